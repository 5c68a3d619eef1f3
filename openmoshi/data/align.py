"""Word alignment of real recordings into moshi-finetune's format, through a pluggable Whisper aligner.

A stereo file is channel 0 = Moshi (SPEAKER_MAIN) and channel 1 = the user (SPEAKER_USER); each channel is
transcribed on its own. A mono file is transcribed once and labelled SPEAKER_MAIN, as moshi-finetune's
annotate.py does (diarize and split such recordings into two channels first to train on them). Results are
written through a rename; a file whose NAME.json exists is skipped; a file that fails leaves NAME.json.err with
the message and the run goes on.

Aligners (optional extras, imported only when used):
- `whisper-timestamped` (what moshi-finetune uses): DTW on Whisper's cross-attention; `pip install
  whisper-timestamped` (with openai-whisper);
- `faster-whisper`: CTranslate2 Whisper with word timestamps; `pip install faster-whisper`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import OpenMoshiError
from .format import SPEAKER_MAIN, SPEAKER_USER, Word, atomic_write_bytes, write_alignments, write_manifest

logger = logging.getLogger(__name__)

WHISPER_RATE = 16_000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au")


class AlignError(OpenMoshiError):
    """An aligner is missing, its weights cannot be found, or a file cannot be aligned."""


class Aligner(Protocol):
    name: str

    def words(self, audio: np.ndarray) -> list[tuple[str, float, float]]:
        """Words and [start, end] seconds of mono float32 audio at 16 kHz."""


def _whisper_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"


def _offline_hint(model: str) -> str:
    return (f"Whisper weights {model!r} are not on this machine and cannot be downloaded here. On a machine with "
            f"network, fetch them (openai-whisper names: python -c \"import whisper; whisper.load_model('{model}')\" "
            f"fills ~/.cache/whisper; Hugging Face ids: huggingface-cli download {model}), copy them over, and "
            "pass --model /path/to/model.pt (or the folder), or set XDG_CACHE_HOME / HF_HOME to where they are.")


@dataclass
class WhisperSettings:
    """What both Whisper aligners take; defaults are moshi-finetune's annotate.py (beam 5, best of 5,
    temperature fallback 0..1)."""

    model: str = "medium"
    device: str = "cpu"
    language: str | None = "en"
    beam_size: int = 5
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    vad: bool = False


@dataclass
class WhisperTimestampedAligner(WhisperSettings):
    """whisper-timestamped (moshi-finetune's aligner), on openai-whisper weights."""

    name: str = "whisper-timestamped"

    def __post_init__(self) -> None:
        try:
            import whisper
            import whisper_timestamped
        except ImportError as exc:
            raise AlignError("the whisper-timestamped aligner needs `pip install whisper-timestamped "
                             f"openai-whisper` (optional extra openmoshi[align]); missing: {exc.name}") from exc
        self._wt = whisper_timestamped
        path = Path(self.model).expanduser()
        if not path.exists():
            if self.model in whisper.available_models():
                cached = _whisper_cache() / os.path.basename(whisper._MODELS[self.model])
                if not cached.is_file():
                    raise AlignError(_offline_hint(self.model))
                path = cached
            elif "/" not in self.model:
                raise AlignError(f"unknown Whisper model {self.model!r}: give a name among "
                                 f"{', '.join(whisper.available_models())}, a Hugging Face id, or a local path")
        try:
            self._model = whisper_timestamped.load_model(str(path) if path.exists() else self.model,
                                                         device=self.device, download_root=str(_whisper_cache()))
        except (OSError, ValueError, RuntimeError) as exc:
            if path.exists():
                raise AlignError(f"cannot load Whisper weights from {path}: {exc}") from exc
            raise AlignError(_offline_hint(self.model) + f" ({type(exc).__name__}: {exc})") from exc

    def words(self, audio: np.ndarray) -> list[tuple[str, float, float]]:
        temps = self.temperatures if len(self.temperatures) > 1 else self.temperatures[0]
        kwargs = {"language": self.language, "vad": "auditok" if self.vad else False, "verbose": None,
                  "temperature": temps}
        if self.beam_size > 1:
            kwargs.update(beam_size=self.beam_size, best_of=self.beam_size)
        try:
            result = self._wt.transcribe(self._model, audio.astype(np.float32), **kwargs)
        except ValueError as exc:
            if "warping path" not in str(exc):
                raise
            # whisper-timestamped's constrained DTW found no path (more tokens than frames in a segment):
            # fall back to openai-whisper's own word timestamps (unconstrained DTW) for this audio
            logger.warning("whisper-timestamped could not align (%s); using openai-whisper's word timestamps", exc)
            import whisper
            options = {k: v for k, v in kwargs.items() if k in ("language", "temperature", "beam_size", "best_of")}
            result = whisper.transcribe(self._model, audio.astype(np.float32), word_timestamps=True, fp16=False,
                                        verbose=None, **options)
        return [((w.get("text") or w.get("word") or "").strip(), float(w["start"]), float(w["end"]))
                for seg in result.get("segments", []) for w in seg.get("words", [])
                if (w.get("text") or w.get("word") or "").strip()]


def _ct2_hint(model: str) -> str:
    repo = model if "/" in model else f"Systran/faster-whisper-{model}"
    return (f"faster-whisper weights {model!r} are not on this machine and cannot be downloaded here. On a machine "
            f"with network, fetch a CTranslate2 model (huggingface-cli download {repo}, or "
            "convert one with ct2-transformers-converter), copy the folder over (model.bin, config.json, "
            "vocabulary.*, tokenizer.json) and pass --model /path/to/folder, or set HF_HOME to the Hugging Face "
            "cache that holds it.")


@dataclass
class FasterWhisperAligner(WhisperSettings):
    """faster-whisper (CTranslate2), int8 on CPU; weights from a local folder or the Hugging Face cache only."""

    name: str = "faster-whisper"

    def __post_init__(self) -> None:
        try:
            from faster_whisper import WhisperModel
            from faster_whisper.utils import download_model
        except ImportError as exc:
            raise AlignError("the faster-whisper aligner needs `pip install faster-whisper` (optional extra "
                             f"openmoshi[align]); missing: {exc.name}") from exc
        path = Path(self.model).expanduser()
        if path.is_dir():
            folder = path
        elif path.exists() or self.model.startswith((".", "/", "~")):
            raise AlignError(f"{self.model}: faster-whisper needs a CTranslate2 model folder (model.bin, "
                             "config.json, vocabulary.*, tokenizer.json)"
                             + ("" if path.exists() else "; no such folder"))
        else:
            try:  # a name (medium) or a Hugging Face id, from the cache only
                folder = Path(download_model(self.model, local_files_only=True))
            except ValueError as exc:  # an unknown size name, or a malformed id
                raise AlignError(f"unknown faster-whisper model {self.model!r}: {exc}") from exc
            except OSError as exc:  # not in the cache (huggingface_hub's LocalEntryNotFoundError)
                raise AlignError(_ct2_hint(self.model)) from exc
        # without tokenizer.json faster-whisper fetches openai/whisper-tiny's from the network (retrying ~25 s
        # offline, local_files_only notwithstanding): name the missing file instead
        missing = [name for name in ("model.bin", "config.json", "tokenizer.json") if not (folder / name).is_file()]
        if missing:
            raise AlignError(f"{folder} is not a complete faster-whisper model folder: missing {', '.join(missing)} "
                             "(copy them from the model's Hugging Face repository, e.g. Systran/faster-whisper-medium)")
        compute = "int8" if self.device == "cpu" else "float16"
        try:
            self._model = WhisperModel(str(folder), device=self.device, compute_type=compute, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise AlignError(f"cannot load faster-whisper weights from {folder}: {type(exc).__name__}: {exc}") from exc
        if self.language and self.language not in self._model.supported_languages:  # else every file fails
            raise AlignError(f"language {self.language!r} is not one of this model's: "
                             f"{', '.join(self._model.supported_languages)}")

    def words(self, audio: np.ndarray) -> list[tuple[str, float, float]]:
        segments, _ = self._model.transcribe(audio.astype(np.float32), language=self.language,
                                             beam_size=self.beam_size, temperature=list(self.temperatures),
                                             word_timestamps=True, vad_filter=self.vad)
        return [(w.word.strip(), float(w.start), float(w.end)) for seg in segments for w in (seg.words or [])
                if w.word.strip()]


ALIGNERS: dict[str, type] = {"whisper-timestamped": WhisperTimestampedAligner,
                             "faster-whisper": FasterWhisperAligner}


def make_aligner(kind: str, **kwargs) -> Aligner:
    if kind not in ALIGNERS:
        raise AlignError(f"unknown aligner {kind!r}; choose from {', '.join(ALIGNERS)}")
    return ALIGNERS[kind](**kwargs)


def _to_16k(channel: np.ndarray, rate: int) -> np.ndarray:
    if rate == WHISPER_RATE:
        return channel.astype(np.float32)
    import torch

    from ..audio.io import resample
    return resample(torch.from_numpy(np.ascontiguousarray(channel, dtype=np.float32))[None], rate,
                    WHISPER_RATE)[0].numpy()


def align_file(path: Path, aligner: Aligner, main_only: bool = False) -> tuple[list[Word], float]:
    """Words of one recording (see the module doc for channels) and its duration in seconds."""
    import soundfile
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise AlignError(f"cannot read {path.name}: {exc}") from exc
    if data.shape[0] == 0:
        raise AlignError(f"{path.name} is empty")
    if data.shape[1] > 2:
        raise AlignError(f"{path.name} has {data.shape[1]} channels; expected mono or stereo (0 = Moshi, 1 = user)")
    speakers = [SPEAKER_MAIN, SPEAKER_USER][:1 if main_only else data.shape[1]]
    words = []
    for channel, speaker in enumerate(speakers):
        audio = data[:, channel]
        if float(np.max(np.abs(audio))) < 1e-4:
            continue  # a silent channel: no words (Whisper would invent some)
        duration = data.shape[0] / rate  # Whisper works on 30 s windows: drop times past the end of the audio
        words += [Word(t, s, min(e, duration), speaker) for t, s, e in aligner.words(_to_16k(audio, rate))
                  if e >= s and s < duration]
    return words, data.shape[0] / rate


def audio_files(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise AlignError(f"{root}: no such folder or file")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def align_folder(root: Path, aligner: Aligner, overwrite: bool = False, main_only: bool = False,
                 manifest: str = "data.jsonl", progress: Callable[[Path], object] | None = None) -> dict:
    """Align every audio file under `root`: NAME.json beside NAME.wav, NAME.json.err on failure, and a manifest
    `root/data.jsonl` of the files aligned so far."""
    root = Path(root)
    files = audio_files(root)
    if not files:
        raise AlignError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    counts = {"aligned": 0, "skipped": 0, "failed": 0}
    for path in files:
        target, err = path.with_suffix(".json"), path.with_suffix(".json.err")
        if target.is_file() and not overwrite:
            counts["skipped"] += 1
        else:
            try:
                words, duration = align_file(path, aligner, main_only)
                write_alignments(target, words, extra={"meta": {"aligner": aligner.name,
                                                                "duration": round(duration, 4)}})
                err.unlink(missing_ok=True)
                counts["aligned"] += 1
            except Exception as exc:  # noqa: BLE001  (one bad file must not stop a long run: record it, go on)
                logger.warning("%s: %s", path, exc)
                atomic_write_bytes(err, f"{type(exc).__name__}: {exc}\n".encode())
                counts["failed"] += 1
        if progress:
            progress(path)
    if root.is_dir():
        import soundfile
        entries = [(str(p.relative_to(root)), soundfile.info(str(p)).duration) for p in files
                   if p.with_suffix(".json").is_file()]
        write_manifest(root / manifest, entries)
        counts["manifest"] = str(root / manifest)
    return counts
