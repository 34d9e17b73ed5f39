"""Tensor parallelism for models shardwise has no family file for: a plan applied to any torch module.

Two ways in, both ending in the same ``Layout`` the built-in families use:

* ``apply_plan(model, plan)``: an unmodified module (e.g. HF's ``BertModel``) and a plan in the usual
  language (HF state-dict names -> partition specs). Linear weights split by rows become
  ``ColumnParallelLinear``, by columns ``RowParallelLinear``, embeddings ``ParallelEmbedding``
  (``parallelize.parallelize``, the module swap the families use). A family plan carries knowledge
  (which dimensions the model code can consume split); for a plain module it is read off the module
  types here: a linear or embedding can be split along either dimension, a column-parallel linear's
  bias follows its weight (added when the plan names only the weight), a row-parallel one stays whole.
* ``layout_of(model)``: a model the user built with ``shardwise.parallel`` layers themselves (NxD's
  way): the layout is read off its parallel layers (even splits, as the layers make them).

Either way the layout is what weights are sliced by (``weights.py``), from an unsharded checkpoint
or from the module's own full weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..dtypes import safetensors_code
from ..errors import ShardwiseError
from ..layout import Layout, ShardSlice, check_tp_degree, compute_layout
from ..parallel.comm import Collectives, default_collectives
from ..parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from ..parallelize import check_runtime, parallelize
from ..plan import TENSOR_AXIS, Plan, Rule, _parse, load_plan, spec_axes
from ..untrusted import parse_yaml

LAYOUT_ATTR = "_shardwise_layout"


@dataclass(frozen=True, kw_only=True)
class CustomConfig(ModelConfig):
    """Head counts for the layout (``units: heads``), read from the module's HF config if it has one."""

    @property
    def tied_sources(self) -> dict[str, str]:
        return {}  # a live module ties by sharing parameters; named_parameters lists each once


def as_plan(plan: Plan | str | Path | dict) -> Plan:
    """A Plan from a Plan, a YAML file, YAML text, or a mapping ``{pattern: spec}`` (optionally with sections)."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return _parse(plan, "<plan>")
    if isinstance(plan, Path) or (isinstance(plan, str) and "\n" not in plan and plan.endswith((".yaml", ".yml"))):
        return load_plan(plan)
    if isinstance(plan, str):
        return _parse(parse_yaml(plan, "<plan>", "the plan"), "<plan>")
    raise ShardwiseError(f"a plan is a Plan, a YAML file or text, or a dict of rules, not {type(plan).__name__}")


def model_config(model: nn.Module, heads: int | None = None, kv_heads: int | None = None) -> CustomConfig:
    """What the layout needs to know of the model: attention heads, from ``heads`` or ``model.config``."""
    hf = getattr(model, "config", None)
    hidden = int(getattr(hf, "hidden_size", 0) or 0)
    heads = heads or int(getattr(hf, "num_attention_heads", 0) or 0) or 1
    kv_heads = kv_heads or int(getattr(hf, "num_key_value_heads", 0) or 0) or heads
    head_dim = int(getattr(hf, "head_dim", 0) or 0) or (hidden // heads if hidden else 1)
    return CustomConfig(architecture=type(model).__name__, family="custom", vocab_size=1, hidden_size=max(hidden, 1),
                        intermediate_size=1, num_layers=1, num_heads=heads, num_kv_heads=kv_heads,
                        head_dim=max(head_dim, 1), max_position_embeddings=1)


def _owner(model: nn.Module, name: str) -> tuple[str, nn.Module | None, str]:
    module_name, _, attr = name.rpartition(".")
    try:
        return module_name, model.get_submodule(module_name), attr
    except AttributeError:
        return module_name, None, attr


def _complete(plan: Plan, model: nn.Module, names: list[str]) -> Plan:
    """The plan with the family knowledge a plain module implies, and column-parallel biases filled in."""
    splits, rules, units = [], list(plan.rules), []
    for name in names:
        module_name, module, attr = _owner(model, name)
        if isinstance(module, (nn.Linear, nn.Embedding)) and attr == "weight":
            splits.append((name, ("pad", "pad")))
        elif isinstance(module, nn.Linear) and attr == "bias":
            weight = plan.spec_for(f"{module_name}.weight")
            column = weight is not None and TENSOR_AXIS in spec_axes(weight[0])
            if column and plan.spec_for(name) is None:
                rules.append(Rule(name, (weight[0],)))
            weight_units = plan.units_for(f"{module_name}.weight")
            if column and weight_units and not plan.units_for(name):
                units.append((name, weight_units[:1]))  # whole heads for the bias too
            splits.append((name, ("pad",) if column else (None,)))
    return replace(plan, rules=tuple(rules), tp_splits=tuple(plan.tp_splits) + tuple(splits),
                   units=tuple(plan.units) + tuple(units))


def _check_heads(model: nn.Module, layout: Layout, config: CustomConfig, plan: Plan) -> None:
    """Splitting an attention's projections needs whole heads per rank: refuse what would cut a head."""
    parts = layout.mesh.size(TENSOR_AXIS) if TENSOR_AXIS in layout.mesh.axis_names else 1
    for name, t in layout.tensors.items():
        if t.replicated or plan.units_for(name):
            continue
        module_name, module, _ = _owner(model, name)
        parent = _owner(model, module_name)[1]
        heads = getattr(parent, "num_attention_heads", None) if isinstance(module, nn.Linear) else None
        if isinstance(heads, int) and t.split_dims == (0,) and heads % parts:
            raise ShardwiseError(
                f"{name}: {heads} attention heads do not split evenly over {parts} ranks; add `units: "
                f"{{{module_name}.weight: [heads, null], ...}}` to the plan (as families/bert/plan.yaml does) to "
                "pad whole heads instead")


