"""The training core: configs and overrides, data order, exact resume after kill -9, 2 processes == 1 (DDP and
FSDP2)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from openmoshi.errors import ConfigError
from openmoshi.train import ShardedBatchSampler, TrainConfig, apply_overrides, from_dict, to_dict
from openmoshi.train.checkpoint import KILL_DURING_WRITE_ENV

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "train_toy.py"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop(KILL_DURING_WRITE_ENV, None)
    env.update(extra)
    return env


def _toy(run: Path, steps: int, *extra: str, env: dict | None = None, check: bool = True):
    return subprocess.run([sys.executable, str(TOY), str(run), str(steps), *extra], env=env or _env(),
                          capture_output=True, text=True, check=check, timeout=300)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model" / "net.pt")


@dataclass
class _Inner:
    lr: float = 1e-3
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    name: str | None = None


@dataclass
class _Root:
    train: TrainConfig = field(default_factory=TrainConfig)
    inner: _Inner = field(default_factory=_Inner)


def test_overrides_parse_by_field_type_and_round_trip():
    cfg = apply_overrides(_Root(), ["train.max_steps=7", "inner.lr=2e-4", "inner.sizes=3,4,5",
                                    "train.progress=false", "inner.name=none"])
    assert cfg.train.max_steps == 7 and cfg.inner.lr == 2e-4 and cfg.inner.sizes == [3, 4, 5]
    assert cfg.train.progress is False and cfg.inner.name is None
    assert from_dict(_Root, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown setting"):
        apply_overrides(_Root(), ["train.max_stepz=1"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(_Root(), ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="at least 1"):
        apply_overrides(_Root(), ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(_Root(), ["train.max_steps"])


def _take(sampler, n):
    it = iter(sampler)
    return [[(r.index, r.serial) for r in next(it)] for _ in range(n)]


def test_data_order_is_deterministic_sharded_and_resumable():
    one = _take(ShardedBatchSampler(10, 4, 0, 1, seed=3), 6)
    # Every item once per epoch, then a new permutation.
    first_epoch = [i for batch in one for i, _ in batch][:10]
    assert sorted(first_epoch) == list(range(10))
    assert [i for batch in one for i, _ in batch][10:20] != first_epoch
    # Two ranks take contiguous halves of each global batch.
    r0 = _take(ShardedBatchSampler(10, 4, 0, 2, seed=3), 6)
    r1 = _take(ShardedBatchSampler(10, 4, 1, 2, seed=3), 6)
    assert [a + b for a, b in zip(r0, r1)] == one
    # Resuming at cursor 8 (after 2 steps) continues the same stream; micro-batches split each step.
    assert _take(ShardedBatchSampler(10, 4, 0, 1, seed=3, start=8), 4) == one[2:6]
    micro = _take(ShardedBatchSampler(10, 4, 0, 1, seed=3, micro_batches=2), 4)
    assert [a + b for a, b in zip(micro[0::2], micro[1::2])] == one[:2]
    assert _take(ShardedBatchSampler(10, 4, 0, 1, seed=4), 1) != one[:1]


@pytest.mark.slow  # five training subprocesses
def test_kill_9_at_any_point_then_resume_equals_uninterrupted(tmp_path):
    steps = 10
    ref = tmp_path / "ref"
    _toy(ref, steps)
    # 1) killed in the middle of writing the checkpoint of step 6 (half a file on disk, then SIGKILL)
    run = tmp_path / "killed_in_write"
    proc = _toy(run, steps, env=_env(**{KILL_DURING_WRITE_ENV: "6"}), check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (run / "checkpoints" / "step_00000003.pt").exists()
    assert not (run / "checkpoints" / "step_00000006.pt").exists()
    _toy(run, steps)  # the same command resumes (from step 3, ignoring the half-written file)
    # 2) killed from outside at an arbitrary moment after the first checkpoint
    run2 = tmp_path / "killed_outside"
    # steps slowed down so the run is surely still going when the first checkpoint appears (on an idle
    # machine the toy otherwise finishes, and prunes step 3, between two polls)
    proc = subprocess.Popen([sys.executable, str(TOY), str(run2), str(steps)], env=_env(TOY_STEP_SLEEP="0.2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while (not (run2 / "checkpoints" / "step_00000003.pt").exists() and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.02)
    assert proc.poll() is None, "the toy run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _toy(run2, steps)
    expected = _weights(ref)
    for resumed in (run, run2):
        got = _weights(resumed)
        for key in expected:
            assert torch.equal(got[key], expected[key]), (resumed.name, key)
    # metrics.jsonl has each train step once after the resume
    import json
    steps_logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["split"] == "train"]
    assert steps_logged == list(range(1, steps + 1))
    # A finished run re-run does nothing and changes nothing.
    _toy(run, steps)
    assert all(torch.equal(_weights(run)[k], expected[k]) for k in expected)


@pytest.mark.slow  # torchrun with two processes
def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    one, two = tmp_path / "one", tmp_path / "two"
    _toy(one, 6, "8", "2")  # global batch 8 as 2 micro-batches of 4
    subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", "29517", str(TOY), str(two), "6", "8"],
                   env=_env(), capture_output=True, text=True, check=True, timeout=300)
    a, b = _weights(one), _weights(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # torchrun with two processes, three times
def test_fsdp_two_processes_equal_one_and_resume_after_kill_is_exact(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    fsdp = ["torchrun", "--nproc-per-node", "2", "--master-port", "29518", str(TOY)]
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    _toy(one, 6, "8", "2")  # global batch 8 as 2 micro-batches of 4 (the weight EMA is what gets exported)
    subprocess.run([*fsdp, str(two), "6", "8"], env=_env(TOY_PARALLEL="fsdp"), capture_output=True, text=True,
                   check=True, timeout=300)
    assert '"parallel": "fsdp"' in (two / "config.json").read_text()
    a, b = _weights(one), _weights(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    ca = torch.load(one / "checkpoints" / "step_00000006.pt", weights_only=False)
    cb = torch.load(two / "checkpoints" / "step_00000006.pt", weights_only=False)
    # the same checkpoint layout as without FSDP: full tensors, optimizer state by parameter index
    assert type(cb["models"]["net"]["0.weight"]) is torch.Tensor
    assert cb["optimizers"]["net"]["state"].keys() == ca["optimizers"]["net"]["state"].keys()
    for i, state in ca["optimizers"]["net"]["state"].items():
        torch.testing.assert_close(cb["optimizers"]["net"]["state"][i]["exp_avg_sq"], state["exp_avg_sq"])
    # killed in the middle of writing step 6's checkpoint, then the same command resumes from step 3
    proc = subprocess.run([*fsdp, str(killed), "6", "8"], env=_env(TOY_PARALLEL="fsdp", **{KILL_DURING_WRITE_ENV: "6"}),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert not (killed / "checkpoints" / "step_00000006.pt").exists()
    subprocess.run([*fsdp, str(killed), "6", "8"], env=_env(TOY_PARALLEL="fsdp"), capture_output=True, text=True,
                   check=True, timeout=300)
    got = _weights(killed)
    for key in b:
        assert torch.equal(got[key], b[key]), key


def test_parallel_setting_is_checked():
    cfg = _Root()
    assert apply_overrides(cfg, ["train.parallel=fsdp"]).train.parallel == "fsdp"
    with pytest.raises(ConfigError, match="parallel must be ddp or fsdp"):
        apply_overrides(cfg, ["train.parallel=zero"])
