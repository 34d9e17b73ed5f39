"""Make single-device model code tensor-parallel by swapping modules as the layout says.

A linear whose weight is split by rows becomes a ``ColumnParallelLinear``; split by columns, a
``RowParallelLinear``; an embedding split either way, a ``ParallelEmbedding``. A column-parallel
module whose output the plan marks replicated (``lm_head: [null, null, null]``) gathers its output.
Modules are rebuilt on the meta device, so no memory is touched until the loaded shard is assigned.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ShardwiseError
from .layout import Layout, TensorLayout, output_spec
from .parallel.comm import Collectives
from .parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from .parallel.sequence import apply_sequence_parallel
from .parallel.swapped import InputSplitLinear, OutputSplitLinear
from .plan import TENSOR_AXIS, Rule, module_names, spec_axes
from .redistribute import HIDDEN_PARALLEL, ROW_PARALLEL, Redistribution


def _output_replicated(layout: Layout, module_name: str) -> bool:
    for pattern, spec in layout.activations.items():
        if Rule(pattern, spec).regex.match(module_name):
            return all(e is None for e in spec)
    return False


def _local_rows(segments) -> list[int]:
    """Source row of each local row of a shard's dimension (-1 for padding)."""
    rows: list[int] = []
    for seg in segments:
        rows.extend(range(seg.start, seg.start + seg.length) if seg.start is not None else [-1] * seg.length)
    return rows


def _swap_linear(name: str, module: nn.Linear, t: TensorLayout, layout: Layout, rank: int, comm: Collectives,
                 red: Redistribution | None = None):
    shard = t.shards[rank]
    bias = module.bias is not None
    move = red.moves.get(t.name) if red is not None else None
    if move is not None and move.layer is not None:
        return _swapped_linear(name, module, t, layout, rank, comm, move.layer, red)
    if t.split_dims == (0,):
        gather = name == layout.output or _output_replicated(layout, name)
        return ColumnParallelLinear(
            module.in_features, module.out_features, bias=bias, gather_output=gather, comm=comm,
            local_out_features=shard.local_shape[0],
            gather_index=layout.gather_index(t.name, 0) if gather else None, device="meta",
            local_index=_local_rows(shard.dims[0]),
        )
    if t.split_dims == (1,):
        return RowParallelLinear(
            module.in_features, module.out_features, bias=bias, input_is_parallel=True, comm=comm,
            local_in_features=shard.local_shape[1], device="meta",
        )
    raise ShardwiseError(f"{name}: splitting a linear weight along dims {t.split_dims} is not supported")


def _swapped_linear(name: str, module: nn.Linear, t: TensorLayout, layout: Layout, rank: int, comm: Collectives,
                    kind: str, red: Redistribution) -> nn.Module:
    """The layer of a linear computed with the split its weight is stored in (``parallel/swapped.py``)."""
    shard, piece = t.shards[rank], red.target(t.name).shards[rank]
    bias = module.bias is not None
    if kind == ROW_PARALLEL:
        gather = name == layout.output or _output_replicated(layout, name)
        return InputSplitLinear(module.in_features, module.out_features, _local_rows(piece.dims[1]),
                                _local_rows(shard.dims[0]), bias=bias, gather_output=gather, comm=comm,
                                gather_index=layout.gather_index(t.name, 0) if gather else None, device="meta")
    return OutputSplitLinear(module.in_features, module.out_features, shard.local_shape[1], piece.local_shape[0],
                             layout.gather_index(t.name, 1), red.swapped.gather_index(t.name, 0), bias=bias,
                             comm=comm, device="meta")


def check_runtime(layout: Layout) -> None:
    """Refuse layouts the layout language allows but this runtime cannot run: none today.

    Every weight spec runs (``redistribute.py``) and every activation spec the layout accepts is placed
    at its module boundary (``parallel/activations.py``).
    """


def native_outputs(layout: Layout, embedding: str | None = None) -> dict[str, int]:
    """Modules whose output the runtime itself keeps split over ``tensor`` (``layout``: the compute layout),
    and along which dimension: column-parallel outputs not gathered (-1: features), and the
    sequence-parallel stream (the sequence). ``embedding`` is the family's embedding module (its output is
    whole however its table is split)."""
    native: dict[str, int] = {}
    for name, t in layout.tensors.items():
        if name.endswith(".weight") and len(t.shape) == 2 and t.split_dims == (0,):
            module = name[: -len(".weight")]
            if module != layout.output and not _output_replicated(layout, module) \
                    and not (embedding and (module == embedding or module.endswith("." + embedding))):
                native[module] = -1
    if layout.sequence is not None:
        rules = [Rule(p, s) for p, s in layout.activations.items()]
        dim = layout.sequence.dim
        for name in module_names(list(layout.tensors)):
            spec = output_spec(rules, name)
            if spec is not None and len(spec) > dim and TENSOR_AXIS in spec_axes(spec[dim]):
                native[name] = dim
    return native


def parallelize(model: nn.Module, layout: Layout, rank: int, comm: Collectives,
                red: Redistribution | None = None) -> nn.Module:
    """Swap ``model``'s modules for ``layout``'s (the compute layout); with ``red``, the linears it swaps
    (``Move.layer``) compute with the split their weights are stored in."""
    for name, module in list(model.named_modules()):
        t = layout.tensors.get(f"{name}.weight")
        if t is None or t.replicated:
            continue
        if isinstance(module, nn.Linear):
            new = _swap_linear(name, module, t, layout, rank, comm, red)
        elif isinstance(module, nn.Embedding):
            shard = t.shards[rank]
            if red is not None and red.moves[t.name].layer == HIDDEN_PARALLEL:  # looked up as stored
                new = ParallelEmbedding(module.num_embeddings, module.embedding_dim, comm, 1,
                                        local_size=red.target(t.name).shards[rank].local_shape[1], device="meta")
            elif t.split_dims == (0,):
                real = [s for s in shard.dims[0] if s.start is not None]
                rows = (real[0].start, real[0].start + real[0].length) if real else (0, 0)
                new = ParallelEmbedding(module.num_embeddings, module.embedding_dim, comm, 0, rows,
                                        shard.local_shape[0], device="meta")
            elif t.split_dims == (1,):
                new = ParallelEmbedding(module.num_embeddings, module.embedding_dim, comm, 1,
                                        local_size=shard.local_shape[1], device="meta")
            else:
                raise ShardwiseError(f"{name}: an embedding can be split along one dimension only")
        else:
            continue
        model.set_submodule(name, new)
    apply_sequence_parallel(model, layout, comm)
    return model


def assign_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Adopt the loaded tensors as parameters (no copy), tie weights, and refuse anything left unset."""
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    unset = [n for n, p in model.named_parameters() if p.is_meta]
    if unset:
        raise ShardwiseError(f"the checkpoint lacks {len(unset)} parameters, e.g. {unset[0]}")
