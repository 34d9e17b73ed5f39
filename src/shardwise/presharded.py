"""Pre-sharded checkpoints: one safetensors file per rank, and a manifest that makes them un-stale-able.

``preshard`` writes ``<compiled>/weights/tp{rank}_sharded_checkpoint.safetensors`` (NxD's file names)
plus ``<compiled>/weights/manifest.json`` recording what they were made from: fingerprints of the
source files, the plan, the mesh, the dtype and the conversions (head assignment, tied weights, source
tensor shapes). A *key* hashed from all of that is stored in every rank file's safetensors metadata.

Safety comes from three rules:
* a rank file is written under a temporary name and renamed when complete (fsynced first with
  ``durable``): a file with the final name is always complete, and an interrupted run leaves
  nothing a later run accepts;
* a rank file is valid only if its header parses, its size matches the header, and its key matches
  the manifest: re-running ``preshard`` skips valid files and redoes the rest (resumable);
* loading recomputes the key from the source (when it is at hand) and refuses, naming what changed.

Files made at one TP degree can be re-sliced into another (``reshard=True``) from the rank files
alone: the manifest carries everything the layout needs (config, plan, source shapes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import (
    DTYPE_NAMES,
    DTYPES,
    Arena,
    CheckpointSource,
    MapUnavailable,
    SliceReader,
    _bytes_of,
    _pread_exact,
    _pwrite_all,
    _scratch,
    can_map,
    map_populated,
    read_header,
)
from .config import ModelConfig, config_from_dict, load_config
from .dtypes import resolve_dtype
from .errors import ShardwiseError
from .layout import Layout, check_mesh, compute_layout
from .loader import LoadStats
from .plan import Plan, Rule, resolve_plan

log = logging.getLogger("shardwise")
FORMAT = "shardwise-presharded"
VERSION = 1
WEIGHTS = "weights"
MANIFEST = "manifest.json"
# Files copied next to the weights so the compiled directory can be used without the source.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


def rank_file(compiled: str | Path, rank: int) -> Path:
    return Path(compiled) / WEIGHTS / f"tp{rank}_sharded_checkpoint.safetensors"


@dataclass
class PreshardStats:
    seconds: float
    bytes_written: int
    ranks_written: list[int]
    ranks_skipped: list[int]


# ---------------------------------------------------------------------------------------------- manifest


def _file_fingerprint(path: Path, samples: int = 16, block: int = 1 << 16) -> dict:
    """Size, header hash and a hash of evenly spaced data blocks: cheap even for a 100 GB file.

    A full hash would read the whole checkpoint on every load; the header pins names, shapes and
    offsets, and the sampled blocks catch re-trained or re-quantized weights.
    """
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        digest.update(f.read(n))
        header_hash = digest.hexdigest()
        data = hashlib.sha256()
        for i in range(samples):
            f.seek(8 + n + (size - 8 - n - block) * i // max(1, samples - 1) if size - 8 - n > block else 8 + n)
            data.update(f.read(block))
    return {"file": path.name, "size": size, "header_sha256": header_hash, "data_sample_sha256": data.hexdigest()}


def _plan_dict(plan: Plan, names: list[str]) -> dict:
    """The part of a plan that decides weights: rules matching a tensor, units, mesh axes.

    Activation rules (e.g. sequence parallelism) change no weight, so they do not make files stale.
    """
    rules = [r for r in plan.rules if any(r.regex.match(n) for n in names)]
    return {"rules": [[r.pattern, [list(e) if isinstance(e, tuple) else e for e in r.spec], r.required]
                      for r in rules],
            "units": [[p, list(u)] for p, u in plan.units], "mesh_axes": list(plan.mesh_axes),
            "mesh_sizes": list(plan.mesh_sizes) if plan.mesh_sizes else None}


def _plan_from_dict(data: dict, family: str) -> Plan:
    """The stored weight rules on top of the family's knowledge (units, consumable splits, output)."""
    rules = tuple(Rule(p, tuple(tuple(e) if isinstance(e, list) else e for e in spec), req)
                  for p, spec, req in data["rules"])
    sizes = tuple(data["mesh_sizes"]) if data.get("mesh_sizes") else None
    return replace(resolve_plan(family), rules=rules, mesh_axes=tuple(data["mesh_axes"]), mesh_sizes=sizes,
                   source="the pre-sharded checkpoint's manifest")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def build_manifest(source: CheckpointSource, config: ModelConfig, plan: Plan, layout: Layout,
                   dtype: torch.dtype) -> dict:
    conversions = {
        "tied": config.tied_sources,
        # The exact rows each rank holds (head assignment, padding) for every tensor, hashed.
        "layout_sha256": _digest({n: [[[s.start, s.length] for s in segs] for segs in sh.dims]
                                  for n, t in layout.tensors.items() for sh in t.shards}),
    }
    body = {
        "source": [_file_fingerprint(f) for f in source.files],
        "config_sha256": _digest(config.raw),
        "plan_sha256": _digest(_plan_dict(plan, list(layout.tensors))),
        "mesh": {"axes": list(layout.mesh.axis_names), "sizes": list(layout.mesh.axis_sizes)},
        "dtype": str(dtype).replace("torch.", ""),
        "conversions": conversions,
    }
    return {"format": FORMAT, "version": VERSION, "key": _digest(body), **body,
            "source_path": str(source.path.resolve()), "plan": _plan_dict(plan, list(layout.tensors)),
            "config": config.raw,
            "tensors": {n: [list(s), d] for n, (s, d) in source.shapes().items()}}


