"""Where metrics go: RUN/metrics.jsonl, TensorBoard (lazy), wandb (lazy, optional), a tqdm bar on rank 0."""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    return rows


class Monitor:
    """Rank 0 writes; other ranks get a Monitor whose methods do nothing."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, max_steps: int, tensorboard: bool,
                 wandb_project: str, progress: bool, config: dict) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = self.wandb = self.bar = None
        if not enabled:
            return
        # Resuming: drop rows past the checkpoint, which the resumed run writes again.
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1)
            except ImportError:
                logger.info("tensorboard is not installed: no event files (pip install tensorboard)")
        if wandb_project:
            try:
                import wandb
            except ImportError:
                logger.warning("wandb_project is set but wandb is not installed (pip install wandb)")
            else:
                self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config,
                                        name=Path(run_dir).name, resume="allow", id=Path(run_dir).name)
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._t0, self._s0 = time.time(), start_step

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "split": split, "time": round(time.time(), 3), **clean}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self.tb.add_scalar(f"{split}/{k}", v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in clean.items()}, step=step)

    def progress(self, step: int, loss: float | None, throughput: float | None, unit: str) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4g}"
        if throughput is not None:
            post[unit] = f"{throughput:.3g}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
