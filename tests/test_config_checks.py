"""Config files and weights are checked field by field: a clear error naming the file and the field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from openmoshi.bundle import init_model, load_model
from openmoshi.checkpoint import read_safetensors, save_safetensors
from openmoshi.errors import CheckpointError, ConfigError, OpenMoshiError


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = init_model("tiny", tmp_path_factory.mktemp("model") / "tiny", seed=2)
    assert (folder / "mimi_config.json").exists()
    return folder


def _edited(tiny_model, tmp_path, filename: str, edit) -> tuple:
    folder = tmp_path / "edited"
    shutil.copytree(tiny_model, folder)
    path = folder / filename
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return folder, path


def _set(key: str, value):
    def edit(raw: dict) -> None:
        target = raw
        *parents, last = key.split(".")
        for parent in parents:
            target = target[parent]
        target[last] = value
    return edit


@pytest.mark.parametrize("key, value, words", [
    ("dim", -64, "field dim must be in [1"),
    ("dim", "abc", "field dim must be an integer"),
    ("context", 1e12, "field context must be an integer"),
    ("num_layers", 10_000, "field num_layers must be in"),
    ("card", 2048.5, "field card must be an integer"),
    ("causal", "yes", "field causal must be true or false"),
    ("delays", [0, "1"], "field delays[1]"),
    ("hidden_scale", float("nan"), "field hidden_scale must be a finite number"),
    ("lm_gen_config", {"top_k": -5}, "field lm_gen_config.top_k must be in [0"),
    ("lm_gen_config", {"temp": "hot"}, "field lm_gen_config.temp must be a finite number"),
    ("lm_gen_config", [1], "field lm_gen_config must be an object"),
])
def test_bad_config_json_fields(tiny_model, tmp_path, key, value, words):
    folder, path = _edited(tiny_model, tmp_path, "config.json", _set(key, value))
    with pytest.raises(ConfigError) as info:
        load_model(folder)
    assert str(path) in str(info.value) and words in str(info.value), str(info.value)


@pytest.mark.parametrize("key, value, words", [
    ("seanet.n_filters", -4, "field seanet.n_filters must be in [1"),
    ("seanet.ratios", [8, "x"], "field seanet.ratios[1]"),
    ("quantizer.bins", "many", "field quantizer.bins must be an integer"),
    ("transformer.context", 1e12, "field transformer.context must be an integer"),
    ("sample_rate", 0, "field sample_rate must be in [1000"),
    ("frame_rate", "fast", "field frame_rate must be a finite number"),
])
def test_bad_mimi_config_fields(tiny_model, tmp_path, key, value, words):
    folder, path = _edited(tiny_model, tmp_path, "mimi_config.json", _set(key, value))
    with pytest.raises(ConfigError) as info:
        load_model(folder)
    message = str(info.value)
    assert str(path) in message and words in message and "JSON" not in message, message


def test_mimi_config_that_is_not_json_says_so(tiny_model, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(tiny_model, folder)
    (folder / "mimi_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="mimi_config.json is not valid JSON"):
        load_model(folder)


@pytest.mark.parametrize("corruption, words", [
    ("int32", "is torch.int32, the model expects floating-point"),
    ("nan", "non-finite value"),
    ("inf", "non-finite value"),
])
@pytest.mark.parametrize("which", ["model.safetensors", "mimi"])
def test_weights_of_wrong_dtype_or_non_finite_are_rejected(tiny_model, tmp_path, corruption, words, which):
    folder = tmp_path / "edited"
    shutil.copytree(tiny_model, folder)
    name = which if which != "mimi" else json.loads((folder / "config.json").read_text())["mimi_name"]
    state = read_safetensors(folder / name)
    key = next(k for k, v in state.items() if v.dtype.is_floating_point and v.numel() > 4)
    if corruption == "int32":
        state[key] = state[key].to(torch.int32)
    else:
        state[key] = state[key].clone()
        state[key].view(-1)[3] = float(corruption)
    save_safetensors(state, folder / name)
    with pytest.raises(OpenMoshiError) as info:
        load_model(folder)
    assert words in str(info.value) and key in str(info.value), str(info.value)


def test_the_shipped_presets_pass_the_checks(tiny_model):
    from openmoshi.lm.config import LMConfig

    for preset in (LMConfig.moshi_7b(), LMConfig.bench(), LMConfig.tiny()):
        assert LMConfig.from_kyutai(preset.to_kyutai()) == preset
    assert load_model(tiny_model).config.dim == 64
