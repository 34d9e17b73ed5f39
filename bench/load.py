"""Loading benchmark (issue 3): shardwise shard-on-load against its peers, at TP 2, in one run.

    python bench/load.py [--config CONFIG_JSON] [--repeats N] [--modes warm,cold] [--methods a,b,...]

Builds (once, cached under ``${SHARDWISE_BENCH_DIR:-/tmp/shardwise-bench}``) a random bf16 checkpoint
with the exact tensor names and shapes of the model in ``--config`` (default: Llama 3.2 1B), then
measures, with every rank a real process and the files either in the page cache (warm: evicted and
read once with plain sequential reads before each measurement, so that every method starts from the
same page-cache state) or evicted from it (cold):

  shard_on_load   shardwise ``load_rank_state`` (reads only the rank's slices)
  presharded      shardwise ``load_presharded_state`` on files written by ``preshard`` (if available)
  preshard_write  shardwise ``preshard`` from scratch (if available; not a rank method)
  hf_tp           transformers ``from_pretrained(tp_plan="auto")`` under torchrun
  naive           ``safetensors.torch.load_file`` of every file, then slicing (what most scripts do)
  dcp             ``torch.distributed.checkpoint`` ``HuggingFaceStorageReader`` into DTensors

plus the machine's limits (page-cache and cold-disk read bandwidth). Measurements of the methods are
interleaved (repeat 1 of every method, then repeat 2, ...) so that load from other processes on the
machine spreads over all of them. Results: ``bench/results/load.json``, ``docs/benchmarks.md``
(section "Loading (bench/load.py)") and ``docs/load_benchmark.png``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # the worktree's shardwise, not an installed copy

import torch  # noqa: E402

from shardwise.settings import free_port  # noqa: E402

DEFAULT_CONFIG = ROOT / "examples" / "configs" / "llama-3.2-1b" / "config.json"
SECTION = "## Loading (bench/load.py)"
RANK_METHODS = ["shard_on_load", "presharded", "hf_tp", "naive", "dcp"]
DIAGNOSIS_METHODS = ["shard_on_load_hugepages"]  # only when named in --methods
LABELS = {
    "shard_on_load": "shardwise shard-on-load",
    "shard_on_load_hugepages": "shard-on-load, SHARDWISE_HUGEPAGES=1",
    "presharded": "shardwise pre-sharded load",
    "preshard_write": "shardwise pre-shard write",
    "hf_tp": "HF transformers tp_plan=auto",
    "naive": "safetensors load_file + slice",
    "dcp": "torch DCP HuggingFaceStorageReader",
}
GB = 1e9
MiB = 1 << 20

# ----------------------------------------------------------------------------------------------------
# The synthetic checkpoint


def llama_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the checkpoint ``cfg`` implies, as the model's family knows them."""
    from shardwise.config import config_from_dict
    from shardwise.families import state_dict_shapes

    return [(name, shape) for name, (shape, _) in state_dict_shapes(config_from_dict(cfg)).items()]


