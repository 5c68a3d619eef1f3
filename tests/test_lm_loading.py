"""Loading and saving LMs in Kyutai's folder layout, LoRA fusion, and the errors users see."""

from __future__ import annotations

import json

import pytest
import torch
from lm_utils import random_codes, sharp_model, small_config

from openmoshi.checkpoint import read_safetensors, save_safetensors
from openmoshi.errors import CheckpointError, ConfigError
from openmoshi.lm.config import LMConfig
from openmoshi.lm.loading import load_lm, read_config, save_lm


@pytest.fixture
def saved(tmp_path):
    lm = sharp_model(small_config())
    return lm, save_lm(lm, tmp_path / "model")


def test_round_trip(saved):
    lm, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    raw = json.loads((folder / "config.json").read_text())
    assert raw["dim"] == 64 and raw["delays"] == lm.cfg.delays and raw["moshi_name"] == "model.safetensors"
    keys = read_safetensors(folder / "model.safetensors").keys()
    assert "transformer.layers.0.self_attn.in_proj_weight" in keys and "depformer.layers.1.gating.7.linear_in.weight" in keys
    loaded = load_lm(folder)
    assert loaded.cfg == lm.cfg and not loaded.training
    for key, value in lm.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    codes = random_codes(lm.cfg, 1, 5)
    with torch.no_grad():
        assert torch.equal(loaded(codes).audio_logits.nan_to_num(), lm(codes).audio_logits.nan_to_num())


def test_bf16_weights_load_in_the_requested_dtype(tmp_path):
    lm = sharp_model(small_config())
    folder = save_lm(lm, tmp_path / "bf16", dtype=torch.bfloat16)
    assert read_safetensors(folder / "model.safetensors")["text_emb.weight"].dtype == torch.bfloat16
    loaded = load_lm(folder, dtype=torch.float32)
    assert loaded.text_emb.weight.dtype == torch.float32 and not loaded.text_emb.weight.is_meta
    assert torch.equal(loaded.text_emb.weight, lm.text_emb.weight.bfloat16().float())
    assert load_lm(folder, dtype=torch.bfloat16).linears[0].weight.dtype == torch.bfloat16


def test_cast_reading_converts_tensor_by_tensor_and_checks_the_file(tmp_path):
    state = {"w": torch.randn(3, 5).to(torch.bfloat16), "n": torch.arange(4), "e": torch.zeros(0, 2),
             "s": torch.tensor(2.5, dtype=torch.float16)}
    path = tmp_path / "m.safetensors"
    save_safetensors(state, path)
    got = read_safetensors(path, dtype=torch.float32)  # another dtype: read and cast one tensor at a time
    assert got.keys() == state.keys() and got["n"].dtype == torch.int64 and torch.equal(got["n"], state["n"])
    for key in ("w", "e", "s"):
        assert got[key].dtype == torch.float32 and torch.equal(got[key], state[key].float())
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(path, dtype=torch.float32)
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_safetensors(path, dtype=torch.float32)


def test_per_step_key_spellings_are_accepted(saved):
    lm, folder = saved
    state = read_safetensors(folder / "model.safetensors")
    stacked = state.pop("depformer.layers.0.self_attn.in_proj_weight")
    for i, block in enumerate(stacked.chunk(lm.cfg.dep_q)):
        state[f"depformer.layers.0.self_attn.in_projs.{i}.weight"] = block
    save_safetensors(state, folder / "model.safetensors")
    assert torch.equal(load_lm(folder).depformer.layers[0].self_attn.in_proj_weight, stacked)


def test_misshaped_tensor_names_the_key(saved):
    _, folder = saved
    raw = json.loads((folder / "config.json").read_text())
    raw["text_card"] = 100  # the checkpoint was made with 120
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"text_emb\.weight.*\(121, 64\).*\(101, 64\)"):
        load_lm(folder)


