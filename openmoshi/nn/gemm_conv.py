"""Training-time causal convolutions on CPU as a few GEMMs over channels-last memory.

oneDNN's conv backward is slow on SEANet's long, narrow signals (64 channels x 23,040 samples). Stored
time-major ([B, T, C] memory), a causal conv needs no im2col copy: the input rows a tap reads are a
contiguous block of the padded input, so each tap is one matmul into (or from) the output rows.

- stride 1, dilation d: tap j reads rows j * d .. j * d + T of the padded input [L, C_in];
- stride s, dilation 1 (kernel padded on the left with zero taps to m * s): viewed as [L / s, s * C_in],
  tap block j reads rows j .. j + T / s;
- transposed conv of stride s (kernel padded on the right to m * s): output viewed as [T, s * C_out],
  input block j adds to output rows j .. T.

Outputs are [B, C, T] tensors whose memory is [B, T, C] (a transposed view), so the elementwise ops in
between keep that layout and the next conv reads it without a copy. The math equals F.conv1d /
F.conv_transpose1d up to float rounding (other summation orders). Used only when autograd records, on
CPU float32, for signals of at least MIN_ROWS output steps, and in an im2col form ("rows") for very short
signals through large weights; the middle stays with oneDNN, which is as fast there.
OPENMOSHI_GEMM_CONV=0 or `set_enabled(False)` turns it off, e.g. to compare.
"""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F

MIN_ROWS = 1024  # output steps per item from which the tap form beats oneDNN (measured on a 2-core Zen 4)
MIN_WIDTH = 8  # input channels x stride below which a tap's matmul is too thin (e.g. the 1-channel input)
# Short signals through large weights (the 12.5-25 Hz end of SEANet: 48 rows through 8M weights) take the
# im2col form, one matmul per direction, each reading the weight once: ~2x faster than oneDNN's backward.
MAX_SHORT_ROWS = 128  # batch x output steps
MIN_SHORT_WEIGHT = 1 << 20  # weight elements

_enabled = os.environ.get("OPENMOSHI_GEMM_CONV", "1").lower() not in ("0", "false", "no", "off")


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = bool(enabled)


def _usable(x: torch.Tensor, param: torch.Tensor) -> bool:
    return (_enabled and x.device.type == "cpu" and x.dtype == torch.float32 and param.dtype == torch.float32
            and torch.is_grad_enabled() and (x.requires_grad or param.requires_grad))


def _weight_elements(conv: torch.nn.Module) -> int:
    k = conv.kernel_size[0]  # type: ignore[index]
    return conv.in_channels * conv.out_channels * k // conv.groups  # type: ignore[operator]


def conv_form(x: torch.Tensor, conv: torch.nn.Conv1d) -> str | None:
    """"taps" or "rows" when causal_conv1d applies to this conv and is expected to beat oneDNN, else None."""
    stride, dilation = conv.stride[0], conv.dilation[0]
    if conv.groups != 1 or not _usable(x, next(conv.parameters())):
        return None
    steps = x.shape[-1] // stride
    if x.shape[0] * steps <= MAX_SHORT_ROWS and _weight_elements(conv) >= MIN_SHORT_WEIGHT:
        return "rows"
    if steps < MIN_ROWS:
        return None
    if conv.in_channels * stride < MIN_WIDTH:  # e.g. the waveform in: im2col is small, a tap would be thin
        return "rows"
    return "taps" if stride == 1 or dilation == 1 else None


def conv_transpose_form(x: torch.Tensor, convtr: torch.nn.ConvTranspose1d) -> str | None:
    if convtr.groups != 1 or convtr.kernel_size[0] < convtr.stride[0]:
        return None
    if not _usable(x, next(convtr.parameters())):
        return None
    if x.shape[0] * x.shape[-1] <= MAX_SHORT_ROWS and _weight_elements(convtr) >= MIN_SHORT_WEIGHT:
        return "rows"
    return "taps" if x.shape[-1] >= MIN_ROWS else None