def build_checkpoint(config_path: Path, out: Path, max_shard_bytes: int = 500_000_000) -> Path:
    """Random bf16 safetensors shards + model.safetensors.index.json, like ``save_pretrained``; cached."""
    from safetensors.torch import save_file

    cfg = json.loads(config_path.read_text())
    marker = out / ".complete"
    if marker.is_file() and marker.read_text() == config_path.read_text():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tensors = llama_tensors(cfg)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    print(f"building a {sum(2 * torch.Size(s).numel() for _, s in tensors) / GB:.2f} GB random bf16 checkpoint "
          f"in {out} ({len(groups)} files)...", flush=True)
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        sd = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                sd[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                sd[name] = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            weight_map[name] = fname
            total += sd[name].numel() * 2
        save_file(sd, str(out / fname), metadata={"format": "pt"})
        del sd
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(config_path.read_text())
    os.sync()
    marker.write_text(config_path.read_text())
    return out


def weight_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------------
# Page cache: residency (mincore), eviction, warming, bandwidth

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_fraction(files: list[Path]) -> float:
    """Fraction of the files' pages that are in the page cache (mincore on a fresh shared mapping)."""
    page = mmap.PAGESIZE
    resident = pages_total = 0
    for f in files:
        size = f.stat().st_size
        if not size:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap failed")
            n = (size + page - 1) // page
            vec = (ctypes.c_ubyte * n)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            _libc.munmap(addr, size)
        finally:
            os.close(fd)
        resident += sum(b & 1 for b in bytes(vec))
        pages_total += n
    return resident / max(1, pages_total)


def evict(files: list[Path]) -> float:
    """Drop the files from the page cache; returns the fraction still resident afterwards."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_fraction(files)


def _read_all(files: list[Path], buf: memoryview, chunk: int = 64 * MiB) -> int:
    """Read files with large readinto calls into a preallocated buffer (one region per file offset)."""
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            pos = 0
            while True:
                n = fh.readinto(buf[pos : pos + chunk])
                if not n:
                    break
                pos += n
            total += pos
    return total


def warm(files: list[Path]) -> float:
    """Put the files in the page cache as a plain sequential read leaves them; returns the resident fraction.

    The files are evicted first, so every warm measurement starts from the same state whatever read
    them last: how pages got into the cache decides their size there (sequential reads bring large
    folios; faults on a mapping, as a cold mapped load makes, often bring 4 KiB pages), and that
    changes what mapping them costs.
    """
    evict(files)
    buf = memoryview(bytearray(64 * MiB))
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return resident_fraction(files)


def _balanced(files: list[Path], streams: int) -> list[list[Path]]:
    """Split ``files`` over ``streams`` with about equal bytes each."""
    parts: list[list[Path]] = [[] for _ in range(streams)]
    loads = [0] * streams
    for f in sorted(files, key=lambda p: -p.stat().st_size):
        i = loads.index(min(loads))
        parts[i].append(f)
        loads[i] += f.stat().st_size
    return parts


def _timed_streams(streams: int, prepare: Callable[[int], Any], work: Callable[[int, Any], int]) -> tuple[float, int]:
    """Run ``work(i, prepared)`` in ``streams`` forked processes started together; (GB/s, bytes).

    Processes, not threads, so that (as for ranks) their page faults do not share one address space.
    ``prepare(i)`` runs in the child before the clock starts; ``work`` returns the bytes it moved.
    A child that fails closes its pipes by exiting, so the parent sees end-of-file and raises
    instead of waiting for it.
    """
    children = []
    for i in range(streams):
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: prepare, signal ready, wait for go, work, report bytes
            code = 1
            try:
                for fd in (ready_r, go_w, done_r):
                    os.close(fd)
                prepared = prepare(i)
                os.write(ready_w, b"r")
                os.read(go_r, 1)
                os.write(done_w, str(work(i, prepared)).encode())
                code = 0
            finally:
                os._exit(code)
        for fd in (ready_w, go_r, done_w):  # the child's ends: EOF on ours once it exits
            os.close(fd)
        children.append((pid, ready_r, go_w, done_r))
    try:
        for _, ready_r, _, _ in children:
            if not os.read(ready_r, 1):
                raise RuntimeError("a bandwidth-measuring child failed while preparing")
        start = time.perf_counter()
        for _, _, go_w, _ in children:
            os.write(go_w, b"g")
        total = 0
        for _, _, _, done_r in children:
            reported = os.read(done_r, 64)
            if not reported:
                raise RuntimeError("a bandwidth-measuring child failed while measuring")
            total += int(reported)
        seconds = time.perf_counter() - start
    finally:
        for pid, *fds in children:
            for fd in fds:
                os.close(fd)  # a child still waiting for "go" reads EOF and exits
            os.waitpid(pid, 0)
    return total / seconds / GB, total


def read_bandwidth(files: list[Path], streams: int, fresh: bool = False) -> tuple[float, int]:
    """GB/s reading ``files`` with ``streams`` processes (like ranks), each into its own pre-touched buffer.

    With ``fresh``, each file goes into newly mapped, untouched memory instead: the page faults of the
    destination then count, as they do for any loader that returns new tensors.
    """
    parts = _balanced(files, streams)
    largest = max(f.stat().st_size for f in files)

    def prepare(i: int):
        return None if fresh else memoryview(bytearray(largest))  # zero-filled: pre-touched

    def work(i: int, buf) -> int:
        total = 0
        for f in parts[i]:
            if fresh:
                dest = mmap.mmap(-1, f.stat().st_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                total += _read_all([f], memoryview(dest))
                dest.close()
            else:
                total += _read_all([f], buf)
        return total

    return _timed_streams(streams, prepare, work)


def machine_sample(files: list[Path]) -> dict:
    """One sample of the machine's limits: page-cache and cold-disk readinto bandwidth, 1 and 2 streams."""
    out: dict = {}
    warm(files)
    for streams in (1, 2):
        out[f"page_cache_gbps_{streams}stream"] = read_bandwidth(files, streams)[0]
    for streams in (1, 2):
        out[f"page_cache_fresh_gbps_{streams}stream"] = read_bandwidth(files, streams, fresh=True)[0]
    for streams in (1, 2):
        out[f"resident_after_evict_{streams}stream"] = evict(files)
        out[f"cold_disk_gbps_{streams}stream"] = read_bandwidth(files, streams)[0]
    return out


def machine_limits(samples: list[dict]) -> dict:
    out: dict = {"cores": os.cpu_count(), "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                          / (1 << 30), 1),
                 "cpu": platform.processor() or platform.machine(), "kernel": platform.release(), "samples": samples}
    for kind in ("page_cache", "page_cache_fresh", "cold_disk"):
        for streams in (1, 2):
            runs = [x[f"{kind}_gbps_{streams}stream"] for x in samples]
            entry = {"median": statistics.median(runs), "runs": runs}
            if kind == "cold_disk":
                entry["resident_after_evict"] = [x[f"resident_after_evict_{streams}stream"] for x in samples]
            out[f"{kind}_gbps_{streams}stream"] = entry
    out["page_cache_gbps"] = max(out["page_cache_gbps_1stream"]["median"], out["page_cache_gbps_2stream"]["median"])
    out["page_cache_fresh_gbps"] = max(out["page_cache_fresh_gbps_1stream"]["median"],
                                       out["page_cache_fresh_gbps_2stream"]["median"])
    out["cold_disk_gbps"] = max(out["cold_disk_gbps_1stream"]["median"], out["cold_disk_gbps_2stream"]["median"])
    return out


# ----------------------------------------------------------------------------------------------------
# Inside a rank


def _proc_status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) * 1024
    return out


def _proc_io() -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}
    except OSError:
        return {}


def _state_bytes(state: dict) -> int:
    """Bytes of distinct storage held (tied weights count once; DTensors count their local shard)."""
    seen, total = set(), 0
    for t in state.values():
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += local.numel() * local.element_size()
    return total


def split_dim(name: str) -> int | None:
    """The dimension the built-in plan splits over ``tensor`` (0 column-parallel and vocab, 1 row-parallel)."""
    from shardwise.plan import TENSOR_AXIS, builtin_plan, spec_axes

    spec = builtin_plan("llama").spec_for(name) or ()
    return next((d for d, e in enumerate(spec) if TENSOR_AXIS in spec_axes(e)), None)


def load_shard_on_load(rank: int, world: int, ckpt: Path, compiled: Path, threads: int) -> tuple[dict, int, dict]:
    from shardwise.checkpoint import CheckpointSource
    from shardwise.conformance import model_layout
    from shardwise.loader import load_rank_state

    source = CheckpointSource(ckpt)
    layout = model_layout(ckpt, world, source=source)
    state, stats = load_rank_state(source, layout, rank, torch.bfloat16, threads)
    return state, stats.bytes_read, {"loadstats_seconds": stats.seconds, "bytes_held": stats.bytes_held,
                                     "bytes_fetched": stats.bytes_fetched, "bytes_mapped": stats.bytes_mapped}


