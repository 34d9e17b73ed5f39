"""Checkpoint sources: safetensors headers, and reads of exactly one rank's slice of a tensor.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets),
then raw little-endian data. We parse the header ourselves because the safetensors library does not
expose data offsets, and offsets are what let a rank read only its own bytes.

A slice that is one contiguous byte range already in the wanted dtype (whole rows of a
column-parallel weight or of the embedding) is not copied at all: it becomes a tensor over a private
mapping of exactly that range of the file, whose pages are the page cache's own (mapped up front, so
the weights are resident when loading returns). Ranks on one machine then share one copy of the
weights, and loading costs no fresh memory. Other slices (column slices of row-parallel weights,
padded or re-typed ones) are copied into memory the caller provides, cast on the way.

Checkpoints are untrusted input. ``read_header`` validates a header as strictly as the safetensors
library does, before any data is read, so every offset used later lies inside its file and inside
its own tensor; ``CheckpointSource`` reads only files an index names inside its directory, and only
safetensors: nothing here ever unpickles.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import mmap
import os
import struct
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from . import settings
from .dtypes import SAFETENSORS_CODES, to_torch
from .errors import ShardwiseError
from .fileio import bytes_of, copy_file_bytes, pread_exact, scratch
from .layout import Segment, ShardSlice
from .untrusted import one_line, read_json

# Safetensors codes shardwise reads (the dtypes table's), as torch dtypes, and back.
DTYPES: dict[str, torch.dtype] = {code: to_torch(name) for code, name in SAFETENSORS_CODES.items()}
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


# The safetensors library's own limits, matched so that a file it refuses is refused here too.
MAX_HEADER_BYTES = 100_000_000
MAX_JSON_DEPTH = 127  # its JSON parser (serde_json) refuses a 128th nested array or object
# Every dtype the library knows. Those outside ``DTYPES`` parse, but shardwise has no use for them.
LIBRARY_DTYPES = frozenset({*DTYPES, "F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
                            "F8_E5M2FNUZ", "U16", "U32", "U64", "C64"})
ITEMSIZES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}
ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
FIELD_SET = frozenset(ENTRY_FIELDS)
INDEX_NAME = "model.safetensors.index.json"


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor infos of one safetensors file, from its header alone, validated before any data is read.

    The rules are the safetensors library's (the file format has no other definition): the header is
    UTF-8 JSON, an object of tensor entries (plus an optional ``__metadata__`` of strings); every entry
    has a dtype, a shape of sizes and ``data_offsets`` holding exactly its bytes; and the tensors' byte
    ranges tile the data section, which ends where the file ends. Every file that library reads with
    dtypes shardwise knows is read here identically; everything it refuses is refused here, as one
    line naming the file, the tensor and the numbers. Offsets are then safe to read at: every range
    lies inside the file, so no later read can run past its end or into another tensor.
    """
    path = Path(path)
    raw, size = _header_bytes(path)
    header = _header_json(path, raw)
    _check_metadata(path, header)
    entries: dict[str, tuple[str, tuple[int, ...], tuple[int, int]]] = {}
    for name, entry in _pairs(header):  # every entry parses, even one a repeated name replaces (as in the library)
        if name != "__metadata__":
            entries[name] = _parse_entry(path, name, entry)
    base, data_bytes = 8 + len(raw), size - 8 - len(raw)
    infos: dict[str, TensorInfo] = {}
    for name, (dtype, shape, (begin, end)) in entries.items():
        _check_entry(path, name, dtype, shape, begin, end, data_bytes)
        infos[name] = TensorInfo(name, dtype, shape, path, base + begin, base + end)
    _check_tiling(path, infos, base, data_bytes)
    return infos


