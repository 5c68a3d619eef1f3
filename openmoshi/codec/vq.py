"""EMA vector-quantization codebooks and the residual stack built from them.

Buffers of one residual stack (names and shapes match Kyutai's Mimi checkpoint):

    layers.{i}._codebook.embedding_sum  [bins, dim]  EMA of the sum of the vectors assigned to each codeword
    layers.{i}._codebook.cluster_usage  [bins]       EMA of the number of vectors assigned to each codeword
    layers.{i}._codebook._initialized   [1]          1.0 once k-means has initialised the codebook

    codeword = embedding_sum / cluster_usage.clamp(min=epsilon)

All vectors here are flat: [N, dim] with N = batch * frames; the quantizer does the [B, D, T] reshaping.
"""

from __future__ import annotations

import math
from itertools import islice
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..nn import fast

# torch.cdist computes exact pairwise differences when both sides have at most this many rows and its
# matmul formulation otherwise. We follow the same switch so that codes match it bit for bit.
_CDIST_EXACT_MAX_ROWS = 25


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of every training process (rank order), so codebook updates see the global batch."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _sum_over_processes_(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _sample_rows(samples: torch.Tensor, num: int, generator: torch.Generator | None) -> torch.Tensor:
    """`num` rows of `samples` [N, D]: without replacement when N >= num, with replacement otherwise."""
    n = samples.shape[0]
    device = generator.device if generator is not None else samples.device
    if n >= num:
        idx = torch.randperm(n, generator=generator, device=device)[:num]
    else:
        idx = torch.randint(0, n, (num,), generator=generator, device=device)
    return samples[idx.to(samples.device)]


def nearest_codes(x: torch.Tensor, padded: torch.Tensor, max_norm: float | None = None) -> torch.Tensor:
    """Index of the nearest codeword for each row of x [N, D]; padded is [K, D + 2] = [c, 1, |c|^2].

    One matmul of [-2x, |x|^2, 1] with padded gives |x - c|^2. The |x|^2 term, the clamp and the sqrt do
    not change the ordering mathematically, but they change float rounding and ties, and keeping them
    makes the codes identical to torch.cdist(...).argmin(), i.e. to Kyutai's codes.
    `max_norm` (max |c|) enables a faster matmul for a few rows on CPU, with the same codes.
    """
    x = x.to(padded.dtype).contiguous()
    if x.shape[0] <= _CDIST_EXACT_MAX_ROWS and padded.shape[0] <= _CDIST_EXACT_MAX_ROWS:
        return torch.cdist(x[None], padded[None, :, :-2])[0].argmin(dim=-1)
    x_sq = x.pow(2).sum(-1, keepdim=True)
    x_pad = torch.cat([x.mul(-2), x_sq, torch.ones_like(x_sq)], dim=-1)
    if max_norm is not None and x.shape[0] <= fast.MAX_ROWS and fast.usable(x_pad, padded):
        codes = _unambiguous_nearest(x_pad, x_sq, padded, max_norm)
        if codes is not None:
            return codes
    return (x_pad @ padded.mT).clamp_min_(0).sqrt_().argmin(dim=-1)


def _unambiguous_nearest(x_pad: torch.Tensor, x_sq: torch.Tensor, padded: torch.Tensor,
                         max_norm: float) -> torch.Tensor | None:
    """Codes from the fast (weight-streaming) matmul, or None if rounding could make them differ.

    Any summation order of the K products lands within err = K * 2^-24 * (|x| + max|c|)^2 of the exact
    squared distance. When the nearest codeword beats the second one by more than 8 err in the fast
    product, it is the strict minimum of the reference product too, clamp and sqrt included.
    """
    d2 = fast.rows_times_weight(x_pad, padded)  # [N, K]
    best = d2.topk(2, dim=1, largest=False)
    gap = best.values[:, 1] - best.values[:, 0]
    err = (x_sq[:, 0].sqrt() + max_norm).square_().mul_(padded.shape[1] * 2.0 ** -24 * 1.01)
    if bool((gap > 8 * err).all()):
        return best.indices[:, 0]
    return None