def load_shard_on_load_hugepages(rank: int, world: int, ckpt: Path, compiled: Path,
                                 threads: int) -> tuple[dict, int, dict]:
    """Diagnosis only (``--methods shard_on_load_hugepages``): shard-on-load with SHARDWISE_HUGEPAGES=1."""
    os.environ["SHARDWISE_HUGEPAGES"] = "1"
    try:
        return load_shard_on_load(rank, world, ckpt, compiled, threads)
    finally:
        os.environ.pop("SHARDWISE_HUGEPAGES", None)


def load_presharded(rank: int, world: int, ckpt: Path, compiled: Path, threads: int) -> tuple[dict, int, dict]:
    from shardwise.presharded import load_presharded_state

    state, stats = load_presharded_state(compiled, rank, tp_degree=world, dtype=torch.bfloat16)
    return state, stats.bytes_read, {"loadstats_seconds": stats.seconds, "bytes_held": stats.bytes_held}


def load_naive(rank: int, world: int, ckpt: Path, compiled: Path, threads: int) -> tuple[dict, int, dict]:
    from safetensors.torch import load_file

    state, read = {}, 0
    for f in weight_files(ckpt):
        full = load_file(str(f))
        read += f.stat().st_size
        for name, t in full.items():
            d = split_dim(name)
            state[name] = t.clone() if d is None else t.chunk(world, dim=d)[rank].clone()
        del full
    return state, read, {}


def load_dcp(rank: int, world: int, ckpt: Path, compiled: Path, threads: int) -> tuple[dict, int, dict]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from shardwise.checkpoint import CheckpointSource

    mesh = init_device_mesh("cpu", (world,))
    state, needed = {}, 0
    for name, info in CheckpointSource(ckpt).tensors.items():
        d = split_dim(name)
        shape = list(info.shape)
        if d is not None:
            shape[d] //= world
        local = torch.empty(shape, dtype=torch.bfloat16)
        needed += local.numel() * 2
        state[name] = DTensor.from_local(local, mesh, [Replicate() if d is None else Shard(d)], run_check=False)
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt), thread_count=threads))
    return state, needed, {"thread_count": threads}


def load_hf(rank: int, world: int, ckpt: Path, compiled: Path, threads: int) -> tuple[dict, int, dict]:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), tp_plan="auto", dtype=torch.bfloat16)
    returned = time.perf_counter() - t0
    state = dict(model.state_dict())
    # On CPU, from_pretrained leaves most weights as views of the mmapped files: their bytes are read
    # on first use. Touch one element per page so that, as for the other methods, the weights are in
    # memory when the clock stops (cold, this is when they come from disk).
    file_backed = _proc_status().get("RssFile", 0)
    for t in state.values():
        local = t.to_local() if hasattr(t, "to_local") else t
        flat = local.detach().reshape(-1)
        step = max(1, 4096 // max(1, flat.element_size()))
        if flat.numel():
            flat[::step].float().sum()
    return state, -1, {"model": model, "from_pretrained_s": returned, "rss_file_after_from_pretrained": file_backed}


# Imported before the timed region, so that no method is charged for importing its library.
PREIMPORT = {
    "shard_on_load": ["shardwise.checkpoint", "shardwise.sharded_model", "shardwise.loader"],
    "shard_on_load_hugepages": ["shardwise.checkpoint", "shardwise.sharded_model", "shardwise.loader"],
    "presharded": ["shardwise.presharded"],
    "naive": ["safetensors.torch"],
    "dcp": ["torch.distributed.checkpoint", "torch.distributed.device_mesh", "torch.distributed.tensor",
            "shardwise.checkpoint"],
    "hf_tp": ["transformers", "transformers.models.llama.modeling_llama"],
}

LOADERS = {"shard_on_load": load_shard_on_load,
           "shard_on_load_hugepages": load_shard_on_load_hugepages,
           "presharded": load_presharded, "naive": load_naive,
           "dcp": load_dcp, "hf_tp": load_hf}


def rank_measure(rank: int, world: int, method: str, ckpt: str, compiled: str, out_dir: str, threads: int) -> None:
    """Runs in every rank process: time one load (ranks start together) and record the rank's costs."""
    import importlib

    import torch.distributed as dist

    for module in PREIMPORT.get(method, []):
        importlib.import_module(module)
    if method == "hf_tp":
        from transformers import AutoModelForCausalLM  # noqa: F401  (resolves the lazy attribute)
    before_status, before_io, before_ru = _proc_status(), _proc_io(), resource.getrusage(resource.RUSAGE_SELF)
    dist.barrier()
    start = time.perf_counter()
    state, logical, extra = LOADERS[method](rank, world, Path(ckpt), Path(compiled), threads)
    seconds = time.perf_counter() - start
    after_ru, after_io = resource.getrusage(resource.RUSAGE_SELF), _proc_io()
    status = _proc_status()
    extra.pop("model", None)
    rec = {
        "rank": rank, "seconds": seconds, "bytes_logical": logical, "bytes_held": _state_bytes(state),
        "peak_rss": max(status.get("VmHWM", 0), after_ru.ru_maxrss * 1024), "rss_before": before_status.get("VmRSS"),
        "rss_after": status.get("VmRSS"), "rss_file_after": status.get("RssFile"),
        "disk_read_bytes": after_io.get("read_bytes", 0) - before_io.get("read_bytes", 0),
        "rchar": after_io.get("rchar", 0) - before_io.get("rchar", 0),
        "user_s": after_ru.ru_utime - before_ru.ru_utime, "sys_s": after_ru.ru_stime - before_ru.ru_stime,
        "minflt": after_ru.ru_minflt - before_ru.ru_minflt, "majflt": after_ru.ru_majflt - before_ru.ru_majflt,
        "torch_threads": torch.get_num_threads(), **extra,
    }
    del state
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rec))
    dist.barrier()


