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

On a GPU every tensor given to ``all_reduce``/``all_gather``/``broadcast`` must live on the rank's
device; host-side values (timings, the engine's step headers, tokens chosen on the host) go through
``host_all_gather``/``host_broadcast``, which need the group's CPU backend (``"cpu:gloo,cuda:nccl"``).
With ``SHARDWISE_CHECK_DEVICES=1`` every call is checked against these rules (``devices.py``).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .. import settings
from . import devices, shm

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
        self.check = devices.checking()  # read once: one attribute test per call when off
        self.handle = _handle(self)  # how the compiled-graph ops find this object (see _all_reduce_op)
        # Bytes this rank sent, per collective, in the ring model the planner uses (all-reduce 2(N-1)/N of
        # the tensor; reduce-scatter, all-gather and broadcast (N-1)/N): what the run measured.
        self.sent: dict[str, float] = {}
        if dist.is_available() and dist.is_initialized():
            self.world_size = dist.get_world_size(group)
            self.rank = dist.get_rank(group)
        else:
            self.world_size, self.rank = 1, 0
        if self.world_size > 1:
            if self.check:  # the agreement below is an all_gather_object: the device must be bound already
                devices.check_collective("all_gather_object")
            # On a real GPU, shared memory would only carry the few host scalars: not worth a segment.
            on_gpu = devices.torch_device(devices.bound_device() or "cpu").type == "cuda"
            wanted = (fast_collectives_wanted(fast) and not on_gpu
                      and "gloo" in str(dist.get_backend(group)).lower())
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

    @property
    def waited(self) -> float | None:
        """Seconds this rank has waited at shared-memory collectives for peers to arrive: the ranks'
        imbalance, which a step's time includes (None where torch.distributed carries the collectives:
        its waits are not visible from here)."""
        return self.shm.waited if self.shm is not None else None

    def _count(self, kind: str, nbytes: int, factor: float) -> None:
        n = self.world_size
        self.sent[kind] = self.sent.get(kind, 0.0) + factor * (n - 1) / n * nbytes

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks, in place (under ``torch.compile``: into a new tensor, as an opaque op)."""
        if self.world_size > 1 and torch.compiler.is_compiling():
            return torch.ops.shardwise.all_reduce(x, self.handle)
        if self.world_size > 1:
            self._count("all-reduce", x.numel() * x.element_size(), 2)
            if self.check:
                devices.check_collective("all_reduce", [x])
                self._all_reduce(devices.plain(x))
                return x
            self._all_reduce(x)
        return x

    def _all_reduce(self, x: torch.Tensor) -> None:
        if self.shm is not None and x.device.type == "cpu" and x.dtype in shm.REDUCIBLE:
            self.shm.all_reduce(x)
        else:
            dist.all_reduce(x, group=self.group)

    def _all_reduced(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over ranks as a new tensor, ``x`` untouched (the compiled graphs' op).

        The shared-memory path writes the sum straight into the new tensor; a clone first, then an
        in-place sum, copied ``x`` once more in each of a decode step's all-reduces (two a layer).
        """
        if self.shm is not None and x.device.type == "cpu" and x.dtype in shm.REDUCIBLE:
            return self.shm.all_reduce(x, out=torch.empty(x.shape, dtype=x.dtype))
        y = x.clone()
        dist.all_reduce(y, group=self.group)
        return y

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim``, in rank order."""
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():
            return torch.ops.shardwise.all_gather(x, self.handle, dim % x.dim(), self.world_size)
        self._count("all-gather", x.numel() * x.element_size() * self.world_size, 1)
        if self.check:
            devices.check_collective("all_gather", [x])
            return devices.like(self._all_gather(devices.plain(x), dim), x)
        return self._all_gather(x, dim)

    def _all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.shm is not None and x.device.type == "cpu":
            return self.shm.all_gather(x, dim)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` (``src`` counted within this group) on every rank, in place."""
        if self.world_size > 1:
            self._count("broadcast", x.numel() * x.element_size(), 1)
            if self.check:
                devices.check_collective("broadcast", [x])
                self._broadcast(devices.plain(x), src, True)
                return x
            self._broadcast(x, src, True)
        return x

    def _broadcast(self, x: torch.Tensor, src: int, fast: bool) -> None:
        if fast and self.shm is not None and x.device.type == "cpu":
            self.shm.broadcast(x, src)
        else:
            root = dist.get_global_rank(self.group, src) if self.group is not None else src
            dist.broadcast(x, src=root, group=self.group)

    def reduce_scatter(self, x: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
        """The sum over ranks of ``x``'s rows ``[start, end)`` along ``dim``; each rank passes its own bounds.

        Partial -> Shard: half an all-reduce's traffic (an all-gather later completes it). Shared memory
        and NCCL do it directly (bit-identical to the all-reduce's rows); gloo has no reduce-scatter, so
        there it is an all-reduce and a slice (and counted as the all-reduce it is).
        """
        if self.world_size == 1:
            return x.narrow(dim, start, end - start)
        if self.check:
            devices.check_collective("reduce_scatter", [x])
            return devices.like(self._reduce_scatter(devices.plain(x), dim, start, end), x)
        return self._reduce_scatter(x, dim, start, end)

    def _reduce_scatter(self, x: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
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
        self._count("all-reduce", nbytes, 2)
        self._all_reduce(x)
        return x.narrow(dim, start, end - start).contiguous()

    # Host-side values: allowed on a GPU run only because its group has a CPU backend (devices.py).
    def host_all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``all_gather`` of a host tensor (a few scalars), over the group's CPU backend."""
        if self.world_size == 1:
            return x
        if self.check:
            devices.check_collective("host_all_gather", [x], host=True)
        return self._all_gather(x, dim)

    def host_broadcast(self, x: torch.Tensor, src: int = 0, fast: bool = True) -> torch.Tensor:
        """``broadcast`` of a host tensor over the group's CPU backend; ``fast=False`` always takes
        torch.distributed (a blocking socket read, no spinning: the engine's idle wait)."""
        if self.world_size > 1:
            if self.check:
                devices.check_collective("host_broadcast", [x], host=True)
            self._broadcast(x, src, fast)
        return x

    def all_gather_object(self, obj: object) -> list:
        """Every rank's picklable ``obj``, in rank order (e.g. errors, so that all ranks decide alike)."""
        if self.world_size == 1:
            return [obj]
        if self.check:
            devices.check_collective("all_gather_object")
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:  # not on a hot path: gloo's barrier (no busy waiting while ranks load)
            if self.check:
                devices.check_collective("barrier")
            dist.barrier(group=self.group)

    def max_over_ranks(self, values: list[float]) -> list[float]:
        """Element-wise maximum of every rank's ``values`` (e.g. the slowest rank's timings): host values."""
        t = torch.tensor(values, dtype=torch.float64)
        return self.host_all_gather(t[None], dim=0).amax(0).tolist() if self.world_size > 1 else values

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


_DEFAULT: tuple[object, Collectives] | None = None


def default_collectives() -> Collectives:
    """One ``Collectives`` of the default process group per process, shared by every layer built without one.

    Building one costs a collective (do all ranks share a machine?) and a shared-memory segment, so
    model code that creates many ``shardwise.parallel`` layers itself (NxD's way) must not make one
    per layer. It is rebuilt when the default group changes (destroyed and initialised again).
    """
    global _DEFAULT
    group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    if _DEFAULT is None or _DEFAULT[0] is not group:
        _DEFAULT = (group, Collectives())
    return _DEFAULT[1]


# Collectives as opaque custom ops under torch.compile: without them dynamo breaks the graph at every
# collective (the shared-memory path is plain Python over a mapped file), so one forward would be
# dozens of graphs. Eager calls never go through these; the ops find their Collectives by handle.
# A handle is the object's creation number in this process, not its id(): the handle is a constant in the
# compiled graph, so an address (different every run) made inductor's compile cache miss on every run
# (about 30 s per `--compile-decode` run here); creation numbers repeat from run to run.
_BY_HANDLE: dict[int, Collectives] = {}


def _handle(comm: Collectives) -> int:
    handle = len(_BY_HANDLE)
    _BY_HANDLE[handle] = comm
    return handle


@torch.library.custom_op("shardwise::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor, handle: int) -> torch.Tensor:
    return _BY_HANDLE[handle]._all_reduced(x)


@_all_reduce_op.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("shardwise::all_gather", mutates_args=())
def _all_gather_op(x: torch.Tensor, handle: int, dim: int, world: int) -> torch.Tensor:
    return _BY_HANDLE[handle]._all_gather(x, dim)


@_all_gather_op.register_fake
def _(x: torch.Tensor, handle: int, dim: int, world: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] *= world
    return x.new_empty(shape)
