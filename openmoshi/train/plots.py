"""PNG plots of a run's curves (RUN/plots/*.png) from RUN/metrics.jsonl; matplotlib is imported lazily."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

from ..errors import ConfigError
from .monitor import read_metrics

logger = logging.getLogger(__name__)

# Bookkeeping columns that are not curves.
_SKIP = {"step", "split", "time", "lr"}


def plot_run(run_dir: str | Path) -> list[Path]:
    """Writes plots/train.png, plots/eval.png (one panel per metric) and plots/lr.png; returns the files."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ConfigError(f"{run_dir} has no metrics.jsonl rows to plot; is it a training run folder?")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("plots need matplotlib: pip install matplotlib") from exc
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for split in sorted({r.get("split", "train") for r in rows}):
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in rows:
            if r.get("split", "train") != split:
                continue
            for k, v in r.items():
                if k not in _SKIP and isinstance(v, (int, float)) and math.isfinite(v):
                    series[k].append((r["step"], v))
        if not series:
            continue
        names = sorted(series)
        cols = min(4, len(names))
        nrows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            steps, values = zip(*series[name])
            ax.plot(steps, values, marker="." if len(steps) < 30 else None)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(f"{run_dir.name}: {split}")
        fig.tight_layout()
        path = out_dir / f"{split}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
