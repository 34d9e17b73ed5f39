"""Shared-memory collectives for CPU ranks on one machine: microseconds instead of gloo's milliseconds.

Decode runs two all-reduces of one hidden vector per layer per token. Over gloo each costs
milliseconds between two local processes (bench/decode.py measures both paths); here it is a copy
into a shared file, a flag store, a wait on the peers' flags and a fixed-order sum, driven directly
from Python (a ProcessGroup wrapper would add its dispatch cost to every call). An all-reduce's copy,
flag store, spin and sum run in C where ``shm_native.py`` could build its library (float32 and
bfloat16): the same steps and results without the interpreter's per-call cost.

Segment layout (one plain file in /dev/shm, mmap'd by every rank; rank 0 creates it, shares its name
through the torch.distributed group and unlinks it as soon as every rank has attached, so nothing is
left behind even if a rank crashes later)::

    header   64 bytes          magic, version, world size, slot bytes
    pids     64 bytes per rank  PID of each rank (liveness checks)
    flags    64 bytes per rank  per-rank generation counter (int64), one cache line each
    data     2 x world x slot   double buffer: buffer ``g % 2``, slot ``rank``

Protocol of every collective (call number ``g``, the same on all ranks because all ranks make the same
calls): write this rank's part into ``data[g % 2][rank]``, store ``flags[rank] = g``, wait until every
``flags[p] >= g``, then read what is needed from ``data[g % 2]``. A rank stores ``g + 1`` only after it
finished reading call ``g``, and a rank can only start writing call ``g + 2`` into the same buffer after
it has seen every peer's ``g + 1``; so two buffers are enough and no call can overwrite data a peer has
not read yet, however many calls run back to back. Tensors larger than a slot go through in chunks,
one generation each.

Sums are exact and deterministic: every rank adds the ranks' contributions in the order 0, 1, ...,
N-1 in the tensor's own dtype (``((x0 + x1) + x2) + ...``, rounding after each addition, as gloo also
sums in the tensor dtype), so all ranks get bit-identical results. For bfloat16/float16 that means
the same per-addition rounding as gloo; gloo's addition order is its own, so for values whose sum is
not exact the last bit can differ from gloo (never between ranks).

Waiting spins briefly, then calls ``os.sched_yield()`` (so more ranks than cores still progress), then
sleeps in short, growing steps; every so often it checks that the peers it waits for are alive (PID
in the header, ``os.kill(pid, 0)`` and not a zombie) and it gives up after a timeout, raising a
one-line ShardwiseError naming the rank.

Memory ordering: the data is written before the flag and read after it, which x86-64's total store
order makes safe without fences; ``Collectives`` therefore enables this path automatically only on
x86-64 (elsewhere it can be forced on with ``fast=True`` at your own risk).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import socket
import time
import uuid

import torch
import torch.distributed as dist

from .. import settings
from ..errors import ShardwiseError
from . import shm_native

MAGIC = 0x5348_4D57_4953_4531  # "SHMWISE1"
LINE = 64
DEFAULT_SLOT_BYTES = 4 << 20
SPINS = 200  # plain spins before yielding: a peer on its own core usually arrives within them
NATIVE_SPINS = 500  # the same in C (shm_native.c), with x86's pause between checks: about as long
YIELD_SECONDS = 0.002  # then sched_yield for this long, then sleep 20 us .. 1 ms
LIVENESS_SECONDS = 0.1
REDUCIBLE = {torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int16,
             torch.int32, torch.int64}


def default_timeout() -> float:
    return settings.shm_timeout()


class ShmUnavailable(ShardwiseError):
    """The segment could not be created or attached on some rank (all ranks raise it together)."""


def host_identity() -> str:
    """Hostname plus boot id: equal on every rank of one machine (containers sharing a host included)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def supported_platform() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


