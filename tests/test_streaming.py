"""Streamed == offline and causality for every streaming module (convs, transformer, Mimi)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mimi_utils import fill_codebooks
from openmoshi.codec import Mimi, mimi_tiny
from openmoshi.nn.conv import StreamingConv1d, StreamingConvTranspose1d
from openmoshi.nn.transformer import CACHE_RESERVE, Transformer, TransformerConfig


def _chunks(total: int, sizes: list[int]):
    start, i = 0, 0
    while start < total:
        size = sizes[i % len(sizes)]
        yield slice(start, min(start + size, total))
        start, i = start + size, i + 1


@pytest.mark.parametrize("kernel,stride,dilation,pad_mode", [
    (7, 1, 1, "constant"), (3, 1, 2, "constant"), (8, 4, 1, "constant"), (4, 2, 1, "replicate"),
    (1, 1, 1, "constant"), (10, 5, 1, "replicate")])
@torch.no_grad()
def test_conv_streamed_equals_offline(kernel, stride, dilation, pad_mode):
    torch.manual_seed(0)
    conv = StreamingConv1d(3, 5, kernel, stride=stride, dilation=dilation, pad_mode=pad_mode)
    x = torch.randn(2, 3, stride * 24)
    offline = conv(x)
    assert offline.shape == (2, 5, 24)
    for sizes in ([1], [2, 5, 3]):
        with conv.streaming(2):
            streamed = torch.cat([conv(x[..., sl]) for sl in _chunks(24, sizes) for sl in
                                  [slice(sl.start * stride, sl.stop * stride)]], dim=-1)
        assert torch.allclose(streamed, offline, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,groups", [(8, 4, 1), (4, 2, 4), (3, 1, 1), (12, 6, 2)])
@torch.no_grad()
def test_conv_transpose_streamed_equals_offline(kernel, stride, groups):
    torch.manual_seed(0)
    convtr = StreamingConvTranspose1d(4, 4, kernel, stride=stride, groups=groups)
    x = torch.randn(3, 4, 17)
    offline = convtr(x)
    assert offline.shape == (3, 4, 17 * stride)
    for sizes in ([1], [3, 1, 4]):
        with convtr.streaming(3):
            streamed = torch.cat([convtr(x[..., sl]) for sl in _chunks(17, sizes)], dim=-1)
        assert torch.allclose(streamed, offline, atol=1e-6)


def _transformer(context: int | None = 12, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64, context=context,
                            layer_scale=0.1, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("sizes", [[1], [3, 2, 7], [CACHE_RESERVE + 5]])
@torch.no_grad()
def test_transformer_streamed_equals_offline_past_context(sizes):
    model = _transformer(context=12)
    x = torch.randn(2, 80, 32)  # far past the 12-step context
    offline = model(x)
    with model.streaming(2):
        streamed = torch.cat([model(x[:, sl]) for sl in _chunks(80, sizes)], dim=1)
    assert torch.allclose(streamed, offline, atol=1e-5)


@torch.no_grad()
def test_transformer_gated_rms_streamed_equals_offline():
    model = _transformer(context=20, norm="rms_norm_f32", gating="silu")
    x = torch.randn(3, 30, 32)
    offline = model(x)
    with model.streaming(3):
        streamed = torch.cat([model(x[:, t:t + 1]) for t in range(30)], dim=1)
    assert torch.allclose(streamed, offline, atol=1e-5)


@torch.no_grad()
def test_transformer_weights_per_step_streamed_equals_offline():
    model = _transformer(context=None, gating="silu", positional_embedding="none", weights_per_step=6,
                         weights_per_step_schedule=[0, 1, 1, 2, 2, 2])
    x = torch.randn(2, 6, 32)
    offline = model(x)
    with model.streaming(2):
        streamed = torch.cat([model(x[:, t:t + 1]) for t in range(6)], dim=1)
        with pytest.raises(RuntimeError):
            model(x[:, :1])  # a 7th step has no weights
    assert torch.allclose(streamed, offline, atol=1e-5)


@torch.no_grad()
def test_transformer_reset_one_item_leaves_others_unchanged():
    model = _transformer(context=8)
    x = torch.randn(2, 20, 32)
    with model.streaming(2):
        first = torch.cat([model(x[:, t:t + 1]) for t in range(10)], dim=1)
        model.reset_streaming(torch.tensor([False, True]))
        second = torch.cat([model(x[:, t:t + 1]) for t in range(10, 20)], dim=1)
    offline = model(x)
    assert torch.allclose(torch.cat([first, second], 1)[0], offline[0], atol=1e-5)
    # Item 1 restarted: it sees x[10:] as a fresh sequence.
    assert torch.allclose(second[1], model(x[1:, 10:])[0], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_mimi() -> Mimi:
    torch.manual_seed(0)
    mimi = Mimi(mimi_tiny()).eval()
    fill_codebooks(mimi, torch.randn(2, 1, 1920 * 10) * 0.1)
    return mimi


@torch.no_grad()
def test_mimi_streamed_equals_offline(tiny_mimi):
    wav = torch.randn(3, 1, 1920 * 12) * 0.1
    latent = tiny_mimi.encode_to_latent(wav)
    codes = tiny_mimi.encode(wav)
    audio = tiny_mimi.decode(codes)
    for enc_sizes, dec_sizes in itertools.product([[1], [2, 3, 1]], [[1], [4, 1]]):
        with tiny_mimi.streaming(3):
            lat = torch.cat([tiny_mimi.encode_to_latent(wav[..., sl.start * 1920: sl.stop * 1920])
                             for sl in _chunks(12, enc_sizes)], dim=-1)
        with tiny_mimi.streaming(3):
            streamed = torch.cat([tiny_mimi.decode(codes[..., sl]) for sl in _chunks(12, dec_sizes)], dim=-1)
        assert torch.allclose(lat, latent, atol=1e-5)
        assert torch.allclose(streamed, audio, atol=1e-5)


@torch.no_grad()
def test_mimi_is_causal(tiny_mimi):
    wav = torch.randn(1, 1, 1920 * 8) * 0.1
    changed = wav.clone()
    changed[..., 1920 * 5:] = torch.randn(1, 1, 1920 * 3)
    a, b = tiny_mimi.encode_to_latent(wav), tiny_mimi.encode_to_latent(changed)
    assert torch.allclose(a[..., :5], b[..., :5], atol=1e-6)
    assert not torch.allclose(a[..., 5:], b[..., 5:])
    codes = torch.randint(0, 2048, (1, 8, 8))
    later = codes.clone()
    later[..., 5:] = torch.randint(0, 2048, (1, 8, 3))
    x, y = tiny_mimi.decode(codes), tiny_mimi.decode(later)
    assert torch.allclose(x[..., : 5 * 1920], y[..., : 5 * 1920], atol=1e-6)
    assert not torch.allclose(x[..., 5 * 1920:], y[..., 5 * 1920:])


@torch.no_grad()
def test_mimi_streaming_rejects_partial_frames(tiny_mimi):
    with tiny_mimi.streaming(1):
        with pytest.raises(ValueError, match="multiple of 1920"):
            tiny_mimi.encode(torch.zeros(1, 1, 1000))
    with pytest.raises(ValueError, match=r"\[B, 1, T\]"):
        tiny_mimi.encode(torch.zeros(1, 2, 1920))


@torch.no_grad()
def test_transformer_item_output_is_independent_of_other_items_history():
    model = _transformer(context=40)
    x = torch.randn(1, 30, 32)

    def run(other_steps: int) -> torch.Tensor:
        with model.streaming(2):
            model.set_active(torch.tensor([False, True]))
            for _ in range(other_steps):  # only item 1 moves: a longer history than item 0's
                model(torch.randn(2, 1, 32))
            model.set_active(None)
            other = torch.randn(2, 1, 32)
            return torch.cat([model(torch.cat([x[:, t:t + 1], other[1:]]))[:1] for t in range(30)], dim=1)

    assert torch.equal(run(0), run(25))  # bit for bit: a server session never depends on the others
