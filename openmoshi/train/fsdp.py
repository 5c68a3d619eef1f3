"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the training loop: shard, gather, re-shard.

With `train.parallel=fsdp` and several processes, each transformer layer, then the root module, is sharded
over a 1-D mesh of every process (gloo on CPU, NCCL on CUDA): parameters, gradients and optimizer moments
live as DTensor shards (dim 0 split over ranks). Checkpoints keep the DDP layout: every DTensor is gathered
to a full CPU tensor (a collective) and rank 0 writes; on resume each rank slices its own shard back out.
Evaluation and export run on rank 0 on a plain module rebuilt from a skeleton (the module with meta
parameters, copied before sharding) and the gathered weights.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def default_layers(module: nn.Module) -> list[nn.Module]:
    """The elements of every `nn.ModuleList` named `layers` (the transformer layers of openmoshi's models)."""
    return [layer for name, sub in module.named_modules()
            if name.rsplit(".", 1)[-1] == "layers" and isinstance(sub, nn.ModuleList) for layer in sub]


def _float(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def skeleton(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `module` whose parameters are meta tensors (no memory; floating ones as `dtype` if given);
    buffers and settings are copied."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta", dtype=_float(p, dtype)),
                                                requires_grad=p.requires_grad) for p in module.parameters()}
    return cast_(copy.deepcopy(module, memo), dtype)


def cast_(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Floating-point parameters and buffers of `module` cast to `dtype` in place (sharded ones left as they are)."""
    if dtype is None:
        return module
    for sub in module.modules():
        for tensors in (sub._parameters, sub._buffers):
            for name, t in tensors.items():
                if t is None or isinstance(t, DTensor) or t.dtype == _float(t, dtype):
                    continue
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(dtype)
                else:
                    tensors[name] = t.to(dtype)
    return module


def shard(module: nn.Module, layers: list[nn.Module], device: torch.device, dtype: torch.dtype | None = None,
          ) -> DeviceMesh:
    """fully_shard each of `layers`, then `module` (which takes every parameter left), over all processes;
    with `dtype`, each is cast just before its sharding (one full layer in that dtype at a time)."""
    # Our tasks never modify a model's outputs in place, the case this warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(cast_(layer, dtype), mesh=mesh)
    fully_shard(cast_(module, dtype), mesh=mesh)
    return mesh


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` holds sharded parameters (it, or a module around it, went through fully_shard)."""
    return isinstance(module, FSDPModule) or any(isinstance(p, DTensor) for p in module.parameters())


def gather(obj: Any, keep: bool) -> Any:
    """`obj` (a state dict, nested dicts/lists) with every DTensor gathered into a full CPU tensor.

    A collective: every process calls it on the same structure. Processes with keep=False get None in
    place of the gathered tensors (they only take part). Without DTensors it returns `obj` itself.
    """
    if isinstance(obj, DTensor):
        full = obj.full_tensor()
        return full.detach().cpu() if keep else None
    if isinstance(obj, dict):
        return {k: gather(v, keep) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather(v, keep) for v in obj)
    return obj


def _shard_like(value: torch.Tensor, like: DTensor) -> DTensor:
    """This process's shard of the full tensor `value`, placed as `like` (no communication)."""
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def load_full(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """module.load_state_dict(state) for full tensors, sharded first where the module's tensors are DTensors."""
    current = module.state_dict()
    module.load_state_dict({k: _shard_like(v, current[k]) if isinstance(current.get(k), DTensor) else v
                            for k, v in state.items()})


def _torch_optimizers(opt: Any) -> list[torch.optim.Optimizer]:
    if isinstance(opt, torch.optim.Optimizer):
        return [opt]
    return [v for v in vars(opt).values() if isinstance(v, torch.optim.Optimizer)]  # a wrapper (LM StageOptimizer)


def reshard_optimizer(opt: Any) -> None:
    """After opt.load_state_dict(full state): moments of DTensor parameters become shards like them."""
    for inner in _torch_optimizers(opt):
        for param, state in inner.state.items():
            if not isinstance(param, DTensor):
                continue
            for key, value in state.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                    state[key] = _shard_like(value, param)


def materialize(skel: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A plain module: a copy of the skeleton holding `state` (full tensors, moved to `device`)."""
    module = copy.deepcopy(skel)
    module.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    return module


class ShardedEMA:
    """Weight EMA of a sharded module: the average is kept as shards too (state_dict keys as the module's)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.avg = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for key, param in module.named_parameters():
            self.avg[key].lerp_(param.detach(), 1.0 - self.decay)
        for key, buffer in module.named_buffers():
            if key in self.avg:  # persistent buffers are copied as they are
                self.avg[key].copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.avg

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            like = self.avg[key]
            self.avg[key] = _shard_like(value, like) if isinstance(like, DTensor) else value.to(like).clone()
