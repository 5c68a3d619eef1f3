"""Atomic, resumable training checkpoints: RUN/checkpoints/step_NNNNNNNN.pt (+ .json config beside).

A checkpoint is one torch file holding everything a run needs to continue exactly as if it had never
stopped: models, weight EMAs, every optimizer and scheduler, the task's own state, the RNG states of every
process (torch, CUDA, numpy, python), the data cursor and the step. It is written to a temporary file,
flushed to disk and renamed, so a crash (even kill -9 mid-write) leaves either the old set or the new one;
leftover temporary files are ignored and removed. Only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")
# Test hook: when set to a step number, the writer of that step's checkpoint writes half of the file and then
# kills its own process with SIGKILL, as a power cut in the middle of a checkpoint write would.
KILL_DURING_WRITE_ENV = "OPENMOSHI_TEST_KILL_DURING_CHECKPOINT"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path, step: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if step is not None and os.environ.get(KILL_DURING_WRITE_ENV) == str(step):
        with open(tmp, "r+b") as handle:
            handle.truncate(tmp.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Checkpointer:
    """Saves and finds the checkpoints of one run folder."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def paths(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.paths()
        return found[-1] if found else None

    def save(self, state: dict[str, Any], step: int, config_json: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob("*.tmp"):  # a crash left it; never a valid checkpoint
            tmp.unlink(missing_ok=True)
        path = self.dir / f"step_{step:08d}.pt"
        config_path = path.with_suffix(".json")
        tmp_cfg = config_path.with_name(config_path.name + ".tmp")
        tmp_cfg.write_text(config_json)
        os.replace(tmp_cfg, config_path)
        atomic_torch_save(state, path, step)
        for old_step, old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
            logger.debug("removed old checkpoint of step %d", old_step)
        return path

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        try:
            # mmap: tensors are read from the file as they are used, not all copied into memory first
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read training checkpoint {path} ({exc}); delete it to resume from "
                                  "the previous one") from exc