def torchrun_entry(args: argparse.Namespace) -> None:
    """``bench/load.py _rank ...`` under torchrun (the HF path needs torchrun's environment)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank_measure(dist.get_rank(), dist.get_world_size(), args.method, args.ckpt, args.compiled, args.out_dir,
                     args.threads)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Orchestration


def presharded_available() -> str | None:
    try:
        import shardwise.presharded as ps  # noqa: F401

        ps.load_presharded_state, ps.preshard  # noqa: B018
    except (ImportError, AttributeError) as exc:
        return f"not available: shardwise.presharded cannot be used ({type(exc).__name__}: {exc})"
    return None


def run_ranks(method: str, world: int, ckpt: Path, compiled: Path, threads: int, timeout: int = 600) -> dict:
    """One measurement: fresh rank processes, so that peak RSS and first-load costs are per load."""
    with tempfile.TemporaryDirectory(prefix="shardwise-bench-") as out_dir:
        env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}",
                   OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)), HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        script = [str(Path(__file__).resolve()), "_rank", "--method", method, "--ckpt", str(ckpt), "--compiled",
                  str(compiled), "--out-dir", out_dir, "--threads", str(threads), "--world", str(world)]
        start = time.perf_counter()
        if method == "hf_tp":  # transformers' TP wants torchrun
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                   "--master-port", str(free_port()), *script]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return {"error": f"timed out after {timeout} s"}
            rc, text = proc.returncode, proc.stderr + proc.stdout
        else:  # the rank processes themselves, with torchrun's variables: shardwise.parallel.launch's torchrun path
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
                       LOCAL_WORLD_SIZE=str(world))
            logs = [tempfile.TemporaryFile(mode="w+") for _ in range(world)]
            procs = [subprocess.Popen([sys.executable, *script, "--launch"], env=dict(env, RANK=str(r),
                                      LOCAL_RANK=str(r)), stdout=logs[r], stderr=subprocess.STDOUT, text=True)
                     for r in range(world)]
            deadline, rc = time.monotonic() + timeout, 0
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                    time.sleep(2 if time.monotonic() <= deadline else 0)
                    for p in procs:  # our own children, by handle
                        if p.poll() is None:
                            p.kill()
                    break
                time.sleep(0.05)
            rc = max(abs(p.wait()) for p in procs)
            text = ""
            for f in logs:
                f.seek(0)
                text += f.read()
                f.close()
        wall = time.perf_counter() - start
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]
        if rc != 0 or len(ranks) != world:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            errs = [ln for ln in lines if "Error" in ln or "error" in ln]
            return {"error": (errs[-1] if errs else (lines[-1] if lines else f"exit {rc}"))[:500],
                    "stderr_tail": "\n".join(lines[-40:])}
        return {"seconds": max(r["seconds"] for r in ranks), "process_wall_s": wall, "ranks": ranks}


def launch_entry(args: argparse.Namespace) -> None:
    from shardwise.parallel.launch import launch

    launch(rank_measure, args.world, (args.method, args.ckpt, args.compiled, args.out_dir, args.threads))


def measure_preshard(ckpt: Path, compiled: Path, world: int) -> dict:
    """``preshard`` from scratch in a fresh process (output deleted first), warm source."""
    shutil.rmtree(compiled, ignore_errors=True)
    code = (
        "import json, resource, sys, time\n"
        f"sys.path.insert(0, {str(ROOT / 'src')!r})\n"
        "from shardwise.presharded import preshard\n"
        "t = time.perf_counter()\n"
        f"s = preshard({str(ckpt)!r}, {str(compiled)!r}, tp_degree={world}, dtype='bfloat16')\n"
        "w = time.perf_counter() - t\n"
        "print(json.dumps(dict(seconds=s.seconds, wall_s=w, bytes_written=s.bytes_written,\n"
        "    ranks_written=list(s.ranks_written) if s.ranks_written is not None else None,\n"
        "    ranks_skipped=list(s.ranks_skipped) if s.ranks_skipped is not None else None,\n"
        "    peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return {"error": (lines[-1] if lines else f"exit {proc.returncode}")[:500]}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["seconds_measured"] = max(rec["seconds"], 0.0)
    return rec


def needed_bytes(ckpt: Path, world: int) -> dict:
    """Source bytes each rank must read (its slices, padding excluded), from shardwise's layout."""
    from shardwise.checkpoint import CheckpointSource
    from shardwise.conformance import model_layout

    source = CheckpointSource(ckpt)
    layout = model_layout(ckpt, world, source=source)
    per_rank = []
    for r in range(world):
        total = 0
        for name, t in layout.tensors.items():
            if t.source == name:
                total += t.shards[r].source_numel * source.tensors[name].itemsize
        per_rank.append(total)
    return {"per_rank": per_rank, "node": sum(per_rank), "checkpoint": source.total_bytes,
            "files": sum(f.stat().st_size for f in weight_files(ckpt))}


