"""Causal 1d convolutions that stream: output chunk by chunk equals one offline pass.

Attribute names (`conv.conv`, `convtr.convtr`) follow Kyutai's checkpoint keys so weights load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations

from . import fast, gemm_conv
from .streaming import StreamingModule, StreamingState, masked_fill_


class _NormConv1d(nn.Module):
    """Holds the conv as `.conv`; weight norm is a training-time option (released weights are plain)."""

    def __init__(self, conv: nn.Conv1d, weight_norm: bool) -> None:
        super().__init__()
        self.conv = parametrizations.weight_norm(conv) if weight_norm else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return fast.conv1d(x, conv.weight, conv.bias, conv.stride[0], conv.dilation[0], conv.groups)

    def causal_gemm(self, x: torch.Tensor, replicate: bool, elu_alpha: float | None) -> torch.Tensor | None:
        """The causally padded conv of unpadded x in its training GEMM form, or None where it does not apply."""
        conv = self.conv
        form = gemm_conv.conv_form(x, conv)
        if form is None:
            return None
        return gemm_conv.causal_conv1d(x, conv.weight, conv.bias, conv.stride[0], conv.dilation[0], replicate,
                                       form, elu_alpha)


class _NormConvTranspose1d(nn.Module):
    def __init__(self, convtr: nn.ConvTranspose1d, weight_norm: bool) -> None:
        super().__init__()
        self.convtr = parametrizations.weight_norm(convtr) if weight_norm else convtr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convtr = self.convtr
        return fast.conv_transpose1d(x, convtr.weight, convtr.bias, convtr.stride[0], convtr.groups)

    def causal_gemm(self, x: torch.Tensor) -> torch.Tensor | None:
        """The offline causal output (last K - stride samples trimmed) in the training GEMM form, or None."""
        convtr = self.convtr
        form = gemm_conv.conv_transpose_form(x, convtr)
        if form is None:
            return None
        return gemm_conv.causal_conv_transpose1d(x, convtr.weight, convtr.bias, convtr.stride[0], form)


@dataclass
class _ConvState(StreamingState):
    previous: torch.Tensor  # [B, C_in, K_eff - S], the input samples the next window still needs
    first: torch.Tensor  # [B] bool, True until the first chunk was seen (for replicate padding)

    def reset(self, mask: torch.Tensor) -> None:
        masked_fill_(self.previous, mask, 0.0)
        self.first.masked_fill_(mask, True)


class StreamingConv1d(StreamingModule):
    """Causal Conv1d. Input [B, C_in, T] with T a multiple of the stride -> [B, C_out, T / stride].

    The left padding is K_eff - stride, zeros (`pad_mode="constant"`) or copies of the first sample
    (`"replicate"`); no right padding, so every output only depends on past and present samples.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, pad_mode: str = "constant",
                 weight_norm: bool = False) -> None:
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode must be 'constant' or 'replicate', got {pad_mode!r}")
        self.pad_mode = pad_mode
        self.conv = _NormConv1d(nn.Conv1d(in_channels, out_channels, kernel_size, stride,
                                          dilation=dilation, groups=groups, bias=bias), weight_norm)
        self.stride = stride
        self.context = (kernel_size - 1) * dilation + 1 - stride

    def _init_streaming_state(self, batch_size: int) -> _ConvState:
        weight = self.conv.conv.weight
        previous = torch.zeros(batch_size, self.conv.conv.in_channels, self.context,
                               device=weight.device, dtype=weight.dtype)
        first = torch.ones(batch_size, dtype=torch.bool, device=weight.device)
        return _ConvState(batch_size, weight.device, previous, first)

    def forward(self, x: torch.Tensor, elu_alpha: float | None = None) -> torch.Tensor:
        """elu_alpha: apply F.elu(x, elu_alpha) first (fused into the conv's input copy where it can)."""
        if x.shape[-1] % self.stride:
            raise ValueError(f"conv input length {x.shape[-1]} is not a multiple of the stride {self.stride}")
        state = self._streaming_state
        if state is None:  # offline; while training, long signals take the GEMM form (see gemm_conv)
            y = self.conv.causal_gemm(x, self.pad_mode == "replicate", elu_alpha)
            if y is not None:
                return y
        if elu_alpha is not None:
            x = F.elu(x, elu_alpha)
        if self.context == 0:
            return self.conv(x)
        if state is None:
            x = F.pad(x, (self.context, 0), mode=self.pad_mode)
        else:
            assert isinstance(state, _ConvState)
            previous = state.previous
            if self.pad_mode == "replicate":
                previous = torch.where(state.first.view(-1, 1, 1), x[..., :1], previous)
                state.first.copy_(state.keep_inactive(torch.zeros_like(state.first), state.first))
            x = torch.cat([previous, x], dim=-1)
            state.previous.copy_(state.keep_inactive(x[..., x.shape[-1] - self.context:], state.previous))
        return self.conv(x)


@dataclass
class _ConvTrState(StreamingState):
    partial: torch.Tensor  # [B, C_out, K - S], overlap to add to the next chunk's first outputs

    def reset(self, mask: torch.Tensor) -> None:
        masked_fill_(self.partial, mask, 0.0)


class StreamingConvTranspose1d(StreamingModule):
    """Causal ConvTranspose1d. Input [B, C_in, T] -> [B, C_out, T * stride].

    Offline, the last K - stride outputs (which would need future input) are trimmed; streaming, they are
    kept (without bias) and added to the next chunk.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True, weight_norm: bool = False) -> None:
        super().__init__()
        self.convtr = _NormConvTranspose1d(
            nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias),
            weight_norm)
        self.overlap = kernel_size - stride

    def _init_streaming_state(self, batch_size: int) -> _ConvTrState:
        weight = self.convtr.convtr.weight
        partial = torch.zeros(batch_size, self.convtr.convtr.out_channels, self.overlap,
                              device=weight.device, dtype=weight.dtype)
        return _ConvTrState(batch_size, weight.device, partial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        if state is None:
            y = self.convtr.causal_gemm(x)
            if y is not None:
                return y
        y = self.convtr(x)
        if self.overlap == 0:
            return y
        end = y.shape[-1] - self.overlap
        if state is None:
            return y[..., :end]
        assert isinstance(state, _ConvTrState)
        y[..., :self.overlap] += state.partial
        tail = y[..., end:]
        bias = self.convtr.convtr.bias
        state.partial.copy_(state.keep_inactive(tail if bias is None else tail - bias[:, None], state.partial))
        return y[..., :end]
