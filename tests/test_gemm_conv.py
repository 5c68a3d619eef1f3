"""The training GEMM form of the causal convs (openmoshi.nn.gemm_conv) against torch's convs: values and
gradients of input, weight and bias, for strides, dilations, kernels that are not a multiple of the stride,
both padding modes, and through the streaming conv modules (weight norm included)."""

import pytest
import torch
from torch.nn import functional as F

from openmoshi.nn import gemm_conv
from openmoshi.nn.conv import StreamingConv1d, StreamingConvTranspose1d


def _grads(fn, *tensors):
    out = fn()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    for t in tensors:
        t.grad = None
    out.backward(g)
    return out.detach(), [t.grad.clone() for t in tensors]


def _close(a, b):
    scale = b.abs().max().clamp_min(1e-6)
    assert (a - b).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("form", ["taps", "rows"])
@pytest.mark.parametrize("c_in,c_out,k,stride,dilation,pad_mode,bias", [
    (6, 5, 3, 1, 1, "constant", True), (6, 5, 3, 1, 2, "constant", True), (4, 7, 1, 1, 1, "constant", False),
    (3, 4, 7, 1, 1, "replicate", True), (5, 6, 8, 4, 1, "constant", True), (5, 6, 5, 2, 1, "replicate", True),
    (4, 3, 3, 3, 1, "constant", False), (4, 3, 2, 4, 1, "constant", True),
])
def test_causal_conv_matches_torch(c_in, c_out, k, stride, dilation, pad_mode, bias, form):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, c_in, 24, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(c_out, c_in, k, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(c_out, generator=gen, dtype=torch.float64).requires_grad_() if bias else None
    context = (k - 1) * dilation + 1 - stride
    params = [x, w] + ([b] if bias else [])
    ref = _grads(lambda: F.conv1d(F.pad(x, (context, 0), mode=pad_mode), w, b, stride, 0, dilation), *params)
    replicate = pad_mode == "replicate"
    got = _grads(lambda: gemm_conv.causal_conv1d(x, w, b, stride, dilation, replicate, form), *params)
    _close(got[0], ref[0])
    for a, r in zip(got[1], ref[1]):
        _close(a, r)


@pytest.mark.parametrize("form", ["taps", "rows"])
@pytest.mark.parametrize("c_in,c_out,k,stride,bias", [
    (6, 5, 8, 4, True), (5, 3, 5, 2, False), (4, 4, 4, 4, True), (3, 2, 1, 1, True), (6, 3, 12, 3, True),
])
def test_causal_conv_transpose_matches_torch(c_in, c_out, k, stride, bias, form):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, c_in, 9, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(c_in, c_out, k, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(c_out, generator=gen, dtype=torch.float64).requires_grad_() if bias else None
    params = [x, w] + ([b] if bias else [])
    ref = _grads(lambda: F.conv_transpose1d(x, w, b, stride)[..., :9 * stride], *params)
    got = _grads(lambda: gemm_conv.causal_conv_transpose1d(x, w, b, stride, form), *params)
    _close(got[0], ref[0])
    for a, r in zip(got[1], ref[1]):
        _close(a, r)


@pytest.mark.parametrize("form", ["taps", "rows"])
@pytest.mark.parametrize("transpose", [False, True])
def test_modules_take_the_gemm_form_in_training(monkeypatch, transpose, form):
    """Long float32 signals with autograd go through the GEMM form; results equal the stock path."""
    torch.manual_seed(0)
    if transpose:
        module = StreamingConvTranspose1d(16, 8, 8, stride=4, weight_norm=True)
    else:
        module = StreamingConv1d(16, 8, 3, dilation=2, weight_norm=True)
    x = torch.randn(2, 16, 40, requires_grad=True)
    params = [x] + list(module.parameters())
    monkeypatch.setattr(gemm_conv, "MIN_ROWS", 1_000_000)
    monkeypatch.setattr(gemm_conv, "MAX_SHORT_ROWS", 0)
    ref = _grads(lambda: module(x), *params)
    if form == "taps":
        monkeypatch.setattr(gemm_conv, "MIN_ROWS", 16)
    else:
        monkeypatch.setattr(gemm_conv, "MAX_SHORT_ROWS", 1000)
        monkeypatch.setattr(gemm_conv, "MIN_SHORT_WEIGHT", 1)
    calls = []
    name = "causal_conv_transpose1d" if transpose else "causal_conv1d"
    original = getattr(gemm_conv, name)
    monkeypatch.setattr(gemm_conv, name, lambda *a: calls.append(a[4 if transpose else 6]) or original(*a))
    got = _grads(lambda: module(x), *params)
    assert calls == [form]
    assert got[0].stride(1) == 1  # time-major memory
    _close(got[0], ref[0])
    for a, r in zip(got[1], ref[1]):
        _close(a, r)
    with torch.no_grad():  # inference keeps the stock path
        calls.clear()
        module(x)
        assert not calls


@pytest.mark.parametrize("form", ["taps", "rows"])
@pytest.mark.parametrize("pad_mode,stride", [("constant", 1), ("replicate", 1), ("constant", 2)])
def test_fused_elu_matches_elu_then_conv(form, pad_mode, stride):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 20, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(5, 6, 4, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    ref = _grads(lambda: F.conv1d(F.pad(F.elu(x, 0.5), (4 - stride, 0), mode=pad_mode), w, b, stride), x, w, b)
    got = _grads(lambda: gemm_conv.causal_conv1d(x, w, b, stride, 1, pad_mode == "replicate", form, 0.5),
                 x, w, b)
    _close(got[0], ref[0])
    for a, r in zip(got[1], ref[1]):
        _close(a, r)


def test_seanet_training_pass_equals_the_stock_convs():
    """A small SEANet encoder + decoder (ELUs fused into the convs, GEMM forms) against gemm_conv turned off."""
    from openmoshi.codec.seanet import SeanetConfig, SeanetDecoder, SeanetEncoder
    torch.manual_seed(0)
    cfg = SeanetConfig(dimension=16, n_filters=4, ratios=[4, 2], weight_norm=True)
    enc, dec = SeanetEncoder(cfg), SeanetDecoder(cfg)
    x = torch.randn(2, 1, 8 * 256)
    params = list(enc.parameters()) + list(dec.parameters())
    results = []
    for enabled in (False, True):
        old = gemm_conv.MIN_ROWS
        try:
            gemm_conv.set_enabled(enabled)
            gemm_conv.MIN_ROWS = 64
            results.append(_grads(lambda: dec(enc(x)), *params))
        finally:
            gemm_conv.set_enabled(True)
            gemm_conv.MIN_ROWS = old
    _close(results[1][0], results[0][0])
    for a, r in zip(results[1][1], results[0][1]):
        _close(a, r)
