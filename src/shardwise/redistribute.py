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

A linear weight stored split over ``tensor`` on the *other* dimension than its layer computes with
(a column-parallel ``q_proj`` stored ``[null, tensor]`` or ``[fsdp, tensor]``, a row-parallel
``o_proj`` stored ``[tensor, null]``) need not be gathered whole over every rank: the layer computes
with the split it is stored in instead (``Move.layer``; ``parallel/swapped.py``), its weight piece
being the stored piece (``none``) or the storage group's pieces gathered (``gather`` over the storage
group, fsdp's own cost). So does an embedding table whose compute spec is vocabulary rows only because it
is tied to an lm_head stored ``[null, tensor]``: it looks up its hidden columns (**hidden-parallel**).

* **row-parallel** (a column-parallel weight split by input columns): each rank slices its columns
  of the whole input, multiplies by its piece, the partial products are summed over ``tensor`` (one
  all-reduce of the output), and each rank keeps the column-parallel output shard the next module
  expects (its heads, with the layout's padding);
* **column-parallel** (a row-parallel weight split by output rows): the input, split by features, is
  all-gathered over ``tensor``, each rank computes its output rows, and they are all-gathered. This
  replaces the row-parallel all-reduce: at decode an all-gather of the input and one of the output
  move what the all-reduce moves when input and output are alike in size.

Which one a weight gets is a cost decision from shapes alone: the bytes a rank sends per decode step
of one token for the swapped layer (its activation collectives, minus what it saves, plus any storage
gather) against the all-gather of the weight over every rank; the swap wins for every real linear
(an activation is one row of a weight). Both are exact (padding rows and columns are zeros that never
reach a result); sums are in another order than the built-in plan's, so logits agree within the
accuracy tolerance rather than bit for bit.

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
from .errors import ShardwiseError
from .layout import Layout, Segments, ShardSlice, TensorLayout, compute_layout
from .plan import TENSOR_AXIS, Plan, Rule, Spec, builtin_plan, spec_axes

NONE, SLICE, GATHER = "none", "slice", "gather"
STORAGE_GROUP, WORLD_GROUP = "storage", "world"
ROW_PARALLEL, COLUMN_PARALLEL = "row-parallel", "column-parallel"  # Move.layer: the linear computes swapped
HIDDEN_PARALLEL = "hidden-parallel"  # Move.layer: the embedding looks up hidden columns as stored


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
    # Set when the linear computes with the split the weight is stored in rather than its compute
    # spec (row-parallel or column-parallel); its weight target is then ``Redistribution.swapped``'s shard.
    layer: str | None = None

    def gathered_elements(self, layout: Layout) -> int:
        """Elements one all-gather of this weight produces (every group member's piece)."""
        piece = layout.tensors[self.name].shards[0]
        return math.prod(piece.local_shape) * self.group_size


@dataclass(frozen=True)
class Redistribution:
    storage: Layout  # what each rank loads and holds (the plan's layout; slice weights: their compute shard)
    compute: Layout  # what the parallel layers compute with
    moves: dict[str, Move]
    # The weights of swapped linears (``Move.layer``) as the layer computes with them: the storage spec
    # with its storage axes removed. None when no linear is swapped.
    swapped: Layout | None = None

    @property
    def trivial(self) -> bool:
        """True when every stored piece is its compute shard: the model runs as loaded."""
        return all(m.kind == NONE and m.layer is None for m in self.moves.values())

    def gathers(self) -> list[Move]:
        return [m for m in self.moves.values() if m.kind == GATHER]

    def layers(self) -> list[Move]:
        """The swapped linears: computed row-parallel or column-parallel as their weights are stored."""
        return [m for m in self.moves.values() if m.layer is not None]

    def target(self, name: str) -> TensorLayout:
        """What ``name``'s layer computes with: its swapped piece, or its compute shard."""
        if self.moves[name].layer is not None and self.swapped is not None:
            return self.swapped.tensors[name]
        return self.compute.tensors[name]

    def summary(self, itemsize: int) -> str:
        """One line for the run log: what the plan costs beyond the fast path."""
        extra = [m for m in self.gathers() if m.extra]
        sliced = [m for m in self.moves.values() if m.kind == SLICE]
        nbytes = sum(m.gathered_elements(self.storage) * itemsize for m in extra)
        names = sorted({_generic(m.name) for m in extra})
        line = (f"the plan stores {len(extra)} weight(s) split in ways the parallel layers do not compute with: "
                f"{len(extra)} extra all-gather(s) per forward, {nbytes / 1e6:.3f} MB gathered per rank per step"
                + (f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" if names else ""))
        for kind, what, how in ((ROW_PARALLEL, "linear(s) computed row-parallel", "one all-reduce of the output each"),
                                (COLUMN_PARALLEL, "linear(s) computed column-parallel",
                                 "an all-gather of the input and one of the output each"),
                                (HIDDEN_PARALLEL, "embedding(s) looked up by hidden columns",
                                 "an all-gather of the output instead of the all-reduce")):
            swapped = sorted({_generic(m.name) for m in self.layers() if m.layer == kind})
            if swapped:
                line += (f"; {len(swapped)} {what} as stored instead of gathered ({how}: "
                         f"{', '.join(swapped[:4])}{', ...' if len(swapped) > 4 else ''})")
        return line + (f"; {len(sliced)} weight(s) sliced locally at load" if sliced else "")


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
    swapped = _swap_layers(layout, compute, config, plan, stored, moves, groups)
    # Slices are read straight from the checkpoint: the loader fetches the compute shard only. A tied
    # parameter follows its source.
    for name, m in moves.items():
        t = layout.tensors[name]
        if moves[name if t.stored else t.source].kind == SLICE:  # a stored tensor (fused parts too) or its tie
            tensors[name] = replace(layout.tensors[name], spec=compute.tensors[name].spec,
                                    shards=compute.tensors[name].shards)
            if m.kind != SLICE:
                moves[name] = replace(m, kind=SLICE)
    return Redistribution(replace(layout, tensors=tensors), compute, moves, swapped)


def _layer_kind(name: str, compute_spec: Spec, plan: Plan, layout: Layout, embedding: str | None) -> str | None:
    """The swap a weight's layer could take: row-parallel for a column-parallel weight (output rows split, input
    read whole), column-parallel for a row-parallel one, hidden-parallel for a vocabulary-parallel embedding
    table whose hidden size divides the ``tensor`` axis; None for anything else (norms, biases)."""
    t = layout.tensors[name]
    if len(t.shape) != 2 or not name.endswith(".weight"):
        return None
    module = name[: -len(".weight")]
    kinds = tuple(plan.splits_for(name)) + (None, None)
    if embedding and (module == embedding or module.endswith("." + embedding)):
        # A vocabulary-parallel table stored split by hidden columns, where the layer can look those up.
        even = kinds[1] is not None and t.shape[1] % layout.mesh.size(TENSOR_AXIS) == 0
        return HIDDEN_PARALLEL if compute_spec == (TENSOR_AXIS, None) and even else None
    if compute_spec == (TENSOR_AXIS, None) and kinds[0] is not None and kinds[1] is None:
        return ROW_PARALLEL
    if compute_spec == (None, TENSOR_AXIS) and kinds[0] is None and kinds[1] is not None:
        return COLUMN_PARALLEL
    return None


def _gathered_output(layout: Layout, module: str) -> bool:
    """Whether ``module``'s output is gathered whole (the family's output module, or a ``[null, ...]`` rule)."""
    return module == layout.output or any(
        Rule(p, s).regex.match(module) and all(e is None for e in s) for p, s in layout.activations.items())


def swap_cost(kind: str, layout: Layout, compute: Layout, swapped: Layout, name: str, group: int) -> int:
    """Elements one rank sends per decode step of one token for a swapped linear, in the planner's ring model.

    Row-parallel: the all-reduce of the output, 2(T-1)/T of it, less the all-gather of a gathered output it
    makes unneeded. Column-parallel: all-gathers of the input and of the output, (T-1)/T of each, less the
    row-parallel all-reduce it replaces. Hidden-parallel (an embedding): the all-gather of the looked-up
    vector less the vocabulary-parallel sum. Plus the storage group's gather of the weight piece, if any.
    """
    tp = layout.mesh.size(TENSOR_AXIS)
    c, piece = compute.tensors[name], swapped.tensors[name]
    out, _ = c.shape
    if kind == ROW_PARALLEL:
        cost = 2 * (tp - 1) * out / tp
        if _gathered_output(layout, name[: -len(".weight")]):
            cost -= (tp - 1) * c.shards[0].local_shape[0]
    elif kind == COLUMN_PARALLEL:
        cost = (tp - 1) * (c.shards[0].local_shape[1] + piece.shards[0].local_shape[0]) - 2 * (tp - 1) * out / tp
    else:  # the hidden vector gathered instead of the vocabulary-parallel lookup's sum
        hidden = c.shape[1]
        cost = (tp - 1) * piece.shards[0].local_shape[1] - 2 * (tp - 1) * hidden / tp
    held = math.prod(layout.tensors[name].shards[0].local_shape)
    return round(cost + (group - 1) * held)


def _swap_layers(layout: Layout, compute: Layout, config: ModelConfig, plan: Plan, stored: dict[str, tuple],
                 moves: dict[str, Move], groups: list[tuple[int, ...]]) -> Layout | None:
    """Swap the layers whose weights would be gathered whole where computing as stored costs less.

    Only extra gathers are considered: the fast path (and fsdp's own gathers) keep their code. A weight
    qualifies when it is a column- or row-parallel linear's (or a vocabulary-parallel embedding table's),
    stored split over ``tensor`` on the other dimension (its storage spec without storage axes is the
    transposed split), and its stored piece, or its storage group's pieces, cover that split's shard on
    every rank. Returns the layout of those pieces (every weight's storage spec without storage axes).
    """
    mesh = layout.mesh
    if TENSOR_AXIS not in mesh.axis_names or mesh.size(TENSOR_AXIS) == 1:
        return None
    from .families import family

    try:
        embedding = family(config.family).roles.get("embedding")
    except ShardwiseError:  # a model with no registered family (custom/): nothing to swap by role
        embedding = None
    kinds: dict[str, str] = {}
    for name, m in moves.items():
        if m.kind != GATHER or not m.extra:
            continue
        kind = _layer_kind(name, compute.tensors[name].spec, plan, layout, embedding)
        want = (TENSOR_AXIS, None) if kind == COLUMN_PARALLEL else (None, TENSOR_AXIS)
        if kind is not None and _tensor_only(layout.tensors[name].spec, layout) == want:
            if kind == ROW_PARALLEL and _gathered_output(layout, name[: -len(".weight")]) \
                    and f"{name[: -len('.weight')]}.bias" in layout.tensors:
                continue  # a gathered output would need the whole bias: keep the gather
            kinds[name] = kind
    if not kinds:
        return None
    weights = [Rule(n, _tensor_only(t.spec, layout), required=False) for n, t in layout.tensors.items()]
    swapped = compute_layout(stored, config, replace(plan, rules=tuple(weights)), mesh)
    world = mesh.world_size
    for name, kind in kinds.items():
        t, piece, m = layout.tensors[name], swapped.tensors[name], moves[name]
        if t.shards == piece.shards:
            new = replace(m, kind=NONE, group=None, group_size=1, extra=False, layer=kind)
        elif all(covers([t.shards[p] for p in groups[r]], piece.shards[r]) for r in range(world)):
            new = replace(m, group=STORAGE_GROUP, group_size=len(groups[0]), extra=False, layer=kind)
        else:
            continue
        if swap_cost(kind, layout, compute, swapped, name, new.group_size) <= \
                m.group_size * math.prod(t.shards[0].local_shape) * (m.group_size - 1) / m.group_size:
            moves[name] = new
    return swapped if any(m.layer for m in moves.values()) else None
