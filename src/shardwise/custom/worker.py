"""One rank of a launched model: build it, load its weights, then run what the caller sends.

Each rank holds a pipe to the caller. Every request goes to every rank (they all run the forward,
whose collectives keep them in step); rank 0 answers with its outputs. Anything a rank raises is
reported through its pipe as one line, and the rank exits (its peers are stopped by the caller).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .. import settings
from ..dtypes import to_torch
from ..errors import ShardwiseError
from ..parallel.comm import Collectives, default_collectives
from ..quick_exit import skip_final_collection
from .builder import Builder
from .plans import apply_plan, layout_of
from .weights import assign, load_checkpoint, load_saved, load_state, replace_into, save_rank

log = logging.getLogger("shardwise")


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs to build and load the model (pickled to each spawned rank)."""

    builder: Builder
    plan: object = None  # a Plan, YAML text or a dict; None: the model's own parallel layers
    checkpoint: str | None = None  # unsharded safetensors checkpoint, sliced on load
    saved: str | None = None  # directory written by ParallelModel.save
    manifest: dict | None = None
    dtype: str | None = None
    compile: bool | str = False  # True: inductor (CUDA graphs on GPU); a string: that torch.compile backend
    device: str = "cpu"
    max_buckets: int = 8


def to_cpu(out):
    """Outputs as plain CPU tensors in the same structure (HF ModelOutput kept), safe to pickle."""
    if isinstance(out, torch.Tensor):
        return out.detach().to("cpu", copy=True)
    if isinstance(out, dict):
        items = {k: to_cpu(v) for k, v in out.items()}
        try:
            return type(out)(**items)
        except TypeError:
            return type(out)(items)
    if isinstance(out, (tuple, list)):
        return type(out)(to_cpu(v) for v in out)
    return out


def to_device(obj, device: str):
    if device == "cpu":
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class Forward:
    """The model's forward, compiled once per input shape (bucket) when asked; counts compilations.

    With ``dynamic=False`` every new shape is a new graph and a shape seen before reuses its graph, so
    a call that compiled anything is a call with a bucket not seen before. ``compilations`` counts those
    calls (dynamo's own graph count is ``graphs``; a forward with collectives is several graphs).
    """

    def __init__(self, model: nn.Module, compile: bool | str, device: str, max_buckets: int):
        self.model, self.compilations, self.shapes = model, 0, set()
        self.fn = model
        if compile:
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * max_buckets + 4)
            backend = compile if isinstance(compile, str) else "inductor"
            mode = "reduce-overhead" if device.startswith("cuda") and backend == "inductor" else None
            self.fn = torch.compile(model, dynamic=False, backend=backend, mode=mode)
        self.compiled = bool(compile)

    @staticmethod
    def graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def __call__(self, args: tuple, kwargs: dict):
        before = self.graphs() if self.compiled else 0
        with torch.no_grad():
            try:
                out = self.fn(*args, **kwargs)
            except (TypeError, ValueError, IndexError, RuntimeError) as exc:  # the user's model refusing its input
                line = (str(exc).strip().splitlines() or [""])[0]
                raise ShardwiseError(f"the model's forward raised {type(exc).__name__}: {line}") from exc
        if self.compiled and self.graphs() > before:
            self.compilations += 1
        return out

    def stats(self) -> dict:
        return {"compilations": self.compilations, "graphs": self.graphs() if self.compiled else 0}


def signature(model: nn.Module) -> tuple[list[str], int | None, bool]:
    """(keyword names, most positional arguments or None for *args, accepts **kwargs) of ``model.forward``:
    the caller checks calls against it, so a misspelt input is one line instead of a failed rank."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return [], None, True
    kinds = inspect.Parameter
    names = [p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)]
    var_args = any(p.kind == kinds.VAR_POSITIONAL for p in params)
    positional = None if var_args else sum(p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
                                           for p in params)
    return names, positional, any(p.kind == kinds.VAR_KEYWORD for p in params)


def build(spec: RankSpec, comm: Collectives) -> nn.Module:
    model = spec.builder.build()
    if spec.plan is not None:
        apply_plan(model, spec.plan, comm)
    layout = layout_of(model, comm)
    dtype = to_torch(spec.dtype) if spec.dtype else next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if spec.saved is not None:
        assign(model, load_saved(layout, spec.saved, comm.rank, spec.manifest))
    elif spec.checkpoint is not None:
        assign(model, load_checkpoint(layout, spec.checkpoint, comm.rank, dtype))
    else:
        assign(model, {})
        model.to(dtype)
    return model.to(spec.device).eval()


def rank_entry(rank: int, world: int, init_method: str, backend: str, threads: int, spec: RankSpec, conn,
               parent_pid: int) -> None:
    from ..engine.ranks import _watch_parent, report_failure

    skip_final_collection()
    _watch_parent(parent_pid)
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s shardwise: %(message)s", force=True)
    try:
        if world > 1:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=settings.collective_timeout()))
        serve(rank, spec, conn)
    except BaseException as exc:  # noqa: BLE001 - reported to the caller, which decides what the user sees
        report_failure(conn, rank, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def serve(rank: int, spec: RankSpec, conn) -> None:
    t0 = time.perf_counter()
    comm = default_collectives()
    model = build(spec, comm)
    layout = layout_of(model, comm)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    forward = Forward(model, spec.compile, spec.device, spec.max_buckets)
    conn.send(("ready", rank, {"layout": layout if rank == 0 else None, "dtype": str(dtype).removeprefix("torch."),
                               "seconds": time.perf_counter() - t0, "signature": signature(model)}))
    while True:
        message = conn.recv()
        kind = message[0]
        if kind == "close":
            return
        if kind == "call":
            out = forward(to_device(message[1], spec.device), to_device(message[2], spec.device))
            if rank == 0:
                conn.send(("result", rank, to_cpu(out), forward.stats()))
        elif kind == "replace":
            source = message[1]
            state = (load_state(layout, source, rank, dtype) if isinstance(source, dict)
                     else load_checkpoint(layout, source, rank, dtype))
            replace_into(model, state)
            comm.barrier()
            conn.send(("replaced", rank, None))
        elif kind == "save":
            conn.send(("saved", rank, save_rank(model, message[1], rank)))
