"""Start ranks: our own local processes, or the ones torchrun started.

``shardwise run --tp-degree N`` spawns N processes itself (no torchrun needed). Under torchrun (the
``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` variables are set) the same worker runs in each process. If
any rank fails, the others are terminated and the failure comes back as one ``ShardwiseError`` that
names the rank that failed first (not a peer that merely lost its connection to it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from .. import settings
from ..errors import ShardwiseError
from ..quick_exit import skip_final_collection
from ..settings import free_port
from . import devices as dev

Worker = Callable[..., Any]
# Errors a rank reports when a *peer* went away; never the root cause of a failure.
_PEER_LOSS = ("Connection reset", "Connection closed", "connection closed", "Broken pipe", "Socket Timeout")


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def threads_per_rank(local_ranks: int) -> int:
    """Each local rank gets its share of the cores, so ranks never oversubscribe the machine."""
    return max(1, settings.usable_cores() // max(1, local_ranks))


def default_backend(device: str) -> str:
    """gloo on CPU; ``"cpu:gloo,cuda:nccl"`` on CUDA (host scalars need a CPU backend: see devices.py)."""
    return dev.backend_for(device)


def _rank_entry(local_rank: int, fn: Worker, world: int, start_rank: int, init_method: str, backend: str,
                threads: Sequence[int], args: tuple, error_dir: str, device: str = "cpu",
                devices: Sequence[str] | None = None) -> None:
    rank = start_rank + local_rank
    skip_final_collection()
    torch.set_num_threads(threads[local_rank])
    _thread_lock_for_progress_bars()
    try:
        # The device first, then the group (NCCL and the object collectives use the current device).
        dev.setup_rank(device, rank, start_rank, devices, len(threads), init_method, backend, world_size=world,
                       timeout=timedelta(seconds=settings.collective_timeout()))
        try:
            fn(rank, world, *args)
            dev.log_report(rank)
        finally:
            dist.destroy_process_group()
            dev.release_device()
    except BaseException as exc:
        internal = not isinstance(exc, (ShardwiseError, KeyboardInterrupt))
        text = f"internal error: {type(exc).__name__}: {exc}" if internal else str(exc)
        first_line = (text.strip().splitlines() or [type(exc).__name__])[0]
        detail = traceback.format_exc() if settings.debug() else ""
        tmp = Path(error_dir) / f".rank{local_rank}"
        tmp.write_text(json.dumps({"time": time.monotonic(), "line": first_line, "internal": internal,
                                   "traceback": detail}))
        tmp.rename(Path(error_dir) / f"rank{local_rank}")  # whole or absent, even if we are killed now
        raise


def _thread_lock_for_progress_bars() -> None:
    """Give tqdm a thread lock instead of the multiprocessing lock it creates on first use.

    That lock is a named semaphore registered with multiprocessing's resource tracker; a rank killed
    while holding it registered (SIGKILL, or SIGTERM when a peer failed) leaves the tracker to print
    "leaked semaphore objects" as the last line of a failed run. A rank's bars are its own, so a
    thread lock is all they need.
    """
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def launch(fn: Worker, world_size: int, args: tuple = (), backend: str = "gloo", start_rank: int = 0,
           local_ranks: int | None = None, threads: Sequence[int] | None = None, device: str = "cpu",
           devices: Sequence[str] | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` on every rank; returns when all ranks have finished.

    Each rank's device (``devices.rank_device``: ``devices[rank]`` from a partition config, else
    ``cuda:<local rank>`` for ``device="cuda"``, else ``device``) is bound before its process group
    is created; ``fn`` finds it with ``devices.bound_device()``.

    On several nodes, each node runs ranks ``start_rank .. start_rank+local_ranks-1`` and they meet
    at ``MASTER_ADDR:MASTER_PORT`` (NxD's ``--start_rank_id`` / ``--local_ranks_size``). ``threads``
    gives each local rank's torch thread count (e.g. ``numCores`` from a partition config); by default
    the usable cores are shared evenly among the local ranks.
    """
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != world_size:
            raise ShardwiseError(f"torchrun started {world} ranks but --tp-degree is {world_size}")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(threads[rank] if threads is not None else threads_per_rank(local))
        dev.setup_rank(device, rank, 0, devices, local, None, backend,
                       timeout=timedelta(seconds=settings.collective_timeout()))
        try:
            fn(rank, world, *args)
            dev.log_report(rank)
        finally:
            dist.destroy_process_group()
            dev.release_device()
        return
    local = world_size - start_rank if local_ranks is None else local_ranks
    if start_rank < 0 or local < 1 or start_rank + local > world_size:
        raise ShardwiseError(f"ranks {start_rank}..{start_rank + local - 1} are not within TP degree {world_size}")
    if world_size == 1:
        if threads is not None:
            torch.set_num_threads(threads[0])
        dev.bind_device(dev.rank_device(device, 0, 0, devices), 0)  # no group, no peers: nothing to claim
        try:
            fn(0, 1, *args)
            dev.log_report(0)
        finally:
            dev.release_device()
        return
    address, port = "127.0.0.1", None
    if local < world_size:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ShardwiseError("a node running only some ranks needs MASTER_ADDR and MASTER_PORT set "
                                 "(the address of the node with rank 0)")
        address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if threads is not None and (len(threads) != local or min(threads) < 1):
        raise ShardwiseError(f"threads per rank {list(threads)} must give each of the {local} local ranks at least 1")
    threads = tuple(threads) if threads is not None else (threads_per_rank(local),) * local
    # torch logs a warning per rank it terminates after a failure; our one-line error says it all.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="shardwise-ranks-") as error_dir:
        context = mp.start_processes(_rank_entry,
                                     args=(fn, world_size, start_rank, f"tcp://{address}:{port or free_port()}",
                                           backend, threads, args, error_dir, device, devices),
                                     nprocs=local, start_method="spawn", join=False)
        try:
            while not context.join():
                pass
        except ProcessException as exc:  # join() has already terminated the surviving ranks
            for proc in context.processes:
                proc.join(10)
            message, exit_code, detail = _root_cause(exc, Path(error_dir), context.processes, start_rank)
            if detail:  # SHARDWISE_DEBUG: the failing rank's own traceback, above the one-line report
                print(detail, file=sys.stderr, end="")
            raise ShardwiseError(message, exit_code) from None
        finally:
            # torch leaves a failed rank's traceback in /tmp/pytorch-errorfile-*.pickle for good; our own
            # report (error_dir) is already read, so remove them.
            for name in context.error_files:
                with contextlib.suppress(OSError):
                    os.unlink(name)


