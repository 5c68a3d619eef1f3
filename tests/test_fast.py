"""CPU fast paths (openmoshi.nn.fast) compute what the torch ops compute; the quantizer's fast path gives
the very same codes as the exact one; offline SEANet in chunks equals one pass."""

from __future__ import annotations

import pytest
import torch
from mimi_utils import fill_codebooks
from torch.nn import functional as F

from openmoshi.codec import Mimi, mimi_tiny, seanet
from openmoshi.codec.vq import nearest_codes
from openmoshi.nn import fast, rope


@pytest.fixture(params=[False, True], ids=["plain", "packing"])
def packing(request):
    with fast.packing(request.param):
        yield request.param


@pytest.mark.parametrize("batch,c_in,c_out,kernel,stride,dilation,length", [
    (1, 8, 5, 3, 1, 1, 6), (2, 8, 5, 3, 1, 2, 9), (1, 512, 12, 4, 2, 1, 4), (3, 4, 6, 1, 1, 1, 5),
    (1, 4, 6, 1, 2, 1, 8), (4, 6, 3, 7, 1, 1, 10), (2, 16, 8, 16, 8, 1, 40)])
@torch.inference_mode()
def test_conv1d_matches_torch(packing, batch, c_in, c_out, kernel, stride, dilation, length):
    torch.manual_seed(0)
    x, w, b = torch.randn(batch, c_in, length), torch.randn(c_out, c_in, kernel), torch.randn(c_out)
    expected = F.conv1d(x, w, b, stride, 0, dilation)
    out = fast.conv1d(x, w, b, stride, dilation)
    assert out.shape == expected.shape and out.is_contiguous()
    assert (out - expected).abs().max() < 1e-4


@pytest.mark.parametrize("batch,c_in,c_out,kernel,stride,length", [
    (1, 8, 5, 4, 2, 1), (2, 8, 5, 16, 8, 2), (1, 16, 4, 10, 5, 3), (4, 4, 6, 3, 1, 2), (1, 2048, 3, 4, 2, 2)])
@torch.inference_mode()
def test_conv_transpose1d_matches_torch(packing, batch, c_in, c_out, kernel, stride, length):
    torch.manual_seed(0)
    x, w, b = torch.randn(batch, c_in, length), torch.randn(c_in, c_out, kernel), torch.randn(c_out)
    expected = F.conv_transpose1d(x, w, b, stride)
    out = fast.conv_transpose1d(x, w, b, stride)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() < 1e-3


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 2, 64), (2, 3, 64), (5, 7, 64), (1, 2, 2048)])
@torch.inference_mode()
def test_linear_matches_torch(packing, shape):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(48, shape[-1])
    expected = F.linear(x, w)
    for contiguous in (True, False):
        out = fast.linear(x, w, contiguous=contiguous)
        assert out.shape == expected.shape
        assert (out - expected).abs().max() < 1e-4
    assert fast.linear(x, w).is_contiguous()
    assert (fast.linear(x, w, torch.ones(48)) - expected - 1).abs().max() < 1e-4


@pytest.mark.parametrize("kernel", ["pad", "gemv"])
@torch.inference_mode()
def test_single_vector_kernels_match_torch(monkeypatch, kernel):
    monkeypatch.setattr(fast, "_single_vector_forced", kernel)  # as OPENMOSHI_FAST_GEMV=kernel does
    assert fast.single_vector_kernel() == kernel
    torch.manual_seed(0)
    for k in (64, 2048):
        x, w, b = torch.randn(1, 1, k), torch.randn(96, k), torch.randn(96)
        out = fast.linear(x, w, b)
        assert out.shape == (1, 1, 96) and (out - F.linear(x, w, b)).abs().max() < 1e-3


def test_single_vector_kernel_is_measured_once_per_thread_count(monkeypatch):
    monkeypatch.setattr(fast, "_single_vector_forced", "")
    monkeypatch.setattr(fast, "_single_vector", {})
    choice = fast.single_vector_kernel()
    assert choice in ("pad", "gemv") and fast._single_vector == {torch.get_num_threads(): choice}
    assert fast.single_vector_kernel() == choice