def _differences(found: dict, expected: dict) -> list[str]:
    what = []
    if found["source"] != expected["source"]:
        names = sorted({f["file"] for f in found["source"]} ^ {f["file"] for f in expected["source"]}
                       | {a["file"] for a, b in zip(found["source"], expected["source"]) if a != b})
        what.append(f"the source checkpoint changed ({', '.join(names) or 'file list'})")
    if found["config_sha256"] != expected["config_sha256"]:
        what.append("config.json changed")
    if found["plan_sha256"] != expected["plan_sha256"]:
        what.append("the sharding plan changed")
    if found["mesh"] != expected["mesh"]:
        what.append(f"the TP degree changed (files are for {_mesh_text(found['mesh'])}, asked for "
                    f"{_mesh_text(expected['mesh'])})")
    if found["dtype"] != expected["dtype"]:
        what.append(f"the dtype changed (files are {found['dtype']}, asked for {expected['dtype']})")
    if found["conversions"] != expected["conversions"] and found["mesh"] == expected["mesh"]:
        what.append("the conversions changed (head assignment or tied weights)")
    return what


def _mesh_text(mesh: dict) -> str:
    return " x ".join(f"{a} {s}" for a, s in zip(mesh["axes"], mesh["sizes"]))


def read_manifest(compiled: str | Path) -> dict | None:
    path = Path(compiled) / WEIGHTS / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("format") == FORMAT and data.get("version") == VERSION else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- writing


def rank_file_valid(path: Path, key: str) -> bool:
    """Complete (size matches header) and made for ``key``."""
    try:
        infos = read_header(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(n)).get("__metadata__", {})
    except (ShardwiseError, OSError, ValueError):
        return False
    end = max((i.end for i in infos.values()), default=8 + n)
    return meta.get("shardwise_key") == key and path.stat().st_size == end


@dataclass
class _RankFile:
    """One rank file being written: its temporary name, descriptor and tensor offsets."""

    rank: int
    path: Path
    tmp: Path
    fd: int
    base: int  # where tensor data starts
    offsets: dict[str, tuple[int, int]]
    size: int


