"""LMConfig: presets, Kyutai config.json conversion, clear errors for unsupported or unknown settings."""

from __future__ import annotations

import pytest

from openmoshi.errors import ConfigError
from openmoshi.lm.config import LMConfig, bench, moshi_7b, tiny

# configs/moshi_7b_202409.json of kyutai-labs/moshi (the LM keys), plus the file names of an HF repo.
RELEASED_7B = {
    "dim": 4096, "text_card": 32000, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 8, "card": 2048,
    "num_heads": 32, "num_layers": 32, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
    "context": 3000, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 1024, "depformer_dim_feedforward": 4224,
    "depformer_num_heads": 16, "depformer_num_layers": 6, "depformer_layer_scale": None,
    "depformer_multi_linear": True, "depformer_context": 8, "depformer_max_period": 10000,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}


def test_moshi_7b_preset_is_the_released_model():
    cfg = moshi_7b()
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.hidden_scale, cfg.context) == (4096, 32, 32, 4.125, 3000)
    assert (cfg.text_card, cfg.card, cfg.n_q, cfg.dep_q) == (32000, 2048, 16, 8)
    assert (cfg.depformer_dim, cfg.depformer_num_layers, cfg.depformer_num_heads) == (1024, 6, 16)
    assert cfg.depformer_dim_feedforward == 4224 and cfg.depformer_weights_per_step
    assert cfg.delays == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    assert (cfg.existing_text_padding_id, cfg.existing_text_end_padding_id) == (3, 0)
    assert (cfg.n_user, cfg.max_delay, cfg.num_codebooks) == (8, 1, 17)
    assert LMConfig.from_kyutai(RELEASED_7B) == cfg


def test_bench_and_tiny_presets():
    b, t = bench(), tiny()
    assert (b.dim, b.num_layers, b.num_heads, b.depformer_dim, b.depformer_num_layers, b.depformer_num_heads) == \
        (1024, 12, 16, 512, 4, 8)
    assert (t.dim, t.num_layers, t.num_heads, t.depformer_dim, t.depformer_num_layers) == (64, 2, 4, 32, 1)
    assert (t.text_card, t.card, t.context, t.n_q, t.dep_q) == (1000, 2048, 250, 16, 8)
    assert b.delays == t.delays == RELEASED_7B["delays"]


@pytest.mark.parametrize("preset", [moshi_7b, bench, tiny])
def test_kyutai_round_trip(preset):
    cfg = preset().replace(lora=True, lora_rank=16, lora_scaling=1.5, lm_gen_config={"temp": 0.6},
                           stt_config={"audio_delay_seconds": 2.0}, model_type="stt")
    raw = cfg.to_kyutai()
    assert raw["lora"] is True and raw["lm_gen_config"] == {"temp": 0.6} and raw["model_type"] == "stt"
    assert LMConfig.from_kyutai(raw) == cfg


def test_file_keys_and_inherited_depformer_settings():
    raw = dict(RELEASED_7B, moshi_name="m.safetensors", mimi_name="mimi.safetensors", tokenizer_name="tok.model",
               lora_name="lora.safetensors", lora=True, lora_rank=128, lora_scaling=2.0, model_type="hibiki",
               model_id={"sig": "abc"}, tts_config={}, depformer_causal=True)
    del raw["depformer_gating"], raw["depformer_max_period"], raw["depformer_dim_feedforward"]
    raw["gating"], raw["max_period"] = "gelu", 5000
    cfg = LMConfig.from_kyutai(raw)
    assert (cfg.moshi_name, cfg.mimi_name, cfg.tokenizer_name, cfg.lora_name) == \
        ("m.safetensors", "mimi.safetensors", "tok.model", "lora.safetensors")
    assert (cfg.lora, cfg.model_type, cfg.model_id) == (True, "hibiki", {"sig": "abc"})
    # Kyutai's depformer inherits the temporal transformer's settings; its MLP width defaults to hidden_scale
    assert (cfg.depformer_gating, cfg.depformer_max_period) == ("gelu", 5000.0)
    assert cfg.depformer_dim_feedforward == int(4.125 * 1024)


@pytest.mark.parametrize("key,value", [
    ("conditioners", {"description": {"type": "lut"}}), ("fuser", {"sum": ["description"]}),
    ("cross_attention", True), ("depformer_low_rank_embeddings", 0),
    ("norm_emb", True)])
def test_unsupported_or_broken_features_are_named(key, value):
    with pytest.raises(ConfigError, match=key):
        LMConfig.from_kyutai(dict(RELEASED_7B, **{key: value}))


def test_disabled_features_are_accepted():
    cfg = LMConfig.from_kyutai(dict(RELEASED_7B, cross_attention=False, quantize=False, conditioners={},
                                    demux_second_stream=False, depformer_low_rank_embeddings=None))
    assert cfg == moshi_7b()


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="frobnicate.*wobble|wobble.*frobnicate"):
        LMConfig.from_kyutai(dict(RELEASED_7B, frobnicate=1, wobble=2))


@pytest.mark.parametrize("changes,message", [
    ({"delays": [0, 1, 1]}, "delays"), ({"dep_q": 20}, "dep_q"), ({"positional_embedding": "sin"}, "sin"),
    ({"depformer_pos_emb": "sin"}, "depformer_pos_emb"), ({"norm": "batch_norm"}, "batch_norm"),
    ({"depformer_num_heads": 7}, "divisible"), ({"depformer_weights_per_step_schedule": [0, 1]}, "schedule")])
def test_invalid_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        LMConfig.from_kyutai(dict(RELEASED_7B, **changes))


def test_kyutai_defaults_for_missing_keys():
    # Kyutai's depformer uses sinusoidal embeddings unless told otherwise: unsupported, and said so
    raw = {k: v for k, v in RELEASED_7B.items() if k != "depformer_pos_emb"}
    with pytest.raises(ConfigError, match="depformer_pos_emb 'sin'"):
        LMConfig.from_kyutai(raw)
    raw = {k: v for k, v in RELEASED_7B.items() if k != "context"}
    assert LMConfig.from_kyutai(raw).context is None
    with pytest.raises(ConfigError, match="num_layers"):
        LMConfig.from_kyutai({k: v for k, v in RELEASED_7B.items() if k != "num_layers"})
