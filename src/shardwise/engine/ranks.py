"""The engine's rank processes: load once, then serve steps until told to stop (or orphaned).

Each rank is a spawned process holding one end of a pipe to the engine. Rank 0 runs the scheduler on
it; the others only report a failure through theirs. A rank whose parent dies exits within a second
(a watchdog thread compares ``os.getppid()`` with the parent it was started by), so killing the
engine's process, even with SIGKILL, leaves no rank behind.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import settings
from ..errors import ShardwiseError
from ..parallel import devices as dev
from ..quick_exit import skip_final_collection
from ..runner import RunOptions, load_rank_model, run_plan
from .control import Control
from .scheduler import Scheduler, follow
from .steps import StepRunner

log = logging.getLogger("shardwise")
WATCHDOG_SECONDS = 0.5


def rank_entry(local_rank: int, world: int, start_rank: int, init_method: str, backend: str, threads: list[int],
               opts: RunOptions, rows: int, eos: tuple[int, ...], devices: tuple[str, ...] | None, conn,
               parent_pid: int, batch_invariant: bool = True) -> None:
    """A spawned rank's whole life."""
    skip_final_collection()
    _watch_parent(parent_pid)
    rank = start_rank + local_rank
    torch.set_num_threads(threads[local_rank])
    from ..parallel.launch import _thread_lock_for_progress_bars

    _thread_lock_for_progress_bars()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s shardwise: %(message)s", force=True)
    if rank != 0:
        log.setLevel(logging.WARNING)
    try:
        if world > 1:  # the device first, then the group (devices.py)
            dev.setup_rank(opts.device, rank, start_rank, devices, len(threads), init_method, backend,
                           world_size=world, timeout=timedelta(seconds=settings.collective_timeout()))
        else:
            dev.bind_device(dev.rank_device(opts.device, rank, start_rank, devices), rank)
        serve_rank(rank, opts, rows, eos, devices, conn, batch_invariant)
        dev.log_report(rank)
    except BaseException as exc:  # noqa: BLE001 - reported to the engine, which decides what the user sees
        report_failure(conn, rank, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        dev.release_device()


def serve_rank(rank: int, opts: RunOptions, rows: int, eos: tuple[int, ...], devices: tuple[str, ...] | None,
               conn, batch_invariant: bool = True) -> None:
    """Load this rank's part of the model, then serve: rank 0 schedules, the others follow."""
    t0 = time.perf_counter()
    device = dev.bound_device() or (devices[rank] if devices else opts.device)
    sharded, comm = load_rank_model(opts, rank, device)
    shard_s, load_s = comm.max_over_ranks([sharded.stats.seconds, time.perf_counter() - t0])
    runner = StepRunner(sharded, run_plan(opts, sharded.config), rows, opts.seq_len, device, batch_invariant)
    control = Control(comm)
    if rank == 0:
        log.info("Engine ready: loaded in %.2f s (sharding %.2f s); %d cache rows of %d positions; decode batches "
                 "of at least %d rows", load_s, shard_s, rows, opts.seq_len, runner.min_rows)
        conn.send(("ready", {"load_seconds": load_s, "shard_seconds": shard_s, "world_size": comm.world_size,
                             "bytes_held_rank0": sharded.stats.bytes_held, "min_decode_rows": runner.min_rows}))
        Scheduler(conn, runner, control, rows, opts.seq_len, eos).serve()
    else:
        follow(runner, control)


def report_failure(conn, rank: int, exc: BaseException) -> None:
    internal = not isinstance(exc, (ShardwiseError, KeyboardInterrupt))
    text = f"internal error: {type(exc).__name__}: {exc}" if internal else str(exc)
    line = (text.strip().splitlines() or [type(exc).__name__])[0]
    detail = traceback.format_exc() if settings.debug() else ""
    try:
        conn.send(("fatal", rank, line, internal, detail))
    except (OSError, EOFError):
        pass


def _watch_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(WATCHDOG_SECONDS)
        os._exit(0)  # orphaned: nobody will read what we produce, and peers die the same way

    threading.Thread(target=watch, name="shardwise-parent-watchdog", daemon=True).start()