def slice_tensor(full: torch.Tensor, shard: ShardSlice) -> torch.Tensor:
    """One rank's piece of a whole tensor, as the layout's segments say (padding rows are zeros)."""
    out = full
    for d, segs in enumerate(shard.dims):
        if len(segs) == 1 and segs[0].start == 0 and segs[0].length == out.shape[d]:
            continue
        pieces = []
        for seg in segs:
            if seg.start is None:
                shape = list(out.shape)
                shape[d] = seg.length
                pieces.append(torch.zeros(shape, dtype=out.dtype, device=out.device))
            else:
                pieces.append(out.narrow(d, seg.start, seg.length))
        out = torch.cat(pieces, dim=d)
    return out.contiguous()


def _fix_heads(model: nn.Module) -> None:
    """HF attention modules keep their head count as attributes; make them this rank's."""
    for module in model.modules():
        size = getattr(module, "attention_head_size", None)
        if not isinstance(size, int) or not isinstance(getattr(module, "num_attention_heads", None), int):
            continue
        for child in module.children():
            if isinstance(child, ColumnParallelLinear) and not child.gather_output:
                module.num_attention_heads = child.weight.shape[0] // size
                if isinstance(getattr(module, "all_head_size", None), int):
                    module.all_head_size = child.weight.shape[0]
                break


def _check_consumable(model: nn.Module, layout: Layout) -> None:
    """A plan on your own model splits what the parallel layers compute with as stored: Linear weights
    by rows or columns (a column-parallel bias with its rows), Embedding tables. The built-in families
    also run other specs by redistributing weights (redistribute.py); modules shardwise did not build
    have no such redistribution, so anything else is refused here, before a rank loads."""
    modules = dict(model.named_modules())
    for name, t in layout.tensors.items():
        if t.replicated:
            continue
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        dims = t.split_dims
        weight = layout.tensors.get(f"{owner}.weight")
        ok = (isinstance(module, nn.Linear) and leaf == "weight" and len(dims) == 1) or \
             (isinstance(module, nn.Embedding) and leaf == "weight" and len(dims) == 1) or \
             (isinstance(module, nn.Linear) and leaf == "bias" and dims == (0,) and weight is not None
              and weight.split_dims == (0,))
        if not ok:
            d = dims[0] if dims else 0
            raise ShardwiseError(f"{name} is split, but the model cannot consume dimension {d} split over 'tensor' "
                                 "(a plan on your own model splits Linear and Embedding weights, and column-parallel "
                                 "biases)")


