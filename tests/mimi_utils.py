"""Random Mimi weights whose codebooks are drawn from real latents, so codes actually vary."""

from __future__ import annotations

import torch

from openmoshi.codec import Mimi


@torch.no_grad()
def fill_codebooks(mimi: Mimi, wav: torch.Tensor, seed: int = 0) -> None:
    """Set every RVQ level's EMA codebook from the statistics of that level's residual on `wav` [B, 1, T]."""
    gen = torch.Generator().manual_seed(seed)
    latent = mimi.encode_to_latent(wav)  # [B, D, F]
    frames = latent.transpose(1, 2).reshape(-1, latent.shape[1])
    q = mimi.quantizer
    branches = [(q.rvq_first, q.cfg.n_q_semantic), (q.rvq_rest, q.cfg.n_q - q.cfg.n_q_semantic)]
    for branch, levels in branches:
        residual = frames @ branch.input_proj.weight[:, :, 0].T
        for level in range(levels):
            book = branch.vq.layers[level]._codebook
            bins = book.embedding_sum.shape[0]
            # Random codewords at half the residual's scale: every level takes a real but small share of
            # the residual, so residuals stay large and the nearest codeword wins by a wide margin.
            words = torch.randn(bins, residual.shape[1], generator=gen) * residual.std(dim=0) * 0.5
            words = words + residual.mean(dim=0)
            words = _widen_margins(residual, words)
            usage = torch.rand(bins, generator=gen) + 0.5
            book.embedding_sum.copy_(words * usage[:, None])
            book.cluster_usage.copy_(usage)
            book._initialized.fill_(1)
            nearest = torch.cdist(residual, words).argmin(dim=1)
            residual = residual - words[nearest]


def _widen_margins(residual: torch.Tensor, words: torch.Tensor, rel_gap: float = 1e-3,
                   passes: int = 20) -> torch.Tensor:
    """Push away runner-up codewords that nearly tie with the nearest one for some frame of `residual`.

    Random codewords occasionally sit at almost the same distance from a frame (a relative gap of 1e-6 was
    seen); then float rounding that differs between two exact computations of the same latent (one pass
    vs chunked streaming, or two CPUs) flips the code. Tests compare codes exactly, so the codebooks they
    build must not hold such ties for the audio they encode.
    """
    words = words.clone()
    for _ in range(passes):
        dist = torch.cdist(residual, words)
        best = dist.topk(2, dim=1, largest=False)
        gap = (best.values[:, 1] - best.values[:, 0]) / best.values[:, 0].clamp(min=1e-12)
        close = (gap < rel_gap).nonzero().flatten()
        if len(close) == 0:
            break
        for i in close.tolist():
            j = best.indices[i, 1]
            words[j] += (words[j] - residual[i]) * 4 * rel_gap
    return words
