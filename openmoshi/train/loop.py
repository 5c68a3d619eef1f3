"""The one training loop every stage runs: `Trainer(task, cfg, run_dir, full_config).fit()`.

Per optimizer step: the process's slice of the global batch arrives as `grad_accum` micro-batches; the
task's `train_step` runs on each (DDP / FSDP gradient sync only on the last); then every optimizer is
clipped, stepped and zeroed, schedulers and weight EMAs advance. Metrics are averaged over micro-batches and
processes. Evaluation (rank 0, EMA weights), plots, checkpoints and RUN/model exports follow on schedule.
Under FSDP (train.parallel=fsdp) weights are gathered from every rank first, so checkpoints, evaluation and
exports see the same full tensors as with DDP.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.order import ShardedBatchSampler
from ..errors import ConfigError
from . import distributed, fsdp
from .checkpoint import Checkpointer, rng_state, set_rng_state
from .config import TrainConfig, diff, from_dict, save_json, to_dict
from .ema import WeightEMA
from .monitor import Monitor, peak_memory_mb
from .task import Task, TrainEnv

logger = logging.getLogger(__name__)


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but this machine has no CUDA GPU; use --set train.device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _identity(x: Any) -> Any:
    return x


class Trainer:
    """Runs (or resumes) one run folder: RUN/config.json, checkpoints/, metrics.jsonl, tb/, plots/, model/."""

    def __init__(self, task: Task, cfg: TrainConfig, run_dir: str | Path, full_config: Any) -> None:
        self.task, self.cfg, self.run_dir = task, cfg, Path(run_dir)
        self.full_config = full_config

    def _check_config(self) -> None:
        """A run folder keeps its config; re-running with other settings says what changed."""
        path = self.run_dir / "config.json"
        if path.exists():
            try:
                old = from_dict(type(self.full_config), json.loads(path.read_text()))
            except (ValueError, ConfigError) as exc:
                logger.warning("could not read the run's previous config (%s)", exc)
                return
            changes = diff(old, self.full_config)
            if changes:
                logger.warning("resuming %s with changed settings: %s", self.run_dir, "; ".join(changes))

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        info = distributed.init(resolve_device(cfg.device, 0).type)
        device = resolve_device(cfg.device, info.local_rank)
        if cfg.batch_size % (info.world_size * cfg.grad_accum):
            raise ConfigError(f"the global batch {cfg.batch_size} must split into {info.world_size} processes "
                              f"x {cfg.grad_accum} micro-batches; change --batch-size or train.grad_accum")
        env = TrainEnv(cfg, device, info, self.run_dir, micro_batches=cfg.grad_accum)
        if cfg.parallel == "fsdp" and not info.enabled:
            logger.info("train.parallel=fsdp with one process: nothing to shard (start with torchrun to shard)")
        try:
            return self._fit(env)
        finally:
            env.close()
            distributed.shutdown()

    def _fit(self, env: TrainEnv) -> dict[str, float]:
        cfg, task, info = self.cfg, self.task, env.dist
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._check_config()
            save_json(self.full_config, self.run_dir / "config.json")
        distributed.barrier()
        seed_everything(cfg.seed)  # same on every process: identical initial weights
        task.setup(env)
        models = task.models()
        emas = {name: (fsdp.ShardedEMA if fsdp.is_sharded(models[name]) else WeightEMA)(models[name], cfg.ema_decay)
                for name in task.ema_models()} if cfg.ema_decay > 0 else {}
        checkpointer = Checkpointer(self.run_dir, cfg.keep_checkpoints)
        step, cursor = 0, 0
        latest = checkpointer.latest()
        if latest is not None:
            step, cursor = self._restore(checkpointer.load(latest[1]), models, emas, info)
            logger.info("resumed %s at step %d", self.run_dir, step)
        else:
            # Every process draws its own randomness from here on (dropout, crops seeded by item are apart).
            torch.manual_seed(cfg.seed + 1 + info.rank)
        env.step = step
        monitor = Monitor(self.run_dir, info.is_main, step, cfg.max_steps, cfg.tensorboard, cfg.wandb_project,
                          cfg.progress, to_dict(self.full_config))
        if step >= cfg.max_steps:
            logger.info("run %s already reached max_steps=%d", self.run_dir, cfg.max_steps)
            monitor.close()
            return {}
        sampler = ShardedBatchSampler(len(task.dataset()), cfg.batch_size, info.rank, info.world_size, cfg.seed,
                                      start=cursor, micro_batches=cfg.grad_accum)
        loader = DataLoader(task.dataset(), batch_sampler=sampler, num_workers=cfg.num_workers,
                            collate_fn=task.collate() or _identity, persistent_workers=False,
                            prefetch_factor=2 if cfg.num_workers else None)
        batches = iter(loader)
        unit, per_item = task.throughput_unit
        window: dict[str, list[float]] = {}
        t_window, steps_window = time.time(), 0
        last: dict[str, float] = {}
        try:
            while step < cfg.max_steps:
                metrics: dict[str, float] = {}
                for micro in range(cfg.grad_accum):
                    batch = next(batches)
                    with env.no_sync(skip=micro < cfg.grad_accum - 1), env.autocast():
                        out = task.train_step(batch, env)
                    for k, v in out.items():
                        metrics[k] = metrics.get(k, 0.0) + float(v) / cfg.grad_accum
                metrics.update(self._optimizer_step())
                step += 1
                env.step = step
                cursor += cfg.batch_size
                for name, ema in emas.items():
                    ema.update(models[name])
                for k, v in metrics.items():
                    window.setdefault(k, []).append(v)
                steps_window += 1
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    avg = distributed.all_reduce_mean({k: sum(v) / len(v) for k, v in window.items()}, env.device)
                    elapsed = time.time() - t_window
                    avg[f"throughput_{unit}_per_s"] = steps_window * cfg.batch_size * per_item / max(elapsed, 1e-9)
                    avg["step_s"] = elapsed / steps_window
                    avg["peak_mem_mb"] = peak_memory_mb(env.device)
                    for name, sched in task.schedulers().items():
                        avg[f"lr_{name}"] = sched.get_last_lr()[0]
                    monitor.log(step, "train", avg)
                    last = avg
                    window, t_window, steps_window = {}, time.time(), 0
                monitor.progress(step, last.get("loss"), last.get(f"throughput_{unit}_per_s"), f"{unit}/s")
                final = step == cfg.max_steps
                t_pause = time.time()
                if (cfg.eval_every and step % cfg.eval_every == 0) or final:
                    self._evaluate(env, models, emas, monitor, step)
                if step % cfg.checkpoint_every == 0 or final:
                    self._save(env, checkpointer, models, emas, step, cursor)
                t_window += time.time() - t_pause  # throughput counts training time only
        finally:
            monitor.close()
        return last

    def _optimizer_step(self) -> dict[str, float]:
        task, out = self.task, {}
        clips = task.grad_clip()
        schedulers = task.schedulers()
        for name, opt in task.optimizers().items():
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            max_norm = clips.get(name, 0.0)
            if max_norm and params:
                if isinstance(params[0], fsdp.DTensor):  # FSDP: the norm over every shard, then clip
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params]).full_tensor()
                    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
                else:
                    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                out[f"grad_norm_{name}"] = float(norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if name in schedulers:
                schedulers[name].step()
        return out

    def _weights(self, env: TrainEnv, models: dict, emas: dict) -> tuple[dict, dict]:
        """Model and EMA state dicts as full tensors (gathered under FSDP: every rank calls this; rank 0 keeps)."""
        keep = env.dist.is_main
        return ({k: fsdp.gather(m.state_dict(), keep) for k, m in models.items()},
                {k: fsdp.gather(e.state_dict(), keep) for k, e in emas.items()})

    def _eval_models(self, env: TrainEnv, models: dict, emas: dict, states: tuple[dict, dict] | None = None,
                     device: torch.device | None = None) -> dict:
        """The modules evaluation and export run (EMA weights where kept); FSDP-sharded ones as plain copies on
        `device` (default env.device). Under FSDP every rank must call it (weights are gathered); the result is
        for rank 0."""
        if any(fsdp.is_sharded(m) for m in models.values()):
            model_states, ema_states = states or self._weights(env, models, emas)
            if not env.dist.is_main:
                return {}
            return {name: env.plain(m, ema_states.get(name) or model_states[name], device) if fsdp.is_sharded(m)
                    else (emas[name].module if name in emas else m) for name, m in models.items()}
        return {name: (emas[name].module if name in emas else m) for name, m in models.items()}

    def _evaluate(self, env: TrainEnv, models: dict, emas: dict, monitor: Monitor, step: int) -> None:
        eval_models = self._eval_models(env, models, emas)
        if env.dist.is_main:
            # Evaluation must not move the training RNG, so that evaluated and resumed runs stay identical.
            saved = rng_state()
            with torch.no_grad():
                metrics = self.task.evaluate(eval_models, env)
            set_rng_state(saved)
            if metrics:
                monitor.log(step, "eval", metrics)
            if self.cfg.plots:
                try:
                    from .plots import plot_run
                    plot_run(self.run_dir)
                except Exception as exc:  # plots are a convenience: never stop training for them
                    logger.warning("could not write plots: %s", exc)
        distributed.barrier()

    def _save(self, env: TrainEnv, checkpointer: Checkpointer, models: dict, emas: dict, step: int,
              cursor: int) -> None:
        task = self.task
        rngs = distributed.gather_objects(rng_state())
        keep = env.dist.is_main
        weights = self._weights(env, models, emas)  # the same tensors as state_dict() without FSDP
        optimizers = {k: fsdp.gather(o.state_dict(), keep) for k, o in task.optimizers().items()}
        export_models = self._eval_models(env, models, emas, weights, torch.device("cpu"))  # export: no GPU copy
        if env.dist.is_main:
            state = {
                "step": step, "cursor": cursor, "world_size": env.dist.world_size,
                "models": weights[0], "ema": weights[1], "optimizers": optimizers,
                "schedulers": {k: s.state_dict() for k, s in task.schedulers().items()},
                "task": task.state_dict(), "rng": rngs, "config": to_dict(self.full_config),
            }
            checkpointer.save(state, step, json.dumps(to_dict(self.full_config), indent=2, sort_keys=True))
            self._export(export_models)
        distributed.barrier()

    def _export(self, models: dict) -> None:
        final = self.run_dir / "model"
        tmp = self.run_dir / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.task.export(models, tmp)
        old = self.run_dir / "model.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _restore(self, state: dict, models: dict, emas: dict, info: distributed.DistInfo) -> tuple[int, int]:
        task = self.task
        for k, m in models.items():
            fsdp.load_full(m, state["models"][k])  # FSDP: each rank takes its shard of the full tensors
        for k, e in emas.items():
            if k in state["ema"]:
                e.load_state_dict(state["ema"][k])
        for k, o in task.optimizers().items():
            o.load_state_dict(state["optimizers"][k])
            fsdp.reshard_optimizer(o)
        for k, s in task.schedulers().items():
            s.load_state_dict(state["schedulers"][k])
        task.load_state_dict(state.get("task", {}))
        rngs = state["rng"]
        if state.get("world_size") == info.world_size and len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank])
        else:
            logger.warning("checkpoint was written by %s processes, this run has %d: RNG streams restart",
                           state.get("world_size"), info.world_size)
            set_rng_state(rngs[0])
            torch.manual_seed(self.cfg.seed + 1 + info.rank + 1000 * state["step"])
        return int(state["step"]), int(state["cursor"])
