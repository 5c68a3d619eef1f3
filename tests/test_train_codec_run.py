"""`openmoshi train codec` end to end on real speech: loss falls, distillation, exports that load (ours, the
`codec encode` command, Kyutai's reference), exact resume after kill -9, 2 processes == 1, `eval codec`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openmoshi.checkpoint import read_safetensors
from openmoshi.cli.main import main
from openmoshi.codec import load_mimi
from openmoshi.train.checkpoint import KILL_DURING_WRITE_ENV

REPO = Path(__file__).resolve().parents[1]
# Small and fast: 0.24 s crops, a light discriminator, one thread (the test machine's cores are shared).
FAST = ["--segment-seconds", "0.24", "--threads", "1", "--set", "train.progress=false", "--set", "train.log_every=1",
        "--set", "train.tensorboard=false", "--set", "discriminator.filters=4",
        "--set", "discriminator.n_ffts=512,256,128", "--set", "data.eval_seconds=1", "--set", "data.eval_items=2"]


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory, speech_files) -> Path:
    out = tmp_path_factory.mktemp("speech_data")
    for f in speech_files:
        shutil.copy(f, out / f.name)
    return out


def _rows(run: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def _cli_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop(KILL_DURING_WRITE_ENV, None)
    return env


def _train_cmd(speech_dir: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "openmoshi", "train", "codec", "--data", str(speech_dir), "--out", str(run),
            "--max-steps", str(steps), "--batch-size", "4", *FAST, *extra]


@pytest.mark.slow  # 30 training steps and 10 evaluations
def test_short_run_on_speech_loss_falls_and_exports(tmp_path, speech_dir, speech_batch):
    run = tmp_path / "run"
    # Reconstruction losses only (EnCodec mix before its adversarial start), raw weights for evaluation.
    assert main(["train", "codec", "--data", str(speech_dir), "--out", str(run), "--max-steps", "30",
                 "--batch-size", "4", "--losses", "encodec", "--eval-every", "3", "--checkpoint-every", "30",
                 "--set", "losses.adv_start=1000", "--set", "train.ema_decay=0", "--set", "train.plots=false",
                 *FAST]) == 0
    evals = _rows(run, "eval")
    assert [r["step"] for r in evals][0] == 3 and evals[-1]["step"] == 30
    assert evals[-1]["mel_distance"] < 0.95 * evals[0]["mel_distance"], [r["mel_distance"] for r in evals]
    train = _rows(run, "train")
    assert {"l1", "msspec", "commit", "bandwidth_kbps", "throughput_audio_s_per_s", "peak_mem_mb"} <= set(train[-1])
    # RUN/model is a plain codec: openmoshi.load_mimi and `openmoshi codec encode --checkpoint` take it.
    mimi = load_mimi(run / "model", num_codebooks=8)
    wav = speech_batch[:1, :, :9600]
    codes = mimi.encode(wav)
    src = tmp_path / "in.wav"
    import soundfile as sf
    sf.write(src, wav[0, 0].numpy(), 24_000)
    assert main(["codec", "encode", str(src), str(tmp_path / "codes.safetensors"), "--checkpoint", str(run / "model"),
                 "--quiet", "--device", "cpu"]) == 0
    assert torch.equal(read_safetensors(tmp_path / "codes.safetensors")["codes"], codes)
    assert sorted(p.name for p in (run / "samples" / "step_00000030").iterdir())[-1] == "spectrograms.png"


@pytest.mark.slow  # training with a teacher, then evaluation with PESQ/STOI
def test_adversarial_run_with_tiny_wavlm_teacher_and_eval(tmp_path, speech_dir, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    teacher = tmp_path / "wavlm"
    transformers.WavLMModel(transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7)).save_pretrained(teacher)
    run = tmp_path / "run"
    assert main(["train", "codec", "--data", str(speech_dir), "--out", str(run), "--max-steps", "3",
                 "--batch-size", "2", "--teacher", str(teacher), "--teacher-layer", "1", "--eval-every", "3",
                 *FAST]) == 0
    row = _rows(run, "train")[-1]
    assert {"adv", "feat", "d_loss", "distill", "grad_norm_adv", "grad_norm_feat"} <= set(row)
    assert 0.0 < row["distill"] < 2.0
    assert len(list((run / "teacher_cache").glob("*.pt"))) == 4  # each file's features, computed once
    assert "teacher_cosine" in _rows(run, "eval")[-1]
    assert (run / "plots" / "train.png").exists() and (run / "model" / "distill_projection.pt").exists()
    capsys.readouterr()
    assert main(["eval", "codec", "--checkpoint", str(run / "model"), str(speech_dir), "--seconds", "1",
                 "--teacher", str(teacher), "--teacher-layer", "1", "--json", "--quiet", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["files"] == 4 and metrics["bitrate_kbps"] == pytest.approx(8 * 10 * 12.5 / 1000)
    assert {"mel_distance", "stft_distance", "si_sdr", "l1", "stoi", "usage_7", "entropy_bits_0",
            "teacher_cosine"} <= set(metrics)
    assert main(["plot", str(run)]) == 0


def _final_state(run: Path) -> dict:
    ckpts = sorted((run / "checkpoints").glob("step_*.pt"))
    return torch.load(ckpts[-1], weights_only=False)


@pytest.mark.slow  # three training processes
def test_codec_kill_9_during_checkpoint_then_resume_is_exact(tmp_path, speech_dir):
    extra = ("--checkpoint-every", "2", "--eval-every", "0", "--set", "train.plots=false")
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_train_cmd(speech_dir, ref, 6, *extra), env=_cli_env(), check=True, capture_output=True)
    env = dict(_cli_env(), **{KILL_DURING_WRITE_ENV: "4"})
    proc = subprocess.run(_train_cmd(speech_dir, run, 6, *extra), env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    subprocess.run(_train_cmd(speech_dir, run, 6, *extra), env=_cli_env(), check=True, capture_output=True)
    a, b = _final_state(ref), _final_state(run)
    for part in ("models", "ema"):
        for name, state in a[part].items():
            for key, value in state.items():
                assert torch.equal(b[part][name][key], value), (part, name, key)
    assert a["optimizers"]["codec"]["state"].keys() == b["optimizers"]["codec"]["state"].keys()
    assert a["task"] == b["task"]


@pytest.mark.slow  # torchrun with two processes
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_codec_two_processes_equal_one(tmp_path, speech_dir, parallel):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    extra = ("--checkpoint-every", "1", "--eval-every", "0", "--set", "train.plots=false")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_train_cmd(speech_dir, one, 1, *extra), env=_cli_env(), check=True, capture_output=True)
    cmd = _train_cmd(speech_dir, two, 1, *extra, "--parallel", parallel)
    cmd = ["torchrun", "--nproc-per-node", "2", "--master-port", "29531", *cmd[1:]]
    proc = subprocess.run(cmd, env=_cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _final_state(one), _final_state(two)
    # Same losses (each process's mean, averaged), same k-means codebooks (rows gathered from both processes)
    ra, rb = _rows(one, "train")[0], _rows(two, "train")[0]
    for key in ("adv", "feat", "l1", "d_loss", "commit", "rvq_entropy", "quantized_share"):
        assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-9), key
    # Same gradients: Adam's first moment after one step is (1 - beta1) * grad. The codec's agree to ~3e-5 of
    # their norm. The discriminator's first gradient is tiny (its real and generated inputs look alike at init:
    # norm ~5e-5) and dominated by rounding: one process with 1 thread vs 2 differs by ~5 % there. A missing or
    # wrong reduction (one process's half batch, a sum for a mean) would be off by 50-100 %.
    for name, tolerance in (("codec", 1e-3), ("discriminator", 0.2)):
        state_a, state_b = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert state_a.keys() == state_b.keys(), name
        ga = torch.cat([state_a[i]["exp_avg"].flatten().double() for i in sorted(state_a)])
        gb = torch.cat([state_b[i]["exp_avg"].flatten().double() for i in sorted(state_a)])
        assert float((ga - gb).norm() / ga.norm()) < tolerance, name
    # Same weights, but for signs: Adam's first step is lr * sign(grad), so where a gradient is within rounding
    # of zero (a handful of the codec's ~2 M weights, 2-4 % of the discriminator's, which sees the codec's
    # first output) the step may go either way, by at most 2 lr.
    lr = 8e-4
    for name in ("codec", "discriminator"):
        total = flipped = 0
        for key, value in a["models"][name].items():
            diff = (b["models"][name][key] - value).abs()
            assert float(diff.max()) <= 2.01 * lr, (name, key)
            total, flipped = total + diff.numel(), flipped + int((diff > 1e-4).sum())
        assert flipped < (1e-4 if name == "codec" else 0.08) * total, (name, flipped, total)