def summarize(runs: list[dict], need: dict, world: int) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"status": "failed", "error": runs[0].get("error") if runs else "not run",
                "stderr_tail": runs[0].get("stderr_tail", "") if runs else ""}
    secs = [r["seconds"] for r in ok]
    med = statistics.median(secs)

    def per_rank(key: str) -> list:
        return [statistics.median(r["ranks"][i][key] for r in ok) for i in range(world)]

    out = {
        "status": "ok", "seconds": med, "seconds_runs": secs, "gbps": need["node"] / med / GB,
        "peak_rss_per_rank": [max(r["ranks"][i]["peak_rss"] for r in ok) for i in range(world)],
        "rss_before_per_rank": per_rank("rss_before"),
        "bytes_logical_per_rank": per_rank("bytes_logical"), "bytes_held_per_rank": per_rank("bytes_held"),
        "disk_read_bytes_per_rank": per_rank("disk_read_bytes"), "rchar_per_rank": per_rank("rchar"),
        "user_s_per_rank": per_rank("user_s"), "sys_s_per_rank": per_rank("sys_s"),
        "minflt_per_rank": per_rank("minflt"), "majflt_per_rank": per_rank("majflt"),
        "process_wall_s": statistics.median(r["process_wall_s"] for r in ok),
        "failed_runs": [r["error"] for r in runs if "error" in r],
    }
    out["disk_read_bytes_node"] = sum(out["disk_read_bytes_per_rank"])
    if all("bytes_mapped" in rank for r in ok for rank in r["ranks"]):
        out["bytes_mapped_per_rank"] = per_rank("bytes_mapped")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="HF config.json of the model to mimic")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per method and mode (median reported)")
    ap.add_argument("--modes", default="warm,cold", help="warm, cold or both")
    ap.add_argument("--methods", default=",".join(RANK_METHODS + ["preshard_write"]))
    ap.add_argument("--tp", type=int, default=2, help="TP degree (ranks, all on this node)")
    ap.add_argument("--threads", type=int, default=4, help="reader threads for shardwise and DCP (shardwise default)")
    ap.add_argument("--bench-dir", type=Path,
                    default=Path(os.environ.get("SHARDWISE_BENCH_DIR", "/tmp/shardwise-bench")))
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "load.json")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--chart", type=Path, default=ROOT / "docs" / "load_benchmark.png")
    ap.add_argument("--no-docs", action="store_true", help="write the JSON only")
    ap.add_argument("--from-json", type=Path, help="only re-render docs and chart from a saved results JSON "
                    "(its ratios and targets are recomputed and saved back)")
    args = ap.parse_args(argv)
    if not args.no_docs:
        try:
            import matplotlib  # noqa: F401  (checked now: the chart is drawn only after minutes of measuring)
        except ImportError:
            print("bench/load.py draws its chart with matplotlib: pip install matplotlib (or pass --no-docs)",
                  file=sys.stderr)
            return 2
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        modes = [m for m in ("warm", "cold") if m in results["ratios"]]
        results["ratios"], results["targets"] = ratios_and_targets(results, modes)  # this version's rules
        args.from_json.write_text(json.dumps(results, indent=2, default=str))
        if args.no_docs:
            print(render_section(results, modes, args.chart, args.docs))
            return 0
        write_chart(results, modes, args.chart)
        write_docs(results, modes, args.docs, args.chart)
        print(f"wrote {args.docs} and {args.chart} from {args.from_json}")
        return 0

    t_start = time.perf_counter()
    name = args.config.parent.name if args.config.name == "config.json" else args.config.stem
    ckpt = build_checkpoint(args.config, args.bench_dir / name)
    compiled = args.bench_dir / f"{name}-tp{args.tp}-presharded"
    files = weight_files(ckpt)
    need = needed_bytes(ckpt, args.tp)
    modes = [m for m in args.modes.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    print(f"checkpoint {ckpt}: {need['files'] / GB:.2f} GB in {len(files)} files; each rank needs "
          f"{[round(b / GB, 3) for b in need['per_rank']]} GB", flush=True)

    unavailable = presharded_available()
    results: dict = {"needed_bytes": need, "tp": args.tp, "threads": args.threads,
                     "config": str(args.config), "checkpoint": str(ckpt), "repeats": args.repeats,
                     "torch": torch.__version__, "methods": {}, "date_utc": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime())}
    try:
        import safetensors
        import transformers

        results["transformers"], results["safetensors"] = transformers.__version__, safetensors.__version__
    except ImportError:
        pass
    for m in ("presharded", "preshard_write"):
        if m in methods and unavailable:
            results["methods"][m] = {"status": "skipped", "error": unavailable}
            print(f"{m}: {unavailable}", flush=True)

    do_preshard = "preshard_write" in methods and not unavailable
    if "presharded" in methods and not unavailable and not do_preshard and not (compiled / "weights").is_dir():
        measure_preshard(ckpt, compiled, args.tp)
    preshard_runs: list[dict] = []

    rank_methods = [m for m in RANK_METHODS + DIAGNOSIS_METHODS if m in methods and m not in results["methods"]]
    raw: dict[str, dict[str, list]] = {m: {mode: [] for mode in modes} for m in rank_methods}
    samples = []
    for rep in range(args.repeats):
        samples.append(machine_sample(files))  # the machine's limits, measured between the methods
        print(f"  [{rep + 1}/{args.repeats}] machine: " + ", ".join(f"{k} {v:.2f}" for k, v in samples[-1].items()),
              flush=True)
        if do_preshard:  # (c) from scratch, warm source; also writes the files that (b) loads next
            warm(files)
            preshard_runs.append(measure_preshard(ckpt, compiled, args.tp))
            os.sync()  # its files reach the disk now, not during the next method's measurement
            shown = (f"{preshard_runs[-1]['seconds']:.2f} s" if "error" not in preshard_runs[-1]
                     else f"FAILED: {preshard_runs[-1]['error']}")
            print(f"  [{rep + 1}/{args.repeats}] warm preshard_write  {shown}", flush=True)
        pre_files = sorted((compiled / "weights").glob("*.safetensors")) if compiled.is_dir() else []
        for mode in modes:
            for m in rank_methods:
                fs = pre_files if m == "presharded" else files
                if mode == "cold":
                    os.sync()
                    left = evict(fs)
                else:
                    left = warm(fs)
                rec = run_ranks(m, args.tp, ckpt, compiled, args.threads)
                rec["resident_before"] = left
                raw[m][mode].append(rec)
                shown = f"{rec['seconds']:.2f} s" if "error" not in rec else f"FAILED: {rec['error']}"
                print(f"  [{rep + 1}/{args.repeats}] {mode:4s} {m:14s} {shown} (resident before {left:.0%}, "
                      f"{time.perf_counter() - t_start:.0f} s elapsed)", flush=True)
            # a method that fails the same way every time need not be retried
            for m in list(rank_methods):
                if all("error" in r for md in modes for r in raw[m][md]) and rep == 0:
                    rank_methods.remove(m)
    results["machine"] = machine_limits(samples)
    if do_preshard:
        ok = [r for r in preshard_runs if "error" not in r]
        if ok:
            secs = [r["seconds"] for r in ok]
            results["methods"]["preshard_write"] = {"status": "ok", "seconds": statistics.median(secs),
                                                    "seconds_runs": secs, "runs": preshard_runs}
        else:
            results["methods"]["preshard_write"] = {"status": "failed", "error": preshard_runs[0]["error"]}
    for m in raw:
        results["methods"][m] = {mode: summarize(raw[m][mode], need, args.tp) for mode in modes}
        for mode in modes:
            results["methods"][m][mode]["raw"] = raw[m][mode]
    results["ratios"], results["targets"] = ratios_and_targets(results, modes)
    results["total_seconds"] = time.perf_counter() - t_start

    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.results}", flush=True)
    if not args.no_docs:
        write_chart(results, modes, args.chart)
        write_docs(results, modes, args.docs, args.chart)
        print(f"wrote {args.docs} and {args.chart}", flush=True)
    print(render_section(results, modes, args.chart, args.docs))
    return 0


