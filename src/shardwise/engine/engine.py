"""``Engine``: a sharded model held resident by one ordinary process, called as often as you like.

The process that builds an ``Engine`` starts the ranks (or, under torchrun, is rank 0 of them) and
keeps a pipe to rank 0. A call is a small message (token ids and sampling parameters); rank 0's
scheduler batches it with whatever else runs and streams tokens back, which a reader thread here
hands to the caller's callback. Nothing but ids and parameters ever crosses the pipe: weights stay
in the ranks, which also load replacements themselves (``swap_weights``).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing.connection as mpc
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ..config import ModelConfig, load_config
from ..errors import ShardwiseError
from ..generation import Sampling
from ..parallel.launch import _PEER_LOSS, default_backend, threads_per_rank, under_torchrun
from ..runner import RunOptions, resolve_ranks, validate
from ..settings import free_port
from .ranks import rank_entry, report_failure, serve_rank
from .types import Completion, EngineBusy, EngineClosed, EngineOptions, SwapReport, TokenEvent

log = logging.getLogger("shardwise")
EventCallback = Callable[[TokenEvent], None]
GREEDY = Sampling()
# Config fields a fine-tune may change without changing what the running model computes.
_SWAP_IGNORES = {"raw", "torch_dtype", "bos_token_id", "eos_token_ids", "pad_token_id", "max_position_embeddings"}


class RequestHandle:
    """One submitted request: its id, and ``cancel()`` to stop it (a last "cancelled" event follows)."""

    def __init__(self, engine: Engine, request_id: int):
        self._engine, self.request_id = engine, request_id

    def cancel(self) -> None:
        self._engine._send(("cancel", self.request_id), quiet=True)


@dataclass
class _Swap:
    done: threading.Event
    result: tuple[str, float, int] | None = None


class Engine:
    """Load a model across ranks once; then ``generate``, ``submit``, ``stream`` and ``swap_weights``.

    ``Engine(EngineOptions(...))`` or ``Engine(model_path=..., tp_degree=2, ...)``. Use it as a context
    manager, or call ``close()``. Under torchrun every process builds it; on rank 0 it returns a
    working engine (``is_driver``), on the other ranks the constructor serves until rank 0 closes.
    """

    def __init__(self, options: EngineOptions | None = None, **overrides):
        opts = replace(options or EngineOptions(), **overrides)
        if opts.max_batch_size < 1 or opts.max_queue < 0 or opts.seq_len < 2:
            raise ShardwiseError("max_batch_size must be at least 1, max_queue at least 0, seq_len at least 2")
        self.options = opts
        self._run_opts, self.config, self.tokenizer = _validate(opts)
        self.model_name = Path(self._run_opts.model_path).name
        self.seq_len = opts.seq_len
        self.eos_token_ids: tuple[int, ...] = tuple(self.config.eos_token_ids) or (
            (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ())
        self.load_info: dict = {}
        self.is_driver = True
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._callbacks: dict[int, EventCallback] = {}
        self._swaps: dict[int, _Swap] = {}
        self._dead: str | None = None
        self._closed = False
        self._ready = threading.Event()
        self._procs: list = []
        self._conn = None
        self._driver: threading.Thread | None = None
        self._owns_group = False
        plan, mesh, topology = resolve_ranks(self._run_opts, self.config)
        world = mesh.world_size
        devices = topology.devices if topology else None
        if under_torchrun():
            self._join_torchrun(world, devices)
            if not self.is_driver:
                return
        else:
            self._spawn(world, devices, topology.threads if topology else None)
        self._ready.wait()
        if self._dead:
            message = self._dead
            self.close()
            raise ShardwiseError(message)
        atexit.register(self.close)

    # -- starting and stopping -----------------------------------------------------------------
    def _spawn(self, world: int, devices, threads) -> None:
        ctx = mp.get_context("spawn")
        threads = list(threads) if threads else [threads_per_rank(world)] * world
        init = f"tcp://127.0.0.1:{free_port()}"
        backend = default_backend(self.options.device)
        conns: dict = {}
        for rank in range(world):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=rank_entry, daemon=True, name=f"shardwise-rank{rank}",
                               args=(rank, world, 0, init, backend, threads, self._run_opts,
                                     self.options.max_batch_size, self.eos_token_ids, devices, theirs, os.getpid(),
                                     self.options.batch_invariant))
            proc.start()
            theirs.close()
            conns[ours] = rank
            self._procs.append(proc)
        self._conn = next(iter(conns))
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self._procs)}
        threading.Thread(target=self._read, args=(conns, sentinels), name="shardwise-engine-reader",
                         daemon=True).start()

    def _join_torchrun(self, world: int, devices) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        from .. import settings
        from ..parallel import devices as dev

        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(threads_per_rank(local))
            dev.setup_rank(self.options.device, int(os.environ["RANK"]), 0, devices, local, None,
                           default_backend(self.options.device),
                           timeout=timedelta(seconds=settings.collective_timeout()))
        rank = dist.get_rank()
        if dist.get_world_size() != world:
            raise ShardwiseError(f"torchrun started {dist.get_world_size()} ranks but the mesh has {world}")
        if rank != 0:  # serve until rank 0 closes, then hand back a closed engine
            self.is_driver = False
            serve_rank(rank, self._run_opts, self.options.max_batch_size, self.eos_token_ids, devices, None,
                       self.options.batch_invariant)
            self._closed = True
            self._release_group()
            return
        ours, theirs = mp.Pipe()

        def drive() -> None:
            try:
                serve_rank(0, self._run_opts, self.options.max_batch_size, self.eos_token_ids, devices, theirs,
                           self.options.batch_invariant)
            except BaseException as exc:  # noqa: BLE001 - handed to the engine like a spawned rank's failure
                report_failure(theirs, 0, exc)
            finally:
                theirs.close()

        self._conn = ours
        self._driver = threading.Thread(target=drive, name="shardwise-rank0", daemon=True)
        self._driver.start()
        threading.Thread(target=self._read, args=({ours: 0}, {}), name="shardwise-engine-reader",
                         daemon=True).start()

    @property
    def alive(self) -> bool:
        """Whether requests can be submitted: not closed, and no rank has failed."""
        return self.is_driver and not self._closed and self._dead is None

    @property
    def rank_pids(self) -> list[int]:
        """Process ids of the ranks this engine started (empty under torchrun)."""
        return [p.pid for p in self._procs]

    def close(self) -> None:
        """Stop the ranks (running requests end with "cancelled"); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._send(("close",), quiet=True)
        deadline = time.monotonic() + 10
        for proc in self._procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if self._driver is not None:  # torchrun: rank 0's loop runs in this process; let it finish its STOP
            self._driver.join(30)
            self._release_group()
        self._fail_pending("cancelled", None)
        atexit.unregister(self.close)

    def _release_group(self) -> None:
        """Destroy the process group if this engine created it: a group left to interpreter exit aborts it."""
        import torch.distributed as dist

        if self._owns_group and dist.is_initialized():
            from ..parallel import devices as dev

            dist.destroy_process_group()
            dev.release_device()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], max_tokens: int, sampling: Sampling | None = None) -> None:
        """Refuse, with one line, what the ranks cannot run: raises ShardwiseError."""
        if not prompt_ids:
            raise ShardwiseError("the prompt is empty")
        vocab = self.config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt_ids):
            raise ShardwiseError(f"prompt token ids must be integers in [0, {vocab})")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ShardwiseError(f"max_tokens must be a positive integer, not {max_tokens!r}")
        if len(prompt_ids) + max_tokens > self.seq_len:
            raise ShardwiseError(
                f"this model's context is {self.seq_len} tokens, but {len(prompt_ids) + max_tokens} were requested "
                f"({len(prompt_ids)} in the prompt, {max_tokens} to generate)")
        if sampling is not None:
            if not sampling.temperature >= 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
                raise ShardwiseError("sampling needs temperature >= 0, 0 < top_p <= 1 and top_k >= 0")

    def submit(self, prompt_ids: list[int], sampling: Sampling = GREEDY, max_tokens: int = 64,
               on_event: EventCallback | None = None, ignore_eos: bool = False) -> RequestHandle:
        """Queue one request; ``on_event`` gets each new token (from the engine's reader thread).

        ``ignore_eos`` generates all ``max_tokens`` even past an end-of-sequence token (for benchmarks).
        """
        self._check_alive()
        prompt_ids = list(prompt_ids)
        self.check_request(prompt_ids, max_tokens, sampling)
        with self._lock:
            if len(self._callbacks) >= self.options.max_batch_size + self.options.max_queue:
                raise EngineBusy(f"the engine has {len(self._callbacks)} requests running or queued; try again later")
            request_id = next(self._ids)
            self._callbacks[request_id] = on_event or (lambda event: None)
        self._send(("submit", request_id, prompt_ids, sampling, max_tokens, bool(ignore_eos)))
        return RequestHandle(self, request_id)

    def stream(self, prompt_ids: list[int], sampling: Sampling = GREEDY, max_tokens: int = 64) -> Iterator[int]:
        """The new token ids of one request as they come; closing the iterator early cancels it."""
        events: queue.Queue[TokenEvent] = queue.Queue()
        handle = self.submit(prompt_ids, sampling, max_tokens, events.put)
        finished = False
        try:
            while True:
                event = events.get()
                if event.token is not None:
                    yield event.token
                if event.finish_reason:
                    finished = True
                    if event.finish_reason == "error":
                        raise ShardwiseError(event.error or "the engine failed")
                    return
        finally:
            if not finished:
                handle.cancel()

    def generate(self, prompts: str | list[str] | list[list[int]], sampling: Sampling = GREEDY,
                 max_new_tokens: int = 64, chat_template: bool = True) -> list[Completion]:
        """Generate for every prompt (text, or token ids), all batched together; one Completion each.

        Text prompts go through the tokenizer's chat template unless ``chat_template`` is False.
        ``max_new_tokens`` is cut to what fits in the context after each prompt.
        """
        from ..prompts import encode_prompts

        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = [list(p) if not isinstance(p, str) else None for p in prompts]
        texts = [p for p in prompts if isinstance(p, str)]
        if texts:
            it = iter(encode_prompts(self.tokenizer, texts, chat_template))
            encoded = [e if e is not None else next(it) for e in encoded]
        results: list[dict] = [{"tokens": [], "done": threading.Event()} for _ in encoded]

        def collector(i: int, start: float) -> EventCallback:
            def on_event(event: TokenEvent) -> None:
                r = results[i]
                if event.token is not None:
                    r["tokens"].append(event.token)
                    r.setdefault("first", time.perf_counter() - start)
                if event.finish_reason:
                    r["finish"], r["error"], r["rank"] = event.finish_reason, event.error, event.rank_seconds
                    r["seconds"] = time.perf_counter() - start
                    r["done"].set()
            return on_event

        for i, ids in enumerate(encoded):
            room = max(1, min(max_new_tokens, self.seq_len - len(ids)))
            while True:
                try:
                    self.submit(ids, sampling, room, collector(i, time.perf_counter()))
                    break
                except EngineBusy:
                    time.sleep(0.01)
        completions = []
        for ids, r in zip(encoded, results):
            r["done"].wait()
            if r["finish"] == "error":
                raise ShardwiseError(r["error"] or "the engine failed")
            completions.append(Completion(self.tokenizer.decode(r["tokens"], skip_special_tokens=True), r["tokens"],
                                          len(ids), r["finish"], r.get("first", r["seconds"]), r["seconds"],
                                          r["rank"]))
        return completions

    # -- weights -------------------------------------------------------------------------------
    def swap_weights(self, model_path: str | Path) -> SwapReport:
        """Replace the live weights with another checkpoint of the same architecture and shapes.

        Each rank reads its own slices through the same layout and copies them into the parameters it
        already has: no rank restarts, no module is rebuilt. Requests already running finish on the
        old weights first; later ones see the new. A checkpoint that differs (a config field, a
        tensor's name or shape) is refused with the difference named, and the old weights stay.
        """
        self._check_alive()
        path = str(model_path)
        difference = config_difference(self.config, load_config(path))
        if difference:
            raise ShardwiseError(f"cannot swap in {path}: {difference}")
        t0 = time.perf_counter()
        with self._lock:
            swap_id = next(self._ids)
            swap = self._swaps[swap_id] = _Swap(threading.Event())
        self._send(("swap", swap_id, path))
        swap.done.wait()
        error, seconds, bytes_read = swap.result
        if error:
            raise ShardwiseError(f"cannot swap in {path}: {error}" if not error.startswith("engine") else error)
        return SwapReport(path, time.perf_counter() - t0, bytes_read)

    # -- the reader thread ---------------------------------------------------------------------
    def _read(self, conns: dict, sentinels: dict) -> None:
        while conns or sentinels:
            for ready in mpc.wait(list(conns) + list(sentinels)):
                if ready in conns:
                    try:
                        message = ready.recv()
                    except (EOFError, OSError):
                        rank = conns.pop(ready)
                        if rank == 0 and not self._closed:
                            self._fail("the engine's rank 0 stopped")
                        continue
                    self._handle(message)
                elif ready in sentinels:
                    rank, proc = sentinels.pop(ready)
                    proc.join()
                    if not self._closed:
                        code = proc.exitcode
                        how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
                        self._fail(f"rank {rank} died ({how}); the engine stopped")

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "events":
            for request_id, token, finish, rank_seconds in message[1]:
                with self._lock:
                    callback = self._callbacks.pop(request_id) if finish else self._callbacks.get(request_id)
                if callback is not None:
                    self._deliver(callback, TokenEvent(request_id, token, finish, None, rank_seconds or None))
        elif kind == "ready":
            self.load_info = message[1]
            self._ready.set()
        elif kind == "swapped":
            _, swap_id, error, seconds, bytes_read = message
            with self._lock:
                swap = self._swaps.pop(swap_id, None)
            if swap is not None:
                swap.result = (error, seconds, bytes_read)
                swap.done.set()
        elif kind == "fatal":
            _, rank, line, internal, detail = message
            if detail:
                log.error("rank %d traceback:\n%s", rank, detail)
            hint = " (a bug in shardwise; --debug shows the traceback)" if internal and not detail else ""
            peer_loss = any(s in line for s in _PEER_LOSS)
            self._fail(f"rank {rank} failed: {line}{hint}", weak=peer_loss)

    def _deliver(self, callback: EventCallback, event: TokenEvent) -> None:
        try:
            callback(event)
        except Exception:  # noqa: BLE001 - a caller's bug must not stop the events of everyone else
            log.exception("an engine event callback raised")

    def _fail(self, message: str, weak: bool = False) -> None:
        """The engine is dead: say why once, end every request and stop the ranks."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = message
        if weak:  # a rank that lost its peer: give the peer's own report a moment to arrive first
            time.sleep(0.2)
        log.error("engine stopped: %s", message)
        self._fail_pending("error", message)
        self._ready.set()
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()

    def _fail_pending(self, finish: str, message: str | None) -> None:
        with self._lock:
            callbacks, self._callbacks = self._callbacks, {}
            swaps, self._swaps = self._swaps, {}
        for request_id, callback in callbacks.items():
            self._deliver(callback, TokenEvent(request_id, None, finish, message))
        for swap in swaps.values():
            swap.result = (message or "engine closed", 0.0, 0)
            swap.done.set()

    def _check_alive(self) -> None:
        if not self.is_driver:
            raise EngineClosed("this process is not rank 0: only rank 0 drives the engine")
        if self._dead:
            raise EngineClosed(f"the engine is not running: {self._dead}")
        if self._closed:
            raise EngineClosed("the engine is closed")

    def _send(self, message: tuple, quiet: bool = False) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, EOFError, AttributeError, ValueError) as exc:
            if not quiet:
                raise EngineClosed(f"the engine is not running: {self._dead or exc}") from None


def config_difference(running: ModelConfig, new: ModelConfig) -> str:
    """The first config field in which ``new`` computes differently from ``running``, or ""."""
    if type(running) is not type(new):
        return f"it is a {new.architecture} ({new.family}), the running model a {running.architecture}"
    for f in fields(running):
        if f.name in _SWAP_IGNORES:
            continue
        a, b = getattr(running, f.name), getattr(new, f.name)
        if a != b:
            return f"config field {f.name} is {b!r}, the running model's {a!r}"
    return ""


def _validate(opts: EngineOptions) -> tuple[RunOptions, ModelConfig, object]:
    """The run options the ranks load with, checked as ``shardwise run`` checks them (before any rank starts)."""
    from ..convert import bundled_model_dir

    model_path = opts.model_path
    if model_path is None:
        model_path = opts.compiled_model_path if opts.skip_sharding and opts.compiled_model_path else None
        model_path = model_path or str(bundled_model_dir())
    run_opts = RunOptions(
        model_path=str(model_path), tp_degree=opts.tp_degree, torch_dtype=opts.torch_dtype, seq_len=opts.seq_len,
        max_context_length=opts.seq_len - 1, max_new_tokens=1, sharding_config=opts.sharding_config,
        overrides=list(opts.overrides), device=opts.device, progress=opts.progress,
        partition_config=opts.partition_config, partition=opts.partition, sequence_parallel=opts.sequence_parallel,
        mesh=opts.mesh, compiled_model_path=opts.compiled_model_path, skip_sharding=opts.skip_sharding,
        verify=opts.verify, fused_qkv=opts.fused_qkv, fused_gate_up=opts.fused_gate_up,
        pad_token_id=opts.pad_token_id, prompts=["."], chat_template=False,
    )
    run_opts, config, tokenizer, _ = validate(run_opts)
    return replace(run_opts, prompts=[]), config, tokenizer
