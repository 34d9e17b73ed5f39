"""The capacity estimate: will it fit? Bytes per rank and collective traffic, from config and headers alone.

``shardwise plan`` reads no weights: tensor names and shapes come from the safetensors headers, or,
with a bare ``config.json``, from :func:`state_dict_shapes`. The same layout the loader uses gives each
rank's parameter bytes (padding included); the KV cache and activations follow from the local head and
column counts; the collectives per generated token follow from which layers are row- or column-parallel.

Link figures are assumptions, not measurements: they are named constants below, and flags override them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ModelConfig, load_config
from .dtypes import WEIGHT_DTYPES, canonical, safetensors_code, weight_dtype
from .dtypes import itemsize as dtype_itemsize
from .errors import ShardwiseError
from .families import family, state_dict_shapes
from .layout import Layout, _show, compute_layout
from .mesh import Mesh
from .plan import TENSOR_AXIS, generic_name, resolve_plan, spec_axes
from .redistribute import COLUMN_PARALLEL, HIDDEN_PARALLEL, ROW_PARALLEL, WORLD_GROUP, Redistribution, redistribution
from .topology import HOST, P2P, load_partition_config, ring_link

# Assumed link figures for the collective-time estimate (override with --p2p-gbps etc.). They are
# order-of-magnitude figures for PCIe-attached accelerators such as Cloud AI 100 cards, not measurements:
# * p2p: device to device through a PCIe Gen4 x16 switch: 31.5 GB/s per direction in theory, ~25 GB/s
#   in practice; a few microseconds per DMA hop.
# * host: the same PCIe links but staged through host memory (device -> host, host -> device), which
#   halves the usable rate and adds a host-side copy and synchronisation per hop.
P2P_GBPS = 25.0
P2P_LATENCY_US = 5.0
HOST_GBPS = 12.0
HOST_LATENCY_US = 20.0

GIB = 1024 ** 3




@dataclass(frozen=True)
class Links:
    p2p_gbps: float = P2P_GBPS
    p2p_latency_us: float = P2P_LATENCY_US
    host_gbps: float = HOST_GBPS
    host_latency_us: float = HOST_LATENCY_US

    def figures(self, kind: str) -> tuple[float, float]:
        """(bytes per second, seconds per hop) of a link kind."""
        if kind == P2P:
            return self.p2p_gbps * 1e9, self.p2p_latency_us * 1e-6
        return self.host_gbps * 1e9, self.host_latency_us * 1e-6


@dataclass(frozen=True)
class Collective:
    """``count`` calls per generated token of one collective over ``bytes`` (the whole result).

    ``group`` is the number of ranks in the ring: the ``tensor`` axis for the parallel layers' sums and
    gathers, the ``fsdp`` (storage) axes for all-gathering weights stored split.
    """

    kind: str  # all-reduce or all-gather
    count: int
    bytes: int
    what: str
    group: int
    extra: bool = False  # communication the fast plan (tensor parallelism, fsdp storage) would not do

    @property
    def steps(self) -> int:
        """Ring steps: an all-reduce is a reduce-scatter then an all-gather; the others one pass (a broadcast
        pipelined along the ring)."""
        return 2 * (self.group - 1) if self.kind == "all-reduce" else self.group - 1

    def sent_per_rank(self) -> float:
        """Bytes each rank sends per call in a ring: 2(N-1)/N of the tensor (all-reduce), (N-1)/N (all-gather)."""
        return self.steps * self.bytes / self.group

    def seconds(self, bandwidth: float, latency: float) -> float:
        """Ring time per call: one latency per step plus the bytes each rank sends over the link."""
        return self.steps * latency + self.sent_per_rank() / bandwidth


@dataclass
class RankCapacity:
    rank: int
    device: str
    param_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    memory_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.kv_cache_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.memory_bytes


@dataclass
class CapacityReport:
    model: str
    shapes_from: str  # "safetensors headers" or "config.json"
    mesh: Mesh
    dtype: str
    batch_size: int
    seq_len: int
    memory_source: str
    ranks: list[RankCapacity]
    collectives: list[Collective]
    link: str  # the link this mesh's ring uses: p2p or host
    links: Links
    uncovered: list[str] = field(default_factory=list)
    rank_batch: int | None = None  # rows one rank carries when the plan divides the batch among replicas
    divisions: list[str] = field(default_factory=list)  # data / context parallelism the plan turns on, in words

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.ranks)

    @property
    def batch_shown(self) -> str:
        if self.rank_batch is None or self.rank_batch == self.batch_size:
            return f"batch {self.batch_size}"
        return f"batch {self.batch_size} ({self.rank_batch} per replica)"

    def comm_seconds(self, kind: str) -> float:
        bw, lat = self.links.figures(kind)
        return sum(c.count * c.seconds(bw, lat) for c in self.collectives)

    @property
    def sent_per_rank(self) -> float:
        return sum(c.count * c.sent_per_rank() for c in self.collectives)

    @property
    def extra(self) -> list[Collective]:
        """Collectives the plan costs beyond the fast plan (weights stored split otherwise than the layers compute
        with, activation rules placing outputs otherwise than the layers produce them)."""
        return [c for c in self.collectives if c.extra]

    def to_dict(self) -> dict:
        return {
            "model": self.model, "shapes_from": self.shapes_from,
            "mesh": dict(zip(self.mesh.axis_names, self.mesh.axis_sizes)), "world_size": self.mesh.world_size,
            "dtype": self.dtype, "batch_size": self.batch_size, "rank_batch": self.rank_batch or self.batch_size,
            "seq_len": self.seq_len,
            "memory_source": self.memory_source, "fits": self.fits,
            "ranks": [{**asdict(r), "total_bytes": r.total_bytes, "fits": r.fits} for r in self.ranks],
            "per_token": {
                "collectives": [asdict(c) for c in self.collectives],
                "bytes_sent_per_rank": round(self.sent_per_rank),
                "extra_collectives": [asdict(c) for c in self.extra],
                "extra_bytes_sent_per_rank": round(sum(c.count * c.sent_per_rank() for c in self.extra)),
                "seconds_p2p": self.comm_seconds(P2P), "seconds_host": self.comm_seconds(HOST),
                "link": self.link,
            },
            "links": asdict(self.links), "replicated_uncovered": self.uncovered, "divisions": self.divisions,
        }

    def format(self) -> str:
        n = self.mesh.world_size
        lines = [
            f"Model {self.model} (shapes from {self.shapes_from}); mesh {self.mesh.describe()} ({n} rank"
            f"{'s' if n != 1 else ''}); {self.dtype}; {self.batch_shown} x seq_len {self.seq_len}",
            f"Memory per rank: {self.memory_source}",
            "",
            f"{'ranks':<10} {'device':<8} {'params':>10} {'KV cache':>10} {'activations':>11} {'total':>10} "
            f"{'memory':>10}  fits",
        ]
        for first, last, r in _group_ranks(self.ranks):
            label, device = (str(first), r.device) if first == last else (f"{first}-{last}", r.device.split(":")[0])
            lines.append(f"{label:<10} {device:<8} {_gib(r.param_bytes):>10} {_gib(r.kv_cache_bytes):>10} "
                         f"{_gib(r.activation_bytes):>11} {_gib(r.total_bytes):>10} {_gib(r.memory_bytes):>10}  "
                         f"{'yes' if r.fits else 'NO'}")
        lines += ["", f"Fits: {'yes' if self.fits else 'NO'}", "",
                  f"Collectives per generated token ({self.batch_shown}; rings over the ranks of one axis "
                  "group):"]
        if not self.collectives:
            lines.append("  none")
        for c in self.collectives:
            lines.append(f"  {c.kind:<10} {c.count:>4} x {_size(c.bytes):>10} over {c.group:>3} ranks  {c.what}"
                         + ("   <- extra" if c.extra else ""))
        if self.extra:
            extra = sum(c.count * c.sent_per_rank() for c in self.extra)
            lines.append(f"  extra (not in the fast plan: weights stored otherwise than the parallel layers compute "
                         f"with, outputs placed otherwise than they are produced): {sum(c.count for c in self.extra)} "
                         f"collective(s), {_size(extra)} sent per rank per token")
        if self.collectives:
            lk = self.links
            lines += [
                f"  sent per rank per token: {_size(self.sent_per_rank)} (ring: all-reduce 2(N-1)/N, "
                "all-gather (N-1)/N of the tensor)",
                f"  time per token, p2p  ({lk.p2p_gbps:g} GB/s, {lk.p2p_latency_us:g} us/hop): "
                f"{self.comm_seconds(P2P) * 1e3:.3f} ms{'   <- this mesh' if self.link == P2P else ''}",
                f"  time per token, host ({lk.host_gbps:g} GB/s, {lk.host_latency_us:g} us/hop): "
                f"{self.comm_seconds(HOST) * 1e3:.3f} ms{'   <- this mesh' if self.link == HOST else ''}",
            ]
        if self.uncovered:
            lines += ["", f"Replicated (no rule): {', '.join(self.uncovered)}"]
        if self.divisions:
            lines += [""] + self.divisions
        lines += ["", ACTIVATION_NOTE]
        return "\n".join(lines)


ACTIVATION_NOTE = (
    "Activations: the prefill of batch x seq_len tokens through one layer at a time (inference keeps no "
    "autograd state): hidden states (4 x hidden), this rank's q/k/v columns and MLP intermediate (3 x), "
    "attention scores batch x local heads x seq_len^2 and the boolean mask, in the compute dtype; plus "
    "float32 logits of the last position (local and gathered); plus, with weights stored split over fsdp, one "
    "decoder layer's weights gathered. Fused attention kernels need less. A batch the plan splits over "
    "fsdp/data is divided among the replicas: KV cache, activations and collectives count one replica's rows; "
    "a sequence split over context prefills one chunk of queries per rank (the KV cache stays whole).")


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _group_ranks(ranks: list[RankCapacity]):
    """Consecutive ranks with identical figures, as (first, last, representative)."""
    groups: list[tuple[int, int, RankCapacity]] = []
    for r in ranks:
        key = (r.device.split(":")[0], r.param_bytes, r.kv_cache_bytes, r.activation_bytes, r.memory_bytes)
        if groups:
            first, _, rep = groups[-1]
            if (rep.device.split(":")[0], rep.param_bytes, rep.kv_cache_bytes, rep.activation_bytes,
                    rep.memory_bytes) == key:
                groups[-1] = (first, r.rank, rep)
                continue
        groups.append((r.rank, r.rank, r))
    return groups


def _meminfo_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ShardwiseError("cannot read MemTotal from /proc/meminfo; give --device-memory-gib")


def _cuda_memory(device_id: int) -> int:
    import torch

    if not torch.cuda.is_available() or device_id >= torch.cuda.device_count():
        raise ShardwiseError(f"cuda:{device_id} is not on this machine; give --device-memory-gib to plan for it")
    return torch.cuda.get_device_properties(device_id).total_memory


def _shapes(model_path: Path, config: ModelConfig) -> tuple[dict, str]:
    directory = model_path if model_path.is_dir() else model_path.parent
    if model_path.is_dir() and (any(directory.glob("*.safetensors")) or
                                (directory / "model.safetensors.index.json").is_file()):
        from .checkpoint import CheckpointSource  # imports torch: only when there are headers to read

        return CheckpointSource(directory).shapes(), "safetensors headers"
    return state_dict_shapes(config, _weights_code(config.torch_dtype)), "config.json"


def _weights_code(name: str) -> str:
    """The safetensors code of a config's ``torch_dtype``, bf16 for anything that is not a weight dtype."""
    try:
        return safetensors_code(name) if canonical(name) in WEIGHT_DTYPES else "BF16"
    except ShardwiseError:
        return "BF16"


