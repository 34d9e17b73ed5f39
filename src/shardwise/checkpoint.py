"""Checkpoint sources: safetensors headers, and reads of exactly one rank's slice of a tensor.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets),
then raw little-endian data. We parse the header ourselves because the safetensors library does not
expose data offsets, and offsets are what let a rank read only its own bytes: each file is memory-
mapped once, each slice is copied out of the mapping by a strided copy that touches only the slice's
bytes, and the copy casts to the target dtype on the way (one pass over the data, no full tensor).
"""

from __future__ import annotations

import json
import mmap
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ShardwiseError
from .layout import ShardSlice

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset of the data in the file
    end: int

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one safetensors file, from its header alone."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ShardwiseError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > 100_000_000:
                raise ShardwiseError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardwiseError(f"{path}: cannot read safetensors header ({exc})") from None
    base = 8 + n
    infos = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise ShardwiseError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        begin, end = meta["data_offsets"]
        infos[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), path, base + begin, base + end)
    return infos


class CheckpointSource:
    """An HF checkpoint directory: one ``model.safetensors``, or shards listed in an index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({self.path / f for f in weight_map.values()})
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            extra = " (only PyTorch .bin weights found; re-save with safetensors)" if any(
                self.path.glob("*.bin")
            ) else ""
            raise ShardwiseError(f"{str(self.path)!r} has no safetensors weights{extra}")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ShardwiseError(f"the index lists files that are missing: {', '.join(missing)}")
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            self.tensors.update(read_header(f))

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """What the layout needs: name -> (shape, dtype)."""
        return {n: (t.shape, t.dtype) for n, t in self.tensors.items()}

    @property
    def total_bytes(self) -> int:
        return sum(t.end - t.begin for t in self.tensors.values())


class SliceReader:
    """Reads rank slices out of memory-mapped checkpoint files; safe to use from several threads.

    ``bytes_read`` counts the source bytes copied out of the files, so tests and the benchmark can
    check that a rank fetched its slices and nothing else.
    """

    def __init__(self, source: CheckpointSource):
        self.source = source
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _map(self, path: Path) -> mmap.mmap:
        with self._lock:
            if path not in self._maps:
                with open(path, "rb") as f:
                    # ACCESS_COPY gives a writable (private, never written) view, which torch.frombuffer needs.
                    self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            return self._maps[path]

    def source_view(self, name: str) -> torch.Tensor:
        info = self.source.tensors[name]
        buf = self._map(info.file)
        count = (info.end - info.begin) // info.itemsize
        flat = torch.frombuffer(buf, dtype=DTYPES[info.dtype], count=count, offset=info.begin)
        return flat.view(info.shape)

    def read(self, source_name: str, shard: ShardSlice, dtype: torch.dtype) -> torch.Tensor:
        """Copy one rank's slice of ``source_name`` into a new tensor of ``dtype`` (padding zeroed)."""
        view = self.source_view(source_name)
        alloc = torch.zeros if shard.has_padding else torch.empty
        out = alloc(shard.local_shape, dtype=dtype)
        for dst_index, src_index in _block_pairs(shard):
            out[dst_index].copy_(view[src_index])
        with self._lock:
            self.bytes_read += shard.source_numel * view.element_size()
        return out

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                try:
                    m.close()
                except BufferError:  # a tensor still views the map; the OS unmaps it at exit
                    pass
            self._maps.clear()


def _block_pairs(shard: ShardSlice):
    """(destination slices, source slices) for every combination of non-padding segments."""
    per_dim: list[list[tuple[slice, slice]]] = []
    for segs in shard.dims:
        pairs, pos = [], 0
        for seg in segs:
            if seg.start is not None:
                pairs.append((slice(pos, pos + seg.length), slice(seg.start, seg.start + seg.length)))
            pos += seg.length
        per_dim.append(pairs)
    combos: list[tuple[tuple[slice, ...], tuple[slice, ...]]] = [((), ())]
    for pairs in per_dim:
        combos = [(d + (p[0],), s + (p[1],)) for d, s in combos for p in pairs]
    return combos
