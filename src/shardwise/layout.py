"""The layout: for every tensor and every rank, which slice of the source tensor that rank holds.

It is a pure function of tensor names/shapes/dtypes (safetensors headers), the model config (head
counts), the sharding plan and the mesh, so it needs no weights and no processes: the capacity estimate, the
shard-on-load reader, the pre-shard writer and the module swap all read the same object.

A rank's slice of one dimension is a list of *segments*: runs of source rows ``[start, start+length)``
or zero padding (``start is None``). Padding is what makes uneven splits exact: padded rows of a
column-parallel weight produce zeros that the matching padded columns of the row-parallel weight
ignore, and padded vocabulary rows are cut from the gathered logits.

The layout refuses only what is meaningless (an axis not in the mesh, a spec longer than the tensor,
tied weights split unalike): it is the *storage* layout, and any split of any dimension over any
axes is stored as written (unevenly: padded). Which of those splits the parallel layers compute with
as stored, and how the others are redistributed, is ``redistribute.py``'s decision (the family plan's
``tp_splits`` table, ``units`` and ``groups``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .config import ModelConfig
from .errors import ShardwiseError
from .mesh import Mesh
from .plan import TENSOR_AXIS, Plan, Rule, SequenceParallel, Spec, generic_name, module_names, spec_axes

log = logging.getLogger("shardwise")


@dataclass(frozen=True)
class Segment:
    start: int | None  # first source row, or None for zero padding
    length: int


Segments = tuple[Segment, ...]


@dataclass(frozen=True)
class ShardSlice:
    """One rank's piece of one tensor: segments per dimension."""

    dims: tuple[Segments, ...]

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(sum(s.length for s in segs) for segs in self.dims)

    @property
    def source_numel(self) -> int:
        """Elements that come from the source (padding excluded): what a reader must fetch."""
        return math.prod(sum(s.length for s in segs if s.start is not None) for segs in self.dims)

    @property
    def has_padding(self) -> bool:
        return any(s.start is None for segs in self.dims for s in segs)


@dataclass(frozen=True)
class TensorLayout:
    name: str  # parameter name in the model
    source: str  # tensor in the checkpoint (differs for tied weights)
    dtype: str  # safetensors dtype string of the source, e.g. "BF16"
    shape: tuple[int, ...]
    spec: Spec  # normalised to one entry per dimension
    shards: tuple[ShardSlice, ...]  # indexed by rank
    # A part of a fused checkpoint tensor (``source``, e.g. Phi-3's qkv_proj): its segments index the
    # source's rows directly, so it is read like any stored tensor, only from the rows of its part.
    fused_part: bool = False

    @property
    def stored(self) -> bool:
        """Read from the checkpoint for this parameter (not a view of another parameter, as tied ones are)."""
        return self.source == self.name or self.fused_part

    @property
    def split_dims(self) -> tuple[int, ...]:
        return tuple(d for d, e in enumerate(self.spec) if e is not None)

    @property
    def replicated(self) -> bool:
        return not self.split_dims


@dataclass(frozen=True)
class HeadAssignment:
    """Source attention heads held by each rank along one axis (None = a zero padding head).

    Rank ``r`` holds ``kv[r]`` KV heads and ``q[r]`` query heads; query slot ``i`` attends with KV slot
    ``i // (len(q[r]) // len(kv[r]))``, which is the grouping ``scaled_dot_product_attention`` uses.
    """

    kv: tuple[tuple[int | None, ...], ...]
    q: tuple[tuple[int | None, ...], ...]


