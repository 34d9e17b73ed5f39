"""Storage layout vs compute layout: how any weight spec runs on the tensor-parallel runtime.

A plan says where each weight is *stored* (GSPMD semantics: any partition spec over any axis is
valid and never changes results). The parallel layers compute with a *compute layout*: each weight
split over ``tensor`` the way the model code consumes it (column-parallel output rows, row-parallel
input columns, vocabulary rows, ...). This module decides, per weight and without weights or
processes, which compute layout it gets and what converts the stored piece into it:

* **none** — the stored piece is the compute shard (the fast path: Megatron-style splits, as before);
* **slice** — every rank's stored piece contains its compute shard: the loader reads only the
  compute shard (a local slice, no communication; e.g. a weight the plan replicates whose group
  partners are split over ``tensor``);
* **gather** — an all-gather of the stored pieces each time the weight is used, over the storage
  group (the ranks sharing the ``tensor`` coordinate: fsdp storage) when their pieces cover the
  compute shard, else over every rank.

The compute spec of a weight is its spec with the storage axes (every axis but ``tensor``) removed,
when the model can consume that split; otherwise (a dimension the model reads whole, an uneven split
padding would make inexact, a layer's projections split differently, tied weights split differently)
the family's built-in spec for it. Either way the modules compute with exactly the weights tensor
parallelism has, so results are those of the built-in plan. ``parallel/redistribute.py`` carries it
out at load and run time; ``capacity.py`` lists the extra all-gathers with their bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from .config import ModelConfig
from .layout import Layout, Segments, ShardSlice, compute_layout
from .plan import TENSOR_AXIS, Plan, Rule, Spec, builtin_plan, spec_axes

NONE, SLICE, GATHER = "none", "slice", "gather"
STORAGE_GROUP, WORLD_GROUP = "storage", "world"


@dataclass(frozen=True)
class Move:
    """How one parameter gets from its stored piece to its compute shard."""

    name: str
    kind: str  # none, slice or gather
    group: str | None = None  # gather: "storage" (ranks sharing the tensor coordinate) or "world"
    group_size: int = 1
    stored: Spec = ()
    compute: Spec = ()
    extra: bool = False  # communication the fast plan (tensor parallelism plus fsdp storage) would not do

    def gathered_elements(self, layout: Layout) -> int:
        """Elements one all-gather of this weight produces (every group member's piece)."""
        piece = layout.tensors[self.name].shards[0]
        return math.prod(piece.local_shape) * self.group_size


@dataclass(frozen=True)
class Redistribution:
    storage: Layout  # what each rank loads and holds (the plan's layout; slice weights: their compute shard)
    compute: Layout  # what the parallel layers compute with
    moves: dict[str, Move]

    @property
    def trivial(self) -> bool:
        """True when every stored piece is its compute shard: the model runs as loaded."""
        return all(m.kind == NONE for m in self.moves.values())

    def gathers(self) -> list[Move]:
        return [m for m in self.moves.values() if m.kind == GATHER]

    def summary(self, itemsize: int) -> str:
        """One line for the run log: what the plan costs beyond the fast path."""
        extra = [m for m in self.gathers() if m.extra]
        sliced = [m for m in self.moves.values() if m.kind == SLICE]
        nbytes = sum(m.gathered_elements(self.storage) * itemsize for m in extra)
        names = sorted({_generic(m.name) for m in extra})
        return (f"the plan stores {len(extra)} weight(s) split in ways the parallel layers do not compute with: "
                f"{len(extra)} extra all-gather(s) per forward, {nbytes / 1e6:.3f} MB gathered per rank per step"
                + (f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" if names else "")
                + (f"; {len(sliced)} weight(s) sliced locally at load" if sliced else ""))


def _generic(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|\Z)", ".*", name)


def _tensor_only(spec: Spec, layout: Layout) -> Spec:
    mesh = layout.mesh
    on = TENSOR_AXIS in mesh.axis_names and mesh.size(TENSOR_AXIS) > 1
    return tuple(TENSOR_AXIS if on and TENSOR_AXIS in spec_axes(e) else None for e in spec)


def _consumable(name: str, spec: Spec, shape: tuple[int, ...], plan: Plan, layout: Layout) -> bool:
    """Whether the parallel layers can compute with ``name`` split as ``spec`` over ``tensor``."""
    kinds = plan.splits_for(name)
    units = plan.units_for(name) or ()
    split = [d for d, e in enumerate(spec) if e is not None]
    if len(split) > 1:
        return False
    for d in split:
        kind = kinds[d] if d < len(kinds) else None
        unit = units[d] if d < len(units) else None
        if kind is None:
            return False
        if shape[d] % layout.mesh.size(TENSOR_AXIS) and kind != "pad" and unit is None:
            return False
    return True


def _usage(spec: Spec) -> bool:
    return any(e is not None for e in spec)


def compute_specs(layout: Layout, plan: Plan, family: str) -> dict[str, Spec]:
    """Per parameter, the spec (over ``tensor`` only) the parallel layers compute with."""
    builtin = builtin_plan(family)
    fallback: dict[str, Spec] = {}

    def builtin_spec(name: str) -> Spec:
        if name not in fallback:
            t = layout.tensors[name]
            rule = next((r for r in reversed(builtin.rules) if r.regex.match(name)), None)
            spec = tuple(rule.spec) + (None,) * (len(t.shape) - len(rule.spec)) if rule else (None,) * len(t.shape)
            fallback[name] = _tensor_only(spec[: len(t.shape)], layout)
        return fallback[name]

    specs: dict[str, Spec] = {}
    for name, t in layout.tensors.items():
        spec = _tensor_only(t.spec, layout)
        specs[name] = spec if _consumable(name, spec, t.shape, plan, layout) else builtin_spec(name)
    # A layer's projections are split over `tensor` together or not at all (a row-parallel projection
    # consumes its partners' split output); tied parameters share one stored tensor and one split.
    for _ in range(2):
        for members in _group_instances(plan, list(layout.tensors)):
            if len({_usage(specs[n]) for n in members}) > 1:
                for n in members:
                    specs[n] = builtin_spec(n)
        for name, t in layout.tensors.items():
            if t.source != name and t.source in specs and specs[t.source] != specs[name]:
                specs[name], specs[t.source] = builtin_spec(name), builtin_spec(t.source)
    return specs


def _group_instances(plan: Plan, names: list[str]) -> list[list[str]]:
    compiled = [[Rule(p, ()).regex for p in group] for group in plan.groups]
    instances: dict[tuple[int, tuple[str, ...]], list[str]] = {}
    for name in names:
        for g, regexes in enumerate(compiled):
            if any(rx.match(name) for rx in regexes):
                key = (g, tuple(re.findall(r"\.(\d+)(?=\.|\Z)", name)))
                instances.setdefault(key, []).append(name)
    return list(instances.values())


def _intervals(segs: Segments) -> list[tuple[int, int]]:
    return [(s.start, s.start + s.length) for s in segs if s.start is not None]


def _overlap(a: Segments, b: Segments) -> int:
    return sum(max(0, min(e1, e2) - max(s1, s2)) for s1, e1 in _intervals(a) for s2, e2 in _intervals(b))


def _source_count(shard: ShardSlice) -> int:
    return math.prod(sum(e - s for s, e in _intervals(d)) for d in shard.dims)


def covers(pieces: list[ShardSlice], target: ShardSlice) -> bool:
    """Whether the source elements of ``pieces`` include all of ``target``'s.

    Pieces of one spec are identical or disjoint (they are products of parts of per-dimension
    partitions), so after removing duplicates their overlaps with the target add up exactly.
    """
    distinct = list(dict.fromkeys(pieces))
    found = sum(math.prod(_overlap(p, t) for p, t in zip(piece.dims, target.dims)) for piece in distinct)
    return found >= _source_count(target)


def storage_group(layout: Layout, rank: int) -> tuple[int, ...]:
    """The ranks that share ``rank``'s ``tensor`` coordinate (all ranks if the mesh has no ``tensor`` axis)."""
    mesh = layout.mesh
    if TENSOR_AXIS not in mesh.axis_names:
        return tuple(range(mesh.world_size))
    mine = mesh.coordinate(rank, TENSOR_AXIS)
    return tuple(r for r in range(mesh.world_size) if mesh.coordinate(r, TENSOR_AXIS) == mine)


def redistribution(layout: Layout, config: ModelConfig, plan: Plan) -> Redistribution:
    """Decide the compute layout and the move of every parameter of ``layout`` (the plan's storage layout)."""
    specs = compute_specs(layout, plan, config.family)
    stored: dict[str, tuple] = {}  # the checkpoint's tensors, as compute_layout takes them
    for n, t in layout.tensors.items():
        if t.source == n:
            stored[n] = (t.shape, t.dtype)
        elif t.fused_part:  # a fused checkpoint tensor (Phi-3's qkv_proj) is the rows of its parts, in order
            rows = stored.get(t.source, ((0,), t.dtype))[0][0]
            stored[t.source] = ((rows + t.shape[0], *t.shape[1:]), t.dtype)
    activations = [Rule(p, s) for p, s in layout.activations.items()]
    weights = [Rule(n, s, required=False) for n, s in specs.items()]
    compute = compute_layout(stored, config, replace(plan, rules=tuple(weights + activations)), layout.mesh)
    world = layout.mesh.world_size
    groups = [storage_group(layout, r) for r in range(world)]
    moves: dict[str, Move] = {}
    tensors = dict(layout.tensors)
    for name, t in layout.tensors.items():
        c = compute.tensors[name]
        if t.shards == c.shards:
            moves[name] = Move(name, NONE, stored=t.spec, compute=c.spec)
            continue
        fast = _tensor_only(t.spec, layout) == c.spec  # the storage-axis gather fsdp storage implies anyway
        if all(covers([t.shards[r]], c.shards[r]) for r in range(world)):
            moves[name] = Move(name, SLICE, stored=t.spec, compute=c.spec)
            continue
        if all(covers([t.shards[p] for p in groups[r]], c.shards[r]) for r in range(world)):
            moves[name] = Move(name, GATHER, STORAGE_GROUP, len(groups[0]), t.spec, c.spec, extra=not fast)
        else:
            moves[name] = Move(name, GATHER, WORLD_GROUP, world, t.spec, c.spec, extra=True)
    # Slices are read straight from the checkpoint: the loader fetches the compute shard only. A tied
    # parameter follows its source.
    for name, m in moves.items():
        t = layout.tensors[name]
        if moves[name if t.stored else t.source].kind == SLICE:  # a stored tensor (fused parts too) or its tie
            tensors[name] = replace(layout.tensors[name], spec=compute.tensors[name].spec,
                                    shards=compute.tensors[name].shards)
            if m.kind != SLICE:
                moves[name] = replace(m, kind=SLICE)
    return Redistribution(replace(layout, tensors=tensors), compute, moves)
