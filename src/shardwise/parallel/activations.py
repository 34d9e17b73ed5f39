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

A column-parallel output arrives split by features over ``tensor``; a rule splitting it over ``tensor``
along another dimension (``q_proj: [null, tensor, null]``) is placed the same way on the whole output,
so its features are all-gathered over ``tensor`` first (in source order), and the rank's own features
(padding rows zero, as the layer computes them) are sliced back out for the next module: one extra
all-gather more than other placements. (An all-to-all would move 1/N of those bytes, but
``Collectives`` has none and the shared-memory transport, the fast path on CPU, could not carry one;
this reuses the all-gather every transport has.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..errors import ShardwiseError
from ..layout import Layout, _group_index
from ..mesh import Mesh
from ..plan import Rule, Spec, spec_axes
from .comm import Collectives

FEATURES = 2  # the features dimension of a module output ([batch, sequence, features])


class Placed(NamedTuple):
    """One module output to place: the spec left to apply, the tuple element, the module, and whether the
    output arrives split by features over ``tensor`` and must be gathered whole first (``regather``)."""

    spec: Spec
    index: int | None
    module: str
    regather: bool


def placed_rules(layout: Layout, native: dict[str, int]) -> list[Placed]:
    """Every module output that needs a placement hook.

    ``native`` maps module names whose output the runtime already splits over ``tensor`` to that
    dimension (sequence parallelism: the sequence; -1, a column-parallel output kept split: its features):
    a rule's ``tensor`` entry on that dimension is produced natively, and only the other entries are
    placed here. A column-parallel output whose rule puts ``tensor`` on another dimension is regathered.
    A batch the plan divides among replicas (``data.batch_axes``) is native too: each replica holds only
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
            whole = rule.output_index in (None, 0)
            home = native.get(m) if whole else None  # the dimension the runtime splits over tensor
            if home == -1:
                home = FEATURES
            effective = tuple(None if d == home and TENSOR_AXIS in spec_axes(e) else e for d, e in enumerate(spec))
            regather = (whole and native.get(m) == -1 and mesh.size(TENSOR_AXIS) > 1
                        and any(TENSOR_AXIS in spec_axes(e) for e in effective))
            if any(mesh.size(a) > 1 for e in effective for a in spec_axes(e)):
                out.append(Placed(effective, rule.output_index, m, regather))
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


class Regather:
    """A column-parallel output split by features over ``tensor``, placed by a rule that splits it over
    ``tensor`` along another dimension: gather the features (in source order), place the whole output,
    then slice this rank's features back, which is what the next module reads."""

    def __init__(self, placement: Placement, module: nn.Module, gather_index: list[int] | None):
        if not isinstance(getattr(module, "local_index", None), torch.Tensor) or not hasattr(module, "comm"):
            raise ShardwiseError(f"{type(module).__name__} keeps its output split by features but does not say "
                                 "which features it holds (local_index), so its output cannot be placed")
        self.placement, self.comm = placement, module.comm
        self.out_features = module.out_features
        self.gather_index = torch.tensor(gather_index) if gather_index is not None else None
        self.local = module.local_index.clamp(min=0)
        self.padding = module.local_index < 0
        self.padded = bool(self.padding.any())  # padding rows, which the layer computes as zeros

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.local.device != x.device:  # once: the indices live where the activations do
            self.local, self.padding = self.local.to(x.device), self.padding.to(x.device)
            if self.gather_index is not None:
                self.gather_index = self.gather_index.to(x.device)
        gathered = self.comm.all_gather(x.contiguous(), dim=-1)
        if self.gather_index is not None:
            whole = gathered.index_select(-1, self.gather_index)
        else:
            whole = gathered.narrow(-1, 0, self.out_features)
        whole = self.placement(whole)
        mine = whole.index_select(-1, self.local)
        return mine.masked_fill(self.padding, 0) if self.padded else mine


def apply_placements(model: nn.Module, layout: Layout, native: dict[str, int], rank: int,
                     comm: Collectives) -> int:
    """Register a placement hook for every rule in ``placed_rules``; returns how many modules got one.

    Collective: every rank calls it alike (groups over storage axes are created here).
    """
    rules = placed_rules(layout, native)
    mesh = layout.mesh
    groups: dict[tuple[str, ...], tuple[Collectives, list[int]]] = {}
    for rule in rules:
        for entry in rule.spec:
            axes = tuple(sorted(a for a in spec_axes(entry) if mesh.size(a) > 1))
            if axes and axes not in groups:
                partition = axis_group_partition(mesh, axes)
                mine = next(p for p in partition if rank in p)
                groups[axes] = (comm if len(partition) == 1 else comm.subgroup(partition), mine)
    for spec, index, name, regather in rules:
        module = model.get_submodule(name)
        placement = Placement(spec, mesh, rank, groups)
        if regather:
            placement = Regather(placement, module, layout.gather_index(f"{name}.weight", 0))
        module.register_forward_hook(_hook(placement, index, name))
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