def kmeans(
    samples: torch.Tensor, num_clusters: int, num_iters: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on samples [N, D]; returns means [K, D] and cluster sizes [K] (at least 1).

    Empty clusters are re-seeded from random samples at every iteration.
    """
    means = _sample_rows(samples, num_clusters, generator)
    sizes = torch.ones(num_clusters, dtype=torch.long, device=samples.device)
    for _ in range(num_iters):
        assign = torch.cdist(samples[None], means[None])[0].argmin(dim=-1)
        sizes = torch.bincount(assign, minlength=num_clusters)
        empty = sizes == 0
        sizes = sizes.clamp(min=1)
        sums = torch.zeros_like(means).index_add_(0, assign, samples)
        reseed = _sample_rows(samples, num_clusters, generator)
        means = torch.where(empty[:, None], reseed, sums / sizes[:, None])
    return means, sizes


class EMACodebook(nn.Module):
    """Euclidean codebook of `bins` codewords of size `dim`, learnt by EMA of assignments (not by gradient).

    threshold_usage_ratio: a codeword whose usage falls below this fraction of the uniform usage is dead
        and gets replaced by a random vector of the batch, with usage replaced_usage_ratio * uniform usage.
    check_unused_every: dead codewords are looked for once every this many training steps.
    """

    def __init__(
        self,
        dim: int,
        bins: int,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        threshold_usage_ratio: float = 0.1,
        replaced_usage_ratio: float = 1.0,
        check_unused_every: int = 5,
        kmeans_iters: int = 50,
    ):
        super().__init__()
        self.dim, self.bins, self.decay, self.epsilon = dim, bins, decay, epsilon
        self.threshold_usage_ratio = threshold_usage_ratio
        self.replaced_usage_ratio = replaced_usage_ratio
        self.check_unused_every = check_unused_every
        self.kmeans_iters = kmeans_iters
        self._steps_to_check = check_unused_every
        self._known_initialized = False
        self._cache: tuple | None = None
        self._max_norm: tuple[torch.Tensor, float] | None = None  # (padded it was computed from, max |c|)
        self.register_buffer("_initialized", torch.tensor([False], dtype=torch.float))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._known_initialized = False
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def initialized(self) -> bool:
        # Remembered once true so that steady-state training does not sync with the device every step.
        if not self._known_initialized:
            self._known_initialized = bool(self._initialized.item())
        return self._known_initialized

    def padded(self) -> torch.Tensor:
        """[bins, dim + 2] = [codewords, 1, |codeword|^2], recomputed only when the buffers changed."""
        s, u = self.embedding_sum, self.cluster_usage
        c = self._cache
        # Holding the buffer objects makes the identity check sound; _version catches in-place edits.
        # Inference tensors (a model loaded under torch.inference_mode) have no version counter: they
        # cannot be trained, so only their identity is checked.
        versions = (None if s.is_inference() else s._version, None if u.is_inference() else u._version)
        if c is None or c[0] is not s or c[1] is not u or c[2] != versions:
            padded = s.new_empty(s.shape[0], s.shape[1] + 2)
            words = torch.div(s, u.clamp(min=self.epsilon)[:, None], out=padded[:, :-2])
            padded[:, -2] = 1.0
            torch.sum(words.pow(2), -1, out=padded[:, -1])
            self._cache = c = (s, u, versions, padded)
        return c[3]

    @property
    def codewords(self) -> torch.Tensor:
        """[bins, dim] current codewords."""
        return self.padded()[:, : self.dim]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, dim] -> codes [N] (long)."""
        padded = self.padded()
        max_norm = None
        if fast.usable(x, padded):  # CPU inference: the host-side bound costs no device sync
            if self._max_norm is None or self._max_norm[0] is not padded:
                self._max_norm = (padded, padded[:, -1].max().sqrt().item())
            max_norm = self._max_norm[1]
        return nearest_codes(x, padded, max_norm)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [*] -> codewords [*, dim]."""
        return F.embedding(codes, self.codewords)

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Initialises the codebook by k-means on x [N, dim] and marks it initialised.

        Under torch.distributed, k-means runs on the rows of every process (same generator state on each).
        """
        x = _gather_rows(x)
        means, sizes = kmeans(x.to(self.embedding_sum.dtype), self.bins, self.kmeans_iters, generator)
        self.embedding_sum.copy_(means * sizes[:, None])
        self.cluster_usage.copy_(sizes)
        self._initialized.fill_(1.0)
        self._known_initialized = True

    @torch.no_grad()
    def maybe_replace_dead(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Every check_unused_every calls, replaces dead codewords by rows of x [N, dim].

        Returns the fraction of codewords replaced (0 when no check ran).
        """
        zero = torch.zeros((), device=x.device)
        if not self.initialized:
            return zero
        self._steps_to_check -= 1
        if self._steps_to_check > 0:
            return zero
        self._steps_to_check = self.check_unused_every
        uniform_usage = self.cluster_usage.sum() / self.bins
        dead = self.cluster_usage < self.threshold_usage_ratio * uniform_usage
        new_usage = self.replaced_usage_ratio * uniform_usage
        fresh = _sample_rows(_gather_rows(x).to(self.embedding_sum.dtype), self.bins, generator)
        self.embedding_sum.copy_(torch.where(dead[:, None], new_usage * fresh, self.embedding_sum))
        self.cluster_usage.copy_(torch.where(dead, new_usage, self.cluster_usage))
        return dead.float().mean()

    @torch.no_grad()
    def ema_update(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Moves usage and sums towards this batch's assignments of x [N, dim] to codes [N]."""
        counts = _sum_over_processes_(torch.bincount(codes, minlength=self.bins).to(self.cluster_usage.dtype))
        self.cluster_usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        x = x.to(self.embedding_sum.dtype)
        if not _distributed():  # one pass over the sums instead of four (no zeroed buffer of per-code sums)
            self.embedding_sum.mul_(self.decay).index_add_(0, codes, x, alpha=1 - self.decay)
            return
        sums = _sum_over_processes_(torch.zeros_like(self.embedding_sum).index_add_(0, codes, x))
        self.embedding_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)

    def usage_entropy(self) -> torch.Tensor:
        """Entropy of the usage distribution over that of the uniform one (1 = all codewords equally used)."""
        p = self.cluster_usage / self.cluster_usage.sum()
        return -torch.special.xlogy(p, p).sum() / math.log(self.bins)


class LevelOutput(NamedTuple):
    quantized: torch.Tensor  # [N, dim], forward value = codewords, gradient = identity (straight-through)
    codes: torch.Tensor  # [N]
    commit_loss: torch.Tensor  # scalar
    metrics: dict[str, torch.Tensor]


class VQLevel(nn.Module):
    """One level of the residual stack: a codebook and its training step."""

    def __init__(self, codebook: EMACodebook):
        super().__init__()
        self._codebook = codebook

    def forward(
        self, x: torch.Tensor, may_init: bool = True, generator: torch.Generator | None = None
    ) -> LevelOutput:
        """x [N, dim]. In training: k-means init (if allowed), dead-code replacement, EMA update."""
        book = self._codebook
        flat = x.detach()
        if self.training and may_init and not book.initialized:
            book.kmeans_init(flat, generator)
        codes = book.encode(flat)
        quantized = book.decode(codes)
        metrics: dict[str, torch.Tensor] = {}
        if not self.training:
            return LevelOutput(quantized, codes, torch.zeros((), device=x.device), metrics)
        # Replacement sees the codes of the codebook before it, like the EMA update that follows.
        metrics["rvq_expired"] = book.maybe_replace_dead(flat, generator)
        book.ema_update(flat, codes)
        if book.initialized:
            metrics["rvq_entropy"] = book.usage_entropy()
        quantized = x + (quantized - x).detach()
        commit_loss = F.mse_loss(x, quantized.detach())
        return LevelOutput(quantized, codes, commit_loss, metrics)


class StackOutput(NamedTuple):
    quantized: torch.Tensor  # [N, dim]
    codes: torch.Tensor  # [n_q, N]
    commit_losses: torch.Tensor  # [n_q]
    metrics: list[dict[str, torch.Tensor]]  # one dict per level used


class ResidualVQ(nn.Module):
    """Residual stack: level i quantizes what levels < i left over."""

    def __init__(self, num_levels: int, dim: int, bins: int, **codebook_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            VQLevel(EMACodebook(dim, bins, **codebook_kwargs)) for _ in range(num_levels)
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        """x [N, dim] -> codes [n_q, N]."""
        residual = x.contiguous()
        codes = []
        for level in islice(self.layers, n_q):  # a slice would build a ModuleList per call
            book = level._codebook
            level_codes = book.encode(residual)
            residual = residual - book.decode(level_codes)
            codes.append(level_codes)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [K, N] -> sum of the K levels' codewords [N, dim]."""
        out = self.layers[0]._codebook.decode(codes[0])
        for level, level_codes in zip(islice(self.layers, 1, None), codes[1:]):
            out = out + level._codebook.decode(level_codes)
        return out

    def forward(self, x: torch.Tensor, n_q: int, generator: torch.Generator | None = None) -> StackOutput:
        """Quantizes x [N, dim] with the first n_q levels (training path when self.training)."""
        residual, total = x, torch.zeros((), device=x.device)
        codes, losses, metrics = [], [], []
        # A level may run k-means only if the level before it was initialised before this batch: otherwise
        # it would be fit on residuals of a codebook fit on the same batch, which are close to zero.
        prev_was_initialized = True
        for level in islice(self.layers, n_q):
            was_initialized = level._codebook.initialized if self.training else True
            out = level(residual, may_init=prev_was_initialized, generator=generator)
            prev_was_initialized = was_initialized
            step = out.quantized.detach()
            residual = residual - step
            total = total + step
            codes.append(out.codes)
            losses.append(out.commit_loss)
            metrics.append(out.metrics)
        if self.training:
            # One straight-through estimator over the sum, so the gradient of the output w.r.t. x is exactly 1.
            total = x + (total - x).detach()
        return StackOutput(total, torch.stack(codes), torch.stack(losses), metrics)
