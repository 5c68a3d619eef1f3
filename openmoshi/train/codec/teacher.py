"""Semantic teacher for distillation: WavLM or HuBERT (transformers, optional) features at Mimi's frame rate
(or targets from word alignments, alignment_teacher.py).

    wav 24 kHz [1, F * 1920] -> 16 kHz [1, F * 1280] -> teacher layer L at 50 Hz [4F - 1, D]
        -> average pool (kernel 8, stride 4, non-causal) -> [F, D] at 12.5 Hz, frame f aligned with Mimi's f

Mimi frame f covers 50 Hz teacher frames 4f .. 4f + 3; its pooled feature averages frames 4f - 2 .. 4f + 5,
a window centred on it (edges repeat the first / last frame). Features of whole files are computed once and
cached on disk; training crops start on frame boundaries and slice them.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch.nn import functional as F

from ...audio.io import load_audio, resample
from ...errors import ConfigError

logger = logging.getLogger(__name__)

TEACHER_RATE = 16_000
POOL_KERNEL, POOL_STRIDE, POOL_LEFT = 8, 4, 2


def pool_to_frames(feats: torch.Tensor, num_frames: int) -> torch.Tensor:
    """feats [B, N, D] at 50 Hz -> [B, num_frames, D] at 12.5 Hz, frame f = mean of 50 Hz frames 4f-2 .. 4f+5."""
    needed = POOL_STRIDE * (num_frames - 1) + POOL_KERNEL  # padded length the pooling reads
    x = feats.transpose(1, 2)  # [B, D, N]
    right = needed - POOL_LEFT - x.shape[-1]
    if right < 0:
        x = x[..., :x.shape[-1] + right]
        right = 0
    x = F.pad(x, (POOL_LEFT, right), mode="replicate")
    return F.avg_pool1d(x, POOL_KERNEL, POOL_STRIDE).transpose(1, 2)


class SemanticTeacher:
    """A frozen WavLM / HuBERT model (local folder or Hugging Face id) giving [F, D] features per file."""

    def __init__(self, source: str, layer: int = -1, device: str | torch.device = "cpu",
                 model: torch.nn.Module | None = None) -> None:
        self.source, self.layer, self.device = str(source), layer, torch.device(device)
        if model is None:
            try:
                from transformers import AutoModel
            except ImportError as exc:
                raise ConfigError("distillation needs transformers: pip install transformers") from exc
            try:
                model = AutoModel.from_pretrained(self.source)
            except OSError as exc:
                raise ConfigError(f"cannot load the teacher {self.source!r} ({exc}); pass a local folder "
                                  "holding a WavLM/HuBERT model, or a Hugging Face id when online") from exc
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)

    def key(self) -> str:
        return hashlib.sha1(f"{self.source}|{self.layer}|{self.dim}".encode()).hexdigest()[:12]

    @torch.no_grad()
    def features(self, wav: torch.Tensor, frame_size: int, sample_rate: int) -> torch.Tensor:
        """wav [B, 1, T] at sample_rate -> features [B, ceil(T / frame_size), D] at the codec's frame rate."""
        frames = -(-wav.shape[-1] // frame_size)
        wav = F.pad(wav, (0, frames * frame_size - wav.shape[-1]))
        x = resample(wav[:, 0].float().cpu(), sample_rate, TEACHER_RATE).to(self.device)
        out = self.model(x, output_hidden_states=True)
        hidden = out.hidden_states[self.layer]  # [B, N, D] at 50 Hz
        return pool_to_frames(hidden.float(), frames).cpu()

    def file_features(self, audio: Path, frame_size: int, sample_rate: int) -> torch.Tensor:
        """[F, D] for a whole file, 30 s per teacher call so that memory stays bounded on long files."""
        wav = load_audio(audio, sample_rate).wav[None]  # [1, 1, T]
        chunk = frame_size * 375
        return torch.cat([self.features(wav[..., i:i + chunk], frame_size, sample_rate)[0]
                          for i in range(0, wav.shape[-1], chunk)])


def make_teacher(source: str, layer: int = -1, device: str | torch.device = "cpu", dim: int = 256):
    """`phonemes` / `letters`: targets from the files' word alignments (alignment_teacher.py); anything else:
    a WavLM / HuBERT folder or Hugging Face id."""
    from .alignment_teacher import UNITS, AlignmentTeacher
    if source in UNITS:
        return AlignmentTeacher(source, dim=dim)
    return SemanticTeacher(source, layer, device)


class FeatureCache:
    """Teacher features of whole audio files, stored as .pt files under `root` (one per file and teacher)."""

    def __init__(self, root: Path, teacher, teacher_key: str) -> None:
        self.root, self.teacher, self.teacher_key = Path(root), teacher, teacher_key

    def path(self, audio: Path) -> Path:
        stat = audio.stat()
        digest = hashlib.sha1(f"{audio.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{self.teacher_key}".encode())
        return self.root / f"{digest.hexdigest()[:20]}.pt"

    def get(self, audio: Path, frame_size: int, sample_rate: int) -> torch.Tensor:
        """[F, D] features of the whole file (computed and stored on first use)."""
        path = self.path(audio)
        if path.exists():
            return torch.load(path)
        if self.teacher is None:
            raise ConfigError(f"no cached teacher features for {audio} and no teacher to compute them")
        feats = self.teacher.file_features(audio, frame_size, sample_rate).to(torch.float16)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(feats, tmp)
        tmp.replace(path)
        return feats
