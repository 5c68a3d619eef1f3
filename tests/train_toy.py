"""A toy training stage for the core's tests: a small MLP fitting a fixed random function.

Run as a script (also under torchrun): python tests/train_toy.py RUN MAX_STEPS [BATCH] [ACCUM];
TOY_PARALLEL=fsdp shards it with FSDP2 under torchrun.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from openmoshi.train import ItemRequest, TrainConfig, TrainEnv, Trainer, item_generator

STEP_SLEEP = float(os.environ.get("TOY_STEP_SLEEP", "0"))


@dataclass
class ToyConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        batch_size=8, checkpoint_every=3, eval_every=4, log_every=1, progress=False, tensorboard=False,
        plots=False))
    width: int = 16


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, req: ItemRequest) -> torch.Tensor:
        gen = torch.Generator().manual_seed(req.index)
        x = torch.randn(4, generator=gen)
        noise = torch.randn(4, generator=item_generator(self.seed, req.serial)) * 0.01  # per-request randomness
        return x + noise


class ToyTask:
    throughput_unit = ("items", 1.0)

    def __init__(self, cfg: ToyConfig) -> None:
        self.cfg = cfg
        self.data = ToyData(37, cfg.train.seed)
        self.counter = 0

    def setup(self, env: TrainEnv) -> None:
        self.net = nn.Sequential(nn.Linear(4, self.cfg.width), nn.Tanh(), nn.Linear(self.cfg.width, 1))
        self.fwd = env.wrap(self.net)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + 0.1 * s))

    def models(self):
        return {"net": self.net}

    def ema_models(self):
        return ["net"]

    def optimizers(self):
        return {"net": self.opt}

    def schedulers(self):
        return {"net": self.sched}

    def grad_clip(self):
        return {"net": 1.0}

    def dataset(self):
        return self.data

    def collate(self):
        return lambda items: torch.stack(items)

    def train_step(self, batch: torch.Tensor, env: TrainEnv) -> dict:
        target = (batch.sin().sum(-1, keepdim=True))
        loss = (self.fwd(batch) - target).pow(2).mean()
        env.backward(loss)
        self.counter += 1
        time.sleep(STEP_SLEEP)  # lets a test kill the run at a moment of its choosing
        return {"loss": loss.detach()}

    def evaluate(self, models, env):
        return {"eval_weight_sum": float(sum(p.sum() for p in models["net"].parameters()))}

    def export(self, models, out_dir: Path) -> None:
        torch.save(models["net"].state_dict(), out_dir / "net.pt")

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state.get("counter", 0)


def main(argv: list[str]) -> None:
    cfg = ToyConfig()
    cfg.train.max_steps = int(argv[1])
    if len(argv) > 2:
        cfg.train.batch_size = int(argv[2])
    if len(argv) > 3:
        cfg.train.grad_accum = int(argv[3])
    cfg.train.parallel = os.environ.get("TOY_PARALLEL", "ddp")
    torch.set_num_threads(1)
    Trainer(ToyTask(cfg), cfg.train, Path(argv[0]), cfg).fit()


if __name__ == "__main__":
    main(sys.argv[1:])
