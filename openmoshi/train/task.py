"""What a training stage provides to the generic loop (see openmoshi/train/__init__.py for the contract)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import fsdp
from .config import TrainConfig
from .distributed import DistInfo


@dataclass
class TrainEnv:
    """The loop's services for a task: where to run, how to wrap models, how to backpropagate."""

    cfg: TrainConfig
    device: torch.device
    dist: DistInfo
    run_dir: Path
    step: int = 0  # optimizer steps done so far (the step being computed is step + 1)
    micro_batches: int = 1
    _wrapped: list[DistributedDataParallel] = field(default_factory=list)
    _fsdp_roots: list[nn.Module] = field(default_factory=list)
    _skeletons: dict[int, tuple[nn.Module, nn.Module]] = field(default_factory=dict)  # id -> (module, skeleton)

    @property
    def fsdp(self) -> bool:
        """Models given to wrap() are sharded with FSDP2 (train.parallel=fsdp and several processes)."""
        return self.dist.enabled and self.cfg.parallel == "fsdp"

    @property
    def bf16(self) -> bool:
        return self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and self.device.type == "cuda")

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when the precision asks for it; nothing otherwise."""
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def wrap(self, module: nn.Module, layers: list[nn.Module] | None = None, dtype: torch.dtype | None = None,
             ) -> nn.Module:
        """The module to run forward through: DDP-wrapped with several processes, itself otherwise.

        Gradients of a wrapped module are averaged over processes during backward. Buffers are not
        broadcast: a task keeps them identical itself (e.g. all-reduced codebook statistics).
        With train.parallel=fsdp the module is sharded in place (FSDP2: each of `layers`, by default every
        `layers` ModuleList element, then the module) and returned; wrap it before building its optimizer.
        `dtype` casts floating-point weights first (under FSDP one layer at a time, just before sharding it).
        """
        if dtype is not None and not self.fsdp:
            fsdp.cast_(module, dtype)
        if not self.dist.enabled:
            return module
        if self.fsdp:
            skel = fsdp.skeleton(module, dtype)
            fsdp.shard(module, fsdp.default_layers(module) if layers is None else layers, self.device, dtype)
            self._fsdp_roots.append(module)
            for name, sub in module.named_modules():  # a task may checkpoint parts of what it wrapped
                self._skeletons[id(sub)] = (sub, skel.get_submodule(name))
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        with warnings.catch_warnings():  # broadcast_buffers=False is the documented way to keep local buffers
            warnings.simplefilter("ignore", FutureWarning)
            ddp = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        self._wrapped.append(ddp)
        return ddp

    def close(self) -> None:
        """Frees the DDP wrappers' reducers while the process group is still registered. A reducer freed last
        frees the group itself, with the GIL held, joining gloo's worker threads; one of them may be waiting for
        the GIL to free a finished collective's tensors: a run hung at exit that way."""
        for ddp in self._wrapped:
            for name in ("logger", "reducer"):  # DDP's C++ logger holds the reducer too
                if hasattr(ddp, name):
                    delattr(ddp, name)
        self._wrapped.clear()

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), scaled so that micro-batch gradients sum to the mean over the step's batch."""
        (loss / self.micro_batches).backward()

    def backward_tensors(self, tensors: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        """One backward of several outputs with given output gradients (e.g. from a gradient balancer)."""
        scaled = [None if g is None else g / self.micro_batches for g in grads]
        torch.autograd.backward(tensors, scaled)

    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        """Within it, DDP keeps gradients local (used for all but the last micro-batch of a step)."""
        with contextlib.ExitStack() as stack:
            if skip:
                for ddp in self._wrapped:
                    stack.enter_context(ddp.no_sync())
            for module in self._fsdp_roots:  # FSDP2: no reduce-scatter until the last micro-batch
                module.set_requires_gradient_sync(not skip)
            try:
                yield
            finally:
                for module in self._fsdp_roots:
                    module.set_requires_gradient_sync(True)

    def plain(self, module: nn.Module, state: dict[str, torch.Tensor], device: torch.device | None = None,
              ) -> nn.Module:
        """For a module sharded by wrap() (or a part of one): an unsharded copy holding `state` (full tensors) on
        `device` (default this process's)."""
        entry = self._skeletons.get(id(module))
        if entry is None:
            raise RuntimeError("plain() takes a module that wrap() sharded")
        return fsdp.materialize(entry[1], state, device or self.device)


class Task(Protocol):
    """A training stage (codec, LM, ...): the models, optimizers, data and step of one kind of training."""

    throughput_unit: tuple[str, float]  # (name, units per item), e.g. ("audio_s", segment seconds)

    def setup(self, env: TrainEnv) -> None:
        """Builds models on env.device (after the loop seeded torch), optimizers and schedulers."""

    def models(self) -> dict[str, nn.Module]:
        """Unwrapped modules to checkpoint, by name."""

    def ema_models(self) -> list[str]:
        """Names of the models whose weight EMA is kept (and used by evaluate/export)."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimizers by name; the loop clips, steps and zeroes each after the micro-batches of a step."""

    def schedulers(self) -> dict[str, Any]:
        """LR schedulers by name (stepped once per optimizer step after their optimizer)."""

    def grad_clip(self) -> dict[str, float]:
        """Max gradient norm per optimizer name (missing or 0 = no clipping)."""

    def dataset(self) -> torch.utils.data.Dataset:
        """Map-style dataset indexed by openmoshi.data.order.ItemRequest."""

    def collate(self) -> Callable | None:
        """Collate function for the DataLoader (None = torch's default)."""

    def train_step(self, batch: Any, env: TrainEnv) -> dict[str, torch.Tensor | float]:
        """One micro-batch: forward, losses, env.backward(...); returns named losses and metrics."""

    def evaluate(self, models: dict[str, nn.Module], env: TrainEnv) -> dict[str, float]:
        """Rank 0, no grad, EMA weights where kept: metrics, and samples/figures under env.run_dir."""

    def export(self, models: dict[str, nn.Module], out_dir: Path) -> None:
        """Writes the ready-to-use model (EMA weights) into out_dir (RUN/model)."""

    def state_dict(self) -> dict[str, Any]:
        """Task state beyond models and optimizers (e.g. a loss balancer's running norms)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
