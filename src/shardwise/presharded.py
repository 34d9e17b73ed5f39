"""Pre-sharded checkpoints: one safetensors file per rank, and a manifest that makes them un-stale-able.

``preshard`` writes ``<compiled>/weights/tp{rank}_sharded_checkpoint.safetensors`` (NxD's file names)
plus ``<compiled>/weights/manifest.json`` recording what they were made from: each source file's
name, size, header hash and full content sha256, the plan, the mesh, the dtype and the conversions
(head assignment, tied weights, source tensor shapes). A *key* hashed from all of that is stored in
every rank file's safetensors metadata. The key holds no file-system identity (path, inode, times),
so a byte-identical copy of the source has the same key.

Safety comes from four rules:
* a rank file is written under a temporary name and renamed when complete (fsynced first with
  ``durable``): a file with the final name is always complete, and an interrupted run leaves
  nothing a later run accepts;
* a rank file is valid only if its header parses, its size matches the header, and its key matches
  the manifest: re-running ``preshard`` skips valid files and redoes the rest (resumable);
* one writer per rank: ``preshard`` holds an ``flock`` on ``weights/.tp{rank}.lock`` for each rank
  it writes (taken in rank order, so writers of overlapping ranks cannot deadlock) and a short one
  on ``weights/.manifest.lock`` for the manifest and side files. A second writer of the same ranks
  waits, then finds the files valid and skips them; writers of disjoint ranks (the nodes of a
  multi-node job) run in parallel and never touch each other's temporary files. Where the file
  system has no ``flock`` (some NFS or Lustre mounts) a warning is logged and writing goes on
  unlocked;
* loading recomputes the key from the source (when it is at hand) and refuses, naming what changed.

How much of the source a load checks is ``verify`` (``check_presharded``, ``require_usable``,
``load_presharded_state``; only with ``model_path``, since without the source there is nothing to
compare; config, plan, mesh and dtype are checked at every level):
* ``"header"``: file names, sizes and headers (tensor names, dtypes, shapes, offsets). Reads only
  the headers (milliseconds). Misses any change of tensor *values* that keeps the header.
* ``"auto"`` (default): ``"header"``, plus each file's content hash, taken as verified while the
  file's *identity* (size, mtime_ns, ctime_ns, inode, device) is the one it had when it was last
  hashed on this host: by ``preshard`` (recorded in the manifest with the host name) or by an
  earlier load (recorded in ``weights/.verified-<host>.json``). Unchanged identity: one ``stat``
  per file, nothing read. Changed identity (an edit, a re-download, a copy to another path or
  node): the whole file is re-hashed, once per change per host (other processes of the host wait
  for it on ``weights/.verify-<host>.lock`` and reuse the result): a byte-identical copy is
  accepted, any change of content is refused. An edit that restores mtime (``os.utime``) is still
  caught, because the kernel sets ctime on every write and nothing but the kernel can set it back.
  Misses only a change of content that keeps every identity field: a write that bypasses the file
  system (raw device, a broken NFS server), or a forged identity (system clock turned back and
  mtime restored, a hand-edited ``.verified`` file or manifest).
* ``"full"``: re-hashes every source file on every load (sha256, files in parallel; reads the
  whole source checkpoint). Catches any change of content.

Files made at one TP degree can be re-sliced into another (``reshard=True``) from the rank files
alone: the manifest carries everything the layout needs (config, plan, source shapes);
``presharded_mesh`` tells the mesh the files were made for, and ``tp_degree=None`` means that one.

The manifest is untrusted input: ``read_manifest`` checks its structure and types, and anything
wrong in it is reported as a ``ShardwiseError`` naming the file (manifests of an older format say
to re-shard).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import re
import secrets
import shutil
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
    can_map,
    map_populated,
    read_header,
)
from .config import ModelConfig, config_from_dict, load_config
from .conformance import model_layout
from .dtypes import WEIGHT_DTYPES, name_of, resolve_dtype
from .errors import ShardwiseError
from .fileio import bytes_of, pread_exact, pwrite_all, scratch
from .layout import Layout, compute_layout
from .loader import LoadStats
from .mesh import Mesh
from .plan import TENSOR_AXIS, Plan, Rule, resolve_plan
from .settings import process_alive
from .untrusted import read_json

log = logging.getLogger("shardwise")
FORMAT = "shardwise-presharded"
VERSION = 2  # 2: full content sha256 and identity of each source file (1 sampled blocks)
WEIGHTS = "weights"
MANIFEST = "manifest.json"
VERIFY_LEVELS = ("auto", "full", "header")
HASH_CHUNK = 8 << 20  # large reads: hashlib releases the GIL for each, so threads hash files in parallel
# Stamped into a rank file's header while the source is still being hashed; replaced by the key
# (same length) just before the file is renamed into place, so no final-named file ever carries it.
KEY_PLACEHOLDER = "pending".ljust(64, "-")
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


# ---------------------------------------------------------------------------------------------- locking


def _host() -> str:
    """This machine's name, as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


_UNLOCKABLE: set[Path] = set()  # directories whose file system refused flock (warned about once)