def _open_rank_file(path: Path, layout: Layout, rank: int, dtype: torch.dtype, key: str) -> _RankFile:
    """Create the rank file under a temporary name, at its full size, with its header written."""
    items = [(n, t) for n, t in sorted(layout.tensors.items()) if t.source == n]
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt", "shardwise_key": key, "rank": str(rank),
                                     "world_size": str(layout.mesh.world_size)}}
    offset = 0
    for name, t in items:
        nbytes = itemsize * math.prod(t.shards[rank].local_shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(t.shards[rank].local_shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    base = 8 + len(blob)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, base + offset)
        os.pwrite(fd, struct.pack("<Q", len(blob)) + blob, 0)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    offsets = {name: tuple(header[name]["data_offsets"]) for name, _ in items}
    return _RankFile(rank, path, tmp, fd, base, offsets, base + offset)


def _write_tensor(rf: _RankFile, name: str, reader: SliceReader, layout: Layout, dtype: torch.dtype) -> None:
    """One tensor of one rank file: a kernel-side file-to-file copy when the slice is a byte range of
    the source in the right dtype, else built in a reused per-thread buffer (cast, padding) and written."""
    t = layout.tensors[name]
    shard = t.shards[rf.rank]
    begin, end = rf.offsets[name]
    span = reader.byte_range(t.source, shard, dtype)
    if span is not None:
        reader.copy_slice_to(t.source, span, rf.fd, rf.base + begin)
        return
    buf = _scratch(end - begin, "write")[: end - begin]
    if shard.has_padding:
        buf.zero_()
    tensor = reader.read(t.source, shard, dtype, buf.view(dtype) if end > begin else None)
    _pwrite_all(rf.fd, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), rf.base + begin)


def _write_rank_files(jobs: list[tuple[int, Path]], reader: SliceReader, layout: Layout, dtype: torch.dtype,
                      key: str, threads: int, durable: bool, progress: bool) -> int:
    """Write several rank files with one pool of threads taking (rank, tensor) pieces.

    Threads pull pieces rather than being handed one task per piece (a submission per piece costs a
    GIL hand-off while the others run), so all cores work to the end whatever the number of ranks.
    A thread takes its next piece from the first file in rank order that no other thread is writing,
    if any: writes to one file serialize on its inode lock (two threads on one file were measured
    slower than one), while different files proceed in parallel. Each file is renamed into place
    (fsynced first with ``durable``) as soon as its last piece is written, so a run killed mid-way
    keeps the ranks it finished.
    """
    files: list[_RankFile] = []
    try:
        for rank, path in jobs:
            files.append(_open_rank_file(path, layout, rank, dtype, key))
        pending = {rf.rank: sorted(rf.offsets, key=lambda n: rf.offsets[n][0] - rf.offsets[n][1]) for rf in files}
        n_pieces = sum(map(len, pending.values()))
        writers = dict.fromkeys(pending, 0)
        lock = threading.Lock()

        def next_piece() -> tuple[_RankFile, str] | None:
            open_files = [rf for rf in files if pending[rf.rank]]
            if not open_files:
                return None
            rf = next((f for f in open_files if writers[f.rank] == 0), open_files[0])
            writers[rf.rank] += 1
            return rf, pending[rf.rank].pop(0)

        bar = tqdm(total=n_pieces, desc="pre-sharding", unit="tensor", disable=not progress,
                   file=sys.stderr, leave=False)

        def finish(rf: _RankFile) -> None:
            if durable:
                os.fsync(rf.fd)
            fd, rf.fd = rf.fd, -1  # closed once, even if close reports an error (e.g. a full disk over NFS)
            os.close(fd)
            rf.tmp.replace(rf.path)

        failed = threading.Event()

        def work() -> None:
            while not failed.is_set():
                with lock:
                    item = next_piece()
                if item is None:
                    return
                rf, name = item
                try:
                    _write_tensor(rf, name, reader, layout, dtype)
                    with lock:
                        writers[rf.rank] -= 1
                        last = not pending[rf.rank] and writers[rf.rank] == 0
                    if last:
                        finish(rf)
                except BaseException:
                    failed.set()  # the other threads stop at their next piece
                    raise
                bar.update(1)

        try:
            for rf in files:
                if not rf.offsets:
                    finish(rf)
            workers = max(1, min(threads, n_pieces))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(work) for _ in range(workers)]
                try:
                    for fut in futures:
                        fut.result()
                except BaseException:  # a failure, or Ctrl-C in this thread: stop the workers too
                    failed.set()
                    raise
        finally:
            bar.close()
    finally:
        for rf in files:  # whatever failed: no descriptor left open, no temporary file left behind
            if rf.fd >= 0:
                fd, rf.fd = rf.fd, -1
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):  # a no-op for files renamed into place
                rf.tmp.unlink(missing_ok=True)
    return sum(rf.size for rf in files)


