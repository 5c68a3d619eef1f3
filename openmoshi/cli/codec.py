"""Encode audio to Mimi codes, or decode codes back to audio.

  openmoshi codec encode speech.mp3 speech.safetensors
  openmoshi codec decode speech.safetensors speech.wav

Input audio may be wav, flac, ogg or mp3 at any sample rate and channel count: it is resampled to 24 kHz
and mixed down to mono (the command says so). Codes are stored as a safetensors file with one tensor
`codes` (int64 [1, K, F]) and the metadata needed to decode them to the original length.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from ..audio.io import load_audio, save_wav
from ..checkpoint import read_safetensors, save_safetensors
from ..codec import load_mimi
from ..errors import AudioError, CheckpointError
from .common import add_device_arguments, resolve_device

DEFAULT_CHECKPOINT = "hf://kyutai/moshiko-pytorch-bf16"
CHUNK_FRAMES = 25  # 2 s per streaming call: bounded memory on long files, same result as one pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    enc = sub.add_parser("encode", help="audio file -> codes (.safetensors)",
                         description="Encode an audio file (wav/flac/ogg/mp3, any rate/channels) to Mimi codes.")
    enc.add_argument("input", type=Path, help="audio file to encode")
    enc.add_argument("output", type=Path, help="where to write the codes (.safetensors)")
    enc.add_argument("--num-codebooks", "-k", type=int, default=8, help="RVQ levels to keep (1-32, Moshi uses 8)")
    dec = sub.add_parser("decode", help="codes (.safetensors) -> wav",
                         description="Decode Mimi codes written by `openmoshi codec encode` to a 24 kHz wav.")
    dec.add_argument("input", type=Path, help="codes file from `codec encode`")
    dec.add_argument("output", type=Path, help="wav file to write")
    for child in (enc, dec):
        child.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                           help="Mimi weights: a .safetensors file, a model folder or hf://owner/repo "
                                f"(default {DEFAULT_CHECKPOINT})")
        child.add_argument("--quiet", action="store_true", help="no progress bar")
        add_device_arguments(child, default_dtype="float32")


def run(args: argparse.Namespace) -> int:
    device, _ = resolve_device(args)
    return _encode(args, device) if args.action == "encode" else _decode(args, device)


def _encode(args: argparse.Namespace, device: torch.device) -> int:
    audio = load_audio(args.input)
    for note in audio.notes:
        print(f"{args.input}: {note}")
    mimi = load_mimi(args.checkpoint, num_codebooks=args.num_codebooks, device=device)
    wav = audio.wav.to(device)[None]  # [1, 1, T]
    chunk = CHUNK_FRAMES * mimi.frame_size
    pad = (-wav.shape[-1]) % mimi.frame_size
    wav = torch.nn.functional.pad(wav, (0, pad))
    codes = []
    with torch.inference_mode(), mimi.streaming(1), \
            tqdm(total=wav.shape[-1] / mimi.sample_rate, unit="s", desc="encode", disable=args.quiet,
                 bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]") as bar:
        for start in range(0, wav.shape[-1], chunk):
            piece = wav[..., start:start + chunk]
            codes.append(mimi.encode(piece).cpu())
            bar.update(piece.shape[-1] / mimi.sample_rate)
    all_codes = torch.cat(codes, dim=-1)
    meta = {"sample_rate": str(mimi.sample_rate), "frame_rate": str(mimi.frame_rate),
            "num_samples": str(audio.wav.shape[-1]), "source": str(args.input),
            "checkpoint": str(args.checkpoint)}
    save_safetensors({"codes": all_codes}, args.output, metadata=meta)
    print(f"{args.input} -> {args.output}: {all_codes.shape[-1]} frames x {all_codes.shape[1]} codebooks "
          f"({audio.duration:.2f} s)")
    return 0


def _read_codes(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:
        raise AudioError(f"{path} is not a codes file written by `openmoshi codec encode` ({exc})") from exc
    try:
        codes = read_safetensors(path)["codes"]
    except (KeyError, CheckpointError) as exc:
        raise AudioError(f"{path} has no `codes` tensor; write it with `openmoshi codec encode`") from exc
    if codes.dim() == 2:
        codes = codes[None]
    if codes.dim() != 3 or codes.dtype.is_floating_point:
        raise AudioError(f"{path}: codes must be integers shaped [1, K, F], got {codes.dtype} {tuple(codes.shape)}")
    return codes.long(), meta


def _decode(args: argparse.Namespace, device: torch.device) -> int:
    codes, meta = _read_codes(args.input)
    mimi = load_mimi(args.checkpoint, num_codebooks=codes.shape[1], device=device)
    if codes.min() < 0 or codes.max() >= mimi.cardinality:
        raise AudioError(f"{args.input}: codes outside 0..{mimi.cardinality - 1}")
    pieces = []
    with torch.inference_mode(), mimi.streaming(codes.shape[0]), \
            tqdm(total=codes.shape[-1] / mimi.frame_rate, unit="s", desc="decode", disable=args.quiet,
                 bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]") as bar:
        for start in range(0, codes.shape[-1], CHUNK_FRAMES):
            piece = codes[..., start:start + CHUNK_FRAMES].to(device)
            pieces.append(mimi.decode(piece).cpu())
            bar.update(piece.shape[-1] / mimi.frame_rate)
    wav = torch.cat(pieces, dim=-1)[0]
    if "num_samples" in meta:
        wav = wav[..., : int(meta["num_samples"])]
    save_wav(args.output, wav, mimi.sample_rate)
    print(f"{args.input} -> {args.output}: {wav.shape[-1] / mimi.sample_rate:.2f} s at {mimi.sample_rate} Hz")
    return 0