@contextlib.contextmanager
def _flocks(paths: list[Path], doing: list[str]) -> Iterator[bool]:
    """Exclusive ``flock``s on ``paths``, taken in the order given and held until the block ends.

    Callers pass ranks in ascending order, so two processes locking overlapping rank sets cannot
    deadlock. A lock held by another process is waited for, saying so (``doing[i]`` says what that
    process is doing). Yields whether the locks are held: on a file system without ``flock``
    (``ENOLCK``, ``EOPNOTSUPP``, ``ENOSYS``: some NFS and Lustre mounts) a warning is logged and the
    block runs unlocked. Opening a lock file can raise ``OSError`` (e.g. a read-only directory).
    """
    fds: list[int] = []
    locked = True
    try:
        for path, what in zip(paths, doing):
            fds.append(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))  # read-only: others' too
            try:
                try:
                    fcntl.flock(fds[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("waiting for another shardwise %s", what)
                    fcntl.flock(fds[-1], fcntl.LOCK_EX)
            except OSError as exc:
                if path.parent not in _UNLOCKABLE:  # once per directory
                    _UNLOCKABLE.add(path.parent)
                    log.warning("cannot lock %s (%s): going on without locking; do not run two shardwise writing "
                                "the same ranks into %s at once", path, exc.strerror or exc, path.parent)
                locked = False
                break
        yield locked
    finally:
        for fd in fds:  # closing releases the lock; lock files stay (removing one would race its next user)
            os.close(fd)


def _weights_dir(compiled: Path) -> Path:
    """``compiled/weights``, created; a path in the way is a one-line error, not a traceback."""
    weights = compiled / WEIGHTS
    for path in (compiled, weights):
        if path.exists() and not path.is_dir():
            raise ShardwiseError(f"{str(path)!r} exists and is not a directory; give --compiled-model-path a "
                                 "directory (new or holding a pre-sharded checkpoint)")
    try:
        weights.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardwiseError(f"cannot create {str(weights)!r}: {exc.strerror or exc}") from None
    return weights


def _tmp_suffix() -> str:
    """Names a temporary file as this process's: unique across the nodes sharing a directory."""
    return f"tmp-{_host()}-{os.getpid()}"


def _remove_debris(weights: Path, ranks: range, locked: bool) -> None:
    """Remove the temporary files of ``ranks`` left by killed runs (never valid: only their writer renames them).

    Holding the ranks' locks, any such file is debris: a live writer of these ranks would hold the
    locks. Unlocked, only files of this host's dead processes are known to be debris; other ranks'
    files are never touched (another node may be writing them).
    """
    host = _host()
    for rank in ranks:
        for tmp in weights.glob(f".{rank_file(weights.parent, rank).name}.tmp-*"):
            if not locked:
                writer_host, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
                if writer_host != host or not pid.isdigit() or process_alive(int(pid)):
                    continue
            tmp.unlink(missing_ok=True)


def _unique_tmp(path: Path) -> Path:
    """A temporary name next to ``path`` that no other call, process or node uses (unlike ``mkstemp``'s
    files, one created under it gets the usual permissions: readable by the others the umask allows)."""
    return path.with_name(f".{path.name}.{_tmp_suffix()}-{secrets.token_hex(4)}")


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all, under a temporary name unique to this call (several
    processes, even on several nodes, may write the same file at once; the last rename wins)."""
    tmp = _unique_tmp(path)
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _copy_side_files(model_path: Path, compiled: Path) -> None:
    """Config and tokenizer files next to the weights, each replaced atomically (readers never see half)."""
    for name in SIDE_FILES:
        src, dst = model_path / name, compiled / name
        if not src.is_file() or (dst.exists() and os.path.samefile(src, dst)):
            continue
        tmp = _unique_tmp(dst)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# ---------------------------------------------------------------------------------------------- source hashes


def _identity(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes may have: size, mtime, ctime, inode, device.

    ctime is set by the kernel on every write (and on metadata changes: those only cost a re-hash);
    unlike mtime it cannot be set back with ``utime``.
    """
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class _Stopped(Exception):
    """A hash abandoned because the run stopped (failure or Ctrl-C)."""


def _hash_file(path: Path, stop: threading.Event | None = None) -> tuple[str, list[int]]:
    """The sha256 of a whole file and its identity, checked unchanged across the read (one version hashed)."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(HASH_CHUNK))
    with open(path, "rb", buffering=0) as f:
        before = _identity(os.fstat(f.fileno()))
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(view):
            if stop is not None and stop.is_set():
                raise _Stopped
            digest.update(view[:n])
        after = _identity(os.fstat(f.fileno()))
    if after != before:
        raise ShardwiseError(f"{path} changed while it was being read; run again once nothing writes to it")
    return digest.hexdigest(), before


def _threads_for(n_files: int) -> int:
    """A thread per file, up to the usable cores and 8 (more only contend)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(n_files, cores, 8))


def _hash_files(files: list[Path]) -> dict[Path, tuple[str, list[int]]]:
    """Hash several files at once (one thread per file, up to the cores), logging the time it took."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=_threads_for(len(files)), thread_name_prefix="shardwise-hash") as pool:
        hashes = dict(zip(files, pool.map(_hash_file, files)))
    size = sum(ident[0] for _, ident in hashes.values())
    log.info("Hashed %d source file%s (%.2f GB) in %.2f seconds", len(files), "s" * (len(files) > 1), size / 1e9,
             time.perf_counter() - start)
    return hashes


def _cache_file(weights: Path) -> Path:
    return weights / f".verified-{_host()}.json"


def _read_cache(weights: Path) -> dict:
    """This host's record of verified files: real path -> {identity, sha256}. Unreadable: empty (re-hash)."""
    try:
        data = json.loads(_cache_file(weights).read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _cached_sha256(cache: dict, path: Path, identity: list[int]) -> str | None:
    entry = cache.get(os.path.realpath(path))
    if isinstance(entry, dict) and entry.get("identity") == identity and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    return None


def _remember(weights: Path, hashes: dict[Path, tuple[str, list[int]]]) -> None:
    """Add ``hashes`` to this host's record (dropping entries whose file changed since); best effort:
    a record that cannot be written only costs a re-hash later."""
    if not hashes:
        return
    try:
        cache = _read_cache(weights)
        cache.update({os.path.realpath(p): {"identity": ident, "sha256": sha} for p, (sha, ident) in hashes.items()})
        _atomic_write_text(_cache_file(weights), json.dumps({"files": {p: e for p, e in cache.items()
                                                                       if _still(p, e)}}, indent=1))
    except OSError as exc:
        log.debug("cannot record verified source hashes in %s: %s", weights, exc)


def _still(path: str, entry) -> bool:
    """Whether a cache entry still describes the file at ``path``."""
    try:
        return isinstance(entry, dict) and entry.get("identity") == _identity(os.stat(path))
    except OSError:
        return False


def _trusted_hashes(files: list[Path], manifest: dict | None, weights: Path) -> dict[Path, tuple[str, list[int]]]:
    """Content hashes of ``files`` that need no reading: taken on this host from the file as it is now.

    From the manifest (written by this host, same identity) or this host's record of earlier checks.
    """
    host, cache = _host(), _read_cache(weights)
    recorded: dict[str, tuple[str, list[int]]] = {}
    if manifest is not None and manifest["source_identity"]["host"] == host:
        identities = manifest["source_identity"]["files"]
        recorded = {e["file"]: (e["sha256"], identities.get(e["file"])) for e in manifest["source"]}
    out = {}
    for f in files:
        identity = _identity(f.stat())
        sha, known_identity = recorded.get(f.name, (None, None))
        sha = sha if known_identity == identity else _cached_sha256(cache, f, identity)
        if sha is not None:
            out[f] = (sha, identity)
    return out


def _header_entry(path: Path) -> dict:
    """A source file's name, size and header hash (tensor names, dtypes, shapes, offsets): the header only."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header_sha256 = hashlib.sha256(f.read(n)).hexdigest()
        size = os.fstat(f.fileno()).st_size
    return {"file": path.name, "size": size, "header_sha256": header_sha256}


def _verified_entries(files: list[Path], manifest: dict, weights: Path, verify: str) -> list[dict]:
    """The source entries as they are now, to compare with the manifest's, content checked per ``verify``.

    A file whose size or header differs is stale whatever its content: it is not read.
    """
    recorded = {e["file"]: e for e in manifest["source"]}
    entries = {f: _header_entry(f) for f in files}
    same_header = [f for f, e in entries.items() if f.name in recorded
                   and (recorded[f.name]["size"], recorded[f.name]["header_sha256"]) == (e["size"], e["header_sha256"])]
    for f, e in entries.items():
        e["sha256"] = recorded[f.name]["sha256"] if f in same_header and verify == "header" else "(not read)"
    if verify != "header" and same_header:
        hashes = {} if verify == "full" else _trusted_hashes(same_header, manifest, weights)
        todo = [f for f in same_header if f not in hashes]
        if todo:
            hashes.update(_rehash(todo, manifest, weights, verify))
        for f in same_header:
            entries[f]["sha256"] = hashes[f][0]
    return list(entries.values())


def _rehash(files: list[Path], manifest: dict, weights: Path, verify: str) -> dict[Path, tuple[str, list[int]]]:
    """Hash ``files`` once for all the processes of this host: the first takes the host's lock and
    hashes, the others wait and find the result recorded (``auto``); the record is updated."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):  # e.g. a read-only directory: each process hashes for itself
            stack.enter_context(_flocks([weights / f".verify-{_host()}.lock"],
                                        [f"checking the source files of {weights}"]))
        hashes = {} if verify == "full" else _trusted_hashes(files, manifest, weights)
        todo = [f for f in files if f not in hashes]
        if todo:
            log.info("Checking the content of %d source file%s (%s)", len(todo), "s" * (len(todo) > 1),
                     "not checked on this host as they are now: new here, copied, or changed" if verify == "auto"
                     else "verify=full")
            fresh = _hash_files(todo)
            _remember(weights, fresh)
            hashes.update(fresh)
        return hashes


class _PendingKey:
    """The key of a pre-shard whose source files may still be being hashed, by background threads.

    Known hashes are used at once; the others are computed while the rank files are written. ``get``
    waits for them, builds the manifest (``make``) and, before any rank file can carry the key, records
    the fresh hashes in this host's cache, so that an interrupted run resumes without hashing again.
    """

    def __init__(self, files: list[Path], known: dict[Path, tuple[str, list[int]]],
                 make: Callable[[dict[Path, tuple[str, list[int]]]], dict], weights: Path):
        self._known, self._make, self._weights = known, make, weights
        self._stop = threading.Event()
        todo = [f for f in files if f not in known]
        self._pool = (ThreadPoolExecutor(max_workers=_threads_for(len(todo)), thread_name_prefix="shardwise-hash")
                      if todo else None)
        self._futures: dict[Path, Future] = {f: self._pool.submit(_hash_file, f, self._stop) for f in todo}
        self._lock = threading.Lock()
        self.manifest: dict | None = None

    @property
    def hashing(self) -> bool:
        return bool(self._futures)

    def ready(self) -> bool:
        return all(f.done() for f in self._futures.values())

    def failed(self) -> bool:
        return any(f.done() and not f.cancelled() and f.exception() is not None for f in self._futures.values())

    def get(self) -> str:
        with self._lock:
            if self.manifest is None:
                fresh = {f: fut.result() for f, fut in self._futures.items()}
                manifest = self._make({**self._known, **fresh})
                _remember(self._weights, fresh)
                self.manifest = manifest
            return self.manifest["key"]

    def close(self) -> None:
        """Stop hashing (each thread stops within one read) and wait for the threads."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- manifest


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
                   dtype: torch.dtype, entries: list[dict], identities: dict[str, list[int]] | None = None) -> dict:
    """The manifest of rank files made from ``source``; ``entries`` are its files' ``{file, size,
    header_sha256, sha256}``. ``identities`` (file name -> identity on this host) are recorded beside
    the key material, never in it: a byte-identical copy of the source has the same key."""
    conversions = {
        "tied": config.tied_sources,
        # The exact rows each rank holds (head assignment, padding) for every tensor, hashed.
        "layout_sha256": _digest({n: [[[s.start, s.length] for s in segs] for segs in sh.dims]
                                  for n, t in layout.tensors.items() for sh in t.shards}),
    }
    body = {  # the key material (_KEYED)
        "source": entries,
        "config_sha256": _digest(config.raw),
        "plan_sha256": _digest(_plan_dict(plan, list(layout.tensors))),
        "mesh": {"axes": list(layout.mesh.axis_names), "sizes": list(layout.mesh.axis_sizes)},
        "dtype": name_of(dtype),
        "conversions": conversions,
    }
    return {"format": FORMAT, "version": VERSION, "key": _digest(body), **body,
            "source_identity": {"host": _host(), "files": identities or {}},
            "source_path": str(source.path.resolve()), "plan": _plan_dict(plan, list(layout.tensors)),
            "config": config.raw,
            "tensors": {n: [list(t.shape), t.dtype] for n, t in layout.tensors.items() if t.source == n}}


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


def _is_int(v, least: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_spec(v) -> bool:
    return isinstance(v, list) and all(e is None or isinstance(e, str) or (_is_str_list(e) and e) for e in v)


def _is_rule(v) -> bool:
    return (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and _is_spec(v[1])
            and isinstance(v[2], bool))


def _is_plan(v) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("rules"), list) and all(map(_is_rule, v["rules"]))
            and isinstance(v.get("units"), list)
            and all(isinstance(u, list) and len(u) == 2 and isinstance(u[0], str) and isinstance(u[1], list)
                    and all(x is None or isinstance(x, str) for x in u[1]) for u in v["units"])
            and _is_str_list(v.get("mesh_axes")) and v["mesh_axes"]
            and (v.get("mesh_sizes") is None or (isinstance(v["mesh_sizes"], list)
                                                and all(_is_int(s, 1) for s in v["mesh_sizes"]))))


def _is_mesh(v) -> bool:
    return (isinstance(v, dict) and _is_str_list(v.get("axes")) and v["axes"] and isinstance(v.get("sizes"), list)
            and len(v["sizes"]) == len(v["axes"]) and all(_is_int(s, 1) for s in v["sizes"]))


def _is_tensors(v) -> bool:
    return isinstance(v, dict) and all(
        isinstance(t, list) and len(t) == 2 and isinstance(t[0], list) and all(_is_int(d) for d in t[0])
        and isinstance(t[1], str) and t[1] in DTYPES for t in v.values())


def _is_source(v) -> bool:
    return isinstance(v, list) and all(
        isinstance(e, dict) and set(e) == {"file", "size", "header_sha256", "sha256"} and isinstance(e["file"], str)
        and _is_int(e["size"]) and isinstance(e["header_sha256"], str) and isinstance(e["sha256"], str) for e in v)


def _is_identity(v) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("host"), str) and isinstance(v.get("files"), dict)
            and all(isinstance(i, list) and len(i) == 5 and all(map(_is_int, i)) for i in v["files"].values()))


_KEYED = ("source", "config_sha256", "plan_sha256", "mesh", "dtype", "conversions")  # what the key is a hash of
# field -> (check, what it must be)
_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "key": (lambda v: isinstance(v, str), "a string"),
    "source": (_is_source, "a list of {file, size, header_sha256, sha256}"),
    "source_identity": (_is_identity, "{host, files: {name: [5 integers]}}"),
    "config_sha256": (lambda v: isinstance(v, str), "a string"),
    "plan_sha256": (lambda v: isinstance(v, str), "a string"),
    "mesh": (_is_mesh, "{axes: [names], sizes: [integers >= 1], one per axis}"),
    "dtype": (lambda v: isinstance(v, str) and v in WEIGHT_DTYPES, f"one of {', '.join(WEIGHT_DTYPES)}"),
    "conversions": (lambda v: isinstance(v, dict), "an object"),
    "source_path": (lambda v: isinstance(v, str), "a string"),
    "plan": (_is_plan, "{rules: [[pattern, spec, required]], units, mesh_axes, mesh_sizes}"),
    "config": (lambda v: isinstance(v, dict), "an object (config.json)"),
    "tensors": (_is_tensors, "an object: name -> [shape (integers), safetensors dtype]"),
}


def _manifest_problem(data) -> str | None:
    """What is wrong with a manifest's structure and types, in a few words; None if nothing."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return "not a shardwise pre-sharded checkpoint manifest"
    for field, (ok, what) in _FIELDS.items():
        if field not in data:
            return f"the field {field!r} is missing"
        if not ok(data[field]):
            return f"the field {field!r} must be {what}"
    try:  # what later steps build from it (the plan's structure, checked above, is all it takes)
        config_from_dict(data["config"])
    except ShardwiseError as exc:
        return str(exc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return f"its config cannot be read ({type(exc).__name__}: {exc})"
    # The rank files are checked against the key: the rest must agree with it (an edit by hand would not).
    if _digest({k: data[k] for k in _KEYED}) != data["key"]:
        return "its content does not match its key"
    if _digest(data["config"]) != data["config_sha256"] or _digest(data["plan"]) != data["plan_sha256"]:
        return "its config or plan does not match the hash recorded for it"
    return None


def has_manifest(compiled: str | Path) -> bool:
    """Whether ``compiled`` has a manifest file at all (valid or not)."""
    return (Path(compiled) / WEIGHTS / MANIFEST).exists()


def read_manifest(compiled: str | Path) -> dict | None:
    """The manifest of the pre-sharded checkpoint at ``compiled``; None if there is none.

    A manifest that cannot be read, is not valid JSON, lacks a field or has one of the wrong type
    raises ``ShardwiseError`` naming the file; so does one of an older format (re-shard).
    """
    compiled = Path(compiled)
    path = compiled / WEIGHTS / MANIFEST
    if compiled.exists() and not compiled.is_dir():
        raise ShardwiseError(f"{str(compiled)!r} is not a directory (a pre-sharded checkpoint is a directory)")
    if not has_manifest(compiled):
        return None
    data = read_json(path, "the pre-sharded checkpoint's manifest", object)
    version = data.get("version") if isinstance(data, dict) and data.get("format") == FORMAT else None
    if _is_int(version) and version != VERSION:
        age = "an older" if version < VERSION else "a newer"
        raise ShardwiseError(f"{path} was made by {age} shardwise (format version {version}, this one reads "
                             f"{VERSION}); re-shard with `shardwise shard --model-path SRC --compiled-model-path "
                             f"{compiled}`")
    problem = _manifest_problem(data) if version == VERSION else "not a shardwise pre-sharded checkpoint manifest"
    if problem:
        raise ShardwiseError(f"{path} is malformed: {problem}; re-shard to rewrite it")
    return data


def _read_manifest_quietly(compiled: Path) -> dict | None:
    """The manifest, or None if it is missing or unusable: a pre-shard replaces it anyway."""
    try:
        return read_manifest(compiled)
    except ShardwiseError as exc:
        log.info("Replacing the manifest at %s: %s", compiled, exc)
        return None


@contextlib.contextmanager
def _from_manifest(manifest: dict) -> Iterator[None]:
    """Errors caused by a manifest's content (it is untrusted input) become one-line ShardwiseErrors."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError) as exc:
        raise ShardwiseError(f"the manifest of the pre-sharded checkpoint made from {manifest.get('source_path')!r} "
                             f"is inconsistent ({type(exc).__name__}: {exc}); re-shard to rewrite it") from exc


def _manifest_config(manifest: dict) -> ModelConfig:
    with _from_manifest(manifest):
        return config_from_dict(manifest["config"])


def _mesh_for(plan: Plan, tp_degree: int | None, manifest: dict) -> Mesh:
    """The plan's mesh at ``tp_degree``; None: at the manifest's (unless the plan sizes its mesh itself)."""
    axes, sizes = manifest["mesh"]["axes"], manifest["mesh"]["sizes"]
    if tp_degree is None and plan.mesh_sizes is None and TENSOR_AXIS in axes:
        tp_degree = sizes[axes.index(TENSOR_AXIS)]
    return plan.mesh(tp_degree)


def presharded_mesh(compiled: str | Path) -> Mesh:
    """The mesh the pre-sharded checkpoint at ``compiled`` was made for (its world size and TP degree)."""
    manifest = read_manifest(compiled)
    if manifest is None:
        raise ShardwiseError(f"no pre-sharded checkpoint at {str(compiled)!r} (run `shardwise shard` first)")
    return Mesh(tuple(manifest["mesh"]["axes"]), tuple(manifest["mesh"]["sizes"]))


def presharded_plan(compiled: str | Path) -> Plan:
    """The sharding plan the pre-sharded checkpoint at ``compiled`` was made with (its weight rules)."""
    manifest = read_manifest(compiled)
    if manifest is None:
        raise ShardwiseError(f"no pre-sharded checkpoint at {str(compiled)!r} (run `shardwise shard` first)")
    with _from_manifest(manifest):
        return _plan_from_dict(manifest["plan"], _manifest_config(manifest).family)


# ---------------------------------------------------------------------------------------------- writing


def rank_file_valid(path: Path, key: str) -> bool:
    """Complete (size matches header) and made for ``key``."""
    try:
        infos = read_header(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            meta = json.loads(f.read(n)).get("__metadata__", {})
        end = max((i.end for i in infos.values()), default=8 + n)
        return isinstance(meta, dict) and meta.get("shardwise_key") == key and path.stat().st_size == end
    except (ShardwiseError, OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return False


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
    key_at: int  # where the key's placeholder is in the header


def _open_rank_file(path: Path, layout: Layout, rank: int, dtype: torch.dtype) -> _RankFile:
    """Create the rank file under a temporary name, at its full size, with its header written
    (the key a placeholder until the source is hashed: see ``_seal``)."""
    items = [(n, t) for n, t in sorted(layout.tensors.items()) if t.source == n]
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt", "shardwise_key": KEY_PLACEHOLDER, "rank": str(rank),
                                     "world_size": str(layout.mesh.world_size)}}
    offset = 0
    for name, t in items:
        nbytes = itemsize * math.prod(t.shards[rank].local_shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(t.shards[rank].local_shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    key_at = 8 + blob.index(f'"shardwise_key":"{KEY_PLACEHOLDER}"'.encode()) + len('"shardwise_key":"')
    base = 8 + len(blob)
    tmp = path.with_name(f".{path.name}.{_tmp_suffix()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, base + offset)
        os.pwrite(fd, struct.pack("<Q", len(blob)) + blob, 0)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    offsets = {name: tuple(header[name]["data_offsets"]) for name, _ in items}
    return _RankFile(rank, path, tmp, fd, base, offsets, base + offset, key_at)


def _seal(rf: _RankFile, key: str, durable: bool) -> None:
    """Stamp the key into a complete rank file and rename it into place (fsynced first with ``durable``)."""
    stamp = key.encode()
    assert len(stamp) == len(KEY_PLACEHOLDER)
    pwrite_all(rf.fd, memoryview(stamp), rf.key_at)
    if durable:
        os.fsync(rf.fd)
    fd, rf.fd = rf.fd, -1  # closed once, even if close reports an error (e.g. a full disk over NFS)
    os.close(fd)
    rf.tmp.replace(rf.path)


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
    buf = scratch(end - begin, "write")[: end - begin]
    if shard.has_padding:
        buf.zero_()
    tensor = reader.read(t.source, shard, dtype, buf.view(dtype) if end > begin else None)
    pwrite_all(rf.fd, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), rf.base + begin)


def _write_rank_files(jobs: list[tuple[int, Path]], reader: SliceReader, layout: Layout, dtype: torch.dtype,
                      key: _PendingKey, threads: int, durable: bool, progress: bool) -> int:
    """Write several rank files with one pool of threads taking (rank, tensor) pieces.

    Threads pull pieces rather than being handed one task per piece (a submission per piece costs a
    GIL hand-off while the others run), so all cores work to the end whatever the number of ranks.
    A thread takes its next piece from the first file in rank order that no other thread is writing,
    if any: writes to one file serialize on its inode lock (two threads on one file were measured
    slower than one), while different files proceed in parallel. Each file is sealed (key stamped,
    renamed into place) as soon as its last piece is written and the key is known, so a run killed
    mid-way keeps the ranks it finished; files finished while the source is still being hashed are
    sealed when the hashes are in.
    """
    files: list[_RankFile] = []
    waiting: list[_RankFile] = []  # complete, waiting for the key
    try:
        for rank, path in jobs:
            files.append(_open_rank_file(path, layout, rank, dtype))
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
            if key.ready():
                _seal(rf, key.get(), durable)
            else:
                with lock:
                    waiting.append(rf)

        failed = threading.Event()

        def work() -> None:
            while not failed.is_set() and not key.failed():  # a failed hash (a changed source) stops writing too
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
            stamp = key.get()  # waits for the hashes; raises if hashing failed
            for rf in waiting:
                _seal(rf, stamp, durable)
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
    verify: str = "auto",
) -> PreshardStats:
    """Write the rank files for ranks ``start_rank .. start_rank+local_ranks-1`` (all by default).

    Valid files from an earlier (possibly interrupted) run are kept; missing or invalid ones are
    written. Each node of a multi-node job can pre-shard its own ranks into a shared directory, at
    the same time: each rank is locked by its writer (see the module docstring).

    Every source file is hashed whole (sha256, by background threads while the rank files are
    written) unless its hash is known on this host for the file as it is now (``verify="auto"``; an
    earlier run recorded it); ``verify="full"`` hashes them all again.

    ``threads`` (default: one per rank file, up to the usable cores and at most 8) write rank files
    in parallel; more threads than cores or files only contend. A killed process never leaves a
    file that loads (files are renamed into place when complete, and a file whose size or key is off
    is rejected). ``durable=True`` also fsyncs each file before the rename, for power loss; it costs
    a full write to disk, often more than the rest of the work.
    """
    start_time = time.perf_counter()
    if verify not in ("auto", "full"):
        raise ShardwiseError(f"pre-sharding verifies the source with 'auto' or 'full', not {verify!r}")
    config = load_config(model_path)
    torch_dtype = resolve_dtype(dtype, config)
    plan = plan or resolve_plan(config.family)
    source = CheckpointSource(model_path)
    layout = model_layout(model_path, plan=plan, config=config, source=source, mesh=plan.mesh(tp_degree))
    if any(t.fused_part for t in layout.tensors.values()):
        raise ShardwiseError(f"{model_path} stores fused projections (e.g. qkv_proj, gate_up_proj): pre-sharding "
                             "them is not supported yet; they shard on load (run without --save-sharded-checkpoint)")
    ranks = _rank_range(tp_degree, start_rank, local_ranks)
    compiled = Path(compiled_model_path)
    weights = _weights_dir(compiled)
    with contextlib.ExitStack() as stack:  # the locks are held until the manifest is written
        try:
            locked = stack.enter_context(_flocks(
                [weights / f".tp{r}.lock" for r in ranks],
                [f"writing rank {r} (of ranks {ranks[0]}..{ranks[-1]} asked for) in {weights}" for r in ranks]))
        except OSError as exc:
            raise ShardwiseError(f"cannot write in {str(weights)!r}: {exc.strerror or exc}") from None
        return _preshard_locked(source, config, plan, layout, torch_dtype, ranks, compiled, locked, threads,
                                progress, durable, verify, start_time)


def _preshard_locked(source: CheckpointSource, config: ModelConfig, plan: Plan, layout: Layout, dtype: torch.dtype,
                     ranks: range, compiled: Path, locked: bool, threads: int | None, progress: bool, durable: bool,
                     verify: str, start_time: float) -> PreshardStats:
    """``preshard`` once its ranks are locked: what is valid is decided now, not before the wait."""
    weights = compiled / WEIGHTS
    _remove_debris(weights, ranks, locked)
    known = {} if verify == "full" else _trusted_hashes(source.files, _read_manifest_quietly(compiled), weights)

    def make(hashes: dict[Path, tuple[str, list[int]]]) -> dict:
        entries = [{**_header_entry(f), "sha256": hashes[f][0]} for f in source.files]
        identities = {f.name: hashes[f][1] for f in source.files}
        return build_manifest(source, config, plan, layout, dtype, entries, identities)

    key = _PendingKey(source.files, known, make, weights)
    try:
        # Files of an earlier run are kept if they carry the key: wait for it only when there are some.
        earlier = any(rank_file(compiled, r).exists() for r in ranks)
        if key.hashing and earlier:
            log.info("Hashing the source files to tell which rank files of an earlier run are valid")
        stamp = key.get() if earlier or not key.hashing else None
        skipped = [r for r in ranks if stamp is not None and rank_file_valid(rank_file(compiled, r), stamp)]
        written = [r for r in ranks if r not in skipped]
        reader = SliceReader(source)
        t0 = time.perf_counter()
        try:
            if threads is None:  # a thread per file being written, up to the cores (and 8: each holds a buffer)
                threads = _threads_for(len(written))
            nbytes = _write_rank_files([(r, rank_file(compiled, r)) for r in written], reader, layout, dtype,
                                       key, threads or 1, durable, progress)
        finally:
            reader.close()
    finally:
        key.close()
    if written:
        log.info("Wrote %d rank file%s (%.2f GB) in %.2f seconds%s", len(written), "s" * (len(written) > 1),
                 nbytes / 1e9, time.perf_counter() - t0,
                 f"; kept {len(skipped)} valid from an earlier run" if skipped else "")
    with _flocks([weights / ".manifest.lock"], [f"writing the manifest in {weights}"]):
        _copy_side_files(source.path, compiled)
        _atomic_write_text(weights / MANIFEST, json.dumps(key.manifest, indent=1))
    return PreshardStats(time.perf_counter() - start_time, nbytes, written, skipped)


def _rank_range(tp_degree: int, start_rank: int, local_ranks: int | None) -> range:
    local = tp_degree - start_rank if local_ranks is None else local_ranks
    if start_rank < 0 or local < 1 or start_rank + local > tp_degree:
        raise ShardwiseError(f"ranks {start_rank}..{start_rank + local - 1} are not within TP degree {tp_degree} "
                             "(check --start-rank-id and --local-ranks-size)")
    return range(start_rank, start_rank + local)


# ---------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class PreshardedCheck:
    """What checking a pre-sharded checkpoint found: its manifest, what is wrong with it for the request
    (empty: nothing), and the config and layout at the requested TP degree, so loading needs neither
    again."""

    manifest: dict
    problems: list[str]
    config: ModelConfig
    layout: Layout

    @property
    def tp_changed(self) -> bool:
        return any(p.startswith("the TP degree changed") for p in self.problems)


def inspect_presharded(compiled: str | Path, tp_degree: int | None = None, dtype: str | torch.dtype = "auto",
                       model_path: str | Path | None = None, plan: Plan | None = None,
                       verify: str = "auto") -> PreshardedCheck:
    """Check a pre-sharded checkpoint against a request (see ``check_presharded``), keeping the layout."""
    if verify not in VERIFY_LEVELS:
        raise ShardwiseError(f"verify must be one of {', '.join(VERIFY_LEVELS)}, not {verify!r}")
    manifest = read_manifest(compiled)
    if manifest is None:
        raise ShardwiseError(f"no pre-sharded checkpoint at {str(compiled)!r} (run `shardwise shard` first)")
    config = _manifest_config(manifest)
    torch_dtype = resolve_dtype(manifest["dtype"] if dtype == "auto" else dtype, config)
    if model_path is not None and Path(model_path).exists():
        config = load_config(model_path)
        source = CheckpointSource(model_path)
        plan = plan or resolve_plan(config.family)
        layout = model_layout(model_path, plan=plan, config=config, source=source,
                              mesh=_mesh_for(plan, tp_degree, manifest))
        entries = _verified_entries(source.files, manifest, Path(compiled) / WEIGHTS, verify)
        expected = build_manifest(source, config, plan, layout, torch_dtype, entries)
    else:  # no source at hand: check what was asked against what the files were made with
        with _from_manifest(manifest):
            plan = plan or _plan_from_dict(manifest["plan"], config.family)
            tensors = {n: (tuple(s), d) for n, (s, d) in manifest["tensors"].items()}
            layout = compute_layout(tensors, config, plan, _mesh_for(plan, tp_degree, manifest))
        expected = {**manifest, "plan_sha256": _digest(_plan_dict(plan, list(layout.tensors))),
                    "dtype": name_of(torch_dtype),
                    "mesh": {"axes": list(layout.mesh.axis_names), "sizes": list(layout.mesh.axis_sizes)}}
    return PreshardedCheck(manifest, _differences(manifest, expected), config, layout)


def check_presharded(compiled: str | Path, tp_degree: int | None = None, dtype: str | torch.dtype = "auto",
                     model_path: str | Path | None = None, plan: Plan | None = None,
                     verify: str = "auto") -> tuple[dict, list[str]]:
    """The manifest and the list of reasons it cannot be used as is (empty: it can).

    ``tp_degree=None``: the TP degree the files were made for. With ``model_path`` the source is
    compared with what the files were made from, its content checked per ``verify`` (see the module
    docstring: ``"auto"``, ``"full"`` or ``"header"``).
    """
    check = inspect_presharded(compiled, tp_degree, dtype, model_path, plan, verify)
    return check.manifest, check.problems


def require_usable(compiled: str | Path, tp_degree: int | None = None, dtype: str | torch.dtype = "auto",
                   model_path: str | Path | None = None, reshard: bool = False,
                   plan: Plan | None = None, verify: str = "auto") -> tuple[dict, bool]:
    """Refuse a stale or incomplete pre-sharded checkpoint, saying what changed and what to do.

    Returns the manifest and whether the files must be re-sliced for another TP degree
    (``tp_degree=None``: the files' own, never re-sliced). ``verify``: see ``check_presharded``.
    """
    check = require_usable_check(compiled, tp_degree, dtype, model_path, reshard, plan, verify)
    return check.manifest, check.tp_changed


def require_usable_check(compiled: str | Path, tp_degree: int | None = None, dtype: str | torch.dtype = "auto",
                         model_path: str | Path | None = None, reshard: bool = False, plan: Plan | None = None,
                         verify: str = "auto", check: PreshardedCheck | None = None) -> PreshardedCheck:
    """``require_usable``, keeping what the check found (``check``: one already made for this request)."""
    compiled = Path(compiled)
    check = check or inspect_presharded(compiled, tp_degree, dtype, model_path, plan, verify)
    manifest, problems = check.manifest, check.problems
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
    return check


def presharded_layout(manifest: dict, tp_degree: int | None = None) -> tuple[ModelConfig, Layout]:
    """Config and layout of a pre-sharded checkpoint at ``tp_degree`` (None: its own), from its manifest alone."""
    config = _manifest_config(manifest)
    with _from_manifest(manifest):
        tensors = {n: (tuple(s), d) for n, (s, d) in manifest["tensors"].items()}
        plan = _plan_from_dict(manifest["plan"], config.family)
        return config, compute_layout(tensors, config, plan, _mesh_for(plan, tp_degree, manifest))


def load_presharded_state(
    compiled_model_path: str | Path,
    rank: int,
    tp_degree: int | None = None,
    dtype: str | torch.dtype = "auto",
    model_path: str | Path | None = None,
    reshard: bool = False,
    plan: Plan | None = None,
    verify: str = "auto",
    check: PreshardedCheck | None = None,
) -> tuple[dict[str, torch.Tensor], LoadStats]:
    """This rank's state dict from pre-sharded files, refusing stale ones.

    With ``reshard=True``, files made at another TP degree are re-sliced for ``tp_degree`` from the
    rank files alone (no source checkpoint needed); other differences are still refused.
    ``tp_degree=None`` loads at the TP degree the files were made for; ``verify``: see
    ``check_presharded``; ``check``, one ``inspect_presharded`` already made for this request.
    """
    start = time.perf_counter()
    compiled = Path(compiled_model_path)
    check = require_usable_check(compiled, tp_degree, dtype, model_path, reshard, plan, verify, check)
    manifest, tp_changed = check.manifest, check.tp_changed
    old_world = math.prod(manifest["mesh"]["sizes"])
    world = tp_degree if tp_changed and tp_degree is not None else old_world
    if not 0 <= rank < world:
        raise ShardwiseError(f"rank {rank} is not within the pre-sharded checkpoint's {world} ranks")
    torch_dtype = resolve_dtype(manifest["dtype"] if dtype == "auto" else dtype, _manifest_config(manifest))
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
            pread_exact(fd, bytes_of(data), begin)
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
        _check_rank_files(old, readers)
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


def _check_rank_files(layout: Layout, readers: list[SliceReader]) -> None:
    """Each rank file holds the tensors and shapes the manifest's layout gives its rank (the manifest
    is untrusted: its tensor list is not part of the key)."""
    for rank, reader in enumerate(readers):
        found = {n: tuple(t.shape) for n, t in reader.source.tensors.items()}
        expected = {n: tuple(t.shards[rank].local_shape) for n, t in layout.tensors.items() if t.source == n}
        if found != expected:
            raise ShardwiseError(f"{reader.source.files[0]} does not hold the tensors its manifest lists; re-shard")


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
