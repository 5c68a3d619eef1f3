"""Deterministic, resumable, rank-sharded order of training items.

The run reads an endless stream of item requests. Global request g (0, 1, 2, ...) belongs to epoch
e = g // N and takes item perm_e[g % N], where perm_e is a permutation drawn from (seed, e). Optimizer step s
consumes requests [s * B, (s + 1) * B) for a global batch B; process r of W takes the r-th contiguous slice of
B / W of them. So the order depends only on (seed, epoch, rank, world size), a run resumes from one integer
(the cursor, g of the next unread request), and 2 processes see exactly the items 1 process would.

A dataset receives `ItemRequest(index, serial)` and must derive any randomness (crop positions, ...) from
`serial` alone, so loader workers and resumes never change what an item contains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Sampler


@dataclass(frozen=True)
class ItemRequest:
    index: int  # which item of the dataset
    serial: int  # global request number g: seeds the item's own randomness


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1))
    return torch.randperm(num_items, generator=gen)


def item_generator(seed: int, serial: int) -> torch.Generator:
    """A torch generator for the randomness of request `serial` (same on any rank, worker or resume)."""
    return torch.Generator().manual_seed((seed * 2_654_435_761 + serial * 40_503 + 1) % (2**63 - 1))


class ShardedBatchSampler(Sampler[list[ItemRequest]]):
    """Endless per-process batches of ItemRequests, starting at global request `start`."""

    def __init__(self, num_items: int, global_batch: int, rank: int, world_size: int, seed: int,
                 start: int = 0, micro_batches: int = 1) -> None:
        if num_items < 1:
            raise ValueError("the dataset is empty")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not split over {world_size} processes")
        self.num_items, self.global_batch = num_items, global_batch
        self.rank, self.world_size, self.seed, self.start = rank, world_size, seed, start
        self.local = global_batch // world_size
        if self.local % micro_batches:
            raise ValueError(f"per-process batch {self.local} does not split into {micro_batches} micro-batches")
        self.micro = micro_batches
        self._perm: tuple[int, torch.Tensor] | None = None

    def request(self, serial: int) -> ItemRequest:
        epoch, pos = divmod(serial, self.num_items)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.num_items, self.seed, epoch))
        return ItemRequest(int(self._perm[1][pos]), serial)

    def __iter__(self) -> Iterator[list[ItemRequest]]:
        """Yields micro-batches: each step's per-process slice split into `micro_batches` lists."""
        g = self.start
        size = self.local // self.micro
        while True:
            first = g + self.rank * self.local
            items = [self.request(first + i) for i in range(self.local)]
            for m in range(self.micro):
                yield items[m * size:(m + 1) * size]
            g += self.global_batch

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**62