def _rows(layout: Layout, name: str, rank: int, dim: int = 0) -> int:
    t = layout.tensors.get(name)
    return t.shards[rank].local_shape[dim] if t is not None else 0


def estimate_capacity(
    model_path: str | Path,
    tp_degree: int | None = None,
    partition_config: str | Path | None = None,
    partition: str | None = None,
    batch_size: int = 1,
    seq_len: int = 2048,
    torch_dtype: str = "auto",
    device: str = "cpu",
    device_memory_gib: float | None = None,
    sharding_config: str | Path | None = None,
    overrides: list[str] | None = None,
    links: Links = Links(),
    sequence_parallel: bool = False,
    mesh: str | None = None,
) -> CapacityReport:
    """Plan ``model_path`` (a checkpoint directory or a ``config.json``) without reading a weight."""
    if batch_size < 1 or seq_len < 1:
        raise ShardwiseError("--batch-size and --seq-len must be at least 1")
    path = Path(model_path)
    config = load_config(path)
    dtype_name = weight_dtype(torch_dtype, config)
    itemsize = dtype_itemsize(dtype_name)
    plan = resolve_plan(config.family, sharding_config, overrides, sequence_parallel, mesh)
    link, device_ids = P2P, None
    if partition_config is not None:
        # Planning needs no such machine: the partition's devices are not checked against this one.
        pc = load_partition_config(partition_config)
        part = pc.partition(partition)
        device_ids, link = part.device_ids, ring_link(pc, part)
        mesh = plan.mesh(tp_degree, part.world_size)
    else:
        mesh = plan.mesh(tp_degree if tp_degree is not None or plan.mesh_sizes else 1)
        link = HOST if device == "cpu" else P2P
    if TENSOR_AXIS in mesh.axis_names and mesh.size(TENSOR_AXIS) > config.num_heads:
        raise ShardwiseError(f"the 'tensor' axis ({mesh.size(TENSOR_AXIS)}) exceeds the model's {config.num_heads} "
                             "attention heads")
    shapes, shapes_from = _shapes(path, config)
    # What each rank holds (the plan's storage) and what the parallel layers compute with (redistribute.py).
    red = redistribution(compute_layout(shapes, config, plan, mesh), config, plan)
    layout = red.compute
    n = mesh.world_size
    cuda = device.startswith("cuda")
    if device_memory_gib is not None:
        memory = [int(device_memory_gib * GIB)] * n
        memory_source = f"--device-memory-gib {device_memory_gib:g}"
    elif cuda:
        ids = device_ids or tuple(range(n))
        memory = [_cuda_memory(i) for i in ids]
        memory_source = "CUDA device memory"
    else:
        total = _meminfo_total()
        memory = [total // n] * n
        memory_source = f"this machine's RAM ({total / GIB:.1f} GiB MemTotal in /proc/meminfo) / {n} ranks"
    devices = [f"cuda:{i}" for i in (device_ids or range(n))] if cuda else ["cpu"] * n
    fam = family(config.family)
    batch = _local_batch(layout, batch_size)
    ranks = []
    for r in range(n):
        params = red.storage.rank_bytes(r, itemsize)
        kv_rows = sum(_rows(layout, fam.role(p, i), r) for i in range(config.num_layers) for p in ("k", "v"))
        kv = batch * seq_len * kv_rows * itemsize
        ranks.append(RankCapacity(r, devices[r], params, kv, _activation_bytes(red, config, r, batch, seq_len,
                                                                            itemsize), memory[r]))
    uncovered = sorted({generic_name(u) for u in red.storage.uncovered})
    return CapacityReport(str(model_path), shapes_from, mesh, dtype_name, batch_size, seq_len, memory_source, ranks,
                      _collectives(red, config, batch, itemsize), link, links, uncovered, batch,
                      _divisions(layout, batch_size, batch))


def _divisions(layout: Layout, batch: int, rank_batch: int) -> list[str]:
    """The work the plan divides (parallel/data.py, parallel/context.py), one line each."""
    from .parallel.context import sequence_axes
    from .parallel.data import batch_axes, replicas

    out = []
    axes = batch_axes(layout)
    if axes:
        out.append(f"Data parallelism: the batch is split over {'x'.join(axes)}: {replicas(layout.mesh, axes)} "
                   f"replicas, each generating {rank_batch} of the {batch} rows (placeholders fill a short share)")
    axes = sequence_axes(layout)
    if axes:
        parts = math.prod(layout.mesh.size(a) for a in axes)
        out.append(f"Context parallelism: prompts are prefilled in {parts} chunks over {'x'.join(axes)} (keys and "
                   "values all-gathered per layer, the KV cache whole on every rank); decode runs whole")
    return out


def _local_batch(layout: Layout, batch: int) -> int:
    """The batch one rank carries: its replica's share when the plan divides the batch among replicas
    (``parallel/data.py``: ``ceil(batch / replicas)`` rows, placeholders included), else the whole batch."""
    from .parallel.data import batch_axes, local_batch, replicas

    return local_batch(batch, replicas(layout.mesh, batch_axes(layout)))


def _activation_bytes(red: Redistribution, config: ModelConfig, rank: int, batch: int, seq: int,
                      itemsize: int) -> int:
    """Peak transient bytes of a prefill of ``batch x seq`` tokens; see ACTIVATION_NOTE. With the sequence
    split over context (``parallel/context.py``) a rank prefills one chunk: its queries over every key."""
    from .parallel.context import chunk_of, sequence_axes

    layout = red.compute
    axes = sequence_axes(layout)
    queries = chunk_of(seq, math.prod(layout.mesh.size(a) for a in axes))[0] if axes else seq
    tokens = batch * queries
    fam = family(config.family)
    p = fam.role("layer") + "."
    q, kv, inter = (_rows(layout, fam.role(role), rank) for role in ("q", "k", "mlp_in"))
    heads = q // config.head_dim
    vocab_local = _rows(layout, fam.role("output"), rank)
    hidden_states = tokens * itemsize * (4 * config.hidden_size + q + 2 * kv + 3 * inter)
    scores = batch * heads * queries * seq * itemsize + batch * queries * seq  # scores + boolean mask
    logits = batch * 4 * (vocab_local + config.vocab_size)
    gathered = 0  # one decoder layer's weights, all-gathered (fsdp storage, redistribution) while it runs
    for m in red.gathers():
        if m.name.startswith(p):
            held = math.prod(red.storage.tensors[m.name].shards[rank].local_shape)
            gathered += (m.gathered_elements(red.storage) - held) * itemsize
    if axes:  # one layer's keys and values of every chunk, gathered over the context group
        gathered += batch * seq * 2 * kv * itemsize
    return hidden_states + scores + logits + gathered


def _collectives(red: Redistribution, config: ModelConfig, batch: int, itemsize: int) -> list[Collective]:
    """The collectives one decode step runs, from which layers the compute layout makes parallel.

    Over ``tensor``: a sum per row-parallel linear and vocabulary-split embedding, a gather per gathered
    column-parallel output (lm_head), and the activation collectives of the linears computed with the split
    their weights are stored in (``Move.layer``: an all-reduce of a row-parallel compute, the input and
    output all-gathers of a column-parallel one; extra). Over storage axes (fsdp), or every rank: an
    all-gather of every weight stored split otherwise than the layers compute with, each step (weights are
    gathered when used and dropped after); those the fast plan would not do are marked extra.
    """
    layout = red.compute
    mesh = layout.mesh
    tp = mesh.size(TENSOR_AXIS) if TENSOR_AXIS in mesh.axis_names else 1
    token = batch * itemsize  # bytes per feature for one decode step's batch
    counts: dict[tuple[str, int, str, int, bool], int] = {}

    def add(kind: str, nbytes: int, what: str, group: int = tp, extra: bool = False) -> None:
        key = (kind, nbytes, what, group, extra)
        counts[key] = counts.get(key, 0) + 1

    for m in red.gathers():
        gathered = m.gathered_elements(red.storage) * itemsize
        stored = [a for e in m.stored for a in spec_axes(e) if a != TENSOR_AXIS]
        if m.extra:
            what = (f"{generic_name(m.name)}: stored {_show(m.stored)}, computed as {_show(m.compute)} "
                    f"(gathered over {'every rank' if m.group == WORLD_GROUP else 'the storage group'})")
        else:
            what = f"{generic_name(m.name)}: weight stored split over {'x'.join(stored)}"
        add("all-gather", gathered, what, m.group_size, m.extra)
    scatter, gather_out, gather_in = layout.sequence_boundaries()
    by_sequence = set(scatter)
    for name, t in layout.tensors.items():
        if not name.endswith(".weight") or len(t.shape) != 2 or tp == 1:
            continue
        module = name[: -len(".weight")]
        split = [d for d in t.split_dims if TENSOR_AXIS in spec_axes(t.spec[d])]
        if not split:
            continue
        short = generic_name(module)
        move = red.moves.get(name)
        if move is not None and move.layer == ROW_PARALLEL:  # replaces the gather of a gathered output
            add("all-reduce", token * t.shape[0], f"{short}: computed row-parallel as stored {_show(move.stored)} "
                "(input sliced locally, partial products summed)", extra=True)
        elif move is not None and move.layer == COLUMN_PARALLEL:  # replaces the row-parallel sum
            piece = red.target(name).shards[0]
            add("all-gather", token * t.shards[0].local_shape[1] * tp, f"{short}: computed column-parallel as stored "
                f"{_show(move.stored)}: input gathered", extra=True)
            add("all-gather", token * piece.local_shape[0] * tp, f"{short}: computed column-parallel as stored "
                f"{_show(move.stored)}: output rows gathered", extra=True)
        elif move is not None and move.layer == HIDDEN_PARALLEL:  # replaces the vocabulary-parallel sum
            add("all-gather", token * t.shape[1], f"{short}: hidden-parallel lookup as stored {_show(move.stored)}, "
                "gathered", extra=True)
        elif module in by_sequence and (split == [1] or module == family(config.family).roles.get("embedding")):
            add("reduce-scatter", token * config.hidden_size, f"{short}: partial sums reduce-scattered by sequence")
        elif module == family(config.family).role("embedding"):
            if split == [0]:
                add("all-reduce", token * t.shape[1], f"{short}: vocabulary-parallel lookup, summed")
            else:
                add("all-gather", token * t.shape[1], f"{short}: hidden-parallel lookup, gathered")
        elif split == [1]:
            add("all-reduce", token * t.shape[0], f"{short}: row-parallel output, summed")
        elif module == layout.output or _gathers(layout, module):
            add("all-gather", token * t.shards[0].local_shape[0] * tp, f"{short}: column-parallel output, gathered")
    # Activation rules placed at module boundaries (parallel/activations.py): sliced, then gathered back.
    from .parallel.activations import placed_rules
    from .parallelize import native_outputs

    embedding = family(config.family).roles.get("embedding")
    native = native_outputs(layout, embedding)
    for spec, index, module, regather in placed_rules(layout, native):
        weight = layout.tensors.get(f"{module}.weight")
        features = weight.shape[0] if weight is not None and len(weight.shape) == 2 and module != embedding \
            else config.hidden_size
        if module == layout.output:
            features = config.vocab_size
        shown = f"{generic_name(module)}{'' if index is None else f'[{index}]'}"
        if regather:  # split by features over tensor as computed: gathered whole before it is placed
            add("all-gather", token * weight.shards[0].local_shape[0] * tp, f"{shown}: column-parallel output "
                f"gathered to be placed as {_show(spec)}", tp, True)
        elif native.get(module) == -1:  # placed over other axes as computed: the rank's features only
            features = weight.shards[0].local_shape[0]
        for d, entry in enumerate(spec):
            axes = [a for a in spec_axes(entry) if mesh.size(a) > 1]
            if axes:
                parts = math.prod(mesh.size(a) for a in axes)
                # The decode step's output [batch, 1, features]; the split dimension is padded to equal pieces.
                size = (batch, 1, features)[d] if d < 3 else 1
                padded = -(-size // parts) * parts
                add("all-gather", token * features // size * padded, f"{shown}: output placed as {_show(spec)}, "
                    "gathered back for the next module", parts, True)
    # Sequence parallelism: a decode step's one token sits on rank 0, so each gather is a broadcast of it.
    for names, what in ((gather_out, "sequence-parallel output, gathered"), (gather_in, "sequence-parallel input, "
                                                                             "gathered")):
        for m in names:
            add("broadcast", token * config.hidden_size, f"{generic_name(m)}: {what} (the decode token, from rank 0)")
    return [Collective(kind, count, nbytes, what, group, extra)
            for (kind, nbytes, what, group, extra), count in counts.items()]


def _gathers(layout: Layout, module: str) -> bool:
    from .plan import Rule

    return any(Rule(p, s).regex.match(module) and all(e is None for e in s) for p, s in layout.activations.items())


def report_json(report: CapacityReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
