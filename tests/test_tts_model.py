"""TTS-family LM features against moshi 0.2.13: conditioners, sum and cross-attention fusion, CFG, demux, low rank."""

from __future__ import annotations

import copy

import pytest
import torch
from lm_utils import FILE_KEYS, sharp_model, small_config

from openmoshi.checkpoint import normalize_keys
from openmoshi.errors import ConfigError
from openmoshi.generation.generator import Generator
from openmoshi.lm.conditioners import TensorInput
from openmoshi.lm.config import LMConfig
from openmoshi.lm.model import LMModel

moshi = pytest.importorskip("moshi")
from moshi.conditioners import ConditionAttributes, TensorCondition
from moshi.models import loaders
from moshi.models.lm import LMGen

CFG_VALUES = ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]
VOICE_DIM = 24


# tiny models run fastest on one thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tts_config(cross: bool = True, **changes) -> LMConfig:
    """tts-1.6b's structure (every stream generated, demuxed second text stream, low-rank depth embeddings,
    shared depth weights, lookup-table + tensor conditioners, sum + cross-attention fusion) at toy size."""
    conditioners = {"control": {"type": "lut", "lut": {"n_bins": 2, "dim": 16, "tokenizer": "noop",
                                                       "possible_values": ["ok", "bad"]}},
                    "cfg": {"type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop",
                                                   "possible_values": CFG_VALUES}}}
    fuser: dict = {"sum": ["control", "cfg"]}
    if cross:
        conditioners["speaker_wavs"] = {"type": "tensor", "tensor": {"dim": VOICE_DIM}}
        fuser.update(cross=["speaker_wavs"], cross_attention_pos_emb=True, cross_attention_pos_emb_scale=1.0)
    base = {"n_q": 8, "dep_q": 8, "delays": [0, 0, 2, 2, 2, 2, 2, 2, 2], "demux_second_text_stream": True,
            "depformer_low_rank_embeddings": 16, "depformer_weights_per_step_schedule": [0, 1, 2, 2, 3, 3, 3, 3],
            "conditioners": conditioners, "fuser": fuser, "cross_attention": cross, "model_type": "tts",
            "tts_config": {"audio_delay": 0.32, "second_stream_ahead": 2}}
    base.update(changes)
    return small_config(**base)


def reference(lm: LMModel):
    kwargs = {k: v for k, v in copy.deepcopy(lm.cfg.to_kyutai()).items() if k not in FILE_KEYS}
    ref = loaders.get_moshi_lm(None, lm_kwargs=kwargs, dtype=torch.float32, device="cpu")
    ref.load_state_dict(lm.state_dict())
    return ref.eval()


def model(cfg: LMConfig, seed: int = 0) -> LMModel:
    lm = sharp_model(cfg, seed)
    with torch.no_grad():  # conditions that matter: larger condition embeddings
        for p in lm.condition_provider.parameters():
            p.mul_(3)
    return lm


def voices(batch: int, length: int = 7, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensor = torch.randn(batch, length, VOICE_DIM, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 5:] = False  # a shorter voice
    return tensor, mask


def our_conditions(lm: LMModel, controls: list, cfgs: list, voice=None):
    tensors = None if voice is None else {"speaker_wavs": TensorInput(*voice)}
    return lm.condition_provider(text={"control": controls, "cfg": cfgs}, tensors=tensors)


def ref_conditions(ref, controls: list, cfgs: list, voice=None):
    attrs = []
    for i, (control, cfg) in enumerate(zip(controls, cfgs)):
        tensor = {} if voice is None else {"speaker_wavs": TensorCondition(voice[0][i:i + 1], voice[1][i:i + 1])}
        attrs.append(ConditionAttributes(text={"control": control, "cfg": cfg}, tensor=tensor))
    return ref.condition_provider.prepare_and_provide(attrs)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_keys_and_shapes_equal_the_reference():
    lm = LMModel(tts_config())
    ref = reference(lm)
    ours = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in normalize_keys(ref.state_dict()).items()}
    assert "transformer.layers.1.cross_attention.in_proj_weight" in ours and "text_emb.out2.weight" in ours
    assert ours["depformer_emb.0.low_rank.weight"] == (32, 16)
    assert LMConfig.from_kyutai(lm.cfg.to_kyutai()) == lm.cfg


