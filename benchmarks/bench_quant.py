"""int8 / int4 weights on CPU: speed and quality against fp32, on the same weights, in one process.

    python benchmarks/bench_quant.py [--config bench] [--threads 2] [--steps 30] [--batch 1 4]
                                     [--quality-steps 200] [--no-reference] [--no-mimi] [--no-quality]
                                     [--no-speed] [--models int8 int4 int4-asym kv-bf16 kv-int8 int4+kv-int8]

int4 is the symmetric format (one scale per group of 32); int4-asym the 5-bit one (a scale and a zero).
kv-bf16, kv-int8: fp32 weights with the temporal transformer's KV cache in bf16 / int8 (one scale per head and
step); int4+kv-int8: both (what `--quantize int4` runs on CPU by default). `--models` picks some of them.

Speed: median `Generator.step` time (one 80 ms frame) of the LM at fp32, int8 and int4 (ours) and fp32
(Kyutai's reference, moshi==0.2.13), rounds alternating between them; Mimi streaming encode + decode per
frame at fp32 and int8 (its transformers; convolutions stay fp32).

Quality (random weights of the config, Kyutai's init): the fp32 model generates `--quality-steps` frames
greedily; every model is then streamed over that token grid one frame at a time (the hot path: one row per
matmul) and its text and audio logits are compared with fp32's: relative L2 error and the share of positions
where the greedy (argmax) token is the same. Mimi: codes of real speech (or noise) from a streamed encode,
and the log-mel distance of the audio decoded from the fp32 codes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lm import _Session, build_models, time_interleaved

from openmoshi.generation.generator import Generator
from openmoshi.lm.config import PRESETS
from openmoshi.lm.delays import delay_codes
from openmoshi.lm.model import LMModel
from openmoshi.lm.quantized import quantize_lm_

SPEECH = Path("/work/shared/data/speech/utt1.wav")
# name, weight bits (None: fp32), symmetric int4, KV cache of the temporal transformer (nn/kv_cache.py)
VARIANTS = [("int8", 8, True, "float"), ("int4", 4, True, "float"), ("int4-asym", 4, False, "float"),
            ("kv-bf16", None, True, "bf16"), ("kv-int8", None, True, "int8"), ("int4+kv-int8", 4, True, "int8")]
KV_OF: dict[str, str] = {}  # model name -> its KV cache kind


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def bench_lm_speed(models: dict, n_user: int, batches: list[int], steps: int, warmup: int) -> dict:
    out = {}
    for batch in batches:
        sessions = {}
        for name, model in models.items():
            if name == "reference":
                from moshi.models.lm import LMGen
                sessions[name] = _Session(LMGen(model), batch, n_user, seed=batch)
            else:
                sessions[name] = _Session(Generator(model), batch, n_user, seed=batch)
        out[batch] = time_interleaved(sessions, steps, warmup)
    return out


@torch.inference_mode()
def greedy_grid(lm: LMModel, steps: int, seed: int = 0) -> torch.Tensor:
    """Frame-aligned tokens [1, K, T] from a greedy fp32 run (random user audio)."""
    cfg = lm.cfg
    gen = Generator(lm, temp=0, temp_text=0)
    user = torch.randint(0, cfg.card, (1, cfg.n_user, steps + 1), generator=torch.Generator().manual_seed(seed))
    outs = []
    with gen.streaming(1):
        for s in range(steps):
            outs.append(gen.step(user[:, :, s:s + 1] if cfg.n_user else None))
    moshi = torch.cat([o for o in outs if o is not None], dim=2)
    n = moshi.shape[-1]
    return torch.cat([moshi, user[..., 1:n + 1]], dim=1) if cfg.n_user else moshi


@torch.inference_mode()
def streamed_logits(lm: LMModel, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits computed one frame at a time: text [T, text_out], audio [T, dep_q, card]."""
    cfg = lm.cfg
    initial = lm.initial_tokens(1)
    delayed = torch.cat([initial, delay_codes(codes, cfg.delays, initial)], dim=2)
    texts, audios = [], []
    everyone = torch.ones(1, dtype=torch.bool)
    with lm.streaming(1), lm.depformer.streaming(1):
        for t in range(codes.shape[-1]):
            hidden, text = lm.forward_text(delayed[:, :, t:t + 1])
            texts.append(text[0, 0, 0])
            lm.depformer.reset_streaming(everyone)
            audios.append(torch.stack([lm.depth_step(k, hidden, delayed[:, k, t + 1]) [0]
                                       for k in range(cfg.dep_q)]))
    return torch.stack(texts), torch.stack(audios)


