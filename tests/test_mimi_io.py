"""Mimi checkpoints (round trip, key conventions, clear errors) and the codec command line."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from conftest import read_speech
from mimi_utils import fill_codebooks
from openmoshi import CheckpointError, ConfigError, Mimi, load_mimi, save_mimi
from openmoshi.cli.main import main
from openmoshi.codec import mimi_tiny


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    mimi = Mimi(mimi_tiny()).eval()
    fill_codebooks(mimi, torch.randn(1, 1, 1920 * 8) * 0.1)
    return save_mimi(mimi, tmp_path_factory.mktemp("mimi") / "tiny.safetensors"), mimi


@torch.no_grad()
def test_round_trip_and_num_codebooks(tiny_file):
    path, original = tiny_file
    wav = torch.randn(2, 1, 1920 * 4) * 0.1
    for k in (1, 4, 8):
        loaded = load_mimi(path, num_codebooks=k)
        original.set_num_codebooks(k)
        assert loaded.num_codebooks == k
        assert torch.equal(loaded.encode(wav), original.encode(wav))
    assert set(load_file(path)) == set(original.state_dict())
    with pytest.raises(ConfigError, match="num_codebooks"):
        load_mimi(path, num_codebooks=9)


def test_per_step_key_convention_loads(tiny_file, tmp_path):
    path, original = tiny_file
    state = load_file(path)
    for key in [k for k in state if k.endswith("self_attn.in_proj_weight")]:
        state[key.replace("in_proj_weight", "in_projs.0.weight")] = state.pop(key)
    for key in [k for k in state if k.endswith("self_attn.out_proj.weight")]:
        state[key.replace("out_proj.weight", "out_projs.0.weight")] = state.pop(key)
    other = tmp_path / "per_step.safetensors"
    save_file(state, str(other))
    wav = torch.randn(1, 1, 1920 * 3) * 0.1
    with torch.no_grad():
        assert torch.equal(load_mimi(other, config=mimi_tiny()).encode(wav), load_mimi(path).encode(wav))


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_bad_checkpoint_names_key_and_file(tiny_file, tmp_path, damage):
    path, _ = tiny_file
    state = load_file(path)
    key = "decoder.model.0.conv.conv.weight"
    if damage == "missing":
        del state[key]
    elif damage == "extra":
        state["decoder.surprise.weight"] = torch.zeros(3)
        key = "decoder.surprise.weight"
    else:
        state[key] = torch.zeros(2, 2, 2)
    bad = tmp_path / f"{damage}.safetensors"
    save_file(state, str(bad))
    with pytest.raises(CheckpointError) as err:
        load_mimi(bad, config=mimi_tiny())
    assert key in str(err.value) and str(bad) in str(err.value)


def test_corrupt_and_missing_sources(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        load_mimi(corrupt)
    with pytest.raises(CheckpointError, match="not found"):
        load_mimi(tmp_path / "nowhere")
    empty_folder = tmp_path / "folder"
    empty_folder.mkdir()
    with pytest.raises(CheckpointError, match="tokenizer-e351c8d8"):
        load_mimi(empty_folder)


def test_hf_source_offline_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError, match="download"):
        load_mimi("hf://kyutai/moshiko-pytorch-bf16")


def test_codec_cli_round_trip(tiny_file, tmp_path, speech_files, capsys):
    path, mimi = tiny_file
    mono = read_speech(speech_files[0], 1.3)[0].numpy()
    from openmoshi.audio.io import resample
    up = resample(torch.from_numpy(mono)[None], 24_000, 44_100)[0].numpy()
    source = tmp_path / "speech.flac"
    sf.write(source, np.stack([up, up], axis=1), 44_100)
    codes_file, out_wav = tmp_path / "codes.safetensors", tmp_path / "out.wav"
    assert main(["codec", "encode", str(source), str(codes_file), "--checkpoint", str(path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "resampled 44100 Hz -> 24000 Hz" in printed and "mixed 2 channels down to mono" in printed
    codes = load_file(codes_file)["codes"]
    assert codes.shape == (1, 8, int(np.ceil(1.3 * 12.5)))
    with torch.no_grad():
        wav = torch.from_numpy(sf.read(source, dtype="float32")[0].mean(axis=1))
        expected = mimi.encode(resample(wav[None], 44_100, 24_000)[None])
    assert torch.equal(codes, expected)
    assert main(["codec", "decode", str(codes_file), str(out_wav), "--checkpoint", str(path), "--quiet"]) == 0
    info = sf.info(out_wav)
    assert info.samplerate == 24_000 and abs(info.duration - 1.3) < 1e-3


def test_codec_cli_unreadable_input(tiny_file, tmp_path, capsys):
    path, _ = tiny_file
    bad = tmp_path / "noise.mp3"
    bad.write_bytes(b"definitely not audio")
    assert main(["codec", "encode", str(bad), str(tmp_path / "x.safetensors"), "--checkpoint", str(path)]) == 1
    err = capsys.readouterr().err
    assert "noise.mp3" in err and "Traceback" not in err