def preshard(
    model_path: str | Path,
    compiled_model_path: str | Path,
    tp_degree: int,
    dtype: str | torch.dtype = "auto",
    plan: Plan | None = None,
    start_rank: int = 0,
    local_ranks: int | None = None,
    threads: int | None = None,
    progress: bool = False,
    durable: bool = False,
) -> PreshardStats:
    """Write the rank files for ranks ``start_rank .. start_rank+local_ranks-1`` (all by default).

    Valid files from an earlier (possibly interrupted) run are kept; missing or invalid ones are
    written. Each node of a multi-node job can pre-shard its own ranks into a shared directory.

    ``threads`` (default: one per rank file, up to the usable cores and at most 8) write rank files
    in parallel; more threads than cores or files only contend. A killed process never leaves a
    file that loads (files are renamed into place when complete, and a file whose size or key is off
    is rejected). ``durable=True`` also fsyncs each file before the rename, for power loss; it costs
    a full write to disk, often more than the rest of the work.
    """
    start_time = time.perf_counter()
    config = load_config(model_path)
    torch_dtype = resolve_dtype(dtype, config)
    plan = plan or resolve_plan(config.family)
    mesh = plan.mesh(tp_degree)
    check_mesh(config, mesh)
    source = CheckpointSource(model_path)
    layout = compute_layout(source.shapes(), config, plan, mesh)
    ranks = _rank_range(tp_degree, start_rank, local_ranks)
    manifest = build_manifest(source, config, plan, layout, torch_dtype)
    compiled = Path(compiled_model_path)
    weights = compiled / WEIGHTS
    weights.mkdir(parents=True, exist_ok=True)
    for rank in ranks:  # debris of an interrupted run of these ranks (never valid; other nodes' are theirs)
        for stale in weights.glob(f".{rank_file(compiled, rank).name}.tmp-*"):
            stale.unlink(missing_ok=True)
    for name in SIDE_FILES:
        if (Path(model_path) / name).is_file():
            shutil.copyfile(Path(model_path) / name, compiled / name)
    skipped = [r for r in ranks if rank_file_valid(rank_file(compiled, r), manifest["key"])]
    written = [r for r in ranks if r not in skipped]
    reader = SliceReader(source)
    t0 = time.perf_counter()
    try:
        if threads is None:  # a thread per file being written, up to the cores (and 8: each holds a buffer)
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            threads = max(1, min(cores, len(written), 8))
        nbytes = _write_rank_files([(r, rank_file(compiled, r)) for r in written], reader, layout, torch_dtype,
                                   manifest["key"], threads or 1, durable, progress)
    finally:
        reader.close()
    if written:
        log.info("Wrote %d rank file%s (%.2f GB) in %.2f seconds%s", len(written), "s" * (len(written) > 1),
                 nbytes / 1e9, time.perf_counter() - t0,
                 f"; kept {len(skipped)} valid from an earlier run" if skipped else "")
    _atomic_write_text(weights / MANIFEST, json.dumps(manifest, indent=1))
    return PreshardStats(time.perf_counter() - start_time, nbytes, written, skipped)


def _rank_range(tp_degree: int, start_rank: int, local_ranks: int | None) -> range:
    local = tp_degree - start_rank if local_ranks is None else local_ranks
    if start_rank < 0 or local < 1 or start_rank + local > tp_degree:
        raise ShardwiseError(f"ranks {start_rank}..{start_rank + local - 1} are not within TP degree {tp_degree} "
                             "(check --start-rank-id and --local-ranks-size)")
    return range(start_rank, start_rank + local)


# ---------------------------------------------------------------------------------------------- loading