# ----------------------------------------------------------------------------------------------------
# Ratios, targets, report


def _get(results: dict, method: str, mode: str, key: str = "seconds"):
    m = results["methods"].get(method, {})
    if mode:
        m = m.get(mode, {})
    return m.get(key) if m.get("status") == "ok" else None


def machine_floors(results: dict) -> dict:
    """What shard-on-load and the pre-shard writer must put in new memory, timed at this machine's rate.

    Shard-on-load maps whole-row slices but must copy column slices (row-parallel weights) into new
    memory, or break the RSS bound by mapping whole rows; a pre-shard must create a new page-cache page
    for every byte it writes. The rate is ``page_cache_fresh_gbps`` (readinto into untouched memory,
    faults and copy included), one sample per repeat. For shard-on-load this is a floor estimate; for
    the writer only an estimate (a page written whole needs no zeroing, and the rate moves with what
    the machine has just freed). They show which targets the machine allows: with both at their
    estimates, the pre-shard's end-to-end ratio is bytes written / bytes copied, whatever the rate.
    """
    mach = results["machine"]
    fresh = mach["page_cache_fresh_gbps"]
    out: dict = {}
    sol = results["methods"].get("shard_on_load", {}).get("warm", {})
    copied = None
    if sol.get("status") == "ok" and "bytes_mapped_per_rank" in sol:
        copied = sum(h - m for h, m in zip(sol["bytes_held_per_rank"], sol["bytes_mapped_per_rank"]))
    if copied:  # nothing copied (everything mapped): no floor from new memory
        floor = copied / GB / fresh
        out["shard_on_load copied bytes (node)"] = copied
        out["shard_on_load floor s (copied bytes / fresh-memory GB/s)"] = floor
        out["shard_on_load_s / its floor"] = sol["seconds"] / floor
        out["allowed by the floor estimate: shard_on_load GB/s / page-cache GB/s"] = (
            results["needed_bytes"]["node"] / floor / GB / mach["page_cache_gbps"])
        hf = _get(results, "hf_tp", "warm")
        if hf:
            out["allowed by the floor estimate: hf_tp_s / shard_on_load_s"] = hf / floor
    pw = results["methods"].get("preshard_write", {})
    written = [r["bytes_written"] for r in pw.get("runs", []) if r.get("bytes_written")]
    if pw.get("status") == "ok" and written:
        written = statistics.median(written)
        estimate = written / GB / fresh
        out["preshard_write estimate s (bytes written / fresh-memory GB/s)"] = estimate
        out["preshard_write_s / its estimate"] = pw["seconds"] / estimate
        if sol.get("status") == "ok":
            out["write estimate / shard_on_load_s"] = estimate / sol["seconds"]
        if copied:
            out["with both at their estimates: (preshard_write_s + presharded_s) / "
                "shard_on_load_s"] = written / copied
    return out


def ratios_and_targets(results: dict, modes: list[str]) -> tuple[dict, list[dict]]:
    ratios: dict = {}
    pc = results["machine"]["page_cache_gbps"]
    disk = results["machine"]["cold_disk_gbps"]
    fresh = results["machine"]["page_cache_fresh_gbps"]
    for mode in modes:
        ours = _get(results, "shard_on_load", mode)
        r: dict = {}
        if ours:
            for peer in ("hf_tp", "naive", "dcp", "presharded", *DIAGNOSIS_METHODS):
                s = _get(results, peer, mode)
                if s:
                    r[f"{peer}_s / shard_on_load_s"] = s / ours
            gbps = _get(results, "shard_on_load", mode, "gbps")
            if mode == "warm":
                r["shard_on_load GB/s / page-cache GB/s"] = gbps / pc
                r["shard_on_load GB/s / page-cache-into-fresh-memory GB/s"] = gbps / fresh
            if mode == "cold":
                r["shard_on_load GB/s / cold-disk GB/s"] = gbps / disk
            pw = _get(results, "preshard_write", "")
            if pw:
                r["preshard_write_s / shard_on_load_s"] = pw / ours
                pl = _get(results, "presharded", mode)
                if pl:
                    r["(preshard_write_s + presharded_s) / shard_on_load_s"] = (pw + pl) / ours
        ratios[mode] = r

    floors = machine_floors(results)
    ratios["floors"] = floors
    targets = []

    def add(name: str, value, limit, ok, how: str) -> None:
        targets.append({"target": name, "value": value, "limit": limit,
                        "met": None if value is None else bool(ok), "how": how})

    w, c = ratios.get("warm", {}), ratios.get("cold", {})
    v = w.get("shard_on_load GB/s / page-cache GB/s")
    vf = w.get("shard_on_load GB/s / page-cache-into-fresh-memory GB/s")
    add("warm shard-on-load >= 80% of page-cache bandwidth", v, 0.8, v is not None and v >= 0.8,
        "node GB/s (bytes both ranks need / slowest rank s) / best page-cache readinto GB/s (pre-touched "
        f"buffer); against readinto into fresh memory: {_fmt(vf)}; allowed by the floor estimate (floors "
        f"below): {_fmt(floors.get('allowed by the floor estimate: shard_on_load GB/s / page-cache GB/s'))}")
    v = w.get("hf_tp_s / shard_on_load_s")
    add("warm shard-on-load >= 3x HF transformers", v, 3.0, v is not None and v >= 3.0,
        "HF from_pretrained(tp_plan=auto) s / shard-on-load s, slowest rank, warm; allowed by the floor "
        f"estimate (floors below): {_fmt(floors.get('allowed by the floor estimate: hf_tp_s / shard_on_load_s'))}")
    need = results["needed_bytes"]
    for mode in modes:
        sol = results["methods"].get("shard_on_load", {}).get(mode, {})
        if sol.get("status") == "ok":
            v = sum(sol["bytes_logical_per_rank"]) / need["node"]
            add(f"bytes read <= 1.1x needed ({mode}, LoadStats.bytes_read)", v, 1.1, v <= 1.1,
                "sum of LoadStats.bytes_read over ranks / sum of the ranks' slice bytes")
            if mode == "cold":
                v = sol["disk_read_bytes_node"] / need["node"]
                add("bytes read <= 1.1x needed (cold, from disk)", v, 1.1, v <= 1.1,
                    "sum over ranks of /proc/self/io read_bytes / sum of the ranks' slice bytes "
                    "(on one node the ranks together need the whole checkpoint)")
    for mode, r in (("warm", w), ("cold", c)):
        if mode not in modes:
            continue
        v = r.get("(preshard_write_s + presharded_s) / shard_on_load_s")
        est = floors.get("write estimate / shard_on_load_s") if mode == "warm" else None
        ran = floors.get("preshard_write_s / its estimate")
        add(f"pre-shard end to end (write + load) <= 2x shard-on-load ({mode})", v, 2.0,
            v is not None and v <= 2.0, "(preshard write s + pre-sharded load s) / shard-on-load s"
            + (f"; writing at the fresh-memory rate alone would take {est:.2f}x this shard-on-load time (the "
               f"writer ran at {ran:.2f}x that estimate)" if est and ran else ""))
        v = r.get("presharded_s / shard_on_load_s")
        add(f"pre-sharded load no slower than shard-on-load ({mode})", v, 1.0, v is not None and v <= 1.0,
            "pre-sharded load s / shard-on-load s")
    for mode in modes:
        sol = results["methods"].get("shard_on_load", {}).get(mode, {})
        if sol.get("status") == "ok":
            worst = max((p - (h * 1.1 + 256 * MiB)) / MiB for p, h in
                        zip(sol["peak_rss_per_rank"], sol["bytes_held_per_rank"]))
            v = max(p / (h * 1.1 + 256 * MiB) for p, h in zip(sol["peak_rss_per_rank"], sol["bytes_held_per_rank"]))
            add(f"peak RSS per rank <= shard + 10% + 256 MB ({mode})", v, 1.0, v <= 1.0,
                f"max over ranks of VmHWM / (shard bytes x 1.1 + 256 MiB); worst margin {worst:+.0f} MiB")
    return ratios, targets


