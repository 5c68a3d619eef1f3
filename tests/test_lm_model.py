"""LMModel on its own: token layout of the teacher-forced pass, streaming == offline, gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from lm_utils import random_codes, sharp_model, small_config

from openmoshi.lm.config import LMConfig
from openmoshi.lm.delays import delay_codes, undelay
from openmoshi.lm.model import LMModel, TokenEmbedding

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def test_delay_and_undelay_are_inverse():
    codes = torch.arange(2 * 3 * 6).view(2, 3, 6)
    initial = torch.full((2, 3, 1), -5)
    delayed = delay_codes(codes, [0, 1, 2], initial)
    assert torch.equal(delayed[:, 0], codes[:, 0])
    assert torch.equal(delayed[:, 2, :2], torch.full((2, 2), -5)) and torch.equal(delayed[:, 2, 2:], codes[:, 2, :4])
    back, mask = undelay(delayed.float(), [0, 1, 2])
    assert torch.equal(back[mask], codes.float()[mask])
    assert mask.sum(-1).tolist() == [[6, 5, 4], [6, 5, 4]] and back[~mask].isnan().all()


def test_no_token_has_zero_embedding():
    emb = TokenEmbedding(5, 3)
    out = emb(torch.tensor([[0, -1, 4]]))
    assert torch.equal(out[0, 1], torch.zeros(3)) and torch.equal(out[0, 2], emb.weight[4])


@torch.no_grad()
def test_forward_layout_and_masks():
    cfg = small_config()
    lm = sharp_model(cfg)
    codes = random_codes(cfg, batch=2, steps=9)
    codes[1, 3, 4] = -1
    out = lm(codes)
    assert out.text_logits.shape == (2, 1, 9, cfg.text_card) and out.audio_logits.shape == (2, 8, 9, cfg.card)
    # delayed codebooks (all but the semantic one) have no prediction for their last frame
    predicted = torch.ones(2, 8, 9, dtype=torch.bool)
    predicted[:, 1:, -1] = False
    assert out.audio_logits[~predicted].isnan().all() and not out.audio_logits[predicted].isnan().any()
    expected = predicted.clone()
    expected[1, 2, 4] = False  # codes[1, 3] is audio codebook 2; -1 there means no loss
    assert torch.equal(out.audio_mask, expected) and out.text_mask.all()
    # frame t of the text is predicted without seeing it: changing it leaves its own logits unchanged
    changed = codes.clone()
    changed[:, 0, 5] = (changed[:, 0, 5] + 1) % cfg.text_card
    again = lm(changed)
    assert torch.equal(again.text_logits[:, :, :6], out.text_logits[:, :, :6])
    assert not torch.allclose(again.text_logits[:, :, 6], out.text_logits[:, :, 6])
    # ... while audio comes after the text of the same model step: the semantic code of frame 5 and,
    # delayed by one step, the acoustic codes of frame 4
    assert not torch.allclose(again.audio_logits[:, 0, 5], out.audio_logits[:, 0, 5])
    assert not torch.allclose(again.audio_logits[:, 1:, 4], out.audio_logits[:, 1:, 4])
    assert torch.equal(again.audio_logits[:, 0, :5], out.audio_logits[:, 0, :5])
    assert torch.equal(again.audio_logits[:, 1:, :4], out.audio_logits[:, 1:, :4])


@torch.no_grad()
def test_streamed_temporal_pass_equals_offline():
    cfg = small_config(context=8)
    lm = sharp_model(cfg)
    tokens = random_codes(cfg, batch=2, steps=20)
    hidden, logits = lm.forward_text(tokens)
    with lm.streaming(2):
        steps = [lm.forward_text(tokens[:, :, t:t + 1]) for t in range(20)]
    assert torch.allclose(torch.cat([h for h, _ in steps], 1), hidden, atol=1e-5)
    assert torch.allclose(torch.cat([lg for _, lg in steps], 2), logits, atol=1e-4)


@torch.no_grad()
def test_depth_steps_equal_teacher_forced_depth():
    cfg = small_config()
    lm = sharp_model(cfg)
    tokens = random_codes(cfg, batch=2, steps=1)
    hidden = torch.randn(2, 1, cfg.dim)
    offline = lm.forward_depth(tokens, hidden)[:, :, 0]  # [B, dep_q, card]
    with lm.depformer.streaming(2):
        for _ in range(2):  # a second frame after a reset gives the same numbers
            lm.depformer.reset_streaming()
            for k in range(cfg.dep_q):
                assert torch.allclose(lm.depth_step(k, hidden, tokens[:, k, 0]), offline[:, k], atol=1e-4)
    for k in range(cfg.dep_q):
        again = lm.depth_logits_recompute(hidden, tokens[:, :k + 1, 0])
        assert torch.allclose(again, offline[:, k], atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = small_config()
    codes = random_codes(cfg, batch=2, steps=6)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        lm = LMModel(cfg.replace(gradient_checkpointing=checkpointing)).train()
        out = lm(codes)
        loss = out.text_logits[out.text_mask].logsumexp(-1).mean() + out.audio_logits[out.audio_mask].logsumexp(-1).mean()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in lm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for key in grads[0]:
        assert torch.allclose(grads[0][key], grads[1][key], atol=1e-6), key


def test_init_is_kyutai_like():
    torch.manual_seed(0)
    lm = LMModel(LMConfig.tiny())
    assert math.isclose(lm.emb[0].weight.std().item(), 1 / math.sqrt(64), rel_tol=0.1)
    assert math.isclose(lm.text_linear.weight.std().item(), 1 / math.sqrt(64), rel_tol=0.1)
    assert lm.text_linear.weight.abs().max() <= 3 / math.sqrt(64) + 1e-6


def test_wrong_stream_count_is_reported():
    lm = LMModel(small_config())
    with pytest.raises(ValueError, match="17"):
        lm(torch.zeros(1, 9, 4, dtype=torch.long))