def _header_bytes(path: Path) -> tuple[bytes, int]:
    """The raw JSON header and the file's size, once the 8-byte length has been checked against both."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ShardwiseError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES:
                raise ShardwiseError(f"{path}: not a safetensors file (header length {n} is over the "
                                     f"{MAX_HEADER_BYTES}-byte limit)")
            if 8 + n > size:
                raise ShardwiseError(f"{path}: truncated or not a safetensors file: the header length says {n} "
                                     f"bytes but only {size - 8} follow it")
            raw = f.read(n)
    except OSError as exc:
        raise ShardwiseError(f"{path}: cannot read safetensors header ({exc.strerror or exc})") from None
    if len(raw) != n:
        raise ShardwiseError(f"{path}: truncated while reading its header ({len(raw)} of {n} bytes)")
    return raw, size


class _JsonObject(dict):
    """A JSON object whose keys repeat, with all its pairs (a plain dict is one whose keys do not).

    The library refuses some repeats (a field of a tensor entry, ``__metadata__``) and type-checks the
    value of every repeat before the last one wins; a plain dict would forget the earlier values.
    """

    __slots__ = ("pairs",)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, object]]) -> dict:
        """The parser's hook: a plain dict when no key repeats (the usual case, and the cheap one)."""
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        obj = cls(pairs)
        obj.pairs = pairs
        return obj


def _pairs(obj: dict) -> Iterable[tuple[str, object]]:
    """All pairs of a parsed object, repeated keys included."""
    return getattr(obj, "pairs", None) or obj.items()


def _repeats(obj: dict) -> bool:
    return getattr(obj, "pairs", None) is not None


def _json_int(text: str) -> int | float:
    """JSON integers as the library's parser reads them: ``-0`` and integers past 64 bits are floats there
    (so never a valid size or offset), and one past float's range is an error."""
    if text == "-0":
        return -0.0
    value = int(text)  # ValueError past Python's 4300-digit limit
    if -(1 << 63) <= value < 1 << 64:
        return value
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"number {text[:20]}... is out of range") from None


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _json_constant(text: str) -> float:
    raise ValueError(f"{text} is not JSON")


