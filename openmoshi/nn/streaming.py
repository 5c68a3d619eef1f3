"""The streaming protocol followed by every stateful module.

A module that keeps state between calls (conv left context, transposed-conv overlap, KV cache, ...)
subclasses `StreamingModule` and returns a `StreamingState` from `_init_streaming_state`. Calling
`module.streaming(batch_size)` on any ancestor starts streaming in every streaming descendant (except
those marked detached, which stream on their own clock, like the depth transformer), and ends it when the
`with` block exits. `reset_streaming(mask)` resets the whole batch or only the items where mask [B] is True,
so one batch slot can be reused by a new conversation without touching the others.
"""

from __future__ import annotations

import contextlib
import typing as tp
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StreamingState:
    """Per-module streaming state; subclasses add tensors and override `reset`.

    `active` [B] bool says which batch items this call really advances (see `set_active`); the others keep
    their state as if the call had not happened. `all_active` is its host-side summary, so the common case
    (everyone advances) costs nothing.
    """

    batch_size: int
    device: torch.device

    def __post_init__(self) -> None:
        self.active = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        self.all_active = True
        self.active_host: list[bool] | None = None  # host copy of `active` (None = all), for host-side counters

    def reset(self, mask: torch.Tensor) -> None:
        """Reset the batch items where `mask` [B] (bool) is True."""

    def keep_inactive(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """`new` for active items, `old` for the frozen ones; tensors shaped [B, ...]."""
        if self.all_active:
            return new
        return torch.where(self.active.view(-1, *([1] * (new.dim() - 1))), new, old)


def masked_fill_(buffer: torch.Tensor, mask: torch.Tensor, value: float | int = 0) -> None:
    """Fill `buffer` [B, ...] with `value` where mask [B] is True, without a host sync."""
    view = mask.view(-1, *([1] * (buffer.dim() - 1)))
    buffer.masked_fill_(view, value)


class StreamingModule(nn.Module):
    """Base class for modules that can run chunk by chunk with state kept between calls."""

    def __init__(self) -> None:
        super().__init__()
        self._streaming_state: StreamingState | None = None
        self._streaming_detached = False

    def _init_streaming_state(self, batch_size: int) -> StreamingState:
        param = next(iter(self.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        return StreamingState(batch_size, device)

    @property
    def is_streaming(self) -> bool:
        return self._streaming_state is not None

    def set_streaming_detached(self, detached: bool) -> None:
        """A detached module only streams when `.streaming()` is called on it directly."""
        self._streaming_detached = detached

    def _streaming_modules(self) -> list[tuple[str, "StreamingModule"]]:
        found: list[tuple[str, StreamingModule]] = []

        def visit(prefix: str, module: nn.Module) -> None:
            if isinstance(module, StreamingModule):
                if module._streaming_detached and prefix:
                    return
                found.append((prefix, module))
            for name, child in module.named_children():
                visit(f"{prefix}.{name}" if prefix else name, child)

        visit("", self)
        return found

    @contextlib.contextmanager
    def streaming(self, batch_size: int) -> tp.Iterator[None]:
        """Run this module and its streaming children in streaming mode for `batch_size` items."""
        modules = self._streaming_modules()
        self._active_streaming_modules = modules
        for name, module in modules:
            if module._streaming_state is not None:
                raise RuntimeError(f"{name or type(module).__name__} is already streaming.")
        try:
            for _, module in modules:
                module._streaming_state = module._init_streaming_state(batch_size)
            yield
        finally:
            for _, module in modules:
                module._streaming_state = None
            self._active_streaming_modules = None

    def set_active(self, mask: torch.Tensor | None) -> None:
        """Advance only the batch items where mask [B] is True in the next calls (None = all).

        Lets one batched step serve streams that are not in lock-step, e.g. server sessions whose audio
        has not arrived yet: their state stays exactly as it was.
        """
        state = self._streaming_state
        if state is None:
            raise RuntimeError("set_active() called outside of a streaming() block.")
        modules = getattr(self, "_active_streaming_modules", None) or self._streaming_modules()
        host = None if mask is None else [bool(v) for v in mask.tolist()]
        for _, module in modules:
            sub = module._streaming_state
            if sub is None:
                continue
            sub.active_host = host
            if mask is None:
                sub.active.fill_(True)
                sub.all_active = True
            else:
                sub.active.copy_(mask.to(sub.device, torch.bool))
                sub.all_active = False

    def reset_streaming(self, mask: torch.Tensor | None = None) -> None:
        """Reset the state of all batch items, or of those where `mask` [B] is True."""
        state = self._streaming_state
        if state is None:
            raise RuntimeError("reset_streaming() called outside of a streaming() block.")
        if mask is None:
            mask = torch.ones(state.batch_size, dtype=torch.bool, device=state.device)
        mask = mask.to(device=state.device, dtype=torch.bool)
        modules = getattr(self, "_active_streaming_modules", None) or self._streaming_modules()
        for _, module in modules:
            if module._streaming_state is not None:
                module._streaming_state.reset(mask)