def _time_major(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T] -> contiguous [B, T, C] (free when x already has that memory)."""
    x = x.transpose(1, 2)
    return x if x.is_contiguous() else x.contiguous()


def _conv_taps(weight: torch.Tensor, stride: int, dilation: int) -> tuple[torch.Tensor, list[int]]:
    """weight [C_out, C_in, K] -> taps [m, width, C_out] and their row offsets (see the module doc)."""
    c_out, c_in, k = weight.shape
    if stride == 1:
        return weight.permute(2, 1, 0), [j * dilation for j in range(k)]
    m = -(-k // stride)
    w = F.pad(weight, (m * stride - k, 0)).view(c_out, c_in, m, stride)
    return w.permute(2, 3, 1, 0).reshape(m, stride * c_in, c_out), list(range(m))


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride: int, dilation: int, replicate: bool,  # type: ignore[override]
                elu_alpha: float | None):
        batch, c_in, length = x.shape
        c_out, _, k = weight.shape
        lead = (k - 1) * dilation if stride == 1 else (-(-k // stride) - 1) * stride
        padded = x.new_empty(batch, length + lead, c_in)
        if elu_alpha is None:
            padded[:, lead:].copy_(x.transpose(1, 2))
        else:  # the activation before the conv, written straight into the padded copy
            torch._C._nn.elu(x.transpose(1, 2), elu_alpha, 1.0, 1.0, out=padded[:, lead:])
        if replicate:
            padded[:, :lead].copy_(padded[:, lead:lead + 1].expand(batch, lead, c_in))
        else:
            padded[:, :lead].zero_()
        rows = padded.view(batch, -1, stride * c_in)
        taps, offsets = _conv_taps(weight, stride, dilation)
        steps = length // stride
        y = x.new_empty(batch, steps, c_out)
        for b in range(batch):
            out = y[b]
            for j, off in enumerate(offsets):
                if j:
                    out.addmm_(rows[b, off:off + steps], taps[j])
                elif bias is not None:
                    torch.addmm(bias, rows[b, off:off + steps], taps[j], out=out)
                else:
                    torch.mm(rows[b, off:off + steps], taps[j], out=out)
        ctx.save_for_backward(padded, weight)
        ctx.conf = (stride, dilation, lead, replicate, bias is not None, elu_alpha)
        return y.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        padded, weight = ctx.saved_tensors
        stride, dilation, lead, replicate, has_bias, elu_alpha = ctx.conf
        batch, _, c_in = padded.shape
        c_out, _, k = weight.shape
        g = _time_major(grad_y)  # [B, T_out, C_out]
        steps = g.shape[1]
        rows = padded.view(batch, -1, stride * c_in)
        taps, offsets = _conv_taps(weight, stride, dilation)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # The last tap covers every row from its offset on: it writes them, the rows before start at 0.
            grad_rows = torch.empty_like(rows)
            last = offsets[-1]
            grad_rows[:, :last].zero_()
            for b in range(batch):
                torch.mm(g[b], taps[-1].T, out=grad_rows[b, last:last + steps])
                for j, off in enumerate(offsets[:-1]):
                    grad_rows[b, off:off + steps].addmm_(g[b], taps[j].T)
            grad_padded = grad_rows.view(batch, -1, c_in)
            grad_x = grad_padded[:, lead:]
            if replicate and lead:
                grad_x = grad_x.clone()
                grad_x[:, 0] += grad_padded[:, :lead].sum(1)
            if elu_alpha is not None:  # from the activation's output (kept in `padded`) to its input
                grad_x = torch.ops.aten.elu_backward(grad_x, elu_alpha, 1.0, 1.0, True, padded[:, lead:])
            grad_x = grad_x.transpose(1, 2)
        if ctx.needs_input_grad[1]:
            grad_taps = g.new_empty(len(offsets), c_out, stride * c_in)
            for j, off in enumerate(offsets):
                acc = grad_taps[j]
                torch.mm(g[0].T, rows[0, off:off + steps], out=acc)
                for b in range(1, batch):
                    acc.addmm_(g[b].T, rows[b, off:off + steps])
            if stride == 1:
                grad_w = grad_taps.permute(1, 2, 0).contiguous()
            else:
                m = len(offsets)
                grad_w = grad_taps.view(m, c_out, stride, c_in).permute(1, 3, 0, 2)
                grad_w = grad_w.reshape(c_out, c_in, m * stride)[:, :, m * stride - k:].contiguous()
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum((0, 1))
        return grad_x, grad_w, grad_b, None, None, None, None


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1,
                  dilation: int = 1, replicate: bool = False, form: str = "taps",
                  elu_alpha: float | None = None) -> torch.Tensor:
    """F.conv1d(F.pad(x, (K_eff - stride, 0), mode), weight, bias, stride, dilation=dilation) for unpadded
    x [B, C_in, T], T a multiple of stride -> [B, C_out, T / stride] (time-major memory).

    form "taps": one matmul per tap, no im2col (long signals); "rows": im2col and one matmul (short ones).
    elu_alpha: apply F.elu(x, elu_alpha) first (fused into the padding copy in the taps form).
    """
    if form == "taps":
        return _CausalConv.apply(x, weight, bias, stride, dilation, replicate, elu_alpha)
    if elu_alpha is not None:
        x = F.elu(x, elu_alpha)
    batch, c_in, _ = x.shape
    c_out, _, k = weight.shape
    span = (k - 1) * dilation + 1
    x = F.pad(x, (span - stride, 0), mode="replicate" if replicate else "constant")
    cols = x.unfold(2, span, stride)  # [B, C_in, T_out, span]
    if dilation > 1:
        cols = cols[..., ::dilation]
    cols = cols.transpose(1, 2).reshape(-1, c_in * k)
    return F.linear(cols, weight.reshape(c_out, c_in * k), bias).view(batch, -1, c_out).transpose(1, 2)


def _transpose_taps(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """weight [C_in, C_out, K] -> [m, C_in, stride * C_out]."""
    c_in, c_out, k = weight.shape
    m = -(-k // stride)
    w = F.pad(weight, (0, m * stride - k)).view(c_in, c_out, m, stride)
    return w.permute(2, 0, 3, 1).reshape(m, c_in, stride * c_out)


class _CausalConvTranspose(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride: int):  # type: ignore[override]
        batch, _, length = x.shape
        _, c_out, _ = weight.shape
        xt = _time_major(x)  # [B, T, C_in]
        taps = _transpose_taps(weight, stride)
        y = x.new_empty(batch, length, stride * c_out)
        bias_rows = bias.repeat(stride) if bias is not None else None
        for b in range(batch):
            if bias_rows is not None:
                torch.addmm(bias_rows, xt[b], taps[0], out=y[b])
            else:
                torch.mm(xt[b], taps[0], out=y[b])
            for j in range(1, min(taps.shape[0], length)):
                y[b, j:].addmm_(xt[b, :length - j], taps[j])
        ctx.save_for_backward(xt, weight)
        ctx.conf = (stride, bias is not None)
        return y.view(batch, length * stride, c_out).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        xt, weight = ctx.saved_tensors
        stride, has_bias = ctx.conf
        batch, length, c_in = xt.shape
        _, c_out, k = weight.shape
        g = _time_major(grad_y).view(batch, length, stride * c_out)
        taps = _transpose_taps(weight, stride)
        m = min(taps.shape[0], length)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = xt.new_empty(batch, length, c_in)
            for b in range(batch):
                torch.mm(g[b], taps[0].T, out=grad_x[b])
                for j in range(1, m):
                    grad_x[b, :length - j].addmm_(g[b, j:], taps[j].T)
            grad_x = grad_x.transpose(1, 2)
        if ctx.needs_input_grad[1]:
            grad_taps = torch.zeros_like(taps)
            for j in range(m):
                for b in range(batch):
                    grad_taps[j].addmm_(xt[b, :length - j].T, g[b, j:])
            grad_w = grad_taps.view(-1, c_in, stride, c_out).permute(1, 3, 0, 2).reshape(c_in, c_out, -1)
            grad_w = grad_w[:, :, :k].contiguous()
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = g.view(batch, length * stride, c_out).sum((0, 1))
        return grad_x, grad_w, grad_b, None


def causal_conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            stride: int, form: str = "taps") -> torch.Tensor:
    """F.conv_transpose1d(x, weight, bias, stride) trimmed to its first T * stride outputs (the causal
    offline output), kernel size >= stride: x [B, C_in, T] -> [B, C_out, T * stride] (time-major memory).

    form "taps" as for causal_conv1d; "rows": one matmul to the kernel-sized columns, then overlap-add.
    """
    if form == "taps":
        return _CausalConvTranspose.apply(x, weight, bias, stride)
    batch, c_in, length = x.shape
    _, c_out, k = weight.shape
    m = -(-k // stride)
    cols = x.transpose(1, 2).reshape(-1, c_in) @ weight.reshape(c_in, c_out * k)  # [B * T, C_out * K]
    cols = F.pad(cols.view(batch, length, c_out, k), (0, m * stride - k))
    cols = cols.view(batch, length, c_out, m, stride)
    y = cols[:, :, :, 0]
    for j in range(1, min(m, length)):  # block j of input step t lands on output step t + j
        y = y + F.pad(cols[:, :length - j, :, j], (0, 0, 0, 0, j, 0))
    y = y.transpose(2, 3).reshape(batch, length * stride, c_out)
    if bias is not None:
        y = y + bias
    return y.transpose(1, 2)