def lm_quality(models: dict, steps: int) -> dict:
    base = models["fp32"]
    base.set_kv_cache("float")
    codes = greedy_grid(base, steps)
    base.set_kv_cache("float")
    ref_text, ref_audio = streamed_logits(base, codes)
    skip = base.cfg.max_delay  # the first frames hold delayed (initial) tokens only
    ref_text, ref_audio = ref_text[skip:], ref_audio[skip:]
    out = {}
    for name, model in models.items():
        if name in ("fp32", "reference"):
            continue
        model.set_kv_cache(KV_OF.get(name, "float"))
        text, audio = streamed_logits(model, codes)
        text, audio = text[skip:], audio[skip:]
        out[name] = {
            "text_rel_err": ((text - ref_text).norm() / ref_text.norm()).item(),
            "audio_rel_err": ((audio - ref_audio).norm() / ref_audio.norm()).item(),
            "text_agree": (text.argmax(-1) == ref_text.argmax(-1)).float().mean().item(),
            "audio_agree": (audio.argmax(-1) == ref_audio.argmax(-1)).float().mean().item(),
        }
    return out


def _speech(seconds: float) -> torch.Tensor:
    if SPEECH.is_file():
        import soundfile
        data, sr = soundfile.read(str(SPEECH), dtype="float32")
        if data.ndim > 1:
            data = data.mean(1)
        wav = torch.from_numpy(data)
        if sr != 24000:
            wav = torch.nn.functional.interpolate(wav[None, None], scale_factor=24000 / sr, mode="linear")[0, 0]
        wav = wav[: int(24000 * seconds)]
    else:
        wav = torch.randn(int(24000 * seconds)) * 0.1
    return wav[: wav.numel() // 1920 * 1920][None, None]


def log_mel(wav: torch.Tensor) -> torch.Tensor:
    spec = torch.stft(wav.flatten(), 1024, 256, window=torch.hann_window(1024), return_complex=True).abs() ** 2
    freqs = torch.linspace(0, 12000, spec.shape[0])
    mel = 2595 * torch.log10(1 + freqs / 700)
    edges = torch.linspace(0, mel.max(), 66)
    bank = torch.stack([((mel - lo) / (c - lo)).clamp(0, 1).minimum(((hi - mel) / (hi - c)).clamp(0, 1))
                        for lo, c, hi in zip(edges[:-2], edges[1:-1], edges[2:])])
    return torch.log(bank @ spec + 1e-5)


@torch.inference_mode()
def mimi_bench(threads: int, frames: int, warmup: int) -> dict:
    from bench_mimi import build_models as build_mimi

    from openmoshi.bundle import quantize_mimi_
    fp32, _ = build_mimi(reference=False)
    int8 = copy.deepcopy(fp32)
    quantize_mimi_(int8)
    models = {"fp32": fp32, "int8": int8}
    wav = _speech(6.0)
    codes, audio = {}, {}
    for name, model in models.items():
        with model.streaming(1):
            codes[name] = torch.cat([model.encode(c) for c in wav.split(1920, dim=-1)], dim=-1)
        with model.streaming(1):
            audio[name] = torch.cat([model.decode(codes["fp32"][..., i:i + 1])
                                     for i in range(codes["fp32"].shape[-1])], dim=-1)
    quality = {
        "codes_agree": (codes["int8"] == codes["fp32"]).float().mean().item(),
        "codes_agree_first": (codes["int8"][:, 0] == codes["fp32"][:, 0]).float().mean().item(),
        "mel_l1": (log_mel(audio["int8"]) - log_mel(audio["fp32"])).abs().mean().item(),
        "mel_l1_vs_input": (log_mel(audio["fp32"]) - log_mel(wav[..., :audio["fp32"].shape[-1]])).abs().mean().item(),
    }
    noise = torch.randn(1, 1, 1920 * (frames + warmup), generator=torch.Generator().manual_seed(0)) * 0.1
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        with model.streaming(1):
            for i in range(warmup):
                model.decode(model.encode(noise[..., i * 1920:(i + 1) * 1920]))
    states = {name: model.streaming(1) for name, model in models.items()}
    for state in states.values():
        state.__enter__()
    for i in range(warmup, warmup + frames):  # alternate frame by frame
        for name, model in models.items():
            start = time.perf_counter()
            model.decode(model.encode(noise[..., i * 1920:(i + 1) * 1920]))
            times[name].append((time.perf_counter() - start) * 1000)
    for state in states.values():
        state.__exit__(None, None, None)
    return {"frame_ms": {n: statistics.median(t) for n, t in times.items()}, "quality": quality,
            "bytes": {n: weight_bytes(m) for n, m in models.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bench", choices=sorted(PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--quality-steps", type=int, default=200)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--no-mimi", action="store_true")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--models", nargs="+", choices=[v[0] for v in VARIANTS],
                        help="only these models beside fp32 (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.config]()
    fp32, ref = build_models(cfg, not args.no_reference)
    models: dict = {"fp32": fp32}
    built: dict = {(None, True): fp32}  # quality alone runs one model at a time: KV variants share weights
    for name, bits, symmetric, kv in VARIANTS:
        if args.models and name not in args.models:
            continue
        model = built.get((bits, symmetric)) if args.no_speed else None
        if model is None:
            model = copy.deepcopy(fp32)
            if bits:
                quantize_lm_(model, bits, symmetric=symmetric)
            built[(bits, symmetric)] = model.eval()
        KV_OF[name] = kv
        model.set_kv_cache(kv)
        models[name] = model
    if ref is not None:
        models["reference"] = ref
    print(f"LM config {args.config!r}, {args.threads} threads; weights: " + ", ".join(
        f"{n} {weight_bytes(m) / 1e6:.0f} MB" for n, m in models.items()
        if n != "reference" and KV_OF.get(n, "float") == "float"))
    speed = {} if args.no_speed else bench_lm_speed(models, cfg.n_user, args.batch, args.steps, args.warmup)
    if speed:
        print(f"{'batch':>5} | " + " | ".join(f"{n + ' ms':>14}" for n in models) + " | int8/fp32 | int4/fp32")
    for batch, row in speed.items():
        print(f"{batch:>5} | " + " | ".join(f"{row[n]:14.1f}" for n in models)
              + f" | {row.get('int8', 0) / row['fp32']:9.2f} | {row.get('int4', 0) / row['fp32']:9.2f}")
    if not args.no_quality:
        quality = lm_quality(models, args.quality_steps)
        print(f"LM quality over {args.quality_steps} greedy fp32 frames, streamed (vs fp32):")
        for name, q in quality.items():
            print(f"  {name}: logits rel. error text {q['text_rel_err']:.4f} audio {q['audio_rel_err']:.4f}; "
                  f"same argmax token: text {q['text_agree']:.1%}, audio {q['audio_agree']:.1%}")
    if not args.no_mimi:
        mimi = mimi_bench(args.threads, 50, 5)
        ms = mimi["frame_ms"]
        print(f"Mimi streaming encode + decode per 80 ms frame, batch 1: fp32 {ms['fp32']:.1f} ms, int8 "
              f"{ms['int8']:.1f} ms ({ms['int8'] / ms['fp32']:.2f}x); weights fp32 {mimi['bytes']['fp32'] / 1e6:.0f}"
              f" MB, int8 {mimi['bytes']['int8'] / 1e6:.0f} MB")
        q = mimi["quality"]
        print(f"Mimi int8 vs fp32: codes equal {q['codes_agree']:.1%} (first codebook {q['codes_agree_first']:.1%});"
              f" log-mel L1 of decoded audio {q['mel_l1']:.4f} (fp32 decode vs its input: {q['mel_l1_vs_input']:.3f})")


if __name__ == "__main__":
    main()