def assign_heads(num_heads: int, num_kv_heads: int, parts: int) -> HeadAssignment:
    """Spread heads over ``parts`` ranks so every rank holds whole GQA groups, exactly.

    Two exact schemes, and we keep whichever gives each rank fewer KV heads (the KV cache dominates
    decode memory), then fewer query heads:
    * replicate: each KV head is copied to ``r = parts / gcd(kv, parts)`` ranks and its query group is
      split ``r`` ways (padded to a multiple of ``r``) - needed when ranks outnumber KV heads;
    * pad groups: add zero KV heads (with zero query groups) up to a multiple of ``parts``.
    """
    group = num_heads // num_kv_heads
    rep = parts // math.gcd(num_kv_heads, parts)
    q_per_virtual = -(-group // rep)
    kv_local_rep = num_kv_heads * rep // parts
    kv_padded = -(-num_kv_heads // parts) * parts
    kv_local_pad = kv_padded // parts
    virtual: list[tuple[int | None, tuple[int | None, ...]]] = []
    if (kv_local_rep, kv_local_rep * q_per_virtual) <= (kv_local_pad, kv_local_pad * group):
        for v in range(num_kv_heads * rep):
            kv, sub = divmod(v, rep)
            q = tuple(
                kv * group + sub * q_per_virtual + j if sub * q_per_virtual + j < group else None
                for j in range(q_per_virtual)
            )
            virtual.append((kv, q))
        per_rank = kv_local_rep
    else:
        for v in range(kv_padded):
            real = v < num_kv_heads
            virtual.append((v if real else None, tuple(v * group + j if real else None for j in range(group))))
        per_rank = kv_local_pad
    chunks = [virtual[r * per_rank : (r + 1) * per_rank] for r in range(parts)]
    return HeadAssignment(
        kv=tuple(tuple(kv for kv, _ in c) for c in chunks),
        q=tuple(tuple(h for _, qs in c for h in qs) for c in chunks),
    )


def _head_segments(heads: Iterable[int | None], head_dim: int) -> Segments:
    segs: list[Segment] = []
    for h in heads:
        start = None if h is None else h * head_dim
        last = segs[-1] if segs else None
        if last and last.start is None and start is None:
            segs[-1] = Segment(None, last.length + head_dim)
        elif last and last.start is not None and start == last.start + last.length:
            segs[-1] = Segment(last.start, last.length + head_dim)
        else:
            segs.append(Segment(start, head_dim))
    return tuple(segs)


def _even_segments(size: int, parts: int, index: int) -> Segments:
    chunk = -(-size // parts)
    start = min(index * chunk, size)
    length = min(chunk, size - start)
    segs = [Segment(start, length)] if length else []
    if chunk - length:
        segs.append(Segment(None, chunk - length))
    return tuple(segs)


def _group_index(mesh: Mesh, rank: int, axes: tuple[str, ...]) -> tuple[int, int]:
    """(number of parts, this rank's part) when a dimension is split over ``axes``, outer first."""
    parts, index = 1, 0
    for axis in axes:
        size = mesh.size(axis)
        parts, index = parts * size, index * size + mesh.coordinate(rank, axis)
    return parts, index


def _rule_for(plan: Plan, name: str) -> Rule | None:
    return next((r for r in reversed(plan.rules) if r.regex.match(name)), None)


def _check_axes(what: str, spec: Spec, mesh: Mesh) -> None:
    for entry in spec:
        for axis in spec_axes(entry):
            if axis not in mesh.axis_names:
                raise ShardwiseError(f"{what}: axis {axis!r} is not in the mesh (axes {list(mesh.axis_names)})")


def _normalise(name: str, rule: Rule | None, ndim: int, mesh: Mesh) -> Spec:
    if rule is None:
        return (None,) * ndim
    spec, what = rule.spec, f"{name} (rule {rule.pattern!r})"
    if len(spec) > ndim:
        raise ShardwiseError(f"{what}: spec {_show(spec)} has {len(spec)} entries but the tensor has {ndim} "
                             f"dimension{'s' if ndim != 1 else ''}")
    _check_axes(what, spec, mesh)
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    # Axes of size 1 split nothing; dropping them keeps "replicated" meaning "identical on every rank".
    return tuple(e if any(mesh.size(a) > 1 for a in spec_axes(e)) else None for e in spec)


def check_tp_degree(config: ModelConfig, tp_degree: int) -> None:
    if tp_degree < 1:
        raise ShardwiseError(f"--tp-degree must be at least 1, got {tp_degree}")
    limit = config.num_heads
    if tp_degree > limit:
        raise ShardwiseError(
            f"--tp-degree {tp_degree} exceeds the model's {limit} attention heads: some ranks would hold only padding"
        )


def check_mesh(config: ModelConfig, mesh: Mesh) -> None:
    """Refuse a mesh whose tensor axis leaves some ranks nothing but padding heads."""
    if TENSOR_AXIS in mesh.axis_names:
        check_tp_degree(config, mesh.size(TENSOR_AXIS))


def compute_layout(
    tensors: dict[str, tuple[tuple[int, ...], str]],
    config: ModelConfig,
    plan: Plan,
    mesh: Mesh,
) -> Layout:
    """Compute the layout of every model parameter for every rank of ``mesh``.

    ``tensors`` maps checkpoint tensor names to (shape, safetensors dtype). Parameters tied to another
    tensor (``lm_head.weight`` with tied embeddings) are added, reading from the tensor they reuse.
    """
    sources = {name: name for name in tensors}
    offsets: dict[str, int] = {}  # fused parts: first source row of the part
    tensors = dict(tensors)
    for fused, parts in _fused_parts(config, tensors).items():
        shape, dtype = tensors.pop(fused)
        del sources[fused]
        row = 0
        for part, rows in parts:
            tensors[part] = ((rows, *shape[1:]), dtype)
            sources[part], offsets[part] = fused, row
            row += rows
        if row != shape[0]:
            raise ShardwiseError(f"{fused}: {shape[0]} rows, but its parts add up to {row}")
    for param, src in config.tied_sources.items():
        if param not in tensors and src in tensors:
            sources[param] = src
    plan.check_against(list(sources))
    heads_by_parts: dict[int, HeadAssignment] = {}
    layouts: dict[str, TensorLayout] = {}
    for name, src in sources.items():
        shape, dtype = tensors[name if name in offsets else src]
        rule = _rule_for(plan, name)
        spec = _normalise(name, rule, len(shape), mesh)
        units = plan.units_for(name) or ()
        _check_split(name, rule, spec, shape, units, plan, mesh)
        shards = []
        for rank in range(mesh.world_size):
            dims: list[Segments] = []
            for d, entry in enumerate(spec):
                if entry is None:
                    dims.append((Segment(0, shape[d]),))
                    continue
                parts, index = _group_index(mesh, rank, spec_axes(entry))
                unit = units[d] if d < len(units) else None
                if unit in ("heads", "kv_heads"):
                    expected = (config.num_heads if unit == "heads" else config.num_kv_heads) * config.head_dim
                    if shape[d] != expected:
                        raise ShardwiseError(
                            f"{name}: dimension {d} has {shape[d]} rows, expected {expected} for {unit}")
                    if parts not in heads_by_parts:
                        heads_by_parts[parts] = assign_heads(config.num_heads, config.num_kv_heads, parts)
                    assignment = heads_by_parts[parts]
                    heads = assignment.q[index] if unit == "heads" else assignment.kv[index]
                    dims.append(_head_segments(heads, config.head_dim))
                else:
                    dims.append(_even_segments(shape[d], parts, index))
            if name in offsets:  # the part's rows, found within the fused tensor
                dims[0] = tuple(Segment(g.start + offsets[name] if g.start is not None else None, g.length)
                                for g in dims[0])
            shards.append(ShardSlice(tuple(dims)))
        layouts[name] = TensorLayout(name, src, dtype, tuple(shape), spec, tuple(shards), name in offsets)
    for name, t in layouts.items():
        if t.stored:
            continue
        src = layouts[t.source]
        if t.shards != src.shards:
            raise ShardwiseError(f"{name} is tied to {t.source} (tie_word_embeddings), so both must be split the same "
                                 f"way; the plan gives {_show(t.spec)} and {_show(src.spec)}")
    activations = _activations(plan, layouts, mesh)
    sequence = _sequence_parallel(plan, module_names(list(layouts)), mesh)
    uncovered = tuple(n for n in layouts if not plan.covers(n))
    if uncovered:
        log.info("%d tensor(s) match no rule and are replicated on every rank: %s", len(uncovered),
                 ", ".join(sorted({generic_name(n) for n in uncovered})))
    return Layout(mesh, layouts, activations, uncovered, plan.output, sequence)


def _fused_parts(config: ModelConfig, tensors) -> dict[str, list[tuple[str, int]]]:
    """Checkpoint tensors that hold several parameters stacked by rows (the family says which), each
    with its parts' names and row counts, e.g. Phi-3's qkv_proj -> q_proj, k_proj, v_proj."""
    from .families import family

    try:
        fam = family(config.family)
    except ShardwiseError:  # a model brought by the user (custom/): no registered family, nothing fused
        return {}
    fused = fam.fused_parts
    return fused(config, list(tensors)) if fused is not None else {}


def _show(spec: Spec) -> str:
    def one(e):
        return "null" if e is None else e if isinstance(e, str) else "[" + ", ".join(e) + "]"
    return "[" + ", ".join(one(e) for e in spec) + "]"


def _check_split(name: str, rule: Rule | None, spec: Spec, shape: tuple[int, ...], units, plan: Plan,
                 mesh: Mesh) -> None:
    """Refuse what is meaningless for storage: nothing, today.

    Any dimension may be stored split over any axis (GSPMD semantics): an uneven split is padded (the
    pieces are placed by source index when gathered, so padding never reaches a result), and a split
    the parallel layers cannot compute with is redistributed at run time (``redistribute.py``).
    """


def _activations(plan: Plan, layouts: dict[str, TensorLayout], mesh: Mesh) -> dict[str, Spec]:
    """Module-output rules, checked: real axes, not longer than an output, and meaningful for the runtime.

    Any placement runs (GSPMD semantics): an output the runtime computes whole is placed at the module
    boundary (``parallel/activations.py``: sliced, then gathered back for the next module), and a
    column-parallel output split over `tensor` by features that a rule splits over `tensor` along another
    dimension has its features gathered first and its own features sliced back after.
    """
    modules = module_names(list(layouts))
    out: dict[str, Spec] = {}
    for rule in plan.rules:
        if rule.output_index is None and any(rule.regex.match(n) for n in layouts):
            continue
        matched = [m for m in modules if Rule(rule.module, ()).regex.match(m)]
        if not matched:
            continue  # an optional family rule for a tensor this model lacks (e.g. a bias)
        what = f"activation rule {rule.pattern!r}"
        if len(rule.spec) > plan.activation_rank:
            raise ShardwiseError(f"{what}: spec {_show(rule.spec)} has {len(rule.spec)} entries but module outputs "
                                 f"have {plan.activation_rank} dimensions (batch, sequence, features)")
        _check_axes(what, rule.spec, mesh)
        out[rule.pattern] = rule.spec
    return out


def _matches(pattern: str, name: str) -> bool:
    return bool(Rule(pattern, ()).regex.match(name))


def _instantiate(pattern: str, name: str) -> str:
    """Put ``name``'s integers into ``pattern``'s stars: (model.layers.*.x, model.layers.3.q) -> model.layers.3.x."""
    numbers = iter(re.findall(r"(?<=\.)\d+(?=\.|\Z)", name))
    return re.sub(r"\*", lambda _: next(numbers, "*"), pattern)


def _stream_modules(seq: SequenceParallel, modules: list[str]) -> list[str]:
    """Modules whose output is the residual stream or a norm of it: those sequence parallelism splits."""
    residual = [m for m in modules if any(_matches(p, m) for p in seq.residual)]
    norms = [m for m in modules if any(_matches(p, m) for p in seq.norms)]
    containers = [m for m in modules if m != "model" and any(r.startswith(m + ".") for r in residual)]
    return residual + norms + containers


def output_spec(plan_rules, module: str) -> Spec | None:
    """The spec of the last activation rule naming ``module`` (tuple-element rules excluded)."""
    spec = None
    for rule in plan_rules:
        if rule.output_index is None and _matches(rule.pattern, module):
            spec = rule.spec
    return spec


def _sequence_parallel(plan: Plan, modules: list[str], mesh: Mesh) -> SequenceParallel | None:
    """Whether the plan turns sequence parallelism on, checked for consistency; its family data if so."""
    seq = plan.sequence
    if seq is None or TENSOR_AXIS not in mesh.axis_names or mesh.size(TENSOR_AXIS) == 1:
        return None

    def split(m: str) -> bool:
        spec = output_spec(plan.rules, m)
        return spec is not None and len(spec) > seq.dim and TENSOR_AXIS in spec_axes(spec[seq.dim])

    residual = [m for m in modules if any(_matches(p, m) for p in seq.residual)]
    on = [m for m in residual if split(m)]
    if on and len(on) != len(residual):
        off = next(m for m in residual if not split(m))
        raise ShardwiseError(
            f"sequence parallelism splits the residual stream: the output of {on[0]} is split by sequence but that "
            f"of {off} is not; split the outputs of all of {', '.join(seq.residual)} as [null, tensor, null]")
    stream = _stream_modules(seq, modules)
    if not on:
        for m in stream:
            if split(m):
                raise ShardwiseError(
                    f"the rule for {m} splits the sequence over 'tensor', which needs sequence parallelism: the "
                    f"outputs of {', '.join(seq.residual)} split as [null, tensor, null] too "
                    "(or --sequence-parallel-enabled)")
        return None
    for m in stream:
        if m not in residual and not any(_matches(p, m) for p in seq.norms):
            spec = output_spec(plan.rules, m)
            if spec is not None and not split(m):
                raise ShardwiseError(f"the output of {m} is the residual stream, which sequence parallelism splits by "
                                     f"sequence; its rule {_show(spec)} says otherwise")
    feeds_output = dict(seq.inputs).get(plan.output or "")
    for m in modules:
        if feeds_output and _matches(feeds_output, m) and split(m):
            raise ShardwiseError(f"generation takes the last position of {m}'s output, so it must be whole: "
                                 f"{m}: [null, null, null]")
    return seq


@dataclass(frozen=True)
class Layout:
    mesh: Mesh
    tensors: dict[str, TensorLayout]
    activations: dict[str, Spec]  # module-name pattern -> spec of that module's output
    uncovered: tuple[str, ...] = ()  # tensors no rule matches: replicated on every rank
    output: str | None = None  # the module whose output is always gathered (lm_head)
    sequence: SequenceParallel | None = None  # set when the plan turns sequence parallelism on

    def sequence_boundaries(self) -> tuple[list[str], list[str], list[str]]:
        """Where sequence parallelism moves data: (modules whose output is scattered by sequence, modules
        whose output is gathered, modules whose input is gathered). Empty unless it is on."""
        seq = self.sequence
        if seq is None:
            return [], [], []
        rules = [Rule(p, s) for p, s in self.activations.items()]

        def split(m: str) -> bool:
            spec = output_spec(rules, m)
            return spec is not None and len(spec) > seq.dim and TENSOR_AXIS in spec_axes(spec[seq.dim])

        scatter, gather_out, gather_in = [], [], []
        for m in module_names(list(self.tensors)):
            if any(_matches(p, m) for p in seq.residual):
                scatter.append(m)
            elif any(_matches(p, m) for p in seq.norms) and not split(m):
                gather_out.append(m)
            if any(_matches(c, m) and split(_instantiate(p, m)) for c, p in seq.inputs):
                gather_in.append(m)
        return scatter, gather_out, gather_in

    @property
    def replicated_names(self) -> list[str]:
        """Tensors identical on every rank: those no rule covers, and those whose rule splits nothing."""
        return [n for n, t in self.tensors.items() if t.replicated]

    def rank_bytes(self, rank: int, itemsize: int, include_tied: bool = False) -> int:
        """Bytes of parameters ``rank`` holds at ``itemsize`` bytes per element, padding included.

        Tied parameters (lm_head reusing the embedding) share the tensor they reuse, so they are not
        counted twice unless ``include_tied``.
        """
        return sum(math.prod(t.shards[rank].local_shape) * itemsize for t in self.tensors.values()
                   if include_tied or t.stored)

    def gather_index(self, name: str, dim: int) -> list[int] | None:
        """Where each source row lands when rank-local rows of ``dim`` are concatenated in rank order.

        Used by column-parallel layers that gather their output: ``None`` means the gathered rows are
        already the source rows followed only by padding, so a plain slice suffices.
        """
        t = self.tensors[name]
        axes = spec_axes(t.spec[dim])
        order = sorted(range(self.mesh.world_size), key=lambda r: _group_index(self.mesh, r, axes)[1])
        seen: set[int] = set()
        position, index = 0, {}
        for rank in order:
            part = _group_index(self.mesh, rank, axes)[1]
            if part in seen:
                continue
            seen.add(part)
            for seg in t.shards[rank].dims[dim]:
                if seg.start is not None:
                    for i in range(seg.length):
                        index[seg.start + i] = position + i
                position += seg.length
        result = [index[i] for i in range(t.shape[dim])]
        return None if result == list(range(t.shape[dim])) else result