class ShmCollectives:
    """All-reduce (sum), all-gather, broadcast and barrier over one shared-memory segment.

    Construct it on every rank of ``group`` at the same time (it uses the group once, to share the
    segment's name). Every call is collective: all ranks must make the same calls in the same order.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, slot_bytes: int | None = None,
                 timeout: float | None = None, path_dir: str = "/dev/shm"):
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.timeout = default_timeout() if timeout is None else float(timeout)
        slot = slot_bytes or settings.shm_slot_bytes(DEFAULT_SLOT_BYTES)
        self.slot_bytes = max(LINE, slot // LINE * LINE)
        self._data_off = LINE * (1 + 2 * self.world)
        size = self._data_off + 2 * self.world * self.slot_bytes

        name: list[str | None] = [None]
        if self.rank == 0:
            name[0] = self._create(path_dir, size)
        problem = None
        try:
            dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                       group=group)
            try:
                words = self._attach(name[0], size)
            except (OSError, ValueError) as exc:
                problem = f"rank {self.rank}: {type(exc).__name__}: {exc}"
            # Every rank has attached (or failed to) and published its PID: this is also the barrier.
            problems: list[str | None] = [None] * self.world
            dist.all_gather_object(problems, problem, group=group)
        finally:
            if self.rank == 0 and name[0] is not None:
                try:
                    os.unlink(name[0])
                except FileNotFoundError:
                    pass
        failed = [p for p in problems if p]
        if failed:
            if problem is None:
                self._release()
            raise ShmUnavailable(f"shared memory unusable: {failed[0]}")
        self.pids = [int(words[i]) for i in self._pid_idx]
        self._gen = 0
        self.waited = 0.0  # seconds this rank spent waiting for peers to arrive (a peer already there: none)
        raw = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._slots = [[raw[self._data_off + (b * self.world + p) * self.slot_bytes:][: self.slot_bytes]
                        for p in range(self.world)] for b in range(2)]
        self._views: dict[tuple, list[torch.Tensor]] = {}
        self._own_flag = self._flag_idx[self.rank]
        self._peers = [p for p in range(self.world) if p != self.rank]
        self._native = shm_native.load()  # None: every call stays in Python, with the same results
        if self._native is not None:  # addresses the C calls take, computed once
            base = raw.data_ptr()
            self._base = base
            self._slot_ptrs = [[base + self._data_off + (b * self.world + p) * self.slot_bytes
                                for p in range(self.world)] for b in range(2)]
            self._slot_arrays = [(ctypes.c_void_p * self.world)(*ptrs) for ptrs in self._slot_ptrs]
            self._peer_idx = (ctypes.c_int64 * len(self._peers))(*[self._flag_idx[p] for p in self._peers])
            self._spun = ctypes.c_int64(0)
            self._sums = {torch.float32: self._native.sw_sum_f32, torch.bfloat16: self._native.sw_sum_bf16}

    # -- plumbing -------------------------------------------------------------------------------

    def _create(self, path_dir: str, size: int) -> str | None:
        """Rank 0: a new segment file with its header written; None if it cannot be made."""
        path = os.path.join(path_dir, f"shardwise-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return None
        try:
            os.ftruncate(fd, size)
            head = mmap.mmap(fd, LINE)
            head[0:32] = b"".join(int(v).to_bytes(8, "little") for v in (MAGIC, 1, self.world, self.slot_bytes))
            head.close()
        except OSError:
            os.unlink(path)
            return None
        finally:
            os.close(fd)
        return path

    def _attach(self, path: str | None, size: int) -> memoryview:
        if path is None:
            raise FileNotFoundError("rank 0 could not create a segment in /dev/shm")
        fd = os.open(path, os.O_RDWR)  # fails if this rank sees another /dev/shm (e.g. another container)
        try:
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        words = memoryview(self._mm).cast("q")
        if words[0] != MAGIC or words[2] != self.world or words[3] != self.slot_bytes:
            words.release()
            raise ValueError(f"segment {path} does not match this group (world {self.world})")
        self._pid_idx = [(LINE + LINE * p) // 8 for p in range(self.world)]
        self._flag_idx = [(LINE * (1 + self.world) + LINE * p) // 8 for p in range(self.world)]
        self._words = words
        words[self._pid_idx[self.rank]] = os.getpid()
        return words

    def _release(self) -> None:
        self._words.release()
        self._mm.close()

    def close(self) -> None:
        """Drop the mapping (the file itself was unlinked at construction)."""
        self._views.clear()
        self._slots = []
        self._words.release()
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes when it does
            pass

    def _view(self, buf: int, dtype: torch.dtype, numel: int) -> list[torch.Tensor]:
        key = (buf, dtype, numel)
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 256:
                self._views.clear()
            nbytes = numel * dtype.itemsize
            views = [s[:nbytes].view(dtype) for s in self._slots[buf]]
            self._views[key] = views
        return views

    def _publish_and_wait(self, gen: int, what: str) -> None:
        words = self._words
        words[self._own_flag] = gen
        for p in self._peers:
            idx = self._flag_idx[p]
            if words[idx] >= gen:
                continue
            start = time.perf_counter()
            spins = 0
            while words[idx] < gen:
                spins += 1
                if spins > SPINS:
                    self._wait_slow(p, idx, gen, what)
                    break
            self.waited += time.perf_counter() - start

    def _wait_slow(self, peer: int, idx: int, gen: int, what: str) -> None:
        words = self._words
        start = time.monotonic()
        next_check = start + LIVENESS_SECONDS
        nap = 2e-5
        while words[idx] < gen:
            now = time.monotonic()
            if now - start < YIELD_SECONDS:
                os.sched_yield()
                continue
            time.sleep(nap)
            nap = min(nap * 2, 1e-3)
            if now >= next_check:
                next_check = now + LIVENESS_SECONDS
                if words[idx] >= gen:
                    return
                if not settings.process_alive(self.pids[peer]):
                    raise ShardwiseError(
                        f"rank {peer} (pid {self.pids[peer]}) exited while rank {self.rank} waited for it in a "
                        f"shared-memory {what}"
                    )
                if now - start > self.timeout:
                    raise ShardwiseError(
                        f"rank {peer} did not reach shared-memory {what} #{gen} within {self.timeout:g} s "
                        f"(rank {self.rank} gave up waiting)"
                    )

    def _arrive_native(self, part: torch.Tensor, gen: int, what: str) -> None:
        """``_publish_and_wait`` with the copy of ``part`` into this rank's slot first, in C."""
        start = time.perf_counter()
        missing = self._native.sw_arrive(part.data_ptr(), self._slot_ptrs[gen & 1][self.rank],
                                         part.numel() * part.element_size(), self._base, self._own_flag,
                                         self._peer_idx, len(self._peers), gen, NATIVE_SPINS, self._spun)
        if self._spun.value:
            if missing:  # yield, sleep and check the peers' liveness, as the Python path does
                for p in self._peers:
                    idx = self._flag_idx[p]
                    if self._words[idx] < gen:
                        self._wait_slow(p, idx, gen, what)
            self.waited += time.perf_counter() - start

    def _next(self) -> int:
        self._gen += 1
        return self._gen

    # -- collectives ----------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum ``x`` over ranks, adding contributions in rank order 0..N-1 on every rank, into ``out``
        (a contiguous tensor of ``x``'s shape and dtype) or, without one, in place."""
        if x.dtype not in REDUCIBLE:
            raise ShardwiseError(f"shared-memory all_reduce does not support {x.dtype}")
        if self.world == 1:
            return x if out is None else out.copy_(x)
        work = x if x.is_contiguous() else x.contiguous()
        flat = work.view(-1)
        # A compiled step's op needs a new tensor: the sum is written there directly, not into a clone of x.
        dest = flat if out is None else out.view(-1)
        total = flat.numel()
        step = self.slot_bytes // x.dtype.itemsize
        native_sum = self._sums.get(x.dtype) if self._native is not None else None
        for start in range(0, total, step):
            part = flat[start:start + step] if total > step else flat
            gen = self._next()
            target = dest[start:start + step] if total > step else dest
            if native_sum is not None:
                self._arrive_native(part, gen, "all_reduce")
                native_sum(target.data_ptr(), self._slot_arrays[gen & 1], self.world, part.numel())
                continue
            views = self._view(gen & 1, x.dtype, part.numel())
            views[self.rank].copy_(part)
            self._publish_and_wait(gen, "all_reduce")
            torch.add(views[0], views[1], out=target)
            for v in views[2:]:
                target.add_(v)
        if out is not None:
            return out
        if work is not x:
            x.copy_(work)
        return x

    def reduce_scatter(self, x: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
        """The sum over ranks of ``x``'s rows ``[start, end)`` along ``dim`` (each rank its own bounds).

        Every rank publishes its whole ``x`` and sums only its own rows, in rank order 0..N-1 as
        ``all_reduce`` does, so the rows are bit-identical to an all-reduce's; each rank reads 1/N of
        the data an all-reduce reads.
        """
        if x.dtype not in REDUCIBLE:
            raise ShardwiseError(f"shared-memory reduce_scatter does not support {x.dtype}")
        rows = x.movedim(dim, 0).contiguous()
        flat = rows.view(-1)
        total = flat.numel()
        per_row = total // rows.shape[0] if rows.shape[0] else 0
        lo, hi = start * per_row, end * per_row
        out = torch.empty(hi - lo, dtype=x.dtype)
        step = self.slot_bytes // x.dtype.itemsize
        for first in range(0, max(total, 1), step):
            n = min(step, total - first)
            gen = self._next()
            views = self._view(gen & 1, x.dtype, n)
            views[self.rank].copy_(flat[first:first + n])
            self._publish_and_wait(gen, "reduce_scatter")
            a, b = max(lo, first), min(hi, first + n)
            if a < b:
                mine = out[a - lo:b - lo]
                torch.add(views[0][a - first:b - first], views[1][a - first:b - first], out=mine)
                for v in views[2:]:
                    mine.add_(v[a - first:b - first])
        return out.view(end - start, *rows.shape[1:]).movedim(0, dim).contiguous()

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` (same shape and dtype on all ranks) along ``dim``, in rank order."""
        flat = x.contiguous().view(-1)
        total = flat.numel()
        out = torch.empty((self.world, total), dtype=x.dtype)
        if total:
            step = self.slot_bytes // x.dtype.itemsize
            for start in range(0, total, step):
                n = min(step, total - start)
                gen = self._next()
                views = self._view(gen & 1, x.dtype, n)
                views[self.rank].copy_(flat[start:start + n])
                self._publish_and_wait(gen, "all_gather")
                for p in range(self.world):
                    out[p, start:start + n].copy_(views[p])
        parts = out.view(self.world, *x.shape).unbind(0)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy rank ``src``'s ``x`` into every rank's ``x`` (in place)."""
        work = x if x.is_contiguous() else x.contiguous()
        flat = work.view(-1)
        total = flat.numel()
        step = self.slot_bytes // x.dtype.itemsize
        for start in range(0, max(total, 1), step):
            n = min(step, total - start)
            gen = self._next()
            views = self._view(gen & 1, x.dtype, n)
            if self.rank == src:
                views[src].copy_(flat[start:start + n])
            self._publish_and_wait(gen, "broadcast")
            if self.rank != src:
                flat[start:start + n].copy_(views[src])
        if work is not x:
            x.copy_(work)
        return x


def agree_on_fast_path(wanted: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Collective: True when every rank of ``group`` wants the fast path and runs on this machine.

    One ``all_gather_object`` of (host identity, wanted), so all ranks reach the same answer.
    """
    mine = (host_identity(), bool(wanted))
    seen: list[tuple[str, bool] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, mine, group=group)
    return all(w for _, w in seen) and len({h for h, _ in seen}) == 1