def apply_plan(model: nn.Module, plan: Plan | str | Path | dict, comm: Collectives | None = None, *,
               heads: int | None = None, kv_heads: int | None = None) -> nn.Module:
    """Make ``model`` tensor-parallel over ``comm``'s ranks as ``plan`` says; returns the same module.

    Call it on every rank (e.g. inside the ``get_model`` given to ``shardwise.launch``). Modules whose
    weights the plan splits are replaced by ``shardwise.parallel`` layers; if the model holds real
    weights they are sliced into them, if it is on the meta device the weights come later (a
    checkpoint, sliced on load). ``heads``/``kv_heads`` default to ``model.config``'s.
    """
    comm = comm or default_collectives()
    params = dict(model.named_parameters())
    if not params:
        raise ShardwiseError(f"{type(model).__name__} has no parameters to split")
    shapes = {n: (tuple(p.shape), safetensors_code(p.dtype)) for n, p in params.items()}
    plan = _complete(as_plan(plan), model, list(shapes))
    config = model_config(model, heads, kv_heads)
    mesh = plan.mesh(world_size=comm.world_size) if plan.mesh_sizes else plan.mesh(comm.world_size)
    if plan.units:
        check_tp_degree(config, mesh.size(TENSOR_AXIS))
    layout = compute_layout(shapes, config, plan, mesh)
    check_runtime(layout)
    if any(a != TENSOR_AXIS and mesh.size(a) > 1 for a in mesh.axis_names):
        raise ShardwiseError("apply_plan runs tensor parallelism only: give the plan a mesh of the 'tensor' axis")
    _check_heads(model, layout, config, plan)
    _check_consumable(model, layout)
    swapped = {n for n, t in layout.tensors.items() if not t.replicated}
    swapped_modules = {n.rpartition(".")[0] for n in swapped}
    full = {n: p.detach() for n, p in params.items() if n.rpartition(".")[0] in swapped_modules}
    parallelize(model, layout, comm.rank, comm)
    if not any(p.is_meta for p in full.values()):
        state = {n: slice_tensor(p, layout.tensors[n].shards[comm.rank]) for n, p in full.items()}
        model.load_state_dict(state, strict=False, assign=True)
    _fix_heads(model)
    setattr(model, LAYOUT_ATTR, layout)
    return model


def layout_of(model: nn.Module, comm: Collectives | None = None) -> Layout:
    """The layout of a model: the one ``apply_plan`` computed, else read off its ``shardwise.parallel`` layers."""
    layout = getattr(model, LAYOUT_ATTR, None)
    if layout is not None:
        return layout
    comm = comm or default_collectives()
    world = comm.world_size
    shapes, rules, splits = {}, [], []
    for name, p in model.named_parameters():
        module_name, module, attr = _owner(model, name)
        shape = tuple(p.shape)
        spec: tuple = ()
        if isinstance(module, ColumnParallelLinear):
            shape = (module.out_features, *shape[1:]) if attr == "weight" else (module.out_features,)
            spec = (TENSOR_AXIS, None) if attr == "weight" else (TENSOR_AXIS,)
            _check_even(name, shape[0], p.shape[0], world)
        elif isinstance(module, RowParallelLinear) and attr == "weight":
            shape, spec = (module.out_features, module.in_features), (None, TENSOR_AXIS)
            _check_even(name, module.in_features, p.shape[1], world)
        elif isinstance(module, ParallelEmbedding):
            shape = (module.num_embeddings, module.embedding_dim)
            spec = (TENSOR_AXIS, None) if module.shard_dim == 0 else (None, TENSOR_AXIS)
            _check_even(name, shape[module.shard_dim], p.shape[module.shard_dim], world)
        shapes[name] = (shape, safetensors_code(p.dtype))
        if spec and world > 1:
            rules.append(Rule(name, spec))
            splits.append((name, tuple("pad" if e else None for e in spec)))
    plan = Plan(tuple(rules), tp_splits=tuple(splits), source=f"the parallel layers of {type(model).__name__}")
    layout = compute_layout(shapes, model_config(model), plan, plan.mesh(world))
    setattr(model, LAYOUT_ATTR, layout)
    return layout


def _check_even(name: str, size: int, local: int, world: int) -> None:
    if local != math.ceil(size / world):
        raise ShardwiseError(f"{name}: a rank holds {local} of {size} rows, but {world} ranks split it "
                             f"{math.ceil(size / world)} a rank (build parallel layers inside the ranks, with the "
                             "default sizes)")
