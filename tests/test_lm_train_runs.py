"""LM training end to end: training and generation agree (a memorised dialogue comes back from `openmoshi infer`
word for word, at the right times), kill -9 + resume equals an uninterrupted run, 2 processes equal 1 (DDP and
FSDP2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from dialogue_utils import make_dialogue

from openmoshi.bundle import init_model
from openmoshi.checkpoint import read_safetensors, save_safetensors
from openmoshi.cli.main import main
from openmoshi.train.checkpoint import KILL_DURING_WRITE_ENV

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--threads", "1", "--set", "train.progress=false", "--set", "train.tensorboard=false",
         "--set", "train.plots=false"]


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("memorise")
    model = init_model("tiny", folder / "model", seed=1)
    manifest, alignments = make_dialogue(folder / "d", "talk", moshi=[("hello", 0.32), ("there", 1.2),
                                                                      ("friend", 2.0)],
                                         user=[("yes", 0.9), ("okay", 2.6)], duration=3.2)
    wav, _ = sf.read(folder / "d" / "talk.wav", dtype="float32")
    sf.write(folder / "user.wav", wav[:, 1], 24_000)  # what the user said, alone
    return {"model": model, "manifest": manifest, "user": folder / "user.wav", "alignments": alignments,
            "folder": folder}


@pytest.mark.slow  # ~80 training steps, then generation
def test_memorised_dialogue_comes_back_from_infer_at_the_right_times(dialogue, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "lm", "--stage", "finetune", "--init", str(dialogue["model"]), "--data",
                 str(dialogue["manifest"]), "--out", str(run), "--duration", "3.2", "--batch-size", "1",
                 "--max-steps", "80", "--lr", "3e-3", "--eval-every", "0", "--checkpoint-every", "1000",
                 "--set", "optim.warmup_steps=10", *QUIET]) == 0
    out = tmp_path / "answers"
    assert main(["infer", "--model", str(run / "model"), str(dialogue["user"]), "--out", str(out), "--greedy",
                 "--quiet", "--threads", "1"]) == 0
    transcript = json.loads((out / "user.transcript.json").read_text())
    moshi = [(w, start) for w, (start, _), speaker in dialogue["alignments"] if speaker == "SPEAKER_MAIN"]
    got = [(w["word"], w["start"]) for w in transcript["words"]]
    assert [w for w, _ in got] == [w for w, _ in moshi]
    for (_, expected), (_, start) in zip(moshi, got):
        assert abs(start - expected) < 0.08  # within one frame


def _run(out: Path, *extra: str, env: dict | None = None, check: bool = True, torchrun: int = 0,
         port: int = 29533):
    args = ["train", "lm", "--stage", "finetune", "--out", str(out), "--duration", "1.6", "--batch-size", "4",
            "--max-steps", "6", "--lr", "3e-3", "--checkpoint-every", "2", "--eval-every", "3",
            "--set", "train.log_every=1", *QUIET, *extra]
    env = dict(env or os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if torchrun:
        cmd = ["torchrun", "--nproc-per-node", str(torchrun), "--master-port", str(port), "-m", "openmoshi", *args]
    else:
        cmd = [sys.executable, "-m", "openmoshi", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=check, timeout=600)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(run / "model" / "model.safetensors")


@pytest.mark.slow  # three training subprocesses
def test_kill_9_during_a_checkpoint_then_resume_equals_uninterrupted(dialogue, tmp_path):
    data = ["--init", str(dialogue["model"]), "--data", str(dialogue["manifest"])]
    ref = tmp_path / "ref"
    _run(ref, *data)
    killed = tmp_path / "killed"
    env = dict(os.environ)
    env[KILL_DURING_WRITE_ENV] = "4"
    proc = _run(killed, *data, env=env, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "checkpoints" / "step_00000002.pt").exists()
    assert not (killed / "checkpoints" / "step_00000004.pt").exists()
    _run(killed, *data)  # the same command resumes from step 2
    expected, got = _weights(ref), _weights(killed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.slow  # torchrun with two processes
def test_two_processes_equal_one_process(dialogue, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    data = ["--init", str(dialogue["model"]), "--data", str(dialogue["manifest"]), "--lora-rank", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, *data)
    _run(two, *data, torchrun=2)
    a, b = read_safetensors(one / "model" / "lora.safetensors"), read_safetensors(two / "model" / "lora.safetensors")
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)  # Adam amplifies float noise
        moved += int(a[key].abs().max() > 0)
    assert moved > 0  # the adapters were trained


@pytest.mark.slow  # torchrun with two processes, three times
def test_fsdp_two_processes_equal_one_and_resume_after_kill_is_exact(dialogue, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    # Full fine-tuning (every weight and Adam moment sharded over the two processes, layer by layer) from bf16
    # weights as Kyutai ships them: one process casts them to fp32 as it reads; FSDP maps the file and casts
    # each layer just before sharding it.
    model = tmp_path / "bf16"
    shutil.copytree(dialogue["model"], model)
    start = {k: v.to(torch.bfloat16) for k, v in read_safetensors(model / "model.safetensors").items()}
    save_safetensors(start, model / "model.safetensors")
    # With the auxiliary user-transcription head, FSDP shards the LM and the head as one module while the
    # checkpoint keeps them apart (`lm`, `user_text_head`).
    data = ["--init", str(model), "--data", str(dialogue["manifest"]), "--set", "loss.user_text_weight=0.5"]
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    _run(one, *data)
    _run(two, *data, "--parallel", "fsdp", torchrun=2, port=29534)
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys() == start.keys() and {v.dtype for v in b.values()} == {torch.float32}
    moved = max(float((a[k] - start[k].float()).abs().max()) for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4)  # Adam amplifies float noise
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.05 * moved
    for name in ("config.json", "mimi_config.json"):  # the same export as without FSDP
        assert (two / "model" / name).read_text() == (one / "model" / name).read_text()
    # killed in the middle of writing step 4's checkpoint; the same command resumes from step 2
    proc = _run(killed, *data, "--parallel", "fsdp", torchrun=2, port=29534, check=False,
                env=dict(os.environ, **{KILL_DURING_WRITE_ENV: "4"}))
    assert proc.returncode != 0
    assert (killed / "checkpoints" / "step_00000002.pt").exists()
    assert not (killed / "checkpoints" / "step_00000004.pt").exists()
    _run(killed, *data, "--parallel", "fsdp", torchrun=2, port=29534)
    got = _weights(killed)
    for key in b:
        assert torch.equal(got[key], b[key]), key