def _root_cause(exc: ProcessException, error_dir: Path, processes, start_rank: int = 0) -> tuple[str, int, str]:
    """The first real failure, as (one line, CLI exit code, the rank's traceback if kept): a rank's own
    error, else a rank that died, else whatever was seen first.

    Exit codes: 2 when a rank refused bad input, 1 for a bug inside a rank or a rank that died.
    """
    errors = {}
    for f in error_dir.glob("rank*"):
        try:
            report = json.loads(f.read_text())
            errors[int(f.name[4:])] = (float(report["time"]), str(report["line"]), bool(report["internal"]),
                                       str(report.get("traceback", "")))
        except (ValueError, KeyError, TypeError, OSError):
            continue

    def failed(rank: int) -> tuple[str, int, str]:
        _, line, internal, detail = errors[rank]
        hint = " (a bug in shardwise; --debug shows the traceback)" if internal and not detail else ""
        return f"rank {start_rank + rank} failed: {line}{hint}", 1 if internal else 2, detail

    # Files and processes are indexed by local rank; messages name global ranks.
    own = [r for r, e in errors.items() if not any(s in e[1] for s in _PEER_LOSS)]
    if own:
        return failed(min(own, key=lambda r: errors[r][0]))
    for rank, proc in enumerate(processes):
        code = proc.exitcode
        if rank not in errors and code not in (0, None, -signal.SIGTERM):
            how = f"signal {_signal_name(-code)}" if code < 0 else f"exit code {code}"
            return f"rank {start_rank + rank} died ({how}); the other ranks were stopped", 1, ""
    if errors:
        return failed(min(errors, key=lambda r: errors[r][0]))
    return f"rank {start_rank + exc.error_index} failed", 1, ""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
