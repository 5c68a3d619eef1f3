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
                   device: str = "cpu", progress: bool = True) -> dict[str, float]:
    """Mean metrics over the files named by `data` (folders, files, manifests); see codec_metrics for each."""
    mimi = load_mimi(checkpoint, num_codebooks=num_codebooks, device=device)
    files = list_audio(list(data))[: max_files or None]
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
    out = {k: v / len(files) for k, v in sums.items()}
    usage = codebook_usage(torch.cat(all_codes, dim=-1)[None], mimi.cardinality)
    out.update(usage)
    out["bitrate_kbps"] = num_codebooks * math.log2(mimi.cardinality) * mimi.frame_rate / 1000
    out["files"] = float(len(files))
    return out
