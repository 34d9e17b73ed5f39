"""Where does one rank's shard-on-load time go? (diagnosis for issue 3)

    python bench/profile_load.py [--rank 0] [--tp 2] [--repeats 3] [--modes warm,cold]

Loads one rank's shard of the benchmark checkpoint (built by ``bench/load.py``) in this process with
shardwise's ``load_rank_state`` and with variants that isolate one cost each, interleaved and repeated:

  shardwise            load_rank_state as shipped (threads 4 and 1)
  by kind              the same reader, column-parallel / row-parallel / replicated tensors timed apart
  pread [+ arena]      os.preadv straight into the destination (column slices: one call per chunk of rows),
                       row-parallel weights: pread whole row chunks into a reused buffer + strided copy;
                       optionally all outputs carved from one MADV_HUGEPAGE arena
  first touch          torch.empty + fill of the rank's bytes: the destination page faults alone
                       (and the same with a MADV_HUGEPAGE destination: 2 MiB faults instead of 4 KiB)
  readinto limit       readinto of exactly the rank's byte ranges into a pre-touched buffer

Each line: wall s, user s, sys s, minor faults, GB/s of the rank's bytes. Results: bench/results/profile.json.
(The stored profile.json was measured at commit 0842562, with two more variants, a read-only mapping
and an arena without MADV_HUGEPAGE, that are what shardwise itself does since.)
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import load as bench  # noqa: E402
import torch  # noqa: E402

from shardwise.checkpoint import CheckpointSource, SliceReader  # noqa: E402
from shardwise.conformance import model_layout  # noqa: E402
from shardwise.loader import load_rank_state  # noqa: E402

GB = 1e9


def timed(fn) -> dict:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    del out
    return {"wall": wall, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
            "minflt": r1.ru_minflt - r0.ru_minflt}


def kind(layout_tensor) -> str:
    d = layout_tensor.split_dims
    return "replicated" if not d else ("column(dim0)" if d == (0,) else "row(dim1)")


def pread_rank(source: CheckpointSource, layout, rank: int, threads: int, chunk: int = 32 << 20,
               hugepages: bool = False) -> dict:
    """Reads every slice with preadv: straight into the output when the slice is contiguous rows.

    With ``hugepages`` the outputs are carved from one anonymous arena advised MADV_HUGEPAGE (THP is
    in madvise mode here), so the destination costs 2 MiB faults instead of 4 KiB ones.
    """
    fds = {f: os.open(f, os.O_RDONLY) for f in source.files}
    todo = [(n, t) for n, t in layout.tensors.items() if t.source == n]
    offsets, total = {}, 0
    for n, t in todo:
        offsets[n] = total
        total += math.prod(t.shards[rank].local_shape) * 2
        total += -total % 64
    arena = None
    if hugepages:
        arena = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena.madvise(mmap.MADV_HUGEPAGE)
        flat = torch.frombuffer(arena, dtype=torch.bfloat16)

    def one(name, t):
        info = source.tensors[name]
        shard = t.shards[rank]
        if hugepages:
            numel = math.prod(shard.local_shape)
            out = flat[offsets[name] // 2 : offsets[name] // 2 + numel].view(shard.local_shape)
        else:
            out = torch.empty(shard.local_shape, dtype=torch.bfloat16)
        fd = fds[info.file]
        shape = info.shape
        row_bytes = math.prod(shape[1:]) * info.itemsize
        if kind(t) == "row(dim1)":
            (seg,) = shard.dims[1]
            rows_per = max(1, chunk // row_bytes)
            buf = torch.empty((min(rows_per, shape[0]), *shape[1:]), dtype=torch.bfloat16)
            bview = memoryview(buf.view(torch.uint8).numpy())
            for first in range(0, shape[0], rows_per):
                last = min(first + rows_per, shape[0])
                n = (last - first) * row_bytes
                os.preadv(fd, [bview[:n]], info.begin + first * row_bytes)
                out[first:last].copy_(buf[: last - first, seg.start : seg.start + seg.length])
        else:
            (seg,) = shard.dims[0] if shape else (None,)
            start = seg.start if seg else 0
            oview = memoryview(out.view(-1).view(torch.uint8).numpy())
            pos, off = 0, info.begin + start * row_bytes
            total = out.numel() * out.element_size()
            while pos < total:
                n = os.preadv(fd, [oview[pos : min(total, pos + chunk)]], off + pos)
                pos += n
        return out

    with ThreadPoolExecutor(threads) as pool:
        state = dict(zip([n for n, _ in todo], pool.map(lambda a: one(*a), todo)))
    for fd in fds.values():
        os.close(fd)
    state["__arena__"] = arena
    return state


def shardwise_by_kind(source, layout, rank: int) -> dict:
    """Same reader, one kind of tensor at a time, one thread (so the split is clean)."""
    out = {}
    for k in ("column(dim0)", "row(dim1)", "replicated"):
        names = [n for n, t in layout.tensors.items() if t.source == n and kind(t) == k]
        reader = SliceReader(source)
        nbytes = sum(layout.tensors[n].shards[rank].source_numel * 2 for n in names)

        def run(names=names, reader=reader):
            return [reader.read(n, layout.tensors[n].shards[rank], torch.bfloat16) for n in names]

        rec = timed(run)
        fetched = getattr(reader, "bytes_fetched", getattr(reader, "bytes_mapped", 0))
        rec.update(bytes=nbytes, mapped=fetched, tensors=len(names))
        reader.close()
        out[k] = rec
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="warm,cold")
    ap.add_argument("--dir", type=Path,
                    default=Path(os.environ.get("SHARDWISE_BENCH_DIR", "/tmp/shardwise-bench")) / "llama-3.2-1b")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    source = CheckpointSource(args.dir)
    layout = model_layout(args.dir, args.tp, source=source)
    files = bench.weight_files(args.dir)
    need = sum(t.shards[args.rank].source_numel * 2 for n, t in layout.tensors.items() if t.source == n)
    print(f"rank {args.rank}/{args.tp}: needs {need / GB:.3f} GB; "
          f"CHUNK_BYTES={getattr(SliceReader, 'CHUNK_BYTES', None)}")

    def first_touch():
        t = torch.empty(need // 2, dtype=torch.bfloat16)
        t.fill_(0)
        return t

    def first_touch_hugepages():
        mm = mmap.mmap(-1, need, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared anon would be shmem: no THP
        mm.madvise(mmap.MADV_HUGEPAGE)
        torch.frombuffer(mm, dtype=torch.uint8).fill_(0)
        return mm

    ranges = []
    for n, t in layout.tensors.items():
        if t.source != n:
            continue
        info = source.tensors[n]
        row_bytes = math.prod(info.shape[1:]) * info.itemsize if info.shape else info.itemsize
        if kind(t) == "column(dim0)":
            (seg,) = t.shards[args.rank].dims[0]
            ranges.append((info.file, info.begin + seg.start * row_bytes, seg.length * row_bytes))
        else:
            ranges.append((info.file, info.begin, info.end - info.begin))
    buf = memoryview(bytearray(max(r[2] for r in ranges)))

    def readinto_limit():
        for f, off, n in ranges:
            with open(f, "rb", buffering=0) as fh:
                fh.seek(off)
                fh.readinto(buf[:n])

    variants = {
        "shardwise threads=4": lambda: load_rank_state(source, layout, args.rank, torch.bfloat16, 4)[0],
        "shardwise threads=1": lambda: load_rank_state(source, layout, args.rank, torch.bfloat16, 1)[0],
        "pread threads=4": lambda: pread_rank(source, layout, args.rank, 4),
        "pread threads=1": lambda: pread_rank(source, layout, args.rank, 1),
        "pread + MADV_HUGEPAGE arena threads=2": lambda: pread_rank(source, layout, args.rank, 2, hugepages=True),
        "first touch only": first_touch,
        "first touch, MADV_HUGEPAGE destination": first_touch_hugepages,
        "readinto limit (rank's ranges incl. whole row-par tensors)": readinto_limit,
    }

    modes = [m for m in args.modes.split(",") if m]
    results: dict = {m: {k: [] for k in variants} for m in modes}
    by_kind: dict = {m: [] for m in modes}
    for rep in range(args.repeats):
        for mode in modes:
            for name, fn in variants.items():
                if mode == "cold" and name.startswith("first touch"):
                    continue
                bench.warm(files) if mode == "warm" else bench.evict(files)
                rec = timed(fn)
                rec["gbps"] = need / rec["wall"] / GB
                results[mode][name].append(rec)
                print(f"[{rep + 1}] {mode} {name:60s} wall {rec['wall']:.2f} user {rec['user']:.2f} "
                      f"sys {rec['sys']:.2f} minflt {rec['minflt']} ({rec['gbps']:.2f} GB/s)", flush=True)
            bench.warm(files) if mode == "warm" else bench.evict(files)
            bk = shardwise_by_kind(source, layout, args.rank)
            by_kind[mode].append(bk)
            for k, r in bk.items():
                print(f"[{rep + 1}] {mode} by kind {k:14s} {r['tensors']} tensors, {r['bytes'] / GB:.3f} GB needed, "
                      f"{r['mapped'] / GB:.3f} GB fetched: wall {r['wall']:.2f} user {r['user']:.2f} "
                      f"sys {r['sys']:.2f} "
                      f"minflt {r['minflt']} ({r['bytes'] / r['wall'] / GB:.2f} GB/s)", flush=True)
    summary = {mode: {k: {f: statistics.median(r[f] for r in v) for f in ("wall", "user", "sys", "minflt", "gbps")}
                      for k, v in results[mode].items() if v} for mode in modes}
    kinds = {mode: {k: {f: statistics.median(b[k][f] for b in by_kind[mode])
                        for f in ("wall", "user", "sys", "minflt", "bytes", "mapped")}
                    for k in by_kind[mode][0]} for mode in modes if by_kind[mode]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rank": args.rank, "tp": args.tp, "need_bytes": need, "summary": summary,
                                    "by_kind": kinds, "raw": results}, indent=2))
    print(json.dumps({"summary": summary, "by_kind": kinds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
