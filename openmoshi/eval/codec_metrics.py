"""Codec quality metrics on waveforms [B, 1, T] at 24 kHz (reference x, reconstruction x_hat).

    mel_distance   DAC's definition: L1 between log10 mel magnitudes (clamped at 1e-5) plus L1 between mel
                   magnitudes, over windows 32 .. 2048 with 5 .. 320 mel bands, hop window / 4, averaged
    stft_distance  the same over linear STFT magnitudes, windows 2048 and 512
    si_sdr         scale-invariant signal-to-distortion ratio, dB (higher is better)
    l1             mean absolute waveform error
    pesq_wb, stoi  wideband PESQ and STOI at 16 kHz, when the `pesq` / `pystoi` packages are installed
"""

from __future__ import annotations

import logging
import math

import torch
from torch.nn import functional as F

from ..audio.io import resample
from ..train.codec.losses import mel_filterbank

logger = logging.getLogger(__name__)

DAC_WINDOWS = (32, 64, 128, 256, 512, 1024, 2048)
DAC_MELS = (5, 10, 20, 40, 80, 160, 320)


def _mag(x: torch.Tensor, n_fft: int) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1]).float()
    window = torch.hann_window(n_fft, device=x.device)
    return torch.stft(x, n_fft, n_fft // 4, n_fft, window, center=True, return_complex=True).abs()


def _log_and_lin_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.l1_loss(a.clamp_min(1e-5).log10(), b.clamp_min(1e-5).log10()) + F.l1_loss(a, b))


def mel_distance(x_hat: torch.Tensor, x: torch.Tensor, sample_rate: int = 24_000) -> float:
    total = 0.0
    for win, mels in zip(DAC_WINDOWS, DAC_MELS):
        fb = mel_filterbank(win, mels, sample_rate).to(x.device)
        total += float(_log_and_lin_l1(fb @ _mag(x_hat, win), fb @ _mag(x, win)))
    return total / len(DAC_WINDOWS)


def stft_distance(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return sum(float(_log_and_lin_l1(_mag(x_hat, w), _mag(x, w))) for w in (2048, 512)) / 2


def si_sdr(x_hat: torch.Tensor, x: torch.Tensor, eps: float = 1e-8) -> float:
    """Mean over items of the SI-SDR (dB) of x_hat [B, 1, T] against x."""
    x = x.reshape(x.shape[0], -1).double()
    y = x_hat.reshape(x_hat.shape[0], -1).double()
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    scale = (y * x).sum(-1, keepdim=True) / (x.pow(2).sum(-1, keepdim=True) + eps)
    target = scale * x
    noise = y - target
    ratio = target.pow(2).sum(-1) / (noise.pow(2).sum(-1) + eps)
    return float((10 * torch.log10(ratio + eps)).mean())


def l1(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(F.l1_loss(x_hat, x))


def pesq_stoi(x_hat: torch.Tensor, x: torch.Tensor, sample_rate: int = 24_000) -> dict[str, float]:
    """Wideband PESQ and STOI averaged over items, each only if its package is installed."""
    out: dict[str, float] = {}
    ref16 = resample(x.reshape(x.shape[0], -1).float().cpu(), sample_rate, 16_000).numpy()
    deg16 = resample(x_hat.reshape(x_hat.shape[0], -1).float().cpu(), sample_rate, 16_000).numpy()
    try:
        from pesq import pesq
    except ImportError:
        logger.info("pesq is not installed: no PESQ (pip install pesq)")
    else:
        scores = []
        for r, d in zip(ref16, deg16):
            try:
                scores.append(pesq(16_000, r, d, "wb"))
            except Exception as exc:  # e.g. no utterance detected in silence
                logger.info("PESQ skipped an item: %s", exc)
        if scores:
            out["pesq_wb"] = sum(scores) / len(scores)
    try:
        from pystoi import stoi
    except ImportError:
        logger.info("pystoi is not installed: no STOI (pip install pystoi)")
    else:
        out["stoi"] = sum(float(stoi(r, d, 16_000, extended=False)) for r, d in zip(ref16, deg16)) / len(ref16)
    return out


def codebook_usage(codes: torch.Tensor, bins: int) -> dict[str, float]:
    """codes [B, K, F] -> per level: fraction of codewords used and entropy of the code distribution (bits)."""
    out: dict[str, float] = {}
    flat = codes.transpose(0, 1).reshape(codes.shape[1], -1)
    for k, level in enumerate(flat):
        counts = torch.bincount(level, minlength=bins).double()
        p = counts / counts.sum()
        out[f"usage_{k}"] = float((counts > 0).double().mean())
        out[f"entropy_bits_{k}"] = float(-torch.special.xlogy(p, p).sum() / math.log(2))
    return out


def waveform_metrics(x_hat: torch.Tensor, x: torch.Tensor, sample_rate: int = 24_000,
                     perceptual: bool = True) -> dict[str, float]:
    out = {"mel_distance": mel_distance(x_hat, x, sample_rate), "stft_distance": stft_distance(x_hat, x),
           "si_sdr": si_sdr(x_hat, x), "l1": l1(x_hat, x)}
    if perceptual:
        out.update(pesq_stoi(x_hat, x, sample_rate))
    return out
