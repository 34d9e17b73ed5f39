"""``ParallelModel``: a model running on every rank, called like a module from one ordinary process.

``shardwise.launch(get_model, checkpoint=..., tp_degree=2)`` spawns the ranks; each imports and
calls ``get_model``, applies the plan if one is given, and loads its weights. ``model(*inputs)`` sends
the inputs to every rank (padded into a bucket first, when buckets are given), every rank runs the
forward, and rank 0's outputs come back here as CPU tensors (cut back to the real input shape).
``save(dir)`` writes the per-rank weights and the program apart; ``shardwise.load(dir)`` rebuilds it
without the source checkpoint; ``replace_weights`` swaps weights in without rebuilding anything.
"""

from __future__ import annotations

import atexit
import multiprocessing.connection as mpc
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

from ..errors import ShardwiseError
from ..layout import Layout
from ..parallel.launch import _PEER_LOSS, default_backend, threads_per_rank
from ..plan import Plan
from ..settings import free_port
from .buckets import Buckets
from .builder import Builder
from .weights import check_shapes, read_saved, write_manifest, write_program
from .worker import RankSpec, rank_entry

_INPUT_TYPES = (torch.Tensor, int, float, bool, str, type(None))


def _plan_json(plan) -> object:
    """A plan as saved in program.json: YAML text and dicts as given; a Plan as its rules and sections."""
    if plan is None or isinstance(plan, (str, dict)):
        return str(plan) if isinstance(plan, Path) else plan
    if isinstance(plan, Path):
        return plan.read_text()
    if isinstance(plan, Plan):
        def spec(s):
            return [list(e) if isinstance(e, tuple) else e for e in s]
        data: dict = {"sharding": {r.pattern: spec(r.spec) for r in plan.rules},
                      "mesh": {"axes": list(plan.mesh_axes)}}
        if plan.units:
            data["units"] = {n: list(u) for n, u in plan.units}
        if plan.tp_splits:
            data["tp_splits"] = {n: list(u) for n, u in plan.tp_splits}
        if plan.groups:
            data["groups"] = [list(g) for g in plan.groups]
        return data
    raise ShardwiseError(f"a plan is a Plan, a YAML file or text, or a dict of rules, not {type(plan).__name__}")


