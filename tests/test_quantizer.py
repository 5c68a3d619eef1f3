import copy
import math

import pytest
import torch

from openmoshi.codec.quantizer import QuantizerConfig, SplitResidualVectorQuantizer
from openmoshi.codec.vq import EMACodebook, ResidualVQ, VQLevel

MIMI = {
    "dimension": 256,
    "n_q": 32,
    "bins": 2048,
    "input_dimension": 512,
    "output_dimension": 512,
    "n_q_semantic": 1,
}
TINY = {
    "dimension": 16,
    "n_q": 4,
    "bins": 32,
    "input_dimension": 24,
    "output_dimension": 20,
    "n_q_semantic": 1,
}


def _filled_state(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The module's state with random initialised EMA codebooks, so that codes actually vary."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if key.endswith("cluster_usage"):
            value = torch.rand(value.shape, generator=g) * 2 + 0.1
        elif key.endswith("embedding_sum"):
            value = torch.randn(value.shape, generator=g) * 0.3
        elif key.endswith("_initialized"):
            value = torch.ones_like(value)
        state[key] = value
    return state


def _reference(kw: dict):
    moshi_quant = pytest.importorskip("moshi.quantization")
    return moshi_quant.SplitResidualVectorQuantizer(**kw)


def _pair(kw: dict):
    torch.manual_seed(0)
    ref = _reference(kw)
    ours = SplitResidualVectorQuantizer(QuantizerConfig(**kw))
    state = _filled_state(ref)
    ref.load_state_dict(state, strict=True)
    ours.load_state_dict(state, strict=True)
    return ref, ours


def test_state_dict_matches_reference_keys_and_shapes():
    ref = _reference(MIMI)
    ours = SplitResidualVectorQuantizer(QuantizerConfig(**MIMI))
    rs, os_ = ref.state_dict(), ours.state_dict()
    assert list(os_) == list(rs)
    assert len(os_) == 2 + 2 + 3 * 32
    for key in rs:
        assert os_[key].shape == rs[key].shape and os_[key].dtype == rs[key].dtype, key
    assert os_["rvq_rest.vq.layers.30._codebook.embedding_sum"].shape == (2048, 256)
    assert os_["rvq_first.input_proj.weight"].shape == (256, 512, 1)
    ref.load_state_dict(os_, strict=True)  # and back the other way


@pytest.fixture(scope="module")
def mimi_pair():
    ref, ours = _pair(MIMI)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("n_q", [1, 8, 32])
def test_codes_and_decode_match_reference(mimi_pair, n_q):
    ref, ours = mimi_pair
    ref.set_num_codebooks(n_q)
    ours.set_num_codebooks(n_q)
    x = torch.randn(3, 512, 50, generator=torch.Generator().manual_seed(1))
    codes = ours.encode(x)
    ref_codes = ref.encode(x)
    assert codes.shape == (3, n_q, 50) and codes.dtype == torch.long
    assert torch.equal(codes, ref_codes)
    assert codes[:, 0].unique().numel() > 50  # the codebooks are really used, not one constant code
    torch.testing.assert_close(ours.decode(codes), ref.decode(ref_codes), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.decode(codes[:, :1]), ref.decode(ref_codes[:, :1]), rtol=0, atol=1e-5)


def test_training_step_matches_reference():
    ref, ours = _pair(TINY)
    ref.train(), ours.train()
    x = torch.randn(3, 24, 10, requires_grad=True)
    a, b = ref(x, 12.5), ours(x, 12.5)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(b.x, a.x)
    torch.testing.assert_close(b.penalty, a.penalty)
    assert b.bandwidth.item() == pytest.approx(4 * 5 * 12.5 / 1000)
    assert sorted(b.metrics) == sorted(a.metrics)
    for key in a.metrics:
        torch.testing.assert_close(b.metrics[key], a.metrics[key])
    rs = ref.state_dict()
    for key, value in ours.state_dict().items():  # EMA updates of every level
        torch.testing.assert_close(value, rs[key])
    (ga,) = torch.autograd.grad(a.x.sum() + a.penalty, x)
    (gb,) = torch.autograd.grad(b.x.sum() + b.penalty, x)
    torch.testing.assert_close(gb, ga)


def _tiny_codebook(usage=(2.0, 1.0, 4.0), **kw) -> EMACodebook:
    """Codewords (0, 0), (2, 0), (0, 2)."""
    book = EMACodebook(dim=2, bins=3, **kw)
    usage = torch.tensor(usage)
    words = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    book.load_state_dict(
        {"_initialized": torch.ones(1), "cluster_usage": usage, "embedding_sum": words * usage[:, None]}
    )
    return book


X_TINY = torch.tensor([[0.1, 0.0], [1.9, 0.2], [0.0, 1.5], [2.2, -0.1]])


def test_level_ema_update_and_commitment_loss_by_hand():
    level = VQLevel(_tiny_codebook(check_unused_every=100)).train()
    x = X_TINY.clone().requires_grad_(True)
    out = level(x)
    assert out.codes.tolist() == [0, 1, 2, 1]
    # mean of squared distances to the chosen codewords: (0.01 + 0.01 + 0.04 + 0.25 + 0.04 + 0.01) / 8
    assert out.commit_loss.item() == pytest.approx(0.045, abs=1e-6)
    torch.testing.assert_close(out.quantized, torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]))
    book = level._codebook
    torch.testing.assert_close(
        book.cluster_usage, torch.tensor([0.99 * 2 + 0.01, 0.99 + 0.02, 0.99 * 4 + 0.01])
    )
    expected_sum = torch.tensor([[0.0, 0.0], [1.98, 0.0], [0.0, 7.92]]) + 0.01 * torch.tensor(
        [[0.1, 0.0], [4.1, 0.1], [0.0, 1.5]]
    )
    torch.testing.assert_close(book.embedding_sum, expected_sum)
    # the codewords used next are the new sums over the new usage (the cache follows the buffers)
    torch.testing.assert_close(book.codewords, expected_sum / book.cluster_usage[:, None])
    # straight-through: d(sum quantized)/dx = 1, and the commitment loss pulls x towards its codeword
    (grad,) = torch.autograd.grad(out.quantized.sum() + out.commit_loss, x)
    torch.testing.assert_close(grad, 1 + 2 * (X_TINY - out.quantized.detach()) / 8)