def _fmt(v, spec: str = ".2f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def render_section(results: dict, modes: list[str], chart: Path, docs: Path) -> str:
    mach, need = results["machine"], results["needed_bytes"]
    left = max(x for k in ("cold_disk_gbps_1stream", "cold_disk_gbps_2stream") for x in mach[k]["resident_after_evict"])
    lines = [SECTION, ""]
    lines.append(
        f"Measured {results['date_utc']} by `python bench/load.py --repeats {results['repeats']}` (median; "
        f"raw data in `bench/results/load.json`). Synthetic checkpoint with the tensor names and shapes of "
        f"`{Path(results['config']).parent.name}` (random bf16, {need['files'] / GB:.2f} GB in "
        f"{len(weight_files(Path(results['checkpoint'])))} safetensors files with an index), TP {results['tp']}: "
        f"{results['tp']} rank processes on this node; each rank needs "
        f"{', '.join(f'{b / GB:.3f}' for b in need['per_rank'])} GB of it (its slices; tied `lm_head` not stored). "
        f"torch {results['torch']}, transformers {results.get('transformers', '?')}, "
        f"safetensors {results.get('safetensors', '?')}; shardwise and DCP read with {results['threads']} threads.")
    lines.append("")
    lines.append(
        f"**Machine**: {mach['cores']} cores, {mach['ram_gib']} GiB RAM, kernel {mach['kernel']}. "
        f"Page-cache read bandwidth (large `readinto` into a pre-touched buffer; median of one sample per "
        f"repeat, taken between the methods): "
        f"{mach['page_cache_gbps_1stream']['median']:.2f} GB/s with 1 stream, "
        f"{mach['page_cache_gbps_2stream']['median']:.2f} GB/s with 2; into fresh, untouched memory (the "
        f"destination's page faults included, as for any loader that returns new tensors): "
        f"{mach['page_cache_fresh_gbps_1stream']['median']:.2f} GB/s with 1 stream, "
        f"{mach['page_cache_fresh_gbps_2stream']['median']:.2f} GB/s with 2. "
        f"Cold-disk read bandwidth after `posix_fadvise(DONTNEED)` (eviction verified with `mincore`: "
        f"{left:.1%} of pages left resident): "
        f"{mach['cold_disk_gbps_1stream']['median']:.2f} GB/s with 1 stream, "
        f"{mach['cold_disk_gbps_2stream']['median']:.2f} GB/s with 2. "
        "Other processes share these cores, so absolute times are noisy; every figure below was measured in "
        "the same run as its peers, with the methods interleaved, and the ratios are what to read.")
    lines.append("")
    rel = os.path.relpath(chart, docs.parent)
    lines.append(f"![Load time per method, warm and cold]({rel})")
    lines.append("")
    lines.append("| method | mode | seconds (slowest rank) | GB/s (needed bytes) | vs shard-on-load | "
                 "peak RSS per rank (GiB) | RSS before load (GiB) | bytes read per rank (GB) | "
                 "disk reads per rank (GB) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for m in RANK_METHODS[:1] + DIAGNOSIS_METHODS + RANK_METHODS[1:]:
        entry = results["methods"].get(m)
        if entry is None:
            continue
        if entry.get("status") in ("skipped", "failed"):
            lines.append(f"| {LABELS[m]} | - | {entry['status']}: {entry['error']} | | | | | | |")
            continue
        for mode in modes:
            e = entry.get(mode, {})
            if e.get("status") != "ok":
                err = str(e.get("error", "not run")).replace("|", "/")
                lines.append(f"| {LABELS[m]} | {mode} | failed: {err} | | | | | | |")
                continue
            ours = _get(results, "shard_on_load", mode)
            rel_s = f"{e['seconds'] / ours:.2f}x" if ours else "n/a"
            logical = e["bytes_logical_per_rank"]
            logical_s = "n/a" if min(logical) < 0 else ", ".join(f"{b / GB:.2f}" for b in logical)
            disk = ", ".join(f"{b / GB:.2f}" for b in e["disk_read_bytes_per_rank"]) if mode == "cold" else "-"
            lines.append(
                f"| {LABELS[m]} | {mode} | {e['seconds']:.2f} ({', '.join(f'{s:.2f}' for s in e['seconds_runs'])}) | "
                f"{e['gbps']:.2f} | {rel_s} | {', '.join(f'{b / (1 << 30):.2f}' for b in e['peak_rss_per_rank'])} | "
                f"{', '.join(f'{b / (1 << 30):.2f}' for b in e['rss_before_per_rank'])} | {logical_s} | {disk} |")
    pw = results["methods"].get("preshard_write")
    if pw:
        if pw.get("status") == "ok":
            lines.append(f"| {LABELS['preshard_write']} | warm source | {pw['seconds']:.2f} "
                         f"({', '.join(f'{s:.2f}' for s in pw['seconds_runs'])}) | | | "
                         f"{pw['runs'][0]['peak_rss'] / (1 << 30):.2f} (one process) | | | |")
        else:
            lines.append(f"| {LABELS['preshard_write']} | - | {pw['status']}: {pw['error']} | | | | | | |")
    lines.append("")
    lines.append(
        "Warm: before each measurement the files are evicted and read once with plain sequential reads, so "
        "every method starts from the same page-cache state (how pages got into the cache decides their size "
        "there, and so what mapping them costs). "
        "Seconds: time inside each rank from a barrier to its state dict (or model) being ready; the slowest "
                 "rank counts. GB/s: bytes the ranks need (their slices) / seconds. Bytes read: shardwise "
                 "`LoadStats.bytes_read`; `load_file` reads whole files; DCP reads its slices; HF n/a. Disk reads: "
                 "`/proc/self/io` `read_bytes` (cold runs; page cache is shared, so a page one rank fetched is free "
                 "for the other). `load_file` + slice and DCP split column-parallel weights (and the embedding) "
                 "on dim 0 and row-parallel ones on dim 1: the same slices as shardwise's layout for this model "
                 "at TP 2 (checked equal for `load_file`). Each method's libraries are imported before the timed "
                 "region; HF's time includes building its model inside `from_pretrained`, as its users pay it, and "
                 "a pass touching one element per page of its weights, because on CPU `from_pretrained` leaves "
                 "most of them as views of the mmapped files, read only on first use (see `from_pretrained_s` "
                 "in the JSON for the time without that pass). "
                 "Peak RSS: `VmHWM` of each rank process, which includes the process "
                 "before loading (interpreter, torch, gloo: the RSS-before column) and file pages mapped while "
                 "loading.")
    lines.append("")
    lines.append("**Ratios**")
    lines.append("")
    for mode in modes:
        for k, v in results["ratios"].get(mode, {}).items():
            lines.append(f"- {mode}: {k} = {v:.2f}")
    lines.append("")
    floors = results["ratios"].get("floors", {})
    if floors:
        lines.append("**Floors and estimates** (this run's bytes at its fresh-memory rate; see `machine_floors` in "
                     "bench/load.py)")
        lines.append("")
        for k, v in floors.items():
            lines.append(f"- {k} = {v / GB:.3f} GB" if k.endswith("bytes (node)") else f"- {k} = {v:.2f}")
        lines.append("")
    lines.append("**Targets**")
    lines.append("")
    lines.append("| target | measured | met |")
    lines.append("|---|---|---|")
    for t in results["targets"]:
        met = "not measured" if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"| {t['target']} | {_fmt(t['value'])} (limit {t['limit']}; {t['how']}) | {met} |")
    lines.append("")
    return "\n".join(lines)


def write_docs(results: dict, modes: list[str], docs: Path, chart: Path) -> None:
    section = render_section(results, modes, chart, docs)
    text = docs.read_text() if docs.is_file() else "# Benchmarks\n\n"
    start = text.find(SECTION)
    if start >= 0:
        nxt = text.find("\n## ", start + len(SECTION))
        rest = text[nxt + 1 :] if nxt >= 0 else ""
        text = text[:start] + section + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    docs.write_text(text.rstrip("\n") + "\n")


def write_chart(results: dict, modes: list[str], chart: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in RANK_METHODS[:1] + DIAGNOSIS_METHODS + RANK_METHODS[1:]
               if any(_get(results, m, mode) for mode in modes)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        vals = [_get(results, m, mode) or 0 for m in methods]
        bars = ax.bar([x + i * width for x in range(len(methods))], vals, width, label=mode)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    pw = _get(results, "preshard_write", "")
    if pw:
        ax.axhline(pw, color="grey", ls=":", lw=1, label=f"pre-shard write {pw:.2f} s")
    need = results["needed_bytes"]["node"]
    pc = need / results["machine"]["page_cache_gbps"] / GB
    ax.axhline(pc, color="green", ls="--", lw=1, label=f"page-cache limit {pc:.2f} s")
    disk = need / results["machine"]["cold_disk_gbps"] / GB
    ax.axhline(disk, color="red", ls="--", lw=1, label=f"cold-disk limit {disk:.2f} s")
    ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(methods))])
    ax.set_xticklabels([LABELS[m].replace(" ", "\n", 2) for m in methods], fontsize=8)
    ax.set_ylabel("seconds, slowest rank (lower is better)")
    ax.set_title(f"Loading {Path(results['config']).parent.name} at TP {results['tp']} "
                 f"({need / GB:.2f} GB needed by the node)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    chart.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(chart, dpi=110)
    plt.close(fig)


def _rank_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--compiled", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--launch", action="store_true", help="this process is one rank: shardwise.parallel.launch")
    args = ap.parse_args(argv)
    if args.launch:
        launch_entry(args)
    else:
        torchrun_entry(args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_rank":
        _rank_main(sys.argv[2:])
    else:
        sys.exit(main())
