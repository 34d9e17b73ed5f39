"""Inside one rank: compute the layout, read this rank's shard, and build the parallel model.

This is the Python API for code that already runs on every rank (e.g. under torchrun)::

    model = shardwise.load_sharded("path/to/checkpoint")        # rank/world from torch.distributed
    out = shardwise.generate(model.model, [[1, 2, 3]], 32, pad_token_id=0, eos_token_ids=(2,),
                             comm=model.comm)
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
from .conformance import conform
from .errors import ShardwiseError
from .layout import Layout, compute_layout
from .loader import LoadStats, load_rank_state
from .mesh import Mesh
from .models.llama import LlamaForCausalLM
from .parallel.comm import Collectives
from .parallel.fsdp import assign_stored, axis_groups, storage_axes
from .parallelize import assign_state, check_runtime, parallelize
from .plan import TENSOR_AXIS, Plan, resolve_plan

log = logging.getLogger("shardwise")

TORCH_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        name = config.torch_dtype
    if name not in TORCH_DTYPES:
        raise ShardwiseError(f"--torch-dtype {name!r} is not one of auto, {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def model_layout(model_path: str | Path, tp_degree: int | None = None, plan: Plan | None = None,
                 config: ModelConfig | None = None, source: CheckpointSource | None = None,
                 mesh: Mesh | None = None) -> Layout:
    """The layout for a checkpoint on a mesh: headers and config only, no weights read.

    The mesh is ``mesh`` if given, else the plan's (``tp_degree`` sizing its ``tensor`` axis).
    """
    config = config or load_config(model_path)
    source = source or CheckpointSource(model_path)
    plan = plan or resolve_plan(config.family)
    mesh = mesh or plan.mesh(tp_degree)
    check_mesh(config, mesh)
    files = {n: t.file.name for n, t in source.tensors.items()}
    return compute_layout(conform(source.shapes(), config, str(source.path), files), config, plan, mesh)


def check_tp_degree(config: ModelConfig, tp_degree: int) -> None:
    if tp_degree < 1:
        raise ShardwiseError(f"--tp-degree must be at least 1, got {tp_degree}")
    limit = config.num_heads
    if tp_degree > limit:
        raise ShardwiseError(
            f"--tp-degree {tp_degree} exceeds the model's {limit} attention heads: some ranks would hold only padding"
        )


def check_mesh(config: ModelConfig, mesh: Mesh) -> None:
    if TENSOR_AXIS in mesh.axis_names:
        check_tp_degree(config, mesh.size(TENSOR_AXIS))


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
    model: LlamaForCausalLM
    config: ModelConfig
    layout: Layout
    rank: int
    comm: Collectives
    stats: LoadStats
    dtype: torch.dtype


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
) -> ShardedModel:
    """Load this rank's shard and return the tensor-parallel model, ready to run.

    ``weights`` picks where the shard comes from: ``"on-load"`` reads this rank's slices from the
    checkpoint at ``model_path``; ``"presharded"`` reads ``compiled_model_path``'s rank file (refusing
    stale ones; ``reshard`` re-slices files made at another TP degree); ``"auto"`` uses a valid
    pre-sharded checkpoint when there is one and shards on load otherwise.
    """
    from . import presharded

    comm = comm or Collectives()
    if weights == "auto":
        weights = "on-load"
        if compiled_model_path is not None and presharded.read_manifest(compiled_model_path) is not None:
            _, problems = presharded.check_presharded(compiled_model_path, comm.world_size, dtype, model_path, plan)
            if not problems:
                weights = "presharded"
            elif comm.rank == 0:
                log.info("Not using the pre-sharded checkpoint (%s); sharding on load", "; ".join(problems))
    if weights == "presharded":
        if compiled_model_path is None:
            raise ShardwiseError("loading pre-sharded weights needs --compiled-model-path")
        manifest = presharded.read_manifest(compiled_model_path) or {}
        if comm.rank == 0:
            log.info("Loading pre-sharded weights for ranks: 0...%d from %s", comm.world_size - 1,
                     Path(compiled_model_path) / presharded.WEIGHTS)
        state, stats = presharded.load_presharded_state(compiled_model_path, comm.rank, comm.world_size, dtype,
                                                        model_path, reshard, plan)
        config, layout = presharded.presharded_layout(manifest, comm.world_size)
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
        state, stats = load_rank_state(source, layout, comm.rank, torch_dtype, read_threads, progress)
    with torch.device("meta"), _skip_init():
        model = LlamaForCausalLM(config)
    mesh = layout.mesh
    storage = storage_axes(mesh)
    if storage:
        if weights == "presharded":
            raise ShardwiseError("pre-sharded checkpoints hold tensor-parallel meshes only; shard this plan on load")
        # FSDP x TP: modules take their tensor-parallel shapes; pieces stored split are gathered on use.
        stored = {n: (t.shape, t.dtype) for n, t in layout.tensors.items() if t.source == n}
        tp_layout = compute_layout(stored, config, plan.without_axes(storage), mesh)
        groups = axis_groups(mesh, comm.rank)
        tp_comm = Collectives(groups.tensor)
        parallelize(model, tp_layout, comm.rank, tp_comm)
        assign_stored(model, state, layout, tp_layout, comm.rank, groups)
    else:
        parallelize(model, layout, comm.rank, comm)
        assign_state(model, state)
    model.to(device)
    model.eval()
    return ShardedModel(model, config, layout, comm.rank, comm, stats, torch_dtype)