def check_presharded(compiled: str | Path, tp_degree: int, dtype: str | torch.dtype = "auto",
                     model_path: str | Path | None = None, plan: Plan | None = None) -> tuple[dict, list[str]]:
    """The manifest and the list of reasons it cannot be used as is (empty: it can)."""
    manifest = read_manifest(compiled)
    if manifest is None:
        raise ShardwiseError(f"no pre-sharded checkpoint at {str(compiled)!r} (run `shardwise shard` first)")
    config = config_from_dict(manifest["config"])
    torch_dtype = resolve_dtype(manifest["dtype"] if dtype == "auto" else dtype, config)
    if model_path is not None and Path(model_path).exists():
        config = load_config(model_path)
        source = CheckpointSource(model_path)
        plan = plan or resolve_plan(config.family)
        layout = compute_layout(source.shapes(), config, plan, plan.mesh(tp_degree))
        expected = build_manifest(source, config, plan, layout, torch_dtype)
    else:  # no source at hand: check what was asked against what the files were made with
        plan = plan or _plan_from_dict(manifest["plan"], config.family)
        tensors = {n: (tuple(s), d) for n, (s, d) in manifest["tensors"].items()}
        layout = compute_layout(tensors, config, plan, plan.mesh(tp_degree))
        expected = {**manifest, "plan_sha256": _digest(_plan_dict(plan, list(layout.tensors))),
                    "dtype": str(torch_dtype).replace("torch.", ""),
                    "mesh": {"axes": list(layout.mesh.axis_names), "sizes": list(layout.mesh.axis_sizes)}}
    return manifest, _differences(manifest, expected)


def require_usable(compiled: str | Path, tp_degree: int, dtype: str | torch.dtype = "auto",
                   model_path: str | Path | None = None, reshard: bool = False,
                   plan: Plan | None = None) -> tuple[dict, bool]:
    """Refuse a stale or incomplete pre-sharded checkpoint, saying what changed and what to do.

    Returns the manifest and whether the files must be re-sliced for another TP degree.
    """
    compiled = Path(compiled)
    manifest, problems = check_presharded(compiled, tp_degree, dtype, model_path, plan)
    tp_changed = [p for p in problems if p.startswith("the TP degree changed")]
    if problems and not (reshard and problems == tp_changed):
        hint = (f"re-shard with `shardwise shard --model-path SRC --compiled-model-path {compiled}`"
                + (" or pass --reshard to re-slice these files" if tp_changed and len(problems) == 1 else ""))
        raise ShardwiseError(f"pre-sharded checkpoint at {str(compiled)!r} is stale: {'; '.join(problems)}; {hint}")
    old_world = math.prod(manifest["mesh"]["sizes"])
    for r in range(old_world):
        if not rank_file_valid(rank_file(compiled, r), manifest["key"]):
            raise ShardwiseError(f"pre-sharded checkpoint at {str(compiled)!r} is incomplete: rank {r}'s file is "
                                 "missing or partial; run `shardwise shard` again to finish it")
    return manifest, bool(tp_changed)


def presharded_layout(manifest: dict, tp_degree: int) -> tuple[ModelConfig, Layout]:
    """Config and layout of a pre-sharded checkpoint at ``tp_degree``, from its manifest alone."""
    config = config_from_dict(manifest["config"])
    tensors = {n: (tuple(s), d) for n, (s, d) in manifest["tensors"].items()}
    plan = _plan_from_dict(manifest["plan"], config.family)
    return config, compute_layout(tensors, config, plan, plan.mesh(tp_degree))


def load_presharded_state(
    compiled_model_path: str | Path,
    rank: int,
    tp_degree: int,
    dtype: str | torch.dtype = "auto",
    model_path: str | Path | None = None,
    reshard: bool = False,
    plan: Plan | None = None,
) -> tuple[dict[str, torch.Tensor], LoadStats]:
    """This rank's state dict from pre-sharded files, refusing stale ones.

    With ``reshard=True``, files made at another TP degree are re-sliced for ``tp_degree`` from the
    rank files alone (no source checkpoint needed); other differences are still refused.
    """
    start = time.perf_counter()
    compiled = Path(compiled_model_path)
    manifest, tp_changed = require_usable(compiled, tp_degree, dtype, model_path, reshard, plan)
    old_world = math.prod(manifest["mesh"]["sizes"])
    torch_dtype = resolve_dtype(manifest["dtype"] if dtype == "auto" else dtype, config_from_dict(manifest["config"]))
    files = [rank_file(compiled, r) for r in range(old_world)]
    if not tp_changed:
        return _read_rank_file(files[rank], torch_dtype, start)
    return _reslice(manifest, files, rank, tp_degree, old_world, torch_dtype, start)