@pytest.mark.parametrize("cross", [True, False])
@torch.no_grad()
def test_teacher_forced_logits_with_conditions_match(cross):
    cfg = tts_config(cross=cross)
    lm = model(cfg)
    ref = reference(lm)
    batch = 3
    controls, cfgs = ["ok", "bad", "ok"], ["2.0", None, "4.0"]
    voice = voices(batch) if cross else None
    ours_c, ref_c = our_conditions(lm, controls, cfgs, voice), ref_conditions(ref, controls, cfgs, voice)
    for name in ref_c:
        assert torch.allclose(ours_c[name].values, ref_c[name].condition, atol=1e-6)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, cfg.card, (batch, cfg.num_codebooks, 20), generator=g)
    # muxed text: second stream token + 1, times text_card + 1, plus the main token (-1 second = none)
    second = torch.randint(-1, cfg.text_card, (batch, 20), generator=g)
    codes[:, 0] = (second + 1) * (cfg.text_card + 1) + torch.randint(0, cfg.text_card, (batch, 20), generator=g)
    ours, theirs = lm(codes, ours_c), ref(codes, ref_c)
    for a, b in [(ours.text_logits, theirs.text_logits), (ours.audio_logits, theirs.logits)]:
        assert torch.equal(a.isnan(), b.isnan())
        assert rel(a.nan_to_num(), b.nan_to_num()) < 1e-4
    # the conditions change the output
    other = lm(codes, our_conditions(lm, ["bad", "ok", "bad"], cfgs, voice))
    assert rel(other.text_logits.nan_to_num(), ours.text_logits.nan_to_num()) > 1e-2


def _run(gen, steps: int, batch: int, hook_logits: list):
    out = []
    with gen.streaming(batch):
        for _ in range(steps):
            frame = gen.step(torch.zeros(batch, 0, 1, dtype=torch.long)) if isinstance(gen, LMGen) else gen.step()
            if frame is not None:
                out.append(frame)
    return torch.cat(out, dim=2), torch.stack(hook_logits, 1)


@pytest.mark.parametrize("null_text,masked", [(False, None), (True, [3, 6])])
@torch.no_grad()
def test_greedy_generation_with_cfg_matches(null_text, masked):
    """Classifier-free guidance on a model conditioned by sum and cross-attention: conditioned rows then null."""
    cfg = tts_config()
    lm = model(cfg)
    ref = reference(lm)
    batch, steps = 2, 24
    controls, cfgs = ["ok", "bad"], [None, None]
    voice = voices(batch)
    null_voice = (torch.zeros_like(voice[0]), torch.zeros_like(voice[1]))
    ours_c = our_conditions(lm, controls + [None, None], cfgs * 2,
                            (torch.cat([voice[0], null_voice[0]]), torch.cat([voice[1], null_voice[1]])))
    ref_c = ref_conditions(ref, controls + [None, None], cfgs * 2,
                           (torch.cat([voice[0], null_voice[0]]), torch.cat([voice[1], null_voice[1]])))
    ours_logits: list = []
    ref_logits: list = []
    gen = Generator(lm, temp=0, temp_text=0, conditions=ours_c, cfg_coef=2.5, cfg_null_text=null_text,
                    cfg_masked_until=masked, text_logits_hook=lambda x: ours_logits.append(x.clone()))
    ref_gen = LMGen(ref, use_sampling=False, cfg_coef=2.5, condition_tensors=ref_c, cfg_is_no_text=null_text,
                    cfg_is_masked_until=masked,
                    on_text_logits_hook=lambda x: ref_logits.append(x[:, 0, 0].clone()))
    ours, ours_l = _run(gen, steps, batch, ours_logits)
    theirs, ref_l = _run(ref_gen, steps, batch, ref_logits)
    assert torch.equal(ours, theirs)
    assert rel(ours_l, ref_l) < 1e-4
    assert len(ours[:, 1:].unique()) > 10 and not torch.equal(ours[0], ours[1])
    # without guidance the tokens differ: the coefficient is really applied
    plain = Generator(lm, temp=0, temp_text=0, conditions=our_conditions(lm, controls, cfgs, voice))
    alone, _ = _run(plain, steps, batch, [torch.zeros(1)])
    assert not torch.equal(alone, ours)


def test_bad_conditioning_configs_are_clear_errors():
    with pytest.raises(ConfigError, match="fuser"):
        tts_config(fuser={"sum": ["control", "nope"]})
    with pytest.raises(ConfigError, match="cross_attention"):
        tts_config(cross_attention=False)
    lm = LMModel(tts_config())
    with pytest.raises(ConfigError, match="speaker_wavs"):
        lm.condition_provider(text={"control": ["ok"], "cfg": [None]})
    with pytest.raises(ConfigError, match="not one of"):
        lm.condition_provider(text={"control": ["great"], "cfg": [None]},
                              tensors={"speaker_wavs": TensorInput.full(torch.zeros(1, 2, VOICE_DIM))})
