"""Inside one rank: compute the layout, read this rank's shard, and build the parallel model.

This is the Python API for code that already runs on every rank (e.g. under torchrun)::

    sharded = shardwise.load_sharded("path/to/checkpoint")      # rank/world from torch.distributed
    out = shardwise.generate(sharded.module, [[1, 2, 3]], 32, pad_token_id=0, eos_token_ids=(2,),
                             comm=sharded.comm)
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointSource
from .config import ModelConfig, load_config
from .conformance import model_layout
from .dtypes import resolve_dtype
from .errors import ShardwiseError
from .families import family
from .layout import Layout
from .loader import LoadStats, load_rank_state
from .parallel.activations import apply_placements
from .parallel.comm import Collectives
from .parallel.context import ContextParallel, apply_context_parallel, sequence_axes
from .parallel.data import BatchSplit
from .parallel.devices import state_to_device, torch_device
from .parallel.fsdp import axis_groups, storage_axes
from .parallel.redistribute import assign_redistributed
from .parallelize import assign_state, check_runtime, native_outputs, parallelize
from .plan import Plan, resolve_plan
from .protocol import Model
from .redistribute import redistribution

log = logging.getLogger("shardwise")

@contextmanager
def _skip_init():
    """Build modules without their random initialisation: the loaded shard replaces every parameter.

    Besides wasted work, ``normal_`` on the meta device goes through torch's reference kernels, whose
    first use imports torch._dynamo: over a second of start-up in every rank.
    """
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    for cls in saved:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


@dataclass
class ShardedModel:
    """This rank's part of a tensor-parallel model: ``module`` runs forwards on every rank together."""

    module: Model
    config: ModelConfig
    layout: Layout
    rank: int
    comm: Collectives
    stats: LoadStats
    dtype: torch.dtype
    batch_split: BatchSplit | None = None  # the plan divides batches among replicas: generate with generate_split
    context: ContextParallel | None = None  # the plan splits the sequence over context: prefill in chunks


