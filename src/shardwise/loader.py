"""Shard-on-load: build one rank's state dict by reading only that rank's slices of the checkpoint."""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .checkpoint import Arena, CheckpointSource, SliceReader
from .layout import Layout

log = logging.getLogger("shardwise")


@dataclass
class LoadStats:
    seconds: float
    bytes_read: int  # source bytes of this rank's slices
    bytes_held: int  # bytes of the tensors built (padding included)
    bytes_fetched: int = 0  # file bytes copied or mapped to get them (whole rows for wide column slices)


def load_rank_state(
    source: CheckpointSource,
    layout: Layout,
    rank: int,
    dtype: torch.dtype,
    threads: int = 4,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], LoadStats]:
    """Read rank ``rank``'s slice of every tensor, cast to ``dtype``, in parallel threads.

    Tied parameters (e.g. ``lm_head.weight``) are not read twice: the model ties them after loading.
    Reads run on a thread pool because the strided copies release the GIL.
    """
    start = time.perf_counter()
    reader = SliceReader(source)
    todo = [(name, t) for name, t in layout.tensors.items() if t.source == name]
    arena = Arena(sum(Arena.size_of(t.shards[rank].local_shape, dtype) for _, t in todo))
    outs = {name: arena.take(t.shards[rank].local_shape, dtype) for name, t in todo}
    state: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(todo), desc=f"rank {rank} loading", unit="tensor", disable=not progress,
               file=sys.stderr, leave=False)
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = {name: pool.submit(reader.read, t.source, t.shards[rank], dtype, outs[name])
                       for name, t in todo}
            for name, fut in futures.items():
                state[name] = fut.result()
                bar.update(1)
    finally:
        bar.close()
        reader.close()
    held = sum(t.numel() * t.element_size() for t in state.values())
    return state, LoadStats(time.perf_counter() - start, reader.bytes_read, held, reader.bytes_fetched)