def test_eval_does_not_touch_codebooks():
    level = VQLevel(_tiny_codebook()).eval()
    before = {k: v.clone() for k, v in level.state_dict().items()}
    out = level(X_TINY)
    assert out.commit_loss.item() == 0.0
    for key, value in level.state_dict().items():
        assert torch.equal(value, before[key])


def test_dead_code_replacement():
    book = _tiny_codebook(usage=(5.0, 5.0, 0.01), check_unused_every=2)  # code 2 is under 0.1 * mean usage
    level = VQLevel(book).train()
    x = torch.tensor([[0.1, 0.0], [1.9, 0.2], [2.2, -0.1], [0.3, 0.1]])
    first = level(x, generator=torch.Generator().manual_seed(0))
    assert first.metrics["rvq_expired"].item() == 0.0  # not checked on the first step
    out = level(x, generator=torch.Generator().manual_seed(0))
    assert out.metrics["rvq_expired"].item() == pytest.approx(1 / 3)
    # code 2 was restarted on a batch vector with the mean usage, then got no assignment from this batch
    new_word = book.codewords[2]
    assert min((new_word - row).abs().max().item() for row in x) < 1e-5
    assert book.codewords[:2].sub(torch.tensor([[0.0, 0.0], [2.0, 0.0]])).abs().max() < 0.05


def test_kmeans_init_on_first_batch_and_only_one_new_level_per_batch():
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    x = (centers[:, None] + 0.1 * torch.randn(3, 20, 2, generator=g)).reshape(-1, 2)
    stack = ResidualVQ(2, dim=2, bins=3, kmeans_iters=10).train()
    assert [lvl._codebook._initialized.item() for lvl in stack.layers] == [0.0, 0.0]
    out = stack(x, n_q=2, generator=torch.Generator().manual_seed(0))
    book = stack.layers[0]._codebook
    assert [lvl._codebook._initialized.item() for lvl in stack.layers] == [1.0, 0.0]
    order = book.codewords[:, 0].argsort().tolist()  # k-means found the 3 centres, 20 points each
    torch.testing.assert_close(book.codewords[order], centers[[1, 2, 0]], atol=0.1, rtol=0)
    torch.testing.assert_close(book.cluster_usage, torch.full((3,), 0.99 * 20 + 0.01 * 20))
    assert out.codes[0].bincount().tolist() == [20, 20, 20]
    stack(x, n_q=2)
    assert [lvl._codebook._initialized.item() for lvl in stack.layers] == [1.0, 1.0]


def test_kmeans_init_is_reproducible_with_a_generator():
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(3))
    states = []
    for _ in range(2):
        book = EMACodebook(dim=4, bins=8)
        book.kmeans_init(x, torch.Generator().manual_seed(7))
        states.append(book.embedding_sum.clone())
    assert torch.equal(states[0], states[1])


