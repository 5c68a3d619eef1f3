"""Generator: consistency with the teacher-forced model, long runs, resets, forcing, seeds, frozen items."""

from __future__ import annotations

import pytest
import torch
from lm_utils import frames, random_codes, run, sharp_model, small_config

from openmoshi.generation.generator import Generator
from openmoshi.lm.model import UNGENERATED
from openmoshi.nn.transformer import CACHE_RESERVE

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def _user(cfg, batch, steps, seed):
    return random_codes(cfg, batch, steps, seed=seed)[:, 1 + cfg.dep_q:]


@torch.no_grad()
def _assert_teacher_forced_argmax(lm, out, user, skip=None):
    """Greedy outputs are the argmax of the teacher-forced logits on the same tokens (where not forced).

    As in Kyutai's LMGen, step s reads the user's frame s with Moshi's frame s - 1: in the frame-aligned
    grid of teacher forcing, the user's frame s + 1 sits beside Moshi's frame s.
    """
    cfg = lm.cfg
    n = out.shape[-1]
    codes = out if user is None else torch.cat([out, user[..., 1:n + 1]], dim=1)
    pred = lm(codes)
    check_text = pred.text_mask[:, 0] & (True if skip is None else ~skip[:, 0])
    check_audio = pred.audio_mask & (True if skip is None else ~skip[:, 1:])
    assert check_text.sum() > 0 and check_audio.sum() > 0
    assert torch.equal(pred.text_logits[:, 0].argmax(-1)[check_text], out[:, 0][check_text])
    assert torch.equal(pred.audio_logits.argmax(-1)[check_audio], out[:, 1:1 + cfg.dep_q][check_audio])


@pytest.mark.parametrize("context", [40, 16])
def test_greedy_generation_is_the_argmax_of_the_teacher_forced_model(context):
    cfg = small_config(context=context)
    lm = sharp_model(cfg)
    steps, batch = 50, 2
    user = _user(cfg, batch, steps, seed=2)
    outs = run(Generator(lm, temp=0, temp_text=0), user, steps, batch)
    assert all(o is None for o in outs[:cfg.max_delay]) and all(o is not None for o in outs[cfg.max_delay:])
    out = frames(outs)
    assert out.shape == (batch, 1 + cfg.dep_q, steps - cfg.max_delay) and out.min() >= 0
    assert out[:, 0].max() < cfg.text_card and out[:, 1:].max() < cfg.card
    _assert_teacher_forced_argmax(lm, out, user)


