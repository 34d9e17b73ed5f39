"""The layout: for every tensor and every rank, which slice of the source tensor that rank holds.

It is a pure function of tensor names/shapes/dtypes (safetensors headers), the model config (head
counts), the sharding plan and the mesh, so it needs no weights and no processes: the planner, the
shard-on-load reader, the pre-shard writer and the module swap all read the same object.

A rank's slice of one dimension is a list of *segments*: runs of source rows ``[start, start+length)``
or zero padding (``start is None``). Padding is what makes uneven splits exact: padded rows of a
column-parallel weight produce zeros that the matching padded columns of the row-parallel weight
ignore, and padded vocabulary rows are cut from the gathered logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .config import ModelConfig
from .errors import ShardwiseError
from .mesh import Mesh
from .plan import Plan, Spec, spec_axes


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


def _normalise(name: str, spec: Spec | None, ndim: int, mesh: Mesh) -> Spec:
    if spec is None:
        return (None,) * ndim
    if len(spec) > ndim:
        raise ShardwiseError(f"{name}: spec {list(spec)} has {len(spec)} entries but the tensor has {ndim} dimensions")
    for entry in spec:
        for axis in spec_axes(entry):
            mesh.size(axis)  # raises a clear error for axes the mesh lacks
    spec = tuple(spec) + (None,) * (ndim - len(spec))
    # Axes of size 1 split nothing; dropping them keeps "replicated" meaning "identical on every rank".
    return tuple(e if any(mesh.size(a) > 1 for a in spec_axes(e)) else None for e in spec)


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
    for param, src in config.tied_sources.items():
        if param not in tensors and src in tensors:
            sources[param] = src
    plan.check_against(list(sources))
    heads_by_parts: dict[int, HeadAssignment] = {}
    layouts: dict[str, TensorLayout] = {}
    for name, src in sources.items():
        shape, dtype = tensors[src]
        spec = _normalise(name, plan.spec_for(name), len(shape), mesh)
        units = plan.units_for(name) or ()
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
            shards.append(ShardSlice(tuple(dims)))
        layouts[name] = TensorLayout(name, src, dtype, tuple(shape), spec, tuple(shards))
    activations = {r.pattern: r.spec for r in plan.rules if r.pattern not in layouts and not _matches_any(r, layouts)}
    return Layout(mesh, layouts, activations)


def _matches_any(rule, layouts: dict[str, TensorLayout]) -> bool:
    return any(rule.regex.match(n) for n in layouts)


@dataclass(frozen=True)
class Layout:
    mesh: Mesh
    tensors: dict[str, TensorLayout]
    activations: dict[str, Spec]  # module-name pattern -> spec of that module's output

    def for_rank(self, rank: int) -> dict[str, ShardSlice]:
        return {name: t.shards[rank] for name, t in self.tensors.items()}

    @property
    def replicated_names(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t.replicated]

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
