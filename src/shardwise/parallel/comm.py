"""Collectives used by the tensor-parallel layers, behind one small interface.

The layers call ``all_reduce``/``all_gather``/``broadcast`` on a ``Collectives`` object instead of
``torch.distributed`` directly, so a faster transport for ranks on one machine slots in without
touching them; with one rank every call is a no-op.

When every rank of the group runs on this machine (same hostname and boot id, checked once at
construction) and the group has a gloo backend, CPU tensors go through shared memory
(``shm.ShmCollectives``: microseconds per call instead of gloo's milliseconds, bit-identical on all
ranks). Everything else (CUDA tensors, ranks on several hosts, dtypes shared memory cannot sum) goes
through ``torch.distributed``. ``SHARDWISE_FAST_COLLECTIVES=0`` or ``Collectives(fast=False)`` turns
the shared-memory path off, e.g. to compare against gloo.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .. import settings
from . import shm

log = logging.getLogger("shardwise")


def fast_collectives_wanted(fast: bool | None = None) -> bool:
    """The constructor flag if given, else ``SHARDWISE_FAST_COLLECTIVES`` (default on, x86-64 only)."""
    if fast is not None:
        return fast
    return settings.fast_collectives() and shm.supported_platform()


class Collectives:
    def __init__(self, group: dist.ProcessGroup | None = None, fast: bool | None = None, **shm_options):
        self.group = group
        self.shm: shm.ShmCollectives | None = None
        # Bytes this rank sent, per collective, in the ring model the planner uses (all-reduce 2(N-1)/N of
        # the tensor; reduce-scatter, all-gather and broadcast (N-1)/N): what the run measured.
        self.sent: dict[str, float] = {}
        if dist.is_available() and dist.is_initialized():
            self.world_size = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
        else:
            self.world_size, self.rank = 1, 0
        if self.world_size > 1:
            wanted = fast_collectives_wanted(fast) and "gloo" in str(dist.get_backend(group)).lower()
            if shm.agree_on_fast_path(wanted, group):
                try:
                    self.shm = shm.ShmCollectives(group, **shm_options)
                except shm.ShmUnavailable as exc:  # raised on every rank alike, so all fall back together
                    log.warning("%s; using torch.distributed", exc)
            elif fast:
                log.warning("fast collectives requested but not every rank is on this host with gloo; using "
                            "torch.distributed")

    @property
    def fast(self) -> bool:
        """Whether CPU tensors go through shared memory."""
        return self.shm is not None

    def _count(self, kind: str, nbytes: int, factor: float) -> None:
        n = self.world_size
        self.sent[kind] = self.sent.get(kind, 0.0) + factor * (n - 1) / n * nbytes

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks, in place."""
        if self.world_size > 1:
            self._count("all-reduce", x.numel() * x.element_size(), 2)
            if self.shm is not None and x.device.type == "cpu" and x.dtype in shm.REDUCIBLE:
                return self.shm.all_reduce(x)
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim``, in rank order."""
        if self.world_size == 1:
            return x
        self._count("all-gather", x.numel() * x.element_size() * self.world_size, 1)
        if self.shm is not None and x.device.type == "cpu":
            return self.shm.all_gather(x, dim)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` (``src`` counted within this group) into every rank's ``x``."""
        if self.world_size > 1:
            self._count("broadcast", x.numel() * x.element_size(), 1)
            if self.shm is not None and x.device.type == "cpu":
                return self.shm.broadcast(x, src)
            root = dist.get_global_rank(self.group, src) if self.group is not None else src
            dist.broadcast(x, src=root, group=self.group)
        return x

    def reduce_scatter(self, x: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
        """The sum over ranks of ``x``'s rows ``[start, end)`` along ``dim``; each rank passes its own bounds.

        Partial -> Shard: half an all-reduce's traffic (an all-gather later completes it). Shared memory
        and NCCL do it directly (bit-identical to the all-reduce's rows); gloo has no reduce-scatter, so
        there it is an all-reduce and a slice (and counted as the all-reduce it is).
        """
        if self.world_size == 1:
            return x.narrow(dim, start, end - start)
        nbytes = x.numel() * x.element_size()
        if self.shm is not None and x.device.type == "cpu" and x.dtype in shm.REDUCIBLE:
            self._count("reduce-scatter", nbytes, 1)
            return self.shm.reduce_scatter(x, dim, start, end)
        length, n = x.shape[dim], self.world_size
        chunk = -(-length // n)
        if "nccl" in str(dist.get_backend(self.group)).lower() and start == min(self.rank * chunk, length):
            self._count("reduce-scatter", nbytes, 1)
            rows = x.movedim(dim, 0)
            if chunk * n != length:
                rows = torch.cat([rows, rows.new_zeros(chunk * n - length, *rows.shape[1:])])
            out = rows.new_empty(chunk, *rows.shape[1:])
            dist.reduce_scatter_tensor(out, rows.contiguous(), group=self.group)
            return out[: end - start].movedim(0, dim).contiguous()
        return self.all_reduce(x).narrow(dim, start, end - start).contiguous()

    def barrier(self) -> None:
        if self.world_size > 1:  # not on a hot path: gloo's barrier (no busy waiting while ranks load)
            dist.barrier(group=self.group)

    def max_over_ranks(self, values: list[float]) -> list[float]:
        """Element-wise maximum of every rank's ``values`` (e.g. the slowest rank's timings)."""
        t = torch.tensor(values, dtype=torch.float64)
        return self.all_gather(t[None], dim=0).amax(0).tolist() if self.world_size > 1 else values

    def subgroup(self, partition: list[list[int]], **options) -> Collectives:
        """The collectives of this rank's part of ``partition`` (lists of global ranks covering the world).

        Every rank must call it with the same partition, in the same order (torch.distributed creates
        each group on all ranks).
        """
        mine = None
        for ranks in partition:
            group = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                mine = group
        if mine is None:
            raise ValueError(f"rank {dist.get_rank()} is in no part of {partition}")
        return Collectives(mine, **options)