def _read_rank_file(path: Path, dtype: torch.dtype, start: float) -> tuple[dict[str, torch.Tensor], LoadStats]:
    """A rank file is exactly the rank's shard: map it (or read it into an arena) and carve the tensors.

    Mapped, its tensors are the page cache's own pages (no copy, no fresh memory; see
    ``checkpoint.map_populated``); without page mapping (``SHARDWISE_MAP_WEIGHTS=0``), one read fills
    an arena.
    """
    infos = read_header(path)
    begin = min((i.begin for i in infos.values()), default=0)
    end = max((i.end for i in infos.values()), default=begin)
    fd = os.open(path, os.O_RDONLY)
    try:
        is_mapped = False
        if can_map() and end > begin:
            aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
            try:
                mm = map_populated(fd, aligned, end - aligned)
                data = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=begin - aligned)
                is_mapped = True
            except MapUnavailable as exc:
                log.debug("reading %s instead of mapping it (%s)", path.name, exc)
        if not is_mapped:
            data = Arena(Arena.size_of((end - begin,), torch.uint8)).take((end - begin,), torch.uint8)
            _pread_exact(fd, _bytes_of(data), begin)
    finally:
        os.close(fd)
    state, mapped = {}, 0
    for name, info in infos.items():
        raw = data[info.begin - begin : info.end - begin].view(DTYPES[info.dtype]).view(info.shape)
        state[name] = raw if raw.dtype == dtype else raw.to(dtype)
        mapped += raw.nbytes if is_mapped and raw.dtype == dtype else 0
    held = sum(t.numel() * t.element_size() for t in state.values())
    return state, LoadStats(time.perf_counter() - start, end - begin, held, end - begin, mapped)


def _reslice(manifest, files, rank, tp_degree, old_world, dtype, start) -> tuple[dict, LoadStats]:
    """Build rank ``rank`` of a ``tp_degree`` layout from rank files of an ``old_world`` layout."""
    _, old = presharded_layout(manifest, old_world)
    _, new = presharded_layout(manifest, tp_degree)
    readers = [SliceReader(CheckpointSource(f.parent, files=[f])) for f in files]
    state = {}
    try:
        for name, t in new.tensors.items():
            if t.source != name:
                continue
            shard = t.shards[rank]
            out = torch.zeros(shard.local_shape, dtype=dtype)
            if t.replicated:
                out.copy_(readers[0].source_view(name))
            else:
                (dim,) = t.split_dims
                _copy_overlaps(out, dim, shard.dims[dim], old.tensors[name], readers, name)
            state[name] = out
    finally:
        for r in readers:
            r.close()
    held = sum(v.numel() * v.element_size() for v in state.values())
    return state, LoadStats(time.perf_counter() - start, sum(r.bytes_fetched for r in readers), held,
                            sum(r.bytes_fetched for r in readers))


def _copy_overlaps(out: torch.Tensor, dim: int, wanted, old_tensor, readers, name: str) -> None:
    """Fill ``out`` along ``dim`` with the source rows ``wanted`` names, from whichever old rank holds them."""
    pos = 0
    for seg in wanted:
        if seg.start is None:
            pos += seg.length
            continue
        missing = [(seg.start, seg.start + seg.length)]
        for old_rank, old_shard in enumerate(old_tensor.shards):
            old_pos = 0
            for old_seg in old_shard.dims[dim]:
                if old_seg.start is not None:
                    for lo, hi in list(missing):
                        a, b = max(lo, old_seg.start), min(hi, old_seg.start + old_seg.length)
                        if a >= b:
                            continue
                        src = readers[old_rank].source_view(name).narrow(dim, old_pos + a - old_seg.start, b - a)
                        out.narrow(dim, pos + a - seg.start, b - a).copy_(src)
                        missing.remove((lo, hi))
                        missing += [r for r in ((lo, a), (b, hi)) if r[0] < r[1]]
                old_pos += old_seg.length
        pos += seg.length
