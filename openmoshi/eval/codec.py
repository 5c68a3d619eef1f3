"""Evaluate a codec on audio files: reconstruction metrics, bitrate, codebook usage, teacher cosine."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from ..audio.io import load_audio
from ..codec.loading import load_mimi
from ..data.audio_clips import list_audio
from ..errors import ConfigError
from .codec_metrics import codebook_usage, waveform_metrics

logger = logging.getLogger(__name__)


def evaluate_codec(checkpoint: str | Path, data: list[str | Path], num_codebooks: int = 8,
                   seconds: float = 0.0, teacher: str = "", teacher_layer: int = -1, max_files: int = 0,
                   device: str = "cpu", progress: bool = True, purity_units: str = "",
                   purity_fit: list[str | Path] | None = None) -> dict[str, float]:
    """Mean metrics over the files named by `data` (folders, files, manifests); see codec_metrics for each.
    With `purity_units` (phonemes / letters), the phone purity of codebook 0 (phone_purity.py), its code map fitted
    on `purity_fit` (at most as many files as evaluated) or on the evaluated files themselves."""
    mimi = load_mimi(checkpoint, num_codebooks=num_codebooks, device=device)
    files = list_audio(list(data))[: max_files or None]
    units = None
    if purity_units:
        from ..train.codec.alignment_teacher import AlignmentTeacher
        units = AlignmentTeacher(purity_units)
    unit_pairs: list[tuple[int, str]] = []
    sem = None
    if teacher:
        from ..train.codec.teacher import make_teacher
        proj_path = Path(checkpoint) / "distill_projection.pt"
        if not proj_path.exists():
            raise ConfigError(f"--teacher needs the distillation projection {proj_path} written by training")
        state = torch.load(proj_path)
        proj = torch.nn.Conv1d(state["weight"].shape[1], state["weight"].shape[0], 1)
        proj.load_state_dict(state)
        sem = (make_teacher(teacher, teacher_layer, device, dim=proj.out_channels), proj.to(device).eval())
    sums: dict[str, float] = {}
    all_codes = []
    with torch.no_grad():
        for path in tqdm(files, desc="evaluating", unit="file", disable=not progress):
            wav = load_audio(path, mimi.sample_rate).wav
            if seconds:
                wav = wav[:, : int(seconds * mimi.sample_rate)]
            wav = wav[None].to(device)  # [1, 1, T]
            codes = mimi.encode(wav)
            rec = mimi.decode(codes)[..., : wav.shape[-1]]
            metrics = waveform_metrics(rec.cpu(), wav.cpu(), mimi.sample_rate)
            if sem is not None:
                model, proj = sem
                student = proj(mimi.quantizer.decode(codes[:, :1]))
                target = model.file_features(path, mimi.frame_size, mimi.sample_rate)[None].to(device)
                frames = min(student.shape[-1], target.shape[1])
                cos = F.cosine_similarity(student[..., :frames].transpose(1, 2), target[:, :frames], dim=-1)
                metrics["teacher_cosine"] = float(cos.mean())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            all_codes.append(codes[0].cpu())
            if units is not None:
                unit_pairs += _unit_pairs(units, path, codes[0, 0].tolist(), mimi.frame_size / mimi.sample_rate)
    out = {k: v / len(files) for k, v in sums.items()}
    if units is not None:
        fit_pairs = unit_pairs
        if purity_fit:
            fit_pairs = []
            with torch.no_grad():
                for path in tqdm(list_audio(list(purity_fit))[: len(files)], desc="purity fit", unit="file",
                                 disable=not progress):
                    wav = load_audio(path, mimi.sample_rate).wav[None].to(device)
                    fit_pairs += _unit_pairs(units, path, mimi.encode(wav)[0, 0].tolist(),
                                             mimi.frame_size / mimi.sample_rate)
        from .phone_purity import phone_purity
        out.update(phone_purity(fit_pairs, unit_pairs))
    usage = codebook_usage(torch.cat(all_codes, dim=-1)[None], mimi.cardinality)
    out.update(usage)
    out["bitrate_kbps"] = num_codebooks * math.log2(mimi.cardinality) * mimi.frame_rate / 1000
    out["files"] = float(len(files))
    return out


def _unit_pairs(units, path: Path, codes: list[int], frame_seconds: float) -> list[tuple[int, str]]:
    """(codebook-0 code, dominant unit) of every frame with speech, from the alignments beside `path`."""
    from ..data.format import read_alignments
    from .phone_purity import dominant_units
    words = read_alignments(Path(path).with_suffix(".json"))
    return [(c, u) for c, u in zip(codes, dominant_units(units, words, len(codes), frame_seconds)) if u is not None]