def test_cached_weight_copies_follow_in_place_edits():
    torch.manual_seed(0)
    w = torch.randn(4, 2048)  # wide: column blocks at 1-2 rows, packed copy at 3+ rows
    wt = torch.randn(8, 3, 4)
    with torch.inference_mode(), fast.packing():
        for rows in (1, 2, 5):
            x = torch.randn(rows, 2048)
            fast.linear(x, w)
            w.mul_(2)
            assert (fast.linear(x, w) - F.linear(x, w)).abs().max() < 1e-3
        x = torch.randn(1, 8, 3)
        fast.conv_transpose1d(x, wt, None, 2)
        wt.add_(1)
        assert (fast.conv_transpose1d(x, wt, None, 2) - F.conv_transpose1d(x, wt, None, 2)).abs().max() < 1e-4


def test_autograd_and_disabled_paths_are_the_torch_ops():
    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(1, 2, 5)
    out = fast.linear(x, w)
    out.sum().backward()  # the torch op: gradients flow
    assert torch.equal(w.grad, torch.ones(1, 2, 6).flatten(0, 1).T @ x.flatten(0, 1))
    fast.set_enabled(False)
    try:
        with torch.inference_mode():
            assert torch.equal(fast.linear(x, w), F.linear(x, w))
    finally:
        fast.set_enabled(True)


@torch.inference_mode()
def test_complex_rope_is_bit_identical():
    torch.manual_seed(0)
    cos, sin = rope.rope_tables(torch.arange(40)[None] + 7, 64, 10_000.0)
    cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # [B, T, 1, D / 2]
    x = torch.randn(1, 40, 24, 64)[:, :, :16]  # a strided slice, as the query and key heads are
    assert torch.equal(fast.apply_rope(x, cos, sin), rope.apply_rope(x, cos, sin))


def _exact_codes(x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    x_sq = x.pow(2).sum(-1, keepdim=True)
    x_pad = torch.cat([x.mul(-2), x_sq, torch.ones_like(x_sq)], dim=-1)
    return (x_pad @ padded.mT).clamp_min_(0).sqrt_().argmin(dim=-1)


@torch.inference_mode()
def test_fast_nearest_codes_equal_exact_even_near_ties():
    torch.manual_seed(0)
    words = torch.randn(2048, 64)
    words[7] = words[3]  # an exact tie: the first index must win, as in the exact path
    words[11] = words[5] * (1 + 1e-7)  # a near tie, within rounding
    sq = words.pow(2).sum(-1, keepdim=True)
    padded = torch.cat([words, torch.ones_like(sq), sq], dim=-1)
    max_norm = sq.max().sqrt().item()
    x = torch.cat([torch.randn(200, 64), words[[3, 5, 7, 11]] + 1e-4 * torch.randn(4, 64),
                   (words[3] + words[9]) / 2 + torch.zeros(1, 64)])
    for rows in (1, 2, 3, 16):
        for start in range(0, x.shape[0] - rows, rows):
            chunk = x[start:start + rows]
            assert torch.equal(nearest_codes(chunk, padded, max_norm), _exact_codes(chunk, padded))
    assert nearest_codes(words[3:4] * 1.0, padded, max_norm).item() == 3


@torch.inference_mode()
def test_offline_seanet_in_chunks_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    mimi = Mimi(mimi_tiny()).eval()
    fill_codebooks(mimi, torch.randn(1, 1, 1920 * 4) * 0.1)
    wav = torch.randn(2, 1, 1920 * 9) * 0.1
    monkeypatch.setattr(seanet, "OFFLINE_CHUNK_STEPS", 4)  # 2 frames per chunk at batch 2
    latent = mimi.encode_to_latent(wav)
    audio = mimi.decode(mimi.encode(wav))
    monkeypatch.setattr(seanet, "OFFLINE_CHUNK_STEPS", 10_000)  # one pass
    assert (mimi.encode_to_latent(wav) - latent).abs().max() < 1e-5
    assert (mimi.decode(mimi.encode(wav)) - audio).abs().max() < 1e-5


def test_mimi_loaded_in_place_under_inference_mode_drops_stale_weight_copies():
    torch.manual_seed(0)
    codes = torch.randint(0, 2048, (1, 8, 3))
    with torch.inference_mode():
        first, second = Mimi(mimi_tiny()).eval(), Mimi(mimi_tiny()).eval()
        first.decode(codes)  # builds the fast paths' weight copies of `first`
        first.load_state_dict(second.state_dict())  # in place: inference tensors have no version counter
        assert (first.decode(codes) - second.decode(codes)).abs().max() < 1e-6
