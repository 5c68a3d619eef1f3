"""Shared fixtures: real speech (shared utterances, espeak-ng voices) and small helpers."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
SPEECH_DIR = REPO.parent / "shared" / "data" / "speech"
SAMPLE_RATE = 24_000


def _resample_np(data: np.ndarray, sr: int) -> np.ndarray:
    from openmoshi.audio.io import resample
    return resample(torch.from_numpy(data).float()[None], sr, SAMPLE_RATE)[0].numpy()


def synthesize(text: str, voice: str, path: Path) -> Path:
    """Speak `text` with espeak-ng into a 24 kHz mono wav at `path`."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (.ci/run installs it)")
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), text], check=True, capture_output=True)
    data, sr = sf.read(raw, dtype="float32")
    sf.write(path, _resample_np(data, sr), SAMPLE_RATE)
    raw.unlink()
    return path


@pytest.fixture(scope="session")
def speech_files(tmp_path_factory) -> list[Path]:
    """Four real 24 kHz utterances: the shared ones, else espeak-ng voices."""
    files = sorted(SPEECH_DIR.glob("utt*.wav"))
    if len(files) >= 4:
        return files[:4]
    out = tmp_path_factory.mktemp("speech")
    lines = [("Hello, how are you today? I wanted to ask you about your plans for the weekend.", "en-us"),
             ("I am fine, thank you. I will probably go hiking in the mountains with friends.", "en-gb+f3"),
             ("Let us talk about the weather. Do you think it will rain on Saturday?", "en-us+m3"),
             ("It is sunny and warm outside, and the forecast says it will stay dry.", "en-gb-x-rp+f1")]
    return [synthesize(text, voice, out / f"utt{i}.wav") for i, (text, voice) in enumerate(lines)]


def read_speech(path: Path, seconds: float | None = None) -> torch.Tensor:
    data, sr = sf.read(path, dtype="float32")
    if data.ndim > 1:
        data = data.mean(axis=1)
    if sr != SAMPLE_RATE:
        data = _resample_np(data, sr)
    wav = torch.from_numpy(np.ascontiguousarray(data))
    if seconds is not None:
        wanted = int(seconds * SAMPLE_RATE)
        if len(wav) < wanted:  # a short utterance is repeated to fill the length asked for
            wav = wav.repeat(-(-wanted // len(wav)))
        wav = wav[:wanted]
    return wav[None]


@pytest.fixture(scope="session")
def speech_batch(speech_files) -> torch.Tensor:
    """[2, 1, 3 s] of two different speakers."""
    return torch.stack([read_speech(speech_files[0], 3.0), read_speech(speech_files[1], 3.0)])


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module's tests (tiny models run fastest so), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def init_preset(folder: Path, preset: str, seed: int) -> Path:
    """A fresh model folder from `openmoshi init --preset`, through the real command."""
    from openmoshi.cli.main import main
    assert main(["init", "--preset", preset, str(folder), "--seed", str(seed)]) == 0
    return folder


def eventually(condition, timeout: float) -> bool:
    """Whether `condition()` becomes true within `timeout` seconds (polled), e.g. a server freeing a closed
    session's slot on its own thread."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
