"""openmoshi's training core: one resumable, distributed loop shared by every training stage.

Layout (what each module is for)
    config.py       TrainConfig (loop settings) + dataclass-tree helpers: from_dict / to_dict, apply_overrides
                    ("a.b=value" from `--set`), save_json, diff
    data.py         ShardedBatchSampler: deterministic order from (seed, epoch), rank slices of the global batch,
                    resumable from one integer cursor; ItemRequest(index, serial) + item_generator(seed, serial)
    task.py         the Task protocol a stage implements, and TrainEnv (device, DDP/FSDP wrap, backward, autocast)
    loop.py         Trainer: the loop, evaluation/plot/checkpoint/export schedule, resume
    checkpoint.py   atomic checkpoints (tmp + fsync + rename, keep last k), RNG state capture/restore
    distributed.py  torchrun process group (gloo on CPU, NCCL on CUDA) and small collectives
    fsdp.py         FSDP2 (train.parallel=fsdp): shard per layer, gather full state for checkpoints, re-shard
    ema.py          WeightEMA (weights used for evaluation and export)
    monitor.py      metrics.jsonl, TensorBoard (lazy), wandb (lazy), tqdm bar, peak memory
    plots.py        RUN/plots/*.png from metrics.jsonl (matplotlib, lazy); also `openmoshi plot RUN`

How a stage plugs in (the contract; `openmoshi/train/codec/` is a complete example)
    1. A config tree: a root dataclass with a `train: TrainConfig` field plus the stage's own sections, and named
       presets (plain functions returning the tree). The CLI applies explicit options, then `--set a.b=value`.
    2. A Task object (task.Task) with:
         throughput_unit = ("audio_s", seconds per item)        # what "items/s" means in logs
         setup(env)            build models on env.device (torch is already seeded identically on every rank);
                               keep `env.wrap(module)` for forward passes (DDP when several processes;
                               with train.parallel=fsdp the module is sharded in place, so wrap before
                               building its optimizer); build optimizers and schedulers
         models()              {name: unwrapped nn.Module} to checkpoint;   ema_models() -> names to average
         optimizers(), schedulers(), grad_clip()  {name: ...}; the loop clips/steps/zeroes each after a step
         dataset(), collate()  a map-style dataset indexed by data.ItemRequest; all item randomness comes from
                               item_generator(seed, request.serial), so order and content never depend on
                               workers, ranks or resumes
         train_step(batch, env) -> {name: scalar}   one micro-batch: forward under the loop's autocast,
                               losses, env.backward(loss) or env.backward_tensors(...); returns named losses
                               and metrics ("loss" is shown on the progress bar)
         evaluate(models, env) -> {name: float}     rank 0, no grad, EMA weights; may write samples/figures
         export(models, out_dir)                   the ready-to-use model (EMA weights) -> RUN/model
         state_dict() / load_state_dict()          any other state that must survive a resume
    3. A thin entry point: build the config, the task, then `Trainer(task, cfg.train, out, cfg).fit()`.

Guarantees: re-running the same command on a run folder resumes from its newest checkpoint; a run killed at
any point (kill -9, even mid-checkpoint) and resumed gives the uninterrupted run's weights exactly (CPU, same
threads); `torchrun --nproc-per-node N -m openmoshi train ...` splits the same global batch over N processes
and matches one process within float tolerance, with DDP or FSDP2 (`--parallel fsdp`); checkpoints are the
same either way (a run may resume under the other).
"""

from ..data.order import ItemRequest, ShardedBatchSampler, item_generator
from .config import TrainConfig, apply_overrides, from_dict, to_dict
from .loop import Trainer
from .task import Task, TrainEnv

__all__ = ["ItemRequest", "ShardedBatchSampler", "Task", "TrainConfig", "TrainEnv", "Trainer", "apply_overrides",
           "from_dict", "item_generator", "to_dict"]
