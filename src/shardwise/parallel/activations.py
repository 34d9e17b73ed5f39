"""Activation rules the parallel layers do not produce natively, applied at module boundaries.

A rule on a module output (``name``, or ``name[i]`` for element ``i`` of a tuple output; element 0 of
a module that returns one tensor is that tensor, as HF's decoder layers return ``(hidden,)``) gives
the placement that output carries (GSPMD semantics). Outputs the fast plan leaves whole are sliced
locally to the requested placement, then all-gathered back over the same axes, because the next
module computes with the whole output: results are unchanged, and each such rule costs one
all-gather per forward, which ``shardwise plan`` lists as extra traffic. Rules the runtime already
produces (a column-parallel output kept split over ``tensor``, sequence parallelism, whole outputs)
add nothing here, nor do a batch split the plan divides among replicas (``data.py``) and a sequence
split over ``context`` (``context.py``: chunked prefill).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ShardwiseError
from ..layout import Layout, _group_index
from ..mesh import Mesh
from ..plan import Rule, Spec, spec_axes
from .comm import Collectives


def placed_rules(layout: Layout, native: dict[str, int]) -> list[tuple[Spec, int | None, str]]:
    """(spec, tuple index, module) for every module output that needs a placement hook.

    ``native`` maps module names whose output the runtime already splits over ``tensor`` to that
    dimension (sequence parallelism: the sequence; -1, a column-parallel output kept split: its features,
    the only ``tensor`` split the layout allows it): their
    rules' ``tensor`` entry there is produced natively, and only the other entries are placed here. A
    batch the plan divides among replicas (``data.batch_axes``) is native too: each replica holds only
    its rows; so is a sequence prefilled in chunks over ``context`` (``context.sequence_axes``).
    """
    from ..plan import TENSOR_AXIS, module_names
    from .context import sequence_axes
    from .data import batch_axes

    modules = module_names(list(layout.tensors))
    mesh = layout.mesh
    divided, chunked = batch_axes(layout), sequence_axes(layout)
    out = []
    for pattern, spec in layout.activations.items():
        if divided and spec:
            spec = (None, *spec[1:])  # the batch: divided among replicas (data.py), every entry the same axes
        if chunked and len(spec) > 1:
            spec = (spec[0], None, *spec[2:])  # the prompt: prefilled in chunks (context.py)
        rule = Rule(pattern, spec)
        regex = Rule(rule.module, ()).regex
        for m in modules:
            if not regex.match(m):
                continue
            effective = tuple(
                None if m in native and rule.output_index in (None, 0) and native[m] in (-1, d)
                and TENSOR_AXIS in spec_axes(e) else e for d, e in enumerate(spec))
            if any(mesh.size(a) > 1 for e in effective for a in spec_axes(e)):
                out.append((effective, rule.output_index, m))
    return out


def axis_group_partition(mesh: Mesh, axes: tuple[str, ...]) -> list[list[int]]:
    """Ranks that differ only along ``axes``: each part is one group of a placement over them."""
    others = [a for a in mesh.axis_names if a not in axes]
    groups: dict[tuple[int, ...], list[int]] = {}
    for r in range(mesh.world_size):
        groups.setdefault(tuple(mesh.coordinate(r, a) for a in others), []).append(r)
    return [groups[k] for k in sorted(groups)]


class Placement:
    """Slice a whole output to ``spec``'s placement, then gather it back whole for the next module."""

    def __init__(self, spec: Spec, mesh: Mesh, rank: int,
                 groups: dict[tuple[str, ...], tuple[Collectives, list[int]]]):
        self.steps = []
        for d, entry in enumerate(spec):
            axes = tuple(a for a in spec_axes(entry) if mesh.size(a) > 1)
            if not axes:
                continue
            comm, members = groups[tuple(sorted(axes))]
            parts, index = _group_index(mesh, rank, axes)
            order = [_group_index(mesh, m, axes)[1] for m in members]  # part held by each group member
            self.steps.append((d, comm, parts, index, order))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for d, comm, parts, index, order in self.steps:
            if d >= x.dim():
                raise ShardwiseError(f"an activation rule splits dimension {d} of an output with {x.dim()}")
            size = x.shape[d]
            chunk = -(-size // parts)
            start = min(index * chunk, size)
            piece = x.narrow(d, start, min(chunk, size - start))  # the placement this output carries
            if piece.shape[d] < chunk:
                pad = list(piece.shape)
                pad[d] = chunk - piece.shape[d]
                piece = torch.cat([piece, piece.new_zeros(pad)], dim=d)
            gathered = comm.all_gather(piece.contiguous(), dim=d).split(chunk, dim=d)
            by_part = [None] * parts
            for member, part in zip(order, gathered):
                by_part[member] = part
            x = torch.cat(by_part, dim=d).narrow(d, 0, size)  # whole again: what the next module reads
        return x


def apply_placements(model: nn.Module, layout: Layout, native: dict[str, int], rank: int,
                     comm: Collectives) -> int:
    """Register a placement hook for every rule in ``placed_rules``; returns how many modules got one.

    Collective: every rank calls it alike (groups over storage axes are created here).
    """
    rules = placed_rules(layout, native)
    mesh = layout.mesh
    groups: dict[tuple[str, ...], tuple[Collectives, list[int]]] = {}
    for spec, _, _ in rules:
        for entry in spec:
            axes = tuple(sorted(a for a in spec_axes(entry) if mesh.size(a) > 1))
            if axes and axes not in groups:
                partition = axis_group_partition(mesh, axes)
                mine = next(p for p in partition if rank in p)
                groups[axes] = (comm if len(partition) == 1 else comm.subgroup(partition), mine)
    for spec, index, name in rules:
        model.get_submodule(name).register_forward_hook(_hook(Placement(spec, mesh, rank, groups), index, name))
    return len(rules)


def _hook(placement: Placement, index: int | None, name: str):
    def hook(_module, _args, out):
        if index is None:
            return placement(out) if isinstance(out, torch.Tensor) else out
        if isinstance(out, tuple):
            if index >= len(out):
                raise ShardwiseError(f"activation rule {name}[{index}]: the output of {name} has {len(out)} elements")
            return (*out[:index], placement(out[index]), *out[index + 1:])
        if index == 0:  # one tensor: element 0 of HF's (hidden,) tuple
            return placement(out)
        raise ShardwiseError(f"activation rule {name}[{index}]: {name} returns one tensor, not a tuple")
    return hook
