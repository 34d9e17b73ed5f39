"""Start ranks: our own local processes, or the ones torchrun started.

``shardwise run --tp-degree N`` spawns N processes itself (no torchrun needed). Under torchrun (the
``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` variables are set) the same worker runs in each process. If
any rank fails, the others are terminated and the failure comes back as one ``ShardwiseError``.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import ShardwiseError

Worker = Callable[..., Any]
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("SHARDWISE_TIMEOUT", "600")))


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_rank(local_ranks: int) -> int:
    """Each local rank gets its share of the cores, so ranks never oversubscribe the machine."""
    return max(1, usable_cores() // max(1, local_ranks))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _rank_entry(rank: int, fn: Worker, world: int, port: int, backend: str, threads: Sequence[int],
                args: tuple) -> None:
    torch.set_num_threads(threads[rank])
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Worker, world_size: int, args: tuple = (), backend: str = "gloo",
           threads: Sequence[int] | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` on every rank; returns when all ranks have finished.

    ``threads`` gives each rank's torch thread count (e.g. ``numCores`` from a partition config);
    by default the usable cores are shared evenly among the local ranks.
    """
    if threads is not None and (len(threads) != world_size or min(threads) < 1):
        raise ShardwiseError(f"threads per rank {list(threads)} must give each of the {world_size} ranks at least 1")
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != world_size:
            raise ShardwiseError(f"torchrun started {world} ranks but --tp-degree is {world_size}")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(threads[rank] if threads is not None else threads_per_rank(local))
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        try:
            fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        return
    if world_size == 1:
        if threads is not None:
            torch.set_num_threads(threads[0])
        fn(0, 1, *args)
        return
    threads = tuple(threads) if threads is not None else (threads_per_rank(world_size),) * world_size
    try:
        mp.start_processes(_rank_entry, args=(fn, world_size, _free_port(), backend, threads, args),
                           nprocs=world_size, start_method="spawn", join=True)
    except mp.ProcessRaisedException as exc:
        raise ShardwiseError(f"rank {exc.error_index} failed: {_last_line(str(exc))}") from None
    except mp.ProcessExitedException as exc:
        how = f"signal {exc.signal_name}" if exc.signal_name else f"exit code {exc.exit_code}"
        raise ShardwiseError(f"rank {exc.error_index} died ({how}); the other ranks were stopped") from None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else text
    prefix = "shardwise.errors.ShardwiseError: "
    return last[len(prefix):] if last.startswith(prefix) else last


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