def _header_json(path: Path, raw: bytes) -> dict:
    """The header as a JSON object, parsed no more leniently than the library parses it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShardwiseError(f"{path}: safetensors header is not UTF-8 (byte {exc.start} of the header)") from None
    try:
        header = json.loads(text, object_pairs_hook=_JsonObject.from_pairs, parse_int=_json_int,
                            parse_float=_json_float, parse_constant=_json_constant)
    except RecursionError:
        raise ShardwiseError(f"{path}: safetensors header JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and the refusals above
        raise ShardwiseError(f"{path}: safetensors header is not valid JSON ({one_line(exc)})") from None
    if not isinstance(header, dict):
        raise ShardwiseError(f"{path}: safetensors header must be a JSON object, not {_kind(header)}")
    return header


def _check_metadata(path: Path, header: dict) -> None:
    """``__metadata__``: absent, null, or an object of strings, given once."""
    if sum(1 for name, _ in _pairs(header) if name == "__metadata__") > 1:
        raise ShardwiseError(f"{path}: __metadata__ appears twice in the header")
    meta = header.get("__metadata__")
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise ShardwiseError(f"{path}: __metadata__ must be an object of strings, not {_kind(meta)}")
    for key, value in _pairs(meta):
        if not isinstance(value, str):
            raise ShardwiseError(f"{path}: __metadata__ {_quote(key)} must be a string, got {_show(value)}")
        if _lone_surrogate(key) or _lone_surrogate(value):
            raise ShardwiseError(f"{path}: __metadata__ {_quote(key)} is not valid Unicode (a lone surrogate)")


def _bad(path: Path, name: str, what: str) -> ShardwiseError:
    return ShardwiseError(f"{path}: tensor {_quote(name)}: {what}")


def _parse_entry(path: Path, name: str, entry: object) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """A tensor entry's dtype, shape and offsets, checked for type only (what the library's parser checks).

    The library also reads an entry written as the array ``[dtype, shape, data_offsets]`` and a dtype
    written as ``{"F32": null}`` (its parser reads Rust structs and enums that way), so those parse here too.
    """
    if _lone_surrogate(name):
        raise _bad(path, name, "the name is not valid Unicode (a lone surrogate)")
    if isinstance(entry, dict):
        if _repeats(entry) or entry.keys() != FIELD_SET:  # exactly the three fields, once each: the usual case
            _check_fields(path, name, entry)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    elif isinstance(entry, list) and len(entry) == 3:
        dtype, shape, offsets = entry
    else:
        found = f"got an array of {len(entry)}" if isinstance(entry, list) else f"not {_kind(entry)}"
        raise _bad(path, name, f"an entry is an object with dtype, shape and data_offsets, {found}")
    if isinstance(dtype, dict) and len(dtype) == 1 and not _repeats(dtype) and next(iter(dtype.values())) is None:
        dtype = next(iter(dtype))
    if not isinstance(dtype, str):
        raise _bad(path, name, f"dtype must be a string, got {_show(dtype)}")
    if dtype not in LIBRARY_DTYPES:
        raise _bad(path, name, f"unknown dtype {_quote(dtype)}")
    if not _sizes(shape):
        raise _bad(path, name, f"shape must be a list of non-negative integers, got {_show(shape)}")
    if not (_sizes(offsets) and len(offsets) == 2):
        raise _bad(path, name, f"data_offsets must be two non-negative integers [begin, end], got {_show(offsets)}")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _sizes(value: object) -> bool:
    """Whether ``value`` is a list of non-negative integers (booleans and floats are not; ``-0`` is a float)."""
    if not isinstance(value, list):
        return False
    for d in value:
        if type(d) is not int or d < 0:
            return False
    return True


def _check_fields(path: Path, name: str, entry: dict) -> None:
    """An entry object with other fields than its three, or a field twice: what the library allows of that."""
    for key, value in _pairs(entry):
        if key not in FIELD_SET:
            _check_ignored(path, name, key, value)
    keys = [key for key, _ in _pairs(entry)]
    for field in ENTRY_FIELDS:
        if keys.count(field) > 1:
            raise _bad(path, name, f"field {field!r} appears twice")
        if field not in entry:
            raise _bad(path, name, f"the entry has no {field!r}")


def _check_ignored(path: Path, name: str, field: str, value: object) -> None:
    """Fields of an entry other than its three are ignored, but still parsed: too deep or not valid Unicode
    there, and the library refuses the file. (Iterative: depth is what is being checked.)"""
    if _lone_surrogate(field):
        raise _bad(path, name, f"field {_quote(field)} is not valid Unicode (a lone surrogate)")
    stack = [(value, 3)]  # the header object is depth 1, an entry 2
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str) and _lone_surrogate(value):
            raise _bad(path, name, f"field {_quote(field)} holds a string that is not valid Unicode "
                                   "(a lone surrogate)")
        if isinstance(value, (dict, list)) and depth > MAX_JSON_DEPTH:
            raise _bad(path, name, f"field {_quote(field)} is JSON nested over {MAX_JSON_DEPTH} deep")
        if isinstance(value, dict):
            for key, item in _pairs(value):
                if _lone_surrogate(key):
                    raise _bad(path, name, f"field {_quote(field)} holds a key that is not valid Unicode "
                                           "(a lone surrogate)")
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def _check_entry(path: Path, name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int,
                 data_bytes: int) -> None:
    """What the library checks of each tensor once parsed: a size that counts, exactly its bytes, in the file."""
    if dtype not in DTYPES:
        raise _bad(path, name, f"dtype {dtype} is not supported by shardwise (supported: {', '.join(DTYPES)})")
    if max(shape, default=0) >= 1 << 63:
        raise _bad(path, name, f"shape {_show(list(shape))} has a size over 2**63 - 1")
    numel = 1
    for d in shape:  # in order, as the library multiplies: a 0 after an overflow does not save it
        numel *= d
        if numel >= 1 << 64:
            raise _bad(path, name, f"shape {_show(list(shape))} has more than 2**64 elements")
    nbytes = numel * ITEMSIZES[dtype]
    if nbytes * 8 >= 1 << 64:
        raise _bad(path, name, f"shape {_show(list(shape))} of {dtype} has more than 2**64 bits")
    if end < begin:
        raise _bad(path, name, f"data_offsets [{begin}, {end}] are reversed")
    if end - begin != nbytes:
        raise _bad(path, name, f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape "
                               f"{_show(list(shape))} of {dtype} is {nbytes} bytes")
    if end > data_bytes:
        raise ShardwiseError(f"{path}: truncated: tensor {_quote(name)} ends at data byte {end} but the file "
                             f"has only {data_bytes} bytes of data")


def _check_tiling(path: Path, infos: dict[str, TensorInfo], base: int, data_bytes: int) -> None:
    """Sorted by offset, the tensors cover the data section exactly: no gap, no overlap, nothing after."""
    pos, previous = 0, None
    for begin, end, name in sorted((i.begin - base, i.end - base, n) for n, i in infos.items()):
        if begin > pos:
            after = f"after tensor {_quote(previous)}" if previous is not None else "at the start of the data"
            raise ShardwiseError(f"{path}: data bytes {pos}..{begin} belong to no tensor ({after}; tensor "
                                 f"{_quote(name)} starts at {begin})")
        if begin < pos:
            raise ShardwiseError(f"{path}: tensor {_quote(name)} (data bytes {begin}..{end}) overlaps tensor "
                                 f"{_quote(previous)}, which ends at {pos}")
        pos, previous = end, name
    if pos != data_bytes:
        raise ShardwiseError(f"{path}: {data_bytes - pos} bytes after the last tensor's data belong to no tensor "
                             f"(tensors end at data byte {pos}, the file at {data_bytes}): not a complete "
                             f"safetensors file")


def _lone_surrogate(text: str) -> bool:
    """Whether JSON escapes left half a UTF-16 pair in ``text`` (the library's parser refuses those)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _kind(value: object) -> str:
    return {dict: "an object", _JsonObject: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _quote(text: object, limit: int = 80) -> str:
    """A name for a message: quoted, escaped to one line, and short whatever the file says."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _show(value: object, limit: int = 80, nested: bool = False) -> str:
    """A JSON value for a message: one line, short, and shallow (hostile values can be huge or deep)."""
    if isinstance(value, list):
        inner = "..." if nested and value else ", ".join(_show(v, limit, True) for v in value[:8])
        text = f"[{inner}{', ...' if len(value) > 8 and not nested else ''}]"
    elif isinstance(value, dict):
        text = "{...}" if value else "{}"
    else:
        text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _index_file_problem(name: str) -> str | None:
    """Why an index entry is not a safetensors file inside the checkpoint directory, if it is not.

    Decided on the name, never by resolving links: in the Hugging Face cache a snapshot's files are
    links into ``../../blobs``, and a link the directory's owner made is theirs to make. What the
    index cannot do is name a file outside the directory (absolute, or climbing with ``..``), or a
    pickled ``.bin``: shardwise reads safetensors only, so no file it loads can run code.
    """
    if not name:
        return "an empty file name"
    if any(c < " " for c in name) or _lone_surrogate(name):  # NUL, newlines...: no real shard is named so
        return "not a valid file name"
    if name.startswith("/"):
        return "an absolute path: files must be inside the checkpoint directory"
    if ".." in PurePosixPath(name).parts:
        return "a path with '..': files must be inside the checkpoint directory"
    if not name.endswith(".safetensors"):
        return "not a .safetensors file (shardwise reads only safetensors weights, never pickled .bin files)"
    return None


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> file name), every file name confined to the directory."""
    data = read_json(index, "checkpoint index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ShardwiseError(f"{index}: the index needs a `weight_map` object (tensor name -> file), "
                             f"got {_kind(weight_map)}")
    for tensor, name in weight_map.items():
        if not isinstance(name, str):
            raise ShardwiseError(f"{index}: weight_map[{_quote(tensor)}] must be a file name, got {_show(name)}")
        problem = _index_file_problem(name)
        if problem:
            raise ShardwiseError(f"{index}: weight_map[{_quote(tensor)}] = {_quote(name)} is {problem}")
    return weight_map


class CheckpointSource:
    """An HF checkpoint directory: one ``model.safetensors``, or shards listed in an index.

    Nothing but safetensors headers is read here, and only from files inside the directory; each
    tensor must be in exactly one file (the one the index says).
    """

    def __init__(self, path: str | Path, files: list[Path] | None = None):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        weight_map = None
        if files is not None:
            files = [Path(f) for f in files]
        elif index.is_file():
            weight_map = _read_weight_map(index)
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
            where = f"{index}: the index lists files that are missing" if weight_map is not None else (
                "checkpoint files are missing")
            raise ShardwiseError(f"{where}: {', '.join(missing)}")
        self.files: list[Path] = files
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(f).items():
                if name in self.tensors:
                    raise ShardwiseError(f"tensor {_quote(name)} is in two checkpoint files: "
                                         f"{self.tensors[name].file} and {f}")
                self.tensors[name] = info
        if weight_map is not None:
            self._check_weight_map(index, weight_map)

    def _check_weight_map(self, index: Path, weight_map: dict[str, str]) -> None:
        """Every tensor the index places is in the file it names."""
        for tensor, name in weight_map.items():
            info = self.tensors.get(tensor)
            if info is None or info.file != self.path / name:
                found = f" (it is in {info.file.name})" if info is not None else ""
                raise ShardwiseError(f"{index}: weight_map puts tensor {_quote(tensor)} in {name}, whose header "
                                     f"has no such tensor{found}")

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """What the layout needs: name -> (shape, dtype)."""
        return {n: (t.shape, t.dtype) for n, t in self.tensors.items()}

    @property
    def total_bytes(self) -> int:
        return sum(t.end - t.begin for t in self.tensors.values())


class SliceReader:
    """Reads rank slices out of checkpoint files; safe to use from several threads.

    ``map_slice`` returns a zero-copy view for slices that ``mappable`` accepts; ``read`` copies.

    Memory stays bounded whatever the checkpoint size: copies go through mappings of a chunk of rows
    at a time (at most ``CHUNK_BYTES``), unmapped as soon as they are copied, or through a reused
    per-thread buffer, so resident memory is the shard being built plus a few chunks.
    ``bytes_read`` counts the source bytes of the slices; ``bytes_fetched`` the file bytes copied or
    mapped to get them (more than the slice only for column slices, whose rows interleave with other
    ranks'); ``bytes_mapped`` the bytes served as views of the file rather than copies.
    """

    CHUNK_BYTES = 32 << 20

    def __init__(self, source: CheckpointSource):
        self.source = source
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_fetched = 0
        self.bytes_mapped = 0

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def _map_rows(self, info: TensorInfo, first: int, last: int) -> tuple[mmap.mmap, torch.Tensor]:
        """A tensor view of rows ``first..last-1`` of ``info`` over a read-only shared mapping (for copying)."""
        shape = info.shape or (1,)
        row_bytes = math.prod(shape[1:]) * info.itemsize
        begin, end = info.begin + first * row_bytes, info.begin + last * row_bytes
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        fd = self._fd(info.file)
        # Read-only and shared: the page-cache pages themselves are mapped. (A private writable
        # mapping populates with write faults, copying every page into fresh memory first.)
        try:
            mm = mmap.mmap(fd, end - aligned, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ,
                           offset=aligned)
        except ValueError:  # shorter than its header says
            raise ShardwiseError(f"{info.file}: the file ends before tensor {info.name}'s data: truncated?") from None
        count = (end - begin) // info.itemsize
        with warnings.catch_warnings():  # torch warns that the buffer is read-only; we only read it
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(mm, dtype=DTYPES[info.dtype], count=count, offset=begin - aligned)
        with self._lock:
            self.bytes_fetched += end - aligned
        return mm, view.view((last - first, *shape[1:]))

    # Smaller slices are copied: a mapping costs a system call and a kernel object, a copy of a few
    # pages costs less, and small tensors would otherwise round up to whole pages each.
    MAP_MIN_BYTES = 1 << 20

    def byte_range(self, source_name: str, shard: ShardSlice, dtype: torch.dtype) -> tuple[int, int] | None:
        """The file bytes ``(begin, end)`` that are exactly this slice as ``dtype``, if there are such bytes.

        That is: whole rows of one run, no padding, no cast, and data aligned to its element size.
        Such a slice can be mapped (``map_slice``) or copied file to file without passing through us.
        """
        info = self.source.tensors[source_name]
        if not (info.shape and DTYPES[info.dtype] == dtype and not shard.has_padding):
            return None
        rows = shard.dims[0]
        whole_rows = all(len(segs) == 1 and segs[0] == Segment(0, size)
                         for segs, size in zip(shard.dims[1:], info.shape[1:]))
        if len(rows) != 1 or rows[0].start is None or not whole_rows or info.begin % info.itemsize:
            return None
        row_bytes = math.prod(info.shape[1:]) * info.itemsize
        begin = info.begin + rows[0].start * row_bytes
        return begin, begin + rows[0].length * row_bytes

    def mappable(self, source_name: str, shard: ShardSlice, dtype: torch.dtype) -> bool:
        """Whether ``map_slice`` serves this slice: a byte range of the file, large enough to be worth it."""
        span = self.byte_range(source_name, shard, dtype) if can_map() else None
        return span is not None and span[1] - span[0] >= max(1, self.MAP_MIN_BYTES)

    def copy_slice_to(self, source_name: str, span: tuple[int, int], dst_fd: int, dst_offset: int) -> None:
        """Copy the file bytes ``span`` (from ``byte_range``) into another file, inside the kernel if it can."""
        info = self.source.tensors[source_name]
        copy_file_bytes(self._fd(info.file), span[0], dst_fd, dst_offset, span[1] - span[0])
        with self._lock:
            self.bytes_read += span[1] - span[0]
            self.bytes_fetched += span[1] - span[0]

    def map_slice(self, source_name: str, shard: ShardSlice) -> torch.Tensor:
        """The slice as a tensor over a private mapping of exactly its byte range, pages mapped in.

        Private: writing to the tensor copies the page for this process and never reaches the file.
        The mapping lives as long as the tensor. Like any memory-mapped weights, it assumes the file
        is not modified in place while in use (replacing it by rename is safe).
        """
        info = self.source.tensors[source_name]
        span = self.byte_range(source_name, shard, DTYPES[info.dtype])
        if span is None:
            raise ValueError(f"{source_name}: this slice is not one byte range of its file")
        begin, end = span
        fd = self._fd(info.file)
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        mm = map_populated(fd, aligned, end - aligned)
        view = torch.frombuffer(mm, dtype=DTYPES[info.dtype], count=(end - begin) // info.itemsize,
                                offset=begin - aligned)
        with self._lock:
            self.bytes_read += end - begin
            self.bytes_fetched += end - aligned
            self.bytes_mapped += end - begin
        return view.view(shard.local_shape)

    def source_view(self, name: str) -> torch.Tensor:
        """The whole source tensor as a view over the file (for small tensors and tests)."""
        info = self.source.tensors[name]
        if info.end == info.begin:  # no elements: nothing to map (and a zero-length mapping is an error)
            return torch.empty(0, dtype=DTYPES[info.dtype]).view(info.shape)
        shape = info.shape or (1,)
        _, view = self._map_rows(info, 0, shape[0])
        return view.view(info.shape)

    def read(self, source_name: str, shard: ShardSlice, dtype: torch.dtype,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy one rank's slice of ``source_name`` into a tensor of ``dtype`` (padding zeroed).

        ``out``, if given, must be zero-filled memory of the slice's shape (e.g. carved from an arena).
        """
        info = self.source.tensors[source_name]
        dims = shard.dims if info.shape else ((Segment(0, 1),),)
        local_shape = tuple(sum(s.length for s in segs) for segs in dims)
        if out is None:
            out = (torch.zeros if shard.has_padding else torch.empty)(local_shape, dtype=dtype)
        else:
            out = out.view(local_shape)
        shape = info.shape or (1,)
        if all(len(segs) == 1 and segs[0] == Segment(0, size) for segs, size in zip(dims[1:], shape[1:])):
            self._read_rows(info, dims[0], out)
        else:
            self._copy_strided(info, dims, out)
        with self._lock:
            self.bytes_read += shard.source_numel * info.itemsize
        return out.view(shard.local_shape)

    def _read_rows(self, info: TensorInfo, segments, out: torch.Tensor) -> None:
        """Whole rows: each segment is one contiguous byte range, read with pread straight into ``out``.

        pread copies from the page cache at memcpy speed with no page-table work; when the dtype
        changes, rows go through a bounded scratch buffer and are cast on the copy out of it.
        """
        fd = self._fd(info.file)
        row_bytes = math.prod((info.shape or (1,))[1:]) * info.itemsize
        src_dtype = DTYPES[info.dtype]
        rows_per_chunk = max(1, self.CHUNK_BYTES // max(1, row_bytes))
        pos = 0
        for seg in segments:
            if seg.start is not None:
                with self._lock:
                    self.bytes_fetched += seg.length * row_bytes
                if out.dtype == src_dtype:
                    dst = bytes_of(out.narrow(0, pos, seg.length))
                    pread_exact(fd, dst, info.begin + seg.start * row_bytes)
                else:
                    for first in range(0, seg.length, rows_per_chunk):
                        n = min(rows_per_chunk, seg.length - first)
                        rows = scratch(n * row_bytes)[: n * row_bytes].view(src_dtype).view(n, *out.shape[1:])
                        pread_exact(fd, bytes_of(rows), info.begin + (seg.start + first) * row_bytes)
                        out.narrow(0, pos + first, n).copy_(rows)
            pos += seg.length

    def _copy_strided(self, info: TensorInfo, dims, out: torch.Tensor) -> None:
        """Column slices: map a chunk of rows at a time and copy the slice's columns out of it.

        Mapping the rows costs page-table entries only (the page cache's pages, large folios mapped
        whole); reading them with ``pread`` instead would copy the other ranks' columns too
        (slower for a 1B model at TP 2 in a one-off A/B).
        """
        shape = info.shape or (1,)
        rows_per_chunk = max(1, self.CHUNK_BYTES // max(1, math.prod(shape[1:]) * info.itemsize))
        trailing = _block_pairs(dims[1:])
        pos = 0
        for seg in dims[0]:
            if seg.start is not None:
                for first in range(seg.start, seg.start + seg.length, rows_per_chunk):
                    last = min(first + rows_per_chunk, seg.start + seg.length)
                    mm, src = self._map_rows(info, first, last)
                    rows = slice(pos + first - seg.start, pos + last - seg.start)
                    for dst_index, src_index in trailing:
                        out[(rows, *dst_index)].copy_(src[(slice(None), *src_index)])
                    del src
                    mm.close()
            pos += seg.length

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_MADV_POPULATE_READ = 22  # Linux 5.14+; Python's mmap module has no name for it


@functools.cache
def _kernel_populates() -> bool:
    """Whether this kernel maps pages in on request (what ``map_populated`` relies on); probed once."""
    if not hasattr(mmap, "MAP_PRIVATE"):
        return False
    try:
        probe = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            probe.madvise(_MADV_POPULATE_READ)
        finally:
            probe.close()
    except (OSError, ValueError, AttributeError):
        return False
    return True


def can_map() -> bool:
    """Whether weights are served as mappings of the checkpoint: the kernel can, and the user did not
    turn it off (``SHARDWISE_MAP_WEIGHTS=0``, read on each call)."""
    return settings.map_weights() and _kernel_populates()


class MapUnavailable(Exception):
    """This range cannot be mapped here (no memory, too many open files, a file system without
    mappings): the caller copies it instead."""


def allow_open_files(count: int) -> None:
    """Raise the soft limit on open files so that ``count`` more fit, as far as the hard limit allows.

    Each mapping keeps a duplicate of its file's descriptor (Python's ``mmap`` makes one), so a rank
    holding hundreds of mapped weights needs hundreds of descriptors; the common soft limit of 1024
    is a default, not a policy.
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = len(os.listdir("/proc/self/fd")) + count + 64 if os.path.isdir("/proc/self/fd") else count + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def map_populated(fd: int, offset: int, length: int) -> mmap.mmap:
    """A private, writable (copy-on-write) mapping of ``length`` file bytes at ``offset``, pages mapped in.

    ``MADV_POPULATE_READ`` maps the page-cache pages read-only in one call, without the copy a
    private writable ``MAP_POPULATE`` would make; on a cold cache, the kernel's readahead for the
    mapping reads ahead in large requests (queuing the whole range with chunked
    ``POSIX_FADV_WILLNEED`` calls was measured slower here). The mapping covers
    exactly the range: pages outside it are never mapped, even where the page cache holds them as
    one large folio.
    """
    truncated = (f"bytes {offset}..{offset + length} of a checkpoint file are past its end: was it truncated "
                 "or overwritten while loading?")
    try:
        mm = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    except ValueError:  # the file is shorter than the range
        raise ShardwiseError(truncated) from None
    except OSError as exc:
        raise MapUnavailable(str(exc)) from None
    try:
        mm.madvise(_MADV_POPULATE_READ)
    except OSError as exc:
        mm.close()
        if exc.errno == errno.EFAULT:  # populating would have raised SIGBUS: pages past the end of the file
            raise ShardwiseError(truncated) from None
        raise MapUnavailable(str(exc)) from None
    return mm


class Arena:
    """One zero-filled anonymous mapping that a rank's whole shard is carved from.

    One mapping instead of a tensor per weight: it is already zero, so padding needs no extra pass,
    and the shard is one region. Transparent huge pages would take 512 times fewer faults, but in
    fresh processes on virtual machines each huge-page fault can cost far more than the 512 small
    ones it replaces (bench/load.py's huge-page method measures it; see docs/benchmarks.md), so they
    are opt-in: ``SHARDWISE_HUGEPAGES=1``.
    """

    ALIGN = 64

    def __init__(self, nbytes: int):
        self.nbytes = max(nbytes, 1)
        self._map = mmap.mmap(-1, self.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE") and settings.hugepages():
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self._used = 0

    @staticmethod
    def size_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return n + (-n % Arena.ALIGN)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        size = self.size_of(shape, dtype)
        if self._used + size > self.nbytes:
            raise RuntimeError("arena exhausted: sizes were computed wrongly")
        count = math.prod(shape)
        t = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._used) if count else torch.empty(
            shape, dtype=dtype)
        self._used += size
        return t.view(shape)


def _block_pairs(dims: tuple) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(destination slices, source slices) for every combination of non-padding segments."""
    combos: list[tuple[tuple[slice, ...], tuple[slice, ...]]] = [((), ())]
    for segs in dims:
        pairs, pos = [], 0
        for seg in segs:
            if seg.start is not None:
                pairs.append((slice(pos, pos + seg.length), slice(seg.start, seg.start + seg.length)))
            pos += seg.length
        combos = [(d + (p[0],), s + (p[1],)) for d, s in combos for p in pairs]
    return combos
