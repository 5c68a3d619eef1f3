"""Mimi's split residual vector quantizer.

          +-> rvq_first: input_proj -> n_q_semantic levels (semantic, distilled) -> output_proj --+
    x ----+                                                                                      (+)-> out
    [B, 512, T] +-> rvq_rest:  input_proj -> n_q - n_q_semantic levels (acoustic)  -> output_proj --+  [B, 512, T]

Codes are [B, K, T], K = semantic levels first, then acoustic levels. Checkpoint compatible with Kyutai's
`SplitResidualVectorQuantizer` (same state_dict keys, same codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .vq import ResidualVQ, StackOutput


@dataclass
class QuantizerConfig:
    """Split RVQ configuration; defaults are Mimi's."""

    dimension: int = 256  # codebook dimension
    n_q: int = 32  # total levels, semantic included
    bins: int = 2048  # codewords per level
    input_dimension: int = 512
    output_dimension: int = 512
    n_q_semantic: int = 1
    decay: float = 0.99  # EMA decay of the codebooks
    epsilon: float = 1e-5  # usage clamp when turning EMA sums into codewords
    threshold_usage_ratio: float = 0.1  # dead codeword: usage below this fraction of the uniform usage
    replaced_usage_ratio: float = 1.0  # usage given to a replaced codeword, as a fraction of the uniform one
    check_unused_every: int = 5  # training steps between dead-codeword checks
    kmeans_iters: int = 50
    q_dropout: bool = False  # training: draw the number of acoustic levels uniformly in 1..active
    quantization_rate: float = 1.0  # training: probability that a sequence's latent is quantized (paper: 0.5)

    def __post_init__(self) -> None:
        if not 1 <= self.n_q_semantic < self.n_q:
            raise ValueError(
                f"need 1 <= n_q_semantic < n_q, got n_q_semantic={self.n_q_semantic}, n_q={self.n_q}"
            )
        if min(self.dimension, self.bins, self.input_dimension, self.output_dimension) < 1:
            raise ValueError(f"dimensions and bins must be positive: {self}")
        if not 0.0 <= self.quantization_rate <= 1.0:
            raise ValueError(f"quantization_rate must be in [0, 1], got {self.quantization_rate}")


@dataclass
class QuantizedResult:
    x: torch.Tensor  # [B, D_out, T]; in training the gradient reaches the input by straight-through
    codes: torch.Tensor  # [B, K, T] long
    bandwidth: torch.Tensor  # scalar, kbit/s for the levels used
    penalty: torch.Tensor | None = None  # commitment loss, mean over the levels used (0 in eval)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    semantic: torch.Tensor | None = None  # [B, D_out, T], the semantic branch's output alone (distillation)