def test_missing_tensor_names_the_key_and_file(saved):
    _, folder = saved
    state = read_safetensors(folder / "model.safetensors")
    del state["out_norm.alpha"]
    save_safetensors(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*out_norm\.alpha"):
        load_lm(folder)


def test_unsupported_feature_in_config_json(saved):
    _, folder = saved
    raw = json.loads((folder / "config.json").read_text())
    raw["conditioners"] = {"description": {"type": "lut", "lut": {}}}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config\.json.*conditioners"):
        load_lm(folder)


def test_sources_without_config_are_the_7b(tmp_path):
    (tmp_path / "legacy").mkdir()
    assert read_config(tmp_path / "legacy") == (LMConfig.moshi_7b(), None)
    (tmp_path / "legacy" / "weights.safetensors").touch()
    assert read_config(tmp_path / "legacy" / "weights.safetensors")[0] == LMConfig.moshi_7b()
    with pytest.raises(CheckpointError, match="not found"):
        read_config(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_lm(tmp_path / "legacy")


def test_bare_weights_file_uses_the_7b_config(saved):
    _, folder = saved
    # a small model's weights under the 7B config: the mismatch is reported, not crashed on
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_lm(folder / "model.safetensors")


def test_lora_is_fused_from_the_config(saved):
    lm, folder = saved
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(4, 64, generator=g), torch.randn(3 * 64, 4, generator=g)
    a2, b2 = torch.randn(8 * 4, 32, generator=g), torch.randn(8 * 32, 4, generator=g)  # stacked over steps
    a3, b3 = torch.randn(4, 32, generator=g), torch.randn(lm.cfg.card, 4, generator=g)
    save_safetensors({
        "transformer.layers.1.self_attn.in_projs.0.lora_A.weight": a1,
        "transformer.layers.1.self_attn.in_projs.0.lora_B.weight": b1,
        "depformer.layers.0.self_attn.out_proj.lora_A.weight": a2,
        "depformer.layers.0.self_attn.out_proj.lora_B.weight": b2,
        "linears.5.lora_A.weight": a3, "linears.5.lora_B.weight": b3,
    }, folder / "adapter.safetensors")
    raw = json.loads((folder / "config.json").read_text())
    raw.update(lora=True, lora_name="adapter.safetensors", lora_scaling=0.5)
    (folder / "config.json").write_text(json.dumps(raw))
    fused = load_lm(folder)
    assert fused.cfg.lora is False
    base = lm.state_dict()
    expected = base["transformer.layers.1.self_attn.in_proj_weight"] + 0.5 * b1 @ a1
    assert torch.allclose(fused.transformer.layers[1].self_attn.in_proj_weight, expected, atol=1e-5)
    blocks = [w + 0.5 * b @ a for w, a, b in zip(base["depformer.layers.0.self_attn.out_proj.weight"].chunk(8),
                                                 a2.chunk(8), b2.chunk(8))]
    assert torch.allclose(fused.depformer.layers[0].self_attn.out_proj.weight, torch.cat(blocks), atol=1e-5)
    assert torch.allclose(fused.linears[5].weight, base["linears.5.weight"] + 0.5 * b3 @ a3, atol=1e-5)
    assert torch.equal(fused.linears[4].weight, base["linears.4.weight"])
    # saving a fused model gives a plain folder
    again = save_lm(fused, folder.parent / "fused")
    assert json.loads((again / "config.json").read_text())["lora"] is False


def test_lora_errors(saved):
    _, folder = saved
    raw = json.loads((folder / "config.json").read_text())
    raw["lora"] = True
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="lora.safetensors"):
        load_lm(folder)
    save_safetensors({"text_linear.lora_A.weight": torch.zeros(4, 5), "text_linear.lora_B.weight": torch.zeros(120, 4)},
                     folder / "lora.safetensors")
    with pytest.raises(CheckpointError, match="text_linear"):
        load_lm(folder)
    save_safetensors({"nonsense.lora_A.weight": torch.zeros(4, 5), "nonsense.lora_B.weight": torch.zeros(5, 4)},
                     folder / "lora.safetensors")
    with pytest.raises(CheckpointError, match="nonsense"):
        load_lm(folder)
    save_safetensors({"text_linear.weight": torch.zeros(120, 64)}, folder / "lora.safetensors")
    with pytest.raises(CheckpointError, match="not a LoRA tensor"):
        load_lm(folder)