@pytest.mark.slow
def test_generation_past_the_context_keeps_a_fixed_cache():
    cfg = small_config(context=16)
    lm = sharp_model(cfg)
    gen = Generator(lm, seed=0)
    user = _user(cfg, 2, 100, seed=3)
    attn = lm.transformer.layers[0].self_attn
    with gen.streaming(2):
        shapes = set()
        for s in range(100):
            out = gen.step(user[:, :, s:s + 1])
            shapes.add((tuple(attn._streaming_state.keys.shape), tuple(gen._state.cache.shape)))
            if s >= cfg.max_delay:
                assert out.shape == (2, 9, 1) and out.min() >= 0
    assert shapes == {((2, cfg.num_heads, 16 + CACHE_RESERVE, cfg.dim // cfg.num_heads), (2, 17, 4))}


@pytest.mark.parametrize("greedy", [True, False])
def test_reset_one_item_leaves_the_others_unchanged(greedy):
    cfg = small_config()
    lm = sharp_model(cfg)
    kwargs = {"temp": 0, "temp_text": 0} if greedy else {"seed": 7}
    batch, steps, at = 3, 40, 15
    user = _user(cfg, batch, steps, seed=4)
    fresh = _user(cfg, batch, steps, seed=5)
    reference = frames(run(Generator(lm, **kwargs), user, steps, batch))
    gen = Generator(lm, **kwargs)
    mixed = user.clone()
    mixed[1, :, at:] = fresh[1, :, :steps - at]
    outs = []
    with gen.streaming(batch):
        for s in range(steps):
            if s == at:
                gen.reset(torch.tensor([False, True, False]))
            outs.append(gen.step(mixed[:, :, s:s + 1]))
    out = frames(outs)
    assert torch.equal(out[[0, 2]], reference[[0, 2]])
    d = cfg.max_delay
    # the restarted item gives no tokens for max(delays) steps, then a new conversation
    assert (out[1, :, at - d:at].eq(UNGENERATED)).all()
    if greedy:
        restarted = frames(run(Generator(lm, **kwargs), fresh, steps - at, batch))
        assert torch.equal(out[1, :, at:], restarted[1, :, :steps - at - d])


def test_full_reset_restarts_the_session():
    cfg = small_config()
    lm = sharp_model(cfg)
    user = _user(cfg, 2, 20, seed=6)
    gen = Generator(lm, temp=0, temp_text=0)
    with gen.streaming(2):
        first = [gen.step(user[:, :, s:s + 1]) for s in range(20)]
        gen.reset()
        second = [gen.step(user[:, :, s:s + 1]) for s in range(20)]
    assert second[0] is None and torch.equal(frames(first), frames(second))


def test_forced_tokens_are_used_and_conditioned_on():
    cfg = small_config()
    lm = sharp_model(cfg)
    steps, batch = 30, 2
    user = _user(cfg, batch, steps, seed=8)
    g = torch.Generator().manual_seed(9)
    force_text = torch.randint(0, cfg.text_card, (batch, steps), generator=g)
    force_text[1] = -1  # item 1: text sampled
    force_audio = torch.full((batch, cfg.dep_q, steps), -1)
    force_audio[:, [0, 2]] = torch.randint(0, cfg.card, (batch, 2, steps), generator=g)
    gen = Generator(lm, temp=0, temp_text=0)
    outs = []
    with gen.streaming(batch):
        for s in range(steps):
            outs.append(gen.step(user[:, :, s:s + 1], force_text=force_text[:, s],
                                 force_audio=force_audio[:, :, s]))
    out = frames(outs)  # frame f comes out max(delays) steps after the step that made its first tokens
    n = out.shape[-1]
    assert torch.equal(out[0, 0], force_text[0, :n])
    assert torch.equal(out[:, 1], force_audio[:, 0, :n])  # semantic: no delay
    assert torch.equal(out[:, 3], force_audio[:, 2, 1:n + 1])  # acoustic: one step late
    forced = torch.zeros_like(out, dtype=torch.bool)
    forced[0, 0] = True
    forced[:, [1, 3]] = True
    # the free tokens (item 1's text, the other codebooks) follow from the forced ones
    _assert_teacher_forced_argmax(lm, out, user, skip=forced)


def test_model_without_user_stream():
    cfg = small_config(n_q=8, dep_q=8, delays=[0, 0, 1, 1, 1, 1, 1, 1, 1])
    lm = sharp_model(cfg)
    outs = run(Generator(lm, temp=0, temp_text=0), None, 20, 2)
    out = frames(outs)
    assert out.shape == (2, 9, 19)
    _assert_teacher_forced_argmax(lm, out, None)


def test_fixed_seed_is_reproducible():
    cfg = small_config()
    lm = sharp_model(cfg)
    with torch.no_grad():  # flatter distributions, so sampling has choices to make
        lm.text_linear.weight.div_(12)
        for linear in lm.linears:
            linear.weight.div_(12)
    user = _user(cfg, 2, 15, seed=10)
    a = frames(run(Generator(lm, seed=123), user, 15, 2))
    b = frames(run(Generator(lm, seed=123), user, 15, 2))
    c = frames(run(Generator(lm, seed=124), user, 15, 2))
    d = frames(run(Generator(lm, text_seed=123, audio_seed=999), user, 15, 2))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    greedy = frames(run(Generator(lm, temp=0, temp_text=0), user, 15, 2))
    assert not torch.equal(a, greedy)


def test_frozen_items_keep_their_state():
    cfg = small_config()
    lm = sharp_model(cfg)
    steps, pause = 30, range(8, 13)
    user = _user(cfg, 2, steps, seed=11)
    straight = frames(run(Generator(lm, temp=0, temp_text=0), user, steps, 2))
    gen = Generator(lm, temp=0, temp_text=0)
    outs, fed = [], 0
    with gen.streaming(2):
        for s in range(steps + len(pause)):
            gen.set_active(torch.tensor([True, s not in pause]))
            frame = user[:, :, s:s + 1].clone() if s < steps else user[:, :, -1:].clone()
            frame[1] = user[1, :, min(fed, steps - 1)][:, None]  # item 1 consumes its audio when active
            fed += s not in pause
            outs.append(gen.step(frame))
    out = frames(outs)
    assert torch.equal(out[0, :, :steps - 1], straight[0])
    paused = [s - cfg.max_delay for s in pause]
    assert out[1, :, paused].eq(UNGENERATED).all()
    kept = [f for f in range(out.shape[-1]) if f not in paused][:steps - cfg.max_delay]
    assert torch.equal(out[1, :, kept], straight[1])


def test_extra_heads_and_text_logits_hook():
    cfg = small_config(extra_heads_num_heads=2, extra_heads_dim=6)
    lm = sharp_model(cfg)

    def prefer_seven(logits):
        logits[:, 7] += 1e4
        return logits

    gen = Generator(lm, temp=0, temp_text=0, text_logits_hook=prefer_seven)
    user = _user(cfg, 2, 6, seed=12)
    with gen.streaming(2):
        outs = [gen.step(user[:, :, s:s + 1]) for s in range(6)]
        heads = gen.extra_heads()
    assert (frames(outs)[:, 0] == 7).all()
    assert len(heads) == 2 and heads[0].shape == (2, 6)
    assert torch.allclose(heads[1].sum(-1), torch.ones(2))


def test_misuse_is_reported():
    cfg = small_config()
    gen = Generator(sharp_model(cfg))
    with pytest.raises(RuntimeError, match="streaming"):
        gen.step(torch.zeros(1, 8, 1, dtype=torch.long))
    with gen.streaming(2):
        with pytest.raises(ValueError, match=r"\[2, 8, 1\]"):
            gen.step(torch.zeros(1, 8, 1, dtype=torch.long))
        with pytest.raises(ValueError, match="user"):
            gen.step()
        with pytest.raises(RuntimeError, match="already streaming"), gen.streaming(2):
            pass


def test_text_only_model():
    # speech-to-text models have no depth transformer: dep_q = 0, every audio stream is an input
    cfg = small_config(n_q=4, dep_q=0, delays=[2, 0, 0, 0, 0])
    lm = sharp_model(cfg)
    assert lm.depformer is None
    user = _user(cfg, 2, 20, seed=13)
    out = frames(run(Generator(lm, temp=0, temp_text=0), user, 20, 2))
    assert out.shape == (2, 1, 18)
    with torch.no_grad():
        pred = lm(torch.cat([out, user[..., 1:19]], dim=1))
    assert pred.audio_logits.shape == (2, 0, 18, cfg.card)
    assert torch.equal(pred.text_logits[:, 0].argmax(-1)[:, :16], out[:, 0, :16])