class ResidualVectorQuantizer(nn.Module):
    """One branch: 1x1 conv in, residual VQ, 1x1 conv out."""

    def __init__(self, cfg: QuantizerConfig, num_levels: int):
        super().__init__()
        self.max_n_q = self.n_q = num_levels
        self.dimension = cfg.dimension
        self.input_proj = nn.Conv1d(cfg.input_dimension, cfg.dimension, 1, bias=False)
        self.output_proj = nn.Conv1d(cfg.dimension, cfg.output_dimension, 1, bias=False)
        self.vq = ResidualVQ(
            num_levels,
            cfg.dimension,
            cfg.bins,
            decay=cfg.decay,
            epsilon=cfg.epsilon,
            threshold_usage_ratio=cfg.threshold_usage_ratio,
            replaced_usage_ratio=cfg.replaced_usage_ratio,
            check_unused_every=cfg.check_unused_every,
            kmeans_iters=cfg.kmeans_iters,
        )

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D_in, T] -> flat latent [B * T, dim]."""
        return self.input_proj(x).transpose(1, 2).reshape(-1, self.dimension)

    def project_out(self, flat: torch.Tensor, batch: int) -> torch.Tensor:
        """flat latent [B * T, dim] -> [B, D_out, T]."""
        return self.output_proj(flat.view(batch, -1, self.dimension).transpose(1, 2).contiguous())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D_in, T] -> codes [B, n_q, T]."""
        batch, _, frames = x.shape
        codes = self.vq.encode(self.project_in(x), self.n_q)  # [n_q, B * T]
        return codes.view(self.n_q, batch, frames).transpose(0, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> [B, D_out, T]."""
        batch, levels, _ = codes.shape
        return self.project_out(self.vq.decode(codes.transpose(0, 1).reshape(levels, -1)), batch)

    def quantize(
        self, x: torch.Tensor, n_q: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, StackOutput]:
        """x [B, D_in, T] -> (flat latent [B * T, dim], stack output on the first n_q levels)."""
        latent = self.project_in(x)
        return latent, self.vq(latent, n_q, generator)


class SplitResidualVectorQuantizer(nn.Module):
    """Semantic RVQ (rvq_first) and acoustic RVQ (rvq_rest) side by side, outputs summed."""

    def __init__(self, cfg: QuantizerConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or QuantizerConfig()
        self.n_q_semantic = cfg.n_q_semantic
        self.rvq_first = ResidualVectorQuantizer(cfg, cfg.n_q_semantic)
        self.rvq_rest = ResidualVectorQuantizer(cfg, cfg.n_q - cfg.n_q_semantic)

    @property
    def total_codebooks(self) -> int:
        return self.rvq_first.max_n_q + self.rvq_rest.max_n_q

    @property
    def num_codebooks(self) -> int:
        """Number of active levels, used by encode and forward."""
        return self.rvq_first.n_q + self.rvq_rest.n_q

    @property
    def cardinality(self) -> int:
        return self.cfg.bins

    def set_num_codebooks(self, n: int) -> None:
        if not self.n_q_semantic <= n <= self.total_codebooks:
            raise ValueError(
                f"number of codebooks must be in [{self.n_q_semantic}, {self.total_codebooks}], got {n}"
            )
        self.rvq_rest.n_q = n - self.n_q_semantic

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.cfg.input_dimension or not x.dtype.is_floating_point:
            raise ValueError(
                f"expected a float latent [B, {self.cfg.input_dimension}, T], got {tuple(x.shape)} {x.dtype}"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D_in, T] float -> codes [B, K, T] long, K = num_codebooks."""
        self._check_input(x)
        with torch.no_grad():
            if x.shape[-1] == 0:
                return torch.empty(x.shape[0], self.num_codebooks, 0, dtype=torch.long, device=x.device)
            codes = self.rvq_first.encode(x)
            if self.rvq_rest.n_q > 0:
                codes = torch.cat([codes, self.rvq_rest.encode(x)], dim=1)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] with 1 <= K <= total_codebooks -> [B, D_out, T] (sum of the first K levels)."""
        if (
            codes.dim() != 3
            or not 1 <= codes.shape[1] <= self.total_codebooks
            or codes.dtype.is_floating_point
        ):
            raise ValueError(
                f"expected integer codes [B, K, T] with 1 <= K <= {self.total_codebooks}, "
                f"got {tuple(codes.shape)} {codes.dtype}"
            )
        out = self.rvq_first.decode(codes[:, : self.n_q_semantic])
        if codes.shape[1] > self.n_q_semantic:
            out = out + self.rvq_rest.decode(codes[:, self.n_q_semantic :])
        return out

    def forward(
        self, x: torch.Tensor, frame_rate: float, generator: torch.Generator | None = None,
        unquantized: torch.Tensor | None = None, n_acoustic: int | None = None,
    ) -> QuantizedResult:
        """Quantizes x [B, D_in, T]; in training mode this is the learning step of the codebooks.

        Training: k-means init, EMA updates and dead-code replacement of the codebooks, straight-through
        output, commitment loss, quantizer dropout (cfg.q_dropout, acoustic levels only) and, with
        probability 1 - cfg.quantization_rate per sequence, the unquantized latent as output.
        `generator` drives all the randomness (default: torch's global RNG). A trainer may make the two
        draws itself: `unquantized` (bool [B], true = pass the latent through) replaces the per-sequence
        quantization-rate draw and `n_acoustic` the dropout draw of the number of acoustic levels.
        """
        self._check_input(x)
        if x.shape[-1] == 0:
            raise ValueError("forward needs at least one frame (T > 0); use encode for empty inputs")
        batch = x.shape[0]
        rng_device = generator.device if generator is not None else x.device
        n_rest = self.rvq_rest.n_q
        if self.training and n_acoustic is not None:
            if not 0 <= n_acoustic <= n_rest:
                raise ValueError(f"n_acoustic must be in 0..{n_rest}, got {n_acoustic}")
            n_rest = n_acoustic
        elif self.training and self.cfg.q_dropout and n_rest > 0:
            n_rest = int(torch.randint(1, n_rest + 1, (1,), generator=generator, device=rng_device).item())
        branches = [(self.rvq_first, self.n_q_semantic)] + ([(self.rvq_rest, n_rest)] if n_rest > 0 else [])
        keep_rows = None  # [B * T, 1], true where the decoder gets the unquantized latent
        if self.training and unquantized is not None:
            keep_rows = unquantized.to(device=x.device, dtype=torch.bool).repeat_interleave(x.shape[-1])[:, None]
        elif self.training and self.cfg.quantization_rate < 1.0:
            draw = torch.rand(batch, generator=generator, device=rng_device).to(x.device)
            # One draw per sequence, shared by both branches: a sequence is either all quantized or not at all.
            keep_rows = (draw >= self.cfg.quantization_rate).repeat_interleave(x.shape[-1])[:, None]

        out, codes, losses, metrics = None, [], [], {}
        sums: dict[str, torch.Tensor] = {}
        level = 0
        semantic = None
        for branch, n_q in branches:
            latent, res = branch.quantize(x, n_q, generator)
            flat = res.quantized if keep_rows is None else torch.where(keep_rows, latent, res.quantized)
            y = branch.project_out(flat, batch)
            semantic = y if semantic is None else semantic
            out = y if out is None else out + y
            codes.append(res.codes.view(n_q, batch, -1).transpose(0, 1))
            losses.append(res.commit_losses)
            for level_metrics in res.metrics:
                for key, value in level_metrics.items():
                    metrics[f"{key}_{level}"] = value
                    sums[key] = sums[key] + value if key in sums else value
                level += 1
        n_used = level
        metrics.update({key: value / n_used for key, value in sums.items()})
        bandwidth = torch.tensor(n_used * math.log2(self.cfg.bins) * frame_rate / 1000, device=x.device)
        return QuantizedResult(
            x=out,
            codes=torch.cat(codes, dim=1),
            bandwidth=bandwidth.to(x.dtype),
            penalty=torch.cat(losses).mean(),
            metrics=metrics,
            semantic=semantic,
        )