def load_sharded(
    model_path: str | Path | None,
    dtype: str | torch.dtype = "auto",
    plan: Plan | None = None,
    comm: Collectives | None = None,
    device: str = "cpu",
    progress: bool = False,
    read_threads: int = 4,
    compiled_model_path: str | Path | None = None,
    weights: str = "auto",
    reshard: bool = False,
    verify: str = "auto",
    fused_qkv: bool = False,
    fused_gate_up: bool = False,
) -> ShardedModel:
    """Load this rank's shard and return the tensor-parallel model, ready to run.

    ``weights`` picks where the shard comes from: ``"on-load"`` reads this rank's slices from the
    checkpoint at ``model_path``; ``"presharded"`` reads ``compiled_model_path``'s rank file (refusing
    stale ones; ``reshard`` re-slices files made at another TP degree); ``"auto"`` uses a valid
    pre-sharded checkpoint when there is one and shards on load otherwise. ``verify`` is how the
    source of pre-sharded files is checked (``presharded.check_presharded``). ``fused_qkv`` and
    ``fused_gate_up`` concatenate each rank's q/k/v (gate/up) slices into one weight (``fusion.py``).
    """
    from . import presharded

    comm = comm or Collectives()
    check = None  # what checking the pre-sharded checkpoint found: checked once, layout included
    if weights == "auto":
        weights = "on-load"
        if compiled_model_path is not None and presharded.has_manifest(compiled_model_path):
            try:
                check = presharded.inspect_presharded(compiled_model_path, comm.world_size, dtype, model_path, plan,
                                                      verify)
                problems = check.problems
            except ShardwiseError as exc:  # e.g. a manifest of an older format: the source still loads
                check, problems = None, [str(exc)]
            if not problems:
                weights = "presharded"
            elif comm.rank == 0:
                log.info("Not using the pre-sharded checkpoint (%s); sharding on load", "; ".join(problems))
    if weights == "presharded":
        if compiled_model_path is None:
            raise ShardwiseError("loading pre-sharded weights needs --compiled-model-path")
        if comm.rank == 0:
            log.info("Loading pre-sharded weights for ranks: 0...%d from %s", comm.world_size - 1,
                     Path(compiled_model_path) / presharded.WEIGHTS)
        check = presharded.require_usable_check(compiled_model_path, comm.world_size, dtype, model_path, reshard,
                                                plan, verify, check)
        state, stats = presharded.load_presharded_state(compiled_model_path, comm.rank, comm.world_size, dtype,
                                                        model_path, reshard, plan, check=check)
        config, layout = check.config, check.layout
        torch_dtype = next(iter(state.values())).dtype
    else:
        if model_path is None:
            raise ShardwiseError("sharding on load needs --model-path")
        config = load_config(model_path)
        torch_dtype = resolve_dtype(dtype, config)
        source = CheckpointSource(model_path)
        plan = plan or resolve_plan(config.family)
        mesh = plan.mesh(world_size=comm.world_size)
        layout = model_layout(model_path, plan=plan, config=config, source=source, mesh=mesh)
        check_runtime(layout)
        if comm.rank == 0:
            log.info("Sharding weights for ranks: 0...%d", comm.world_size - 1)
        red = redistribution(layout, config, plan)
        state, stats = load_rank_state(source, red.storage, comm.rank, torch_dtype, read_threads, progress)
    # Weights straight to the device, through pinned staging buffers (no second full host copy).
    state = state_to_device(state, device)
    with torch.device("meta"), _skip_init():
        model = family(config.family).build(config)
    mesh = layout.mesh
    if weights == "presharded":
        red = None
        stored_plan = plan or presharded.presharded_plan(compiled_model_path)
        if storage_axes(mesh) or not redistribution(layout, config, stored_plan).trivial:
            raise ShardwiseError("pre-sharded checkpoints hold plans the parallel layers compute with as stored "
                                 "(tensor-parallel meshes, Megatron-style splits); shard this plan on load")
    redistributed = red is not None and bool(storage_axes(mesh) or not red.trivial)
    groups = None
    if redistributed:
        # The modules take the compute layout's shapes; pieces stored otherwise are sliced at load or
        # gathered on use (redistribute.py). Over storage axes, the parallel layers run in the tensor group.
        if comm.rank == 0 and any(m.extra or m.kind == "slice" or m.layer for m in red.moves.values()):
            log.info("Redistributing: %s", red.summary(torch.tensor([], dtype=torch_dtype).element_size()))
        groups = axis_groups(mesh, comm.rank, comm) if storage_axes(mesh) else None
        parallelize(model, red.compute, comm.rank, groups.tensor if groups else comm, red)
        assign_redistributed(model, state, red, comm.rank, comm, groups.storage if groups else None)
        layout = red.storage
    else:
        parallelize(model, layout, comm.rank, comm)
        assign_state(model, state)
    compute = red.compute if red is not None else layout
    # A batch split over storage axes (never tensor): each replica generates its own rows (parallel/data.py).
    split = BatchSplit.of(compute, comm.rank, comm, groups.tensor) if groups is not None else None
    if split is not None and comm.rank == 0:
        log.info("Data parallelism: the plan splits the batch over %s, so %d replicas each generate their share "
                 "of a batch's rows", "x".join(split.axes), split.parts)
    context = apply_context_parallel(model, compute, comm.rank, comm)
    if context is not None and comm.rank == 0:
        log.info("Context parallelism: the plan splits the sequence over %s, so prompts are prefilled in %d chunks",
                 "x".join(sequence_axes(compute)), context.parts)
    native = native_outputs(compute, family(config.family).roles.get("embedding"))
    placed = apply_placements(model, compute, native, comm.rank, comm)
    if placed and comm.rank == 0:
        log.info("Activation rules: %d module output(s) are sliced to their placement and gathered back for the "
                 "next module (per forward, one extra all-gather per split dimension, and one more where a "
                 "column-parallel output's features are gathered first)", placed)
    if fused_qkv or fused_gate_up:
        if redistributed or placed:  # pieces gathered per projection, or outputs placed per module
            if comm.rank == 0:
                log.info("Not fusing projections: this plan redistributes weights or places module outputs")
        else:
            from .fusion import fuse_projections

            fused = fuse_projections(model, fused_qkv, fused_gate_up)
            if comm.rank == 0:
                log.info("Fused %d projection groups (%s)", fused,
                         " and ".join(n for n, on in (("q/k/v", fused_qkv), ("gate/up", fused_gate_up)) if on))
    model.to(torch_device(device))  # what the state did not hold (buffers); the weights are there already
    model.eval()
    return ShardedModel(model, config, layout, comm.rank, comm, stats, torch_dtype, split, context)

