"""Parity with Kyutai's reference LMModel / LMGen (moshi 0.2.13) on the same random weights."""

from __future__ import annotations

import pytest
import torch

moshi = pytest.importorskip("moshi")
from lm_utils import frames, kyutai_kwargs, random_codes, run, sharp_model, small_config
from moshi.models import loaders
from moshi.models.lm import LMGen
from moshi.models.lm import LMModel as RefLM

from openmoshi.checkpoint import normalize_keys
from openmoshi.generation.generator import Generator
from openmoshi.lm.config import LMConfig
from openmoshi.lm.loading import load_lm
from openmoshi.lm.model import LMModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest


def _reference(lm: LMModel) -> RefLM:
    ref = RefLM(**kyutai_kwargs(lm.cfg)).eval()
    ref.load_state_dict(lm.state_dict())
    return ref


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_7b_keys_and_shapes_equal_the_reference():
    with torch.device("meta"):
        ours = LMModel(LMConfig.moshi_7b())
        ref = RefLM(**loaders._lm_kwargs)
    ref_state = normalize_keys(ref.state_dict())  # per-step in_projs.N -> the stacked layout of the files
    assert _shapes(ours.state_dict()) == _shapes(ref_state)
    assert len(ref_state) == 355 and sum(v.numel() for v in ref_state.values()) == 7_687_729_152


def test_from_kyutai_of_the_reference_kwargs():
    assert LMConfig.from_kyutai(loaders._lm_kwargs) == LMConfig.moshi_7b()


@pytest.mark.parametrize("changes", [{}, {"depformer_multi_linear": False, "depformer_weights_per_step": False},
                                     {"depformer_weights_per_step_schedule": [0, 1, 1, 2, 2, 2, 3, 3],
                                      "text_card_out": 90, "extra_heads_num_heads": 2, "depformer_norm": "rms_norm",
                                      "bias_proj": True, "kv_repeat": 2}])
def test_state_dict_keys_match_variants(changes):
    cfg = small_config(**changes)
    ours, ref = LMModel(cfg), RefLM(**kyutai_kwargs(cfg))
    assert _shapes(ours.state_dict()) == _shapes(normalize_keys(ref.state_dict()))


@pytest.mark.parametrize("changes", [{}, {"depformer_weights_per_step_schedule": [0, 1, 1, 2, 2, 2, 3, 3],
                                          "depformer_norm": "layer_norm", "bias_proj": True}])
@torch.no_grad()
def test_teacher_forced_logits_match(changes):
    cfg = small_config(**changes)
    lm = sharp_model(cfg)
    ref = _reference(lm)
    codes = random_codes(cfg, batch=3, steps=30)
    codes[0, 4, 7] = -1  # "no token": zero input embedding and no loss
    codes[2, 0, 3] = -1
    ours, theirs = lm(codes), ref(codes)
    assert torch.equal(ours.text_mask, theirs.text_mask) and torch.equal(ours.audio_mask, theirs.mask)
    assert not ours.audio_mask.all() and not ours.text_mask.all()
    for a, b in [(ours.text_logits, theirs.text_logits), (ours.audio_logits, theirs.logits)]:
        assert a.shape == b.shape
        assert torch.equal(a.isnan(), b.isnan())
        a, b = a.nan_to_num(), b.nan_to_num()
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4


@torch.no_grad()
def test_greedy_generation_matches():
    cfg = small_config()
    lm = sharp_model(cfg)
    ref = _reference(lm)
    steps, batch = 70, 3  # past the context of 40 steps
    user = random_codes(cfg, batch, steps, seed=5)[:, 1 + cfg.dep_q:]
    ours = run(Generator(lm, temp=0, temp_text=0), user, steps, batch)
    ref_gen = LMGen(ref, use_sampling=False)
    theirs = []
    with ref_gen.streaming(batch):
        for s in range(steps):
            theirs.append(ref_gen.step(user[:, :, s:s + 1]))
    assert [o is None for o in ours] == [o is None for o in theirs]
    a, b = frames(ours), frames(theirs)
    assert a.shape == (batch, 1 + cfg.dep_q, steps - cfg.max_delay)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # different inputs, different answers


@torch.no_grad()
def test_lora_fusion_matches_reference(tmp_path):
    from openmoshi.checkpoint import save_safetensors
    from openmoshi.lm.loading import save_lm

    cfg = small_config()
    lm = sharp_model(cfg)
    folder = save_lm(lm, tmp_path / "model")
    # LoRA tensors for every linear layer, named as Kyutai's fine-tuning saves them (in_projs.N per step)
    g = torch.Generator().manual_seed(3)
    rank, lora = 4, {}
    linears = {n: m for n, m in RefLM(**kyutai_kwargs(cfg)).named_modules() if isinstance(m, torch.nn.Linear)}
    for name, module in linears.items():
        lora[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.1
        lora[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.1
    save_safetensors(lora, folder / "lora.safetensors")
    ours = load_lm(folder, lora_weights=folder / "lora.safetensors")
    ref = loaders.get_moshi_lm(folder / "model.safetensors", lm_kwargs=dict(kyutai_kwargs(cfg), lora=True,
                               lora_rank=rank, lora_scaling=2.0), dtype=torch.float32,
                               lora_weights=folder / "lora.safetensors", fuse_lora=True)
    ref_state = normalize_keys(ref.state_dict())
    changed = 0
    for key, value in ours.state_dict().items():
        assert torch.allclose(value, ref_state[key], atol=1e-5), key
        changed += not torch.equal(value, lm.state_dict()[key])
    # every linear weight changed (embeddings and norms have no LoRA)
    assert changed == sum(v.dim() == 2 and "emb" not in k for k, v in lm.state_dict().items()) == 61


@torch.no_grad()
def test_sampled_generation_matches_with_the_same_global_seed():
    # Our sampler draws from the random stream as Kyutai's does, in the same order (text, then codebooks).
    cfg = small_config()
    torch.manual_seed(0)
    lm = LMModel(cfg).eval()
    ref = _reference(lm)
    steps, batch = 20, 2
    user = random_codes(cfg, batch, steps, seed=5)[:, 1 + cfg.dep_q:]
    torch.manual_seed(1234)
    ours = frames(run(Generator(lm, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25), user, steps, batch))
    torch.manual_seed(1234)
    ref_gen = LMGen(ref, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
    theirs = []
    with ref_gen.streaming(batch):
        for s in range(steps):
            theirs.append(ref_gen.step(user[:, :, s:s + 1]))
    assert torch.equal(ours, frames(theirs))
    assert len(ours[:, 1].unique()) > 10  # really sampled