def test_quantizer_dropout_draws_acoustic_levels_from_the_generator():
    torch.manual_seed(0)
    model = SplitResidualVectorQuantizer(QuantizerConfig(**TINY, q_dropout=True)).train()
    model.load_state_dict(_filled_state(model))
    x = torch.randn(2, 24, 5)
    seen = set()
    for seed in range(20):
        expected = 1 + int(torch.randint(1, 4, (1,), generator=torch.Generator().manual_seed(seed)))
        res = model(x, 12.5, generator=torch.Generator().manual_seed(seed))
        assert res.codes.shape == (2, expected, 5)
        assert res.bandwidth.item() == pytest.approx(expected * 5 * 12.5 / 1000)
        assert len([k for k in res.metrics if k.startswith("rvq_entropy_")]) == expected
        seen.add(expected)
    assert seen == {2, 3, 4}  # 1 semantic level + 1..3 acoustic levels
    assert model.eval()(x, 12.5).codes.shape[1] == 4  # no dropout at inference


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_quantization_rate(rate):
    torch.manual_seed(0)
    model = SplitResidualVectorQuantizer(QuantizerConfig(**TINY, quantization_rate=rate)).train()
    model.load_state_dict(_filled_state(model))
    frozen = copy.deepcopy(model).eval()  # the codebooks before this training step
    x = torch.randn(2, 24, 5)
    res = model(x, 12.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unquantized = sum(b.output_proj(b.input_proj(x)) for b in (model.rvq_first, model.rvq_rest))
        quantized = frozen.decode(frozen.encode(x))
    torch.testing.assert_close(res.x, unquantized if rate == 0.0 else quantized)
    assert (res.x - quantized).abs().max() > 1e-2 if rate == 0.0 else True
    assert torch.equal(res.codes, frozen.encode(x))  # codes (and codebook learning) either way


def test_quantization_rate_is_drawn_per_sequence():
    torch.manual_seed(0)
    model = SplitResidualVectorQuantizer(QuantizerConfig(**TINY, quantization_rate=0.5)).train()
    model.load_state_dict(_filled_state(model))
    x = torch.randn(64, 24, 3)
    res = model(x, 12.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unquantized = sum(b.output_proj(b.input_proj(x)) for b in (model.rvq_first, model.rvq_rest))
    is_raw = (res.x - unquantized).abs().amax(dim=(1, 2)) < 1e-6
    draw = torch.rand(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(is_raw, draw >= 0.5)
    assert 16 < int(is_raw.sum()) < 48


def test_straight_through_gradient_reaches_the_input():
    torch.manual_seed(0)
    model = SplitResidualVectorQuantizer(QuantizerConfig(**TINY)).train()
    model.load_state_dict(_filled_state(model))
    x = torch.randn(2, 24, 5, requires_grad=True)
    res = model(x, 12.5)
    (grad,) = torch.autograd.grad(res.x.sum(), x)
    # through the straight-through estimator the quantizer is the identity: sum_b W_in_b^T W_out_b^T 1
    expected = sum(
        b.input_proj.weight[:, :, 0].T @ b.output_proj.weight[:, :, 0].T @ torch.ones(20)
        for b in (model.rvq_first, model.rvq_rest)
    )
    torch.testing.assert_close(grad, expected[None, :, None].expand(2, 24, 5))
    (grad_penalty,) = torch.autograd.grad(model(x, 12.5).penalty, x)
    assert grad_penalty.abs().sum() > 0


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SplitResidualVectorQuantizer(QuantizerConfig(**TINY)).eval()
    model.load_state_dict(_filled_state(model, seed=1))
    x = torch.randn(2, 24, 7)
    codes = model.encode(x)
    torch.save(model.state_dict(), tmp_path / "q.pt")
    other = SplitResidualVectorQuantizer(QuantizerConfig(**TINY)).eval()
    other.load_state_dict(_filled_state(other, seed=2))
    assert not torch.equal(other.encode(x), codes)  # fills the codeword cache with the old weights
    other.load_state_dict(torch.load(tmp_path / "q.pt"), strict=True)
    assert torch.equal(other.encode(x), codes)  # the cache was refreshed by the load
    torch.testing.assert_close(other.decode(codes), model.decode(codes), rtol=0, atol=0)


def test_api_and_errors():
    model = SplitResidualVectorQuantizer(QuantizerConfig(**TINY))
    assert (model.total_codebooks, model.num_codebooks, model.cardinality) == (4, 4, 32)
    model.set_num_codebooks(2)
    assert model.num_codebooks == 2 and model.encode(torch.randn(1, 24, 3)).shape == (1, 2, 3)
    assert model.encode(torch.randn(1, 24, 0)).shape == (1, 2, 0)
    with pytest.raises(ValueError):
        model.set_num_codebooks(0)
    with pytest.raises(ValueError):
        model.encode(torch.randn(1, 23, 3))
    with pytest.raises(ValueError):
        model.decode(torch.zeros(1, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        model(torch.randn(1, 24, 0), 12.5)
    with pytest.raises(ValueError):
        QuantizerConfig(n_q=1, n_q_semantic=1)
    assert math.isclose(QuantizerConfig().epsilon, 1e-5)
