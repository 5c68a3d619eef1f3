"""Tests for openmoshi.generation.sampling.sample_token: greedy, top-k, top-p, distribution, reference parity."""

from __future__ import annotations

import pytest
import torch

from openmoshi.errors import ConfigError
from openmoshi.generation.sampling import sample_token


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_is_argmax_for_any_leading_shape():
    logits = torch.randn(3, 5, 7, 100, generator=torch.Generator().manual_seed(0))
    for temperature in (0.0, -1.0):
        tokens = sample_token(logits, temperature)
        assert tokens.shape == (3, 5, 7) and tokens.dtype == torch.long
        assert torch.equal(tokens, logits.argmax(-1))
    assert sample_token(logits[0, 0, 0], 0.0).shape == ()


def test_top_k_1_and_tiny_top_p_are_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 1000, generator=gen)
    assert torch.equal(sample_token(logits, 1.5, top_k=1, generator=gen), logits.argmax(-1))
    assert torch.equal(sample_token(logits, 1.5, top_p=1e-9, generator=gen), logits.argmax(-1))


def test_top_k_stays_in_the_top_k():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(200, generator=gen)
    allowed = set(torch.topk(logits, 5).indices.tolist())
    tokens = sample_token(logits.expand(20000, 200), 2.0, top_k=5, generator=gen)
    assert set(tokens.unique().tolist()) == allowed  # never outside, and every one of them drawn


def test_top_p_keeps_the_nucleus_with_renormalised_probabilities():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(40000, 4)
    gen = torch.Generator().manual_seed(3)
    # Mass before each sorted token: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95. With p = 0.7 only the
    # first two stay, renormalised to 0.625 / 0.375.
    tokens = sample_token(logits, 1.0, top_p=0.7, generator=gen)
    counts = torch.bincount(tokens, minlength=4).float()
    assert counts[0] == 0 and counts[2] == 0
    assert _chi_square(counts[[1, 3]], torch.tensor([0.625, 0.375])) < 10.83  # chi2(1) at p = 0.001
    # top_p >= 1 keeps every token.
    every = sample_token(logits, 1.0, top_p=1.0, generator=gen)
    assert set(every.unique().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax(temperature):
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    want = torch.softmax(logits / temperature, -1)
    tokens = sample_token(logits.expand(50000, 4), temperature, generator=torch.Generator().manual_seed(4))
    counts = torch.bincount(tokens, minlength=4).float()
    assert _chi_square(counts, want) < 16.27  # chi2(3) at p = 0.001
    assert (counts / counts.sum() - want).abs().max() < 0.01


def test_generator_makes_draws_reproducible():
    logits = torch.randn(8, 2048, generator=torch.Generator().manual_seed(5))
    draw = lambda seed: sample_token(logits, 0.8, top_k=250, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_no_host_sync():
    # Meta tensors have no data: any .item(), .tolist() or branch on a value raises.
    with pytest.raises(RuntimeError, match="meta"):
        torch.empty(3, device="meta").sum().item()
    logits = torch.empty(2, 1, 1, 2048, device="meta")
    for top_k, top_p in ((250, 0.0), (0, 0.9), (0, 0.0)):
        tokens = sample_token(logits, 0.8, top_k, top_p)
        assert tokens.shape == (2, 1, 1) and tokens.dtype == torch.long


def test_half_precision_logits_and_bad_arguments():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(6))
    a = sample_token(logits.bfloat16(), 0.7, top_k=10, generator=torch.Generator().manual_seed(0))
    b = sample_token(logits.bfloat16().float(), 0.7, top_k=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ConfigError):
        sample_token(logits, 1.0, top_k=-1)
    with pytest.raises(ConfigError):
        sample_token(logits, 1.0, top_p=-0.1)


# ----------------------------------------------------------------------------- parity with the reference

PARITY_CASES = [
    # (leading shape, vocab, temperature, top_k, top_p): Moshi's audio and text defaults, top-p, plain
    ((2, 1, 1), 2048, 0.8, 250, 0.0),
    ((2, 1, 1), 32001, 0.7, 25, 0.0),
    ((3, 4), 500, 1.0, 0, 0.9),
    ((5,), 100, 1.3, 0, 0.0),
    ((4,), 100, 0.9, 1000, 0.0),  # top_k larger than the vocabulary
    ((4,), 100, 0.9, 10, 0.5),  # both set: top_p wins in both implementations
    ((2, 3), 64, 0.0, 5, 0.0),  # greedy
]


@pytest.mark.parametrize("shape,vocab,temperature,top_k,top_p", PARITY_CASES)
def test_same_draws_as_reference(shape, vocab, temperature, top_k, top_p):
    moshi_sampling = pytest.importorskip("moshi.utils.sampling")
    for seed in range(5):
        logits = torch.randn(*shape, vocab, generator=torch.Generator().manual_seed(100 + seed)) * 3
        torch.manual_seed(seed)
        ref = moshi_sampling.sample_token(logits, True, temperature, top_k, top_p)
        torch.manual_seed(seed)
        ours_global = sample_token(logits, temperature, top_k, top_p)
        ours_gen = sample_token(
            logits, temperature, top_k, top_p, generator=torch.Generator().manual_seed(seed)
        )
        assert ref.shape == shape
        assert torch.equal(ours_global, ref)
        assert torch.equal(ours_gen, ref)


def test_same_draws_as_reference_over_a_long_run():
    moshi_sampling = pytest.importorskip("moshi.utils.sampling")
    logits = torch.randn(200, 1, 1, 2048, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(1234)
    ref = torch.stack([moshi_sampling.sample_token(step, True, 0.8, 250) for step in logits])
    gen = torch.Generator().manual_seed(1234)
    ours = torch.stack([sample_token(step, 0.8, 250, generator=gen) for step in logits])
    assert torch.equal(ours, ref)
    assert ref.unique().numel() > 100  # a real spread of tokens, not a degenerate argmax
