"""Audio training clips: folders or JSONL manifests of audio files -> random fixed-length 24 kHz mono crops.

Sources: a folder (every audio file below it, any format the audio reader takes), a single audio file, or a
JSONL manifest whose lines hold {"path": ...} (relative to the manifest; moshi-finetune's format, extra keys
ignored). Files are decoded, mixed to mono and resampled once per loader process and kept in memory.

Crops start on codec frame boundaries (so cached teacher features slice exactly), at a position drawn from
the request's own generator: the same request always gives the same crop, in any worker, rank or resume.
Files shorter than the crop are zero-padded; `mask` marks the real samples.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from ..audio.io import AUDIO_EXTENSIONS, load_audio
from ..errors import ConfigError
from .order import ItemRequest, item_generator


def list_audio(sources: list[str | Path]) -> list[Path]:
    """Audio files named by folders, files and .jsonl manifests, in a stable order."""
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        elif path.suffix == ".jsonl" and path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    rel = entry["path"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise ConfigError(f"{path}:{n}: expected a JSON object with a 'path' ({exc})") from exc
                files.append((path.parent / rel) if not Path(rel).is_absolute() else Path(rel))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"training data {path} does not exist (pass folders, audio files or .jsonl manifests)")
    if not files:
        raise ConfigError(f"no audio files found in {[str(s) for s in sources]}")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} audio files of the manifest are missing, e.g. {missing[0]}")
    return files


class AudioClips(torch.utils.data.Dataset):
    """Items {"wav": [1, S], "mask": [1, S], "u": [4] uniforms, "file": i, "start_frame": f} per ItemRequest."""

    def __init__(self, files: list[Path], segment_samples: int, frame_size: int, sample_rate: int, seed: int,
                 cache_items: int = 4096) -> None:
        if segment_samples < frame_size or segment_samples % frame_size:
            raise ConfigError(f"the segment must be a positive multiple of the frame ({frame_size} samples), "
                              f"got {segment_samples}")
        self.files, self.segment, self.frame = files, segment_samples, frame_size
        self.sample_rate, self.seed = sample_rate, seed
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cache_items = cache_items

    def __len__(self) -> int:
        return len(self.files)

    def audio(self, index: int) -> torch.Tensor:
        """Whole file [T] at the training rate (memoised per process)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        wav = load_audio(self.files[index], self.sample_rate).wav[0]
        self._cache[index] = wav
        if len(self._cache) > self._cache_items:
            self._cache.popitem(last=False)
        return wav

    def __getitem__(self, req: ItemRequest) -> dict:
        wav = self.audio(req.index)
        gen = item_generator(self.seed, req.serial)
        frames_total = wav.shape[-1] // self.frame
        frames_crop = self.segment // self.frame
        start = int(torch.randint(0, max(1, frames_total - frames_crop + 1), (1,), generator=gen))
        piece = wav[start * self.frame: start * self.frame + self.segment]
        mask = torch.zeros(self.segment)
        mask[:piece.shape[-1]] = 1.0
        piece = torch.nn.functional.pad(piece, (0, self.segment - piece.shape[-1]))
        return {"wav": piece[None], "mask": mask[None], "u": torch.rand(4, generator=gen),
                "file": req.index, "start_frame": start}


def collate_clips(items: list[dict]) -> dict:
    return {"wav": torch.stack([i["wav"] for i in items]), "mask": torch.stack([i["mask"] for i in items]),
            "u": torch.stack([i["u"] for i in items]),
            "file": torch.tensor([i["file"] for i in items]),
            "start_frame": torch.tensor([i["start_frame"] for i in items])}
