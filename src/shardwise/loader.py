"""Shard-on-load: build one rank's state dict by reading only that rank's slices of the checkpoint."""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .checkpoint import Arena, CheckpointSource, MapUnavailable, SliceReader, allow_open_files
from .layout import Layout, TensorLayout

log = logging.getLogger("shardwise")


@dataclass
class LoadStats:
    seconds: float
    bytes_read: int  # source bytes of this rank's slices
    bytes_held: int  # bytes of the tensors built (padding included)
    bytes_fetched: int = 0  # file bytes copied or mapped to get them (whole rows for column slices)
    bytes_mapped: int = 0  # of bytes_held, those that are views of the files' page-cache pages (no copy)


def load_rank_state(
    source: CheckpointSource,
    layout: Layout,
    rank: int,
    dtype: torch.dtype,
    threads: int = 4,
    progress: bool = False,
    map_weights: bool = True,
) -> tuple[dict[str, torch.Tensor], LoadStats]:
    """Read rank ``rank``'s slice of every tensor, cast to ``dtype``, in parallel threads.

    With ``map_weights`` (the default), slices that are contiguous in the file and already ``dtype``
    are views of the file's pages (``SliceReader.map_slice``); the rest are copied into one arena.
    Tied parameters (e.g. ``lm_head.weight``) are not read twice: the model ties them after loading.
    Copies run on a thread pool (they release the GIL); mappings are made in the calling thread.
    A slice that cannot be mapped here (``MapUnavailable``) is copied instead.
    """
    start = time.perf_counter()
    reader = SliceReader(source)
    todo = [(name, t) for name, t in layout.tensors.items() if t.stored]
    mapped = [name for name, t in todo if map_weights and reader.mappable(t.source, t.shards[rank], dtype)]
    mapped_set = set(mapped)
    copied = [(name, t) for name, t in todo if name not in mapped_set]
    arena = Arena(sum(Arena.size_of(t.shards[rank].local_shape, dtype) for _, t in copied))
    outs = {name: arena.take(t.shards[rank].local_shape, dtype) for name, t in copied}
    results: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(todo), desc=f"rank {rank} loading", unit="tensor", disable=not progress,
               file=sys.stderr, leave=False)

    def copy_all(items: list[tuple[str, TensorLayout]]) -> None:
        for name, t in items:
            results[name] = reader.read(t.source, t.shards[rank], dtype, outs.get(name))
            bar.update(1)

    try:
        # Mapping holds the GIL (the madvise call does not release it), so threads would only queue
        # for it: mappings are made here, one after another, before the copies start (faults in the
        # arena and new mappings would also contend for the address-space lock).
        if mapped:
            allow_open_files(len(mapped))  # each mapping holds a file descriptor
        for name in mapped:
            try:
                results[name] = reader.map_slice(layout.tensors[name].source, layout.tensors[name].shards[rank])
                bar.update(1)
            except MapUnavailable as exc:
                log.debug("copying %s instead of mapping it (%s)", name, exc)
                copied.append((name, layout.tensors[name]))  # read() allocates its own tensor
        # Copies release the GIL. One task per thread, balanced by bytes: submitting a task per tensor
        # while workers run costs a GIL hand-off per submission.
        buckets: list[list[tuple[str, TensorLayout]]] = [[] for _ in range(max(1, min(threads, len(copied))))]
        loads = [0] * len(buckets)

        def size(item: tuple[str, TensorLayout]) -> int:
            return Arena.size_of(item[1].shards[rank].local_shape, dtype)

        for item in sorted(copied, key=size, reverse=True):
            i = loads.index(min(loads))
            buckets[i].append(item)
            loads[i] += size(item)
        if len(buckets) == 1:
            copy_all(buckets[0])
        else:
            with ThreadPoolExecutor(max_workers=len(buckets)) as pool:
                for fut in [pool.submit(copy_all, b) for b in buckets]:
                    fut.result()
    finally:
        bar.close()
        reader.close()
    state = {name: results[name] for name, _ in todo}
    held = sum(t.numel() * t.element_size() for t in state.values())
    return state, LoadStats(time.perf_counter() - start, reader.bytes_read, held, reader.bytes_fetched,
                            reader.bytes_mapped)
