"""Model folders: `openmoshi init`, load_model, round trips, and clear errors for broken folders."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import read_speech
from openmoshi import CheckpointError, ConfigError, load_model, save_model
from openmoshi.cli.main import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("init") / "tiny"
    assert main(["init", "--preset", "tiny", str(folder), "--seed", "7"]) == 0
    return folder


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_init_folder_has_kyutai_layout_and_loads_back_identical(tiny, tmp_path):
    config = json.loads((tiny / "config.json").read_text())
    for name in (config["moshi_name"], config["mimi_name"], config["tokenizer_name"], "mimi_config.json"):
        assert (tiny / name).is_file()
    first = load_model(tiny)
    again = load_model(save_model(first, tmp_path / "copy"))
    assert _states_equal(first.lm, again.lm) and _states_equal(first.mimi, again.mimi)
    assert first.tokenizer.get_piece_size() == again.tokenizer.get_piece_size() == 1000
    assert first.generation == {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}


def test_init_keeps_an_existing_model_and_refuses_other_folders(tiny, tmp_path, capsys):
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    assert main(["init", "--preset", "tiny", str(tiny), "--seed", "99"]) == 0
    assert "keeping it" in capsys.readouterr().out
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["init", "--preset", "tiny", str(other)]) == 1
    assert "--force" in capsys.readouterr().err


def test_lm_gen_config_overrides_defaults(tiny, tmp_path):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["lm_gen_config"] = {"temp": 0.6, "top_k_text": 10}
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(folder).generation == {"temp": 0.6, "temp_text": 0.7, "top_k": 250, "top_k_text": 10}


def test_wrong_config_fails_clearly(tiny, tmp_path):
    import shutil
    folder = tmp_path / "wrong"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_heads"], config["dim"] = 4, 128  # weights were written for dim 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert "model.safetensors" in str(err.value) and "shape" in str(err.value)
    config["conditioners"] = {"description": {"type": "lut"}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="conditioners"):
        load_model(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_and_client_commands(tiny, tmp_path, speech_files):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "openmoshi.cli.main", "serve", "--model", str(tiny),
                               "--port", str(port), "--max-sessions", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert json.loads(r.read())["max_sessions"] == 2
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError("server did not start: " + (server.stdout.read() if server.poll() else ""))
                time.sleep(0.3)
        wav = tmp_path / "question.wav"
        sf.write(wav, read_speech(speech_files[2], 1.5)[0].numpy(), 24_000)
        out = tmp_path / "heard"
        assert main(["client", "--url", f"ws://127.0.0.1:{port}/api/chat", "--input", str(wav), "--out", str(out),
                     "--text-temperature", "0", "--audio-temperature", "0"]) == 0
        heard = sf.info(out / "moshi.wav")
        assert abs(heard.duration - 2.0) < 0.3  # 1.5 s of speech + 0.5 s of trailing silence
        transcript = json.loads((out / "transcript.json").read_text())
        assert transcript["text"] == "".join(p["text"] for p in transcript["pieces"])
        assert json.loads((out / "metadata.json").read_text())["text_temperature"] == 0
    finally:
        server.terminate()
        server.wait(20)
    assert np.isfinite(heard.duration)


def test_config_may_name_files_in_another_hf_repo(tiny, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    folder = tmp_path / "remote-names"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["moshi_name"] = "hf://someone/elsewhere/model.safetensors"  # as Kyutai's hf_get allows
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:  # offline here: the error names the repo and what to do
        load_model(folder)
    assert "someone/elsewhere" in str(err.value) and "download" in str(err.value)