def _check_inputs(value, where: str = "input") -> None:
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _check_inputs(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_inputs(v, f"{where}[{k!r}]")
    elif not isinstance(value, _INPUT_TYPES):
        raise ShardwiseError(f"{where} is a {type(value).__name__}; a launched model takes tensors, numbers, strings "
                             "and lists or dicts of them")
    elif isinstance(value, torch.Tensor) and value.device.type != "cpu":
        raise ShardwiseError(f"{where} is on {value.device}; pass CPU tensors (ranks move them to their device)")


class ParallelModel:
    """A tensor-parallel model held by ranks; call it like the module it is built from.

    Use it as a context manager or call ``close()``. ``compile_stats`` tells, after each call, how many
    calls compiled a graph (one per bucket with ``compile=True``) and dynamo's graph count on rank 0.
    """

    def __init__(self, spec: RankSpec, tp_degree: int, buckets: Buckets | None = None, plan_json: object = None):
        if isinstance(tp_degree, bool) or not isinstance(tp_degree, int) or tp_degree < 1:
            raise ShardwiseError(f"tp_degree must be a positive integer, not {tp_degree!r}")
        if buckets is not None and not isinstance(buckets, Buckets):
            raise ShardwiseError(f"buckets must be a shardwise.Buckets, not {type(buckets).__name__}")
        self.spec, self.tp_degree, self.buckets, self._plan_json = spec, tp_degree, buckets, plan_json
        self.compile_stats: dict = {"compilations": 0, "graphs": 0}
        self.layout: Layout | None = None
        self.dtype: str = ""
        self.load_seconds = 0.0
        self._lock = threading.Lock()
        self._closed = False
        self._dead: str | None = None
        self._procs: list = []
        self._conns: list = []
        self._spawn()
        atexit.register(self.close)

    # -- ranks ---------------------------------------------------------------------------------
    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        world = self.tp_degree
        init = f"tcp://127.0.0.1:{free_port()}"
        threads = threads_per_rank(world)
        for rank in range(world):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=rank_entry, daemon=True, name=f"shardwise-rank{rank}",
                               args=(rank, world, init, default_backend(self.spec.device), threads, self.spec, theirs,
                                     os.getpid()))
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)
        try:
            ready = self._collect("ready", set(range(world)))
        except BaseException:
            self.close()
            raise
        self.layout = ready[0]["layout"]
        self.dtype = ready[0]["dtype"]
        self.load_seconds = max(r["seconds"] for r in ready.values())
        self._signature = ready[0]["signature"]

    @property
    def rank_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _collect(self, kind: str, ranks: set[int]) -> dict[int, object]:
        """Wait for ``kind`` from each of ``ranks``; a rank's failure or death becomes one ShardwiseError."""
        got: dict[int, object] = {}
        conns = {c: r for r, c in enumerate(self._conns)}
        sentinels = {p.sentinel: r for r, p in enumerate(self._procs)}
        weak: str | None = None
        while ranks - set(got):
            ready = mpc.wait(list(conns) + list(sentinels), timeout=None if weak is None else 0.5)
            if not ready and weak:
                self._fail(weak)
            for obj in ready:
                if obj in conns:
                    try:
                        message = obj.recv()
                    except (EOFError, OSError):
                        conns.pop(obj)
                        continue
                    if message[0] == "fatal":
                        _, rank, line, internal, detail = message
                        if detail:
                            print(detail, end="", flush=True)
                        hint = " (a bug; --debug or SHARDWISE_DEBUG=1 shows the traceback)" if internal and not \
                            detail else ""
                        text = f"rank {rank} failed: {line}{hint}"
                        if any(s in line for s in _PEER_LOSS):
                            weak = weak or text  # a peer's own report may follow: wait a little for it
                            continue
                        self._fail(text, 1 if internal else 2)
                    if message[0] == kind:
                        got[message[1]] = message[2] if len(message) == 3 else message[2:]
                elif obj in sentinels:
                    rank = sentinels.pop(obj)
                    code = self._procs[rank].exitcode
                    if rank in ranks and rank not in got and not self._closed:
                        how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
                        weak = weak or f"rank {rank} died ({how})"
        return got

    def _fail(self, message: str, exit_code: int = 2):
        self._dead = message
        self.close()
        raise ShardwiseError(message, exit_code)

    def _send_all(self, message: tuple) -> None:
        self._check_alive()
        try:
            for conn in self._conns:
                conn.send(message)
        except (OSError, EOFError, ValueError) as exc:
            self._fail(f"the ranks are not running ({exc})")

    def _check_alive(self) -> None:
        if self._dead:
            raise ShardwiseError(f"the model is not running: {self._dead}")
        if self._closed:
            raise ShardwiseError("the model is closed")

    # -- the API -------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """One forward on every rank; rank 0's outputs, as CPU tensors in the module's output structure."""
        _check_inputs(args, "inputs")
        _check_inputs(kwargs, "keyword inputs")
        names, positional, any_keyword = self._signature
        unknown = [k for k in kwargs if k not in names]
        if unknown and not any_keyword:
            raise ShardwiseError(f"the model's forward has no input {unknown[0]!r}; it takes {', '.join(names)}")
        if positional is not None and len(args) > positional:
            raise ShardwiseError(f"the model's forward takes at most {positional} positional inputs, got {len(args)}")
        unpad: Callable = lambda out: out  # noqa: E731
        if self.buckets is not None:
            args, kwargs, unpad = self.buckets.pad(args, kwargs)
        with self._lock:
            self._send_all(("call", args, kwargs))
            out, stats = self._collect("result", {0})[0]
        self.compile_stats = stats
        return unpad(out)

    def replace_weights(self, weights: str | Path | dict[str, torch.Tensor] | nn.Module) -> None:
        """New weights of the same layout, copied into the live parameters on every rank (nothing rebuilt).

        ``weights``: an unsharded safetensors checkpoint directory (each rank reads its slices), a
        whole state dict, or a module whose ``state_dict()`` is one. Names and shapes are checked here
        first, so a mismatch is refused (one line) and the old weights stay.
        """
        self._check_alive()
        if isinstance(weights, nn.Module):
            weights = weights.state_dict()
        if isinstance(weights, dict):
            bad = next((k for k, v in weights.items() if not isinstance(v, torch.Tensor)), None)
            if bad is not None:
                raise ShardwiseError(f"replace_weights: {bad} is not a tensor")
            check_shapes(self.layout, {k: tuple(v.shape) for k, v in weights.items()}, "the new state dict")
            source: object = {k: weights[k].detach().cpu() for k in self.layout.tensors}
        else:
            from ..checkpoint import CheckpointSource

            path = Path(weights)
            if not path.is_dir():
                raise ShardwiseError(f"replace_weights: {str(path)!r} is not a checkpoint directory")
            check_shapes(self.layout, {n: s for n, (s, _) in CheckpointSource(path).shapes().items()}, str(path))
            source = str(path)
        with self._lock:
            self._send_all(("replace", source))
            self._collect("replaced", set(range(self.tp_degree)))

    def save(self, directory: str | Path) -> Path:
        """Write the per-rank weights (``weights/tp{r}_sharded_checkpoint.safetensors``), their manifest and the
        program (``program.json``: the builder's import path and arguments, plan, dtype, buckets)."""
        self._check_alive()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.buckets is not None and self.buckets.kernel is not None:
            raise ShardwiseError("a model with a custom bucket kernel cannot be saved with it; save without buckets "
                                 "and pass them to shardwise.load")
        with self._lock:
            self._send_all(("save", str(directory)))
            files = self._collect("saved", set(range(self.tp_degree)))
        write_manifest(directory, self.layout, [files[r] for r in range(self.tp_degree)], getattr(torch, self.dtype))
        write_program(directory, {"format": "shardwise-program", "version": 1,
                                  "builder": self.spec.builder.to_json(), "plan": self._plan_json,
                                  "dtype": self.dtype, "compile": self.spec.compile, "device": self.spec.device,
                                  "buckets": self.buckets.to_json() if self.buckets else None})
        return directory

    def close(self) -> None:
        """Stop the ranks; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            try:
                conn.send(("close",))
            except (OSError, EOFError, ValueError):
                pass
        for proc in self._procs:
            proc.join(10)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        atexit.unregister(self.close)

    def __enter__(self) -> ParallelModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def launch(get_model: Callable[..., nn.Module], checkpoint: str | Path | None = None, tp_degree: int = 1,
           plan: Plan | str | Path | dict | None = None, buckets: Buckets | None = None, compile: bool | str = False,
           dtype: str | None = None, args: tuple = (), kwargs: dict | None = None,
           device: str = "cpu") -> ParallelModel:
    """Start ``tp_degree`` ranks, build the model on each with ``get_model(*args, **kwargs)``, load weights.

    ``get_model`` is a module-level function (ranks import it by name; from a script, call ``launch``
    under ``if __name__ == "__main__":``). It returns a module built with ``shardwise.parallel`` layers,
    or a plain module that ``plan`` (a Plan, YAML file or text, or dict of rules) parallelizes. Weights:
    ``checkpoint``, an unsharded safetensors checkpoint each rank reads its slices of; without one, the
    module's own (full) weights, sliced. ``buckets`` pads inputs into static shapes; ``compile`` compiles
    each bucket's forward once (``True``: inductor, with CUDA graphs on GPU; or a torch.compile backend name).
    """
    builder = Builder.of(get_model, tuple(args), kwargs)
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise ShardwiseError(f"checkpoint {str(checkpoint)!r} is not a directory")
    plan_json = _plan_json(plan)
    if isinstance(plan, Path) or (isinstance(plan, str) and "\n" not in plan and plan.endswith((".yaml", ".yml"))):
        from .plans import as_plan

        plan = as_plan(plan)  # read (and checked) here, so ranks need not find the file
    if compile not in (True, False) and not isinstance(compile, str):
        raise ShardwiseError(f"compile is True, False or a torch.compile backend name, not {compile!r}")
    max_buckets = len(buckets.seq) * len(buckets.batch or (1,)) if buckets is not None else 8
    spec = RankSpec(builder, plan, str(checkpoint) if checkpoint is not None else None, dtype=dtype,
                    compile=compile, device=device, max_buckets=max_buckets)
    return ParallelModel(spec, tp_degree, buckets, plan_json)


def load(directory: str | Path, buckets: Buckets | None = None, compile: bool | str | None = None) -> ParallelModel:
    """A model saved by ``ParallelModel.save``: same program, its per-rank weights, no source checkpoint.

    Buckets and ``compile`` default to what was saved.
    """
    program, manifest = read_saved(directory)
    builder = Builder.from_json(program["builder"], str(Path(directory) / "program.json"))
    saved_buckets = program.get("buckets")
    if buckets is None and isinstance(saved_buckets, dict):
        buckets = Buckets(saved_buckets.get("seq") or [], saved_buckets.get("batch"))
    compile = program.get("compile", False) if compile is None else compile
    plan = program.get("plan")
    spec = RankSpec(builder, plan, None, str(directory), manifest, program.get("dtype"), compile,
                    str(program.get("device", "cpu")))
    spec = replace(spec, max_buckets=len(buckets.seq) * len(buckets.batch or (1,)) if buckets else 8)
    return ParallelModel(spec, manifest["tp_degree"], buckets, plan)
