"""Input-vs-output spectrogram figures for evaluation samples (matplotlib, imported lazily by callers)."""

from __future__ import annotations

from pathlib import Path

import torch


def spectrogram_pair(wav: torch.Tensor, rec: torch.Tensor, sample_rate: int, path: Path) -> Path:
    """One row per item: log-magnitude spectrogram of the input (left) and of the codec's output (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = wav.shape[0]
    fig, axes = plt.subplots(n, 2, figsize=(10, 2.2 * n), squeeze=False)
    window = torch.hann_window(1024)
    for i in range(n):
        for j, (x, title) in enumerate(((wav[i], "input"), (rec[i], "output"))):
            spec = torch.stft(x.reshape(-1).float(), 1024, 256, 1024, window, return_complex=True).abs()
            db = 20 * spec.clamp_min(1e-5).log10()
            axes[i, j].imshow(db.numpy(), origin="lower", aspect="auto", vmin=float(db.max()) - 80,
                              extent=(0, x.shape[-1] / sample_rate, 0, sample_rate / 2000))
            axes[i, j].set_title(f"item {i} {title}", fontsize=8)
            axes[i, j].set_ylabel("kHz", fontsize=7)
            axes[i, j].tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
