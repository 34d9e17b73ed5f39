"""Seeded mutation fuzzing of everything shardwise parses from users: safetensors files, checkpoint
indexes, sharding-plan YAML and partition-config JSON.

The contract under test: bad input raises ``ShardwiseError`` (one line), never another exception, a
crash or a hang. For safetensors files it is stricter: whatever we accept, the safetensors library
accepts too and reads as the same tensors, and whatever it accepts we accept (except dtypes shardwise
does not support), so we never read outside the file or into another tensor's bytes.

Every case is reproducible from its class and number (``random.Random(f"{cls}:{i}")``). The default
is ``CASES`` per class, a few hundred in all; ``SHARDWISE_FUZZ_CASES=5000`` runs a long campaign.
Run with ``-s`` to see the per-class table (``test_fuzz_summary``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import pytest
import torch

from shardwise.checkpoint import DTYPES, CheckpointSource, SliceReader
from shardwise.errors import ShardwiseError
from shardwise.plan import FAMILY_KEYS

CASES = int(os.environ.get("SHARDWISE_FUZZ_CASES", "25"))  # per mutation class
CASE_LIMIT_S = 10.0  # per case: far above what any case takes; reaching it is a hang
# class -> outcome ("accepted", "refused", "failed") -> count; and class -> seconds
COUNTS: dict[str, Counter] = defaultdict(Counter)
SECONDS: dict[str, float] = defaultdict(float)


# --- running cases ------------------------------------------------------------------------------------


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout in the case if it runs longer than ``seconds`` (SIGALRM: main thread, POSIX)."""
    def expire(signum, frame):
        raise CaseTimeout(f"case ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_class(cls: str, case: Callable[[random.Random, int], tuple[str, Callable[[], str]]]) -> None:
    """Run ``CASES`` cases of one class; fail listing every case that let anything but ShardwiseError out.

    ``case(rng, i)`` builds the input and returns (a description, a check that returns the outcome).
    """
    failures = []
    start = time.perf_counter()
    for i in range(CASES):
        rng = random.Random(f"{cls}:{i}")
        description = "?"
        try:
            with time_limit(CASE_LIMIT_S):
                description, check = case(rng, i)
                outcome = check()
        except Exception as exc:  # everything that escapes is what this test reports
            outcome = "failed"
            failures.append(f"{cls}:{i} [{description[:300]}]: {type(exc).__name__}: {str(exc)[:300]}")
        COUNTS[cls][outcome] += 1
    SECONDS[cls] += time.perf_counter() - start
    assert not failures, f"{len(failures)} of {CASES} {cls} cases failed:\n" + "\n".join(failures[:25])


def refused(exc: ShardwiseError) -> str:
    assert "\n" not in str(exc), f"not one line: {exc}"
    return "refused"


# --- safetensors files --------------------------------------------------------------------------------


def base_tensors() -> dict[str, torch.Tensor]:
    """A few tensors of every supported dtype and of awkward shapes (scalar, empty, 3-d)."""
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(5, 4, generator=g),
        "norm.weight": torch.randn(4, generator=g).half(),
        "proj.weight": torch.randn(3, 2, generator=g).bfloat16(),
        "cube": torch.randn(2, 2, 2, generator=g).double(),
        "ids": torch.tensor([1, -2, 3], dtype=torch.int64),
        "i32": torch.tensor([[7, 8], [9, 10]], dtype=torch.int32),
        "i16": torch.tensor([1, 2, 3], dtype=torch.int16),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "bytes": torch.arange(7, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True, True, False, False]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3, dtype=torch.int32),
    }


class Base:
    """A real safetensors file split into its parts, for mutating."""

    def __init__(self, raw: bytes):
        (self.n,) = struct.unpack("<Q", raw[:8])
        self.raw = raw
        self.header_text = raw[8:8 + self.n].decode()
        self.header = json.loads(self.header_text)
        self.data = raw[8 + self.n:]

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]


def assemble(header: dict | str | bytes, data: bytes) -> bytes:
    blob = header if isinstance(header, bytes) else (
        header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("fuzz-base") / "model.safetensors"
    save_file(base_tensors(), str(path), metadata={"format": "pt"})
    return Base(path.read_bytes())


from test_checkpoint_validation import library_tensors  # noqa: E402 - one definition of the reference


def our_tensors(directory: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """Every tensor, read in full through shardwise, with its file (ShardwiseError if refused)."""
    source = CheckpointSource(directory)
    reader = SliceReader(source)
    try:
        out = {}
        for name, info in source.tensors.items():
            assert 8 <= info.begin <= info.end <= info.file.stat().st_size, f"{name} reaches outside its file"
            out[name] = (reader.source_view(name).clone(), info.file)
        return out
    finally:
        reader.close()


def raw_bytes(t: torch.Tensor) -> bytes:
    """Bytes, so that NaNs compare equal; booleans as 0/1 (a bool byte of 2 is True, and copies make it 1)."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return (flat != 0 if t.dtype == torch.bool else flat).numpy().tobytes()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)


def check_against_library(directory: Path) -> str:
    """Our outcome for a checkpoint, after checking every file's tensors against the library's reading."""
    files = sorted(directory.rglob("*.safetensors"))
    library = {f: library_tensors(f) for f in files}
    try:
        ours = our_tensors(directory)
    except ShardwiseError as exc:
        if len(files) == 1 and "not supported by shardwise" not in str(exc):
            assert library[files[0]] is None, f"the library reads this file but we refuse it: {exc}"
        return refused(exc)
    for name, (tensor, file) in ours.items():
        theirs = library.get(file)
        assert theirs is not None, f"we accept {file.name}, which the safetensors library refuses"
        assert name in theirs and same(tensor, theirs[name]), f"we read {name} differently from the library"
    if len(files) == 1:
        assert set(ours) == set(library[files[0]] or {}), "we find other tensors than the library"
    return "accepted"


def file_case(directory: Path, raw: bytes) -> Callable[[], str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(raw)
    return lambda: check_against_library(directory)


SPECIAL_VALUES = [None, True, False, 0, -1, 1, 2, -0.0, 1.5, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1,
                  2**64, 10**30, float("1e300"), "", "x", "F32", "2", "\u00e9", "\ud800", [], [1], [[]], {}, {"a": 1},
                  {"F32": None}]


def random_value(rng: random.Random, depth: int = 0) -> object:
    """A random JSON-ish value, biased to the edges (huge, negative, empty, wrong type, deep)."""
    roll = rng.random()
    if roll < 0.6 or depth > 3:
        return rng.choice(SPECIAL_VALUES)
    if roll < 0.75:
        return rng.randint(-(2**70), 2**70)
    if roll < 0.9:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["a", "dtype", "shape", "data_offsets", "__metadata__"]): random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def text_of(header: dict) -> str:
    """JSON text, with -0.0 written the way a hostile writer might (``-0``)."""
    return json.dumps(header).replace("-0.0", "-0")


def m_header_bytes(rng: random.Random, b: Base) -> tuple[str, bytes]:
    raw = bytearray(b.raw)
    spots = [rng.randrange(8, 8 + b.n) for _ in range(rng.randint(1, 4))]
    for s in spots:
        raw[s] = rng.choice([rng.randrange(256), raw[s] ^ (1 << rng.randrange(8)), ord(rng.choice('{}[]",:0-9eE\\ '))])
    return f"header bytes changed at {spots}", bytes(raw)


def m_length_field(rng: random.Random, b: Base) -> tuple[str, bytes]:
    size = len(b.raw)
    n = rng.choice([0, 1, 2, b.n - 1, b.n + 1, b.n + rng.randint(2, 64), rng.randint(0, b.n), 2**64 - 1, 2**63,
                    100_000_000, 100_000_001, rng.getrandbits(64), rng.getrandbits(32), size - 8, size, size - 7,
                    rng.randrange(0, size)])
    return f"header length {n}", struct.pack("<Q", n) + b.raw[8:]


def m_truncate(rng: random.Random, b: Base) -> tuple[str, bytes]:
    cut = rng.choice([rng.randrange(0, len(b.raw)), rng.randrange(0, 8), 8 + b.n, len(b.raw) - 1,
                      rng.randrange(8 + b.n, len(b.raw))])
    return f"truncated to {cut} bytes", b.raw[:cut]


def m_extend(rng: random.Random, b: Base) -> tuple[str, bytes]:
    extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if rng.random() < 0.5:
        return f"{len(extra)} bytes appended", b.raw + extra
    at = rng.randrange(8 + b.n, len(b.raw) + 1)
    return f"{len(extra)} bytes inserted in the data at {at}", b.raw[:at] + extra + b.raw[at:]


def m_reorder(rng: random.Random, b: Base) -> tuple[str, bytes]:
    """Valid rewrites: entries in another order, data laid out in another order, arrays for entries."""
    names = b.names()
    rng.shuffle(names)
    keys = names + (["__metadata__"] if rng.random() < 0.7 else [])
    rng.shuffle(keys)
    header, data, pos = {}, b"", 0
    relayout = rng.random() < 0.5
    for k in keys:
        entry = dict(b.header[k]) if k != "__metadata__" else b.header[k]
        if k != "__metadata__":
            begin, end = entry["data_offsets"]
            if relayout:
                entry["data_offsets"] = [pos, pos + end - begin]
                data += b.data[begin:end]
                pos += end - begin
            if rng.random() < 0.2:
                entry = [entry["dtype"], entry["shape"], entry["data_offsets"]]
        header[k] = entry
    return f"reordered (relayout={relayout}) {keys}", assemble(header, data if relayout else b.data)


def retyped(b: Base, name: str, field: str, value: object) -> dict:
    header = json.loads(b.header_text)
    header[name][field] = value
    return header


def m_dtype(rng: random.Random, b: Base) -> tuple[str, bytes]:
    name = rng.choice(b.names())
    value = rng.choice([*DTYPES, "F8_E4M3", "F8_E5M2", "U16", "U32", "U64", "C64", "F4", "F33", "f32", "", " F32",
                        32, None, ["F32"], {"F32": None}, {"F32": 1}, {}, True])
    return f"{name}.dtype = {value!r}", assemble(retyped(b, name, "dtype", value), b.data)


def m_shape(rng: random.Random, b: Base) -> tuple[str, bytes]:
    name = rng.choice(b.names())
    shape = list(b.header[name]["shape"])
    roll = rng.random()
    if roll < 0.5 and shape:
        shape[rng.randrange(len(shape))] = rng.choice(SPECIAL_VALUES + [rng.randint(-5, 10), 2**62, 10**19])
    elif roll < 0.65:
        shape = rng.choice([None, 4, "4", {}, [[4]], [], [0], [2**32, 2**32], [0, 2**63], [2**63 - 1, 0]])
    elif roll < 0.8:
        shape = shape[::-1]  # same size, other shape: valid
    elif roll < 0.9:
        shape = shape + [1] * rng.randint(1, 70)  # many unit dimensions: valid
    else:
        shape = shape[:-1] if shape else [1]
    return f"{name}.shape = {shape!r}", assemble(text_of(retyped(b, name, "shape", shape)), b.data)


def m_offsets(rng: random.Random, b: Base) -> tuple[str, bytes]:
    name = rng.choice(b.names())
    begin, end = b.header[name]["data_offsets"]
    size = len(b.data)
    value = rng.choice([
        [end, begin], [begin + 1, end + 1], [begin - 1, end - 1], [begin, end + 1], [begin, end - 1],
        [0, end - begin], [size, size + end - begin], [size * 2, size * 2 + end - begin], [begin], [begin, end, end],
        [float(begin), end], [-0.0, end], [-8, end], [str(begin), end], [begin, 2**64 + end], [2**63, 2**63 + 8],
        [True, end], None, {"0": begin}, [begin, rng.randrange(0, size + 16)], [rng.randrange(0, size), end]])
    return f"{name}.data_offsets = {value!r}", assemble(text_of(retyped(b, name, "data_offsets", value)), b.data)


INVALID_UTF8 = [b"\xff", b"\xc3", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\x80",
                b"\xc0\xaf", b"\xf4\x90\x80\x80"]


def m_non_utf8(rng: random.Random, b: Base) -> tuple[str, bytes]:
    text = b.header_text.encode()
    junk = rng.choice(INVALID_UTF8)
    if rng.random() < 0.7:  # inside a string: a tensor name or metadata value
        quotes = [i for i, c in enumerate(text) if c == ord('"')]
        at = rng.choice(quotes) + 1
    else:
        at = rng.randrange(len(text) + 1)
    return f"{junk!r} inserted at {at}", assemble(text[:at] + junk + text[at:], b.data)


def m_nesting(rng: random.Random, b: Base) -> tuple[str, bytes]:
    depth = rng.choice([10, 100, 124, 125, 126, 127, 200, 1000, 5000, 100_000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    inner = "1" if opener != "[" else ""
    deep = opener * depth + inner + closer * depth
    where = rng.choice(["whole header", "extra field", "metadata", "shape", "unclosed"])
    name = rng.choice(b.names())
    header = json.loads(b.header_text)
    if where == "whole header":
        text = deep
    elif where == "unclosed":
        text = '{"x": ' + opener * depth
    else:
        marker = "__DEEP__"
        if where == "extra field":
            header[name]["z"] = marker
        elif where == "metadata":
            header["__metadata__"] = {"format": marker}
        else:
            header[name]["shape"] = marker
        text = json.dumps(header).replace(f'"{marker}"', deep)
    return f"{opener} nested {depth} deep in {where} ({name})", assemble(text, b.data)


def m_metadata(rng: random.Random, b: Base) -> tuple[str, bytes]:
    header = json.loads(b.header_text)
    value = rng.choice([[], 1, "x", None, True, {"a": 1}, {"a": None}, {"a": ["b"]}, {"a": {"b": "c"}}, {},
                        {"\ud800": "x"}, {"a": "\udc00"}, {"format": "pt", "extra": "x" * 1000}, [["format", "pt"]],
                        random_value(rng)])
    if rng.random() < 0.2:
        text = json.dumps(header)[:-1] + ', "__metadata__": ' + json.dumps(value) + "}"  # given twice
        return f"__metadata__ twice, then {value!r}", assemble(text, b.data)
    header["__metadata__"] = value
    return f"__metadata__ = {value!r}", assemble(header, b.data)


JSON_TRICKS = [
    ("NaN value", lambda t: t.replace('"pt"', "NaN", 1)),
    ("Infinity value", lambda t: t.replace('"pt"', "-Infinity", 1)),
    ("float out of range", lambda t: t[:-1] + ', "__x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], '
                                              '"z": 1e400}}'),
    ("long integer", lambda t: t[:-1] + ', "__x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], '
                                        '"z": ' + "7" * 400 + "}}"),
    ("lone surrogate name", lambda t: t.replace('"ids"', '"ids\\ud800"')),
    ("surrogate pair name", lambda t: t.replace('"ids"', '"ids\\ud83d\\ude00"')),
    ("escaped names", lambda t: t.replace('"ids"', '"\\u0069ds"').replace('"dtype"', '"\\u0064type"')),
    ("trailing garbage", lambda t: t + "x"),
    ("trailing NUL", lambda t: t + "\x00"),
    ("trailing spaces", lambda t: t + " " * 7),
    ("leading whitespace", lambda t: "\n\t " + t),
    ("byte order mark", lambda t: "\ufeff" + t),
    ("duplicate tensor", lambda t: t[:-1] + ', "ids": ' + json.dumps(json.loads(t)["ids"]) + "}"),
    ("duplicate field", lambda t: t.replace('"shape"', '"shape": [3], "shape"', 1)),
    ("control character in a name", lambda t: t.replace('"ids"', '"i\x01ds"')),
    ("single quotes", lambda t: t.replace('"ids"', "'ids'")),
    ("comment", lambda t: "// c\n" + t),
    ("minus zero offset", lambda t: t.replace('"data_offsets":[0,', '"data_offsets":[-0,', 1)),
    ("exponent in a shape", lambda t: t.replace('"shape":[3]', '"shape":[3e0]', 1)),
    ("empty text", lambda t: ""),
    ("only whitespace", lambda t: "   "),
]


def m_json_text(rng: random.Random, b: Base) -> tuple[str, bytes]:
    what, trick = rng.choice(JSON_TRICKS)
    compact = json.dumps(b.header, separators=(",", ":"))
    text = trick(compact if rng.random() < 0.5 else b.header_text)
    return what, assemble(text.encode("utf-8", "surrogatepass"), b.data)


def m_tree(rng: random.Random, b: Base) -> tuple[str, bytes]:
    """A random edit anywhere in the header tree: replace, delete or add a value."""
    header = json.loads(b.header_text)
    name = rng.choice(list(header))
    node, key = header, name
    while isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.6:
        node = node[key]
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
    action = rng.choice(["replace", "delete", "add"])
    if action == "replace":
        node[key] = random_value(rng)
    elif action == "delete":
        del node[key]
    else:
        target = node[key] if isinstance(node[key], (dict, list)) else node
        value = random_value(rng)
        if isinstance(target, dict):
            target[rng.choice(["z", "dtype", "shape", "__metadata__", "new"])] = value
        else:
            target.append(value)
    try:
        text = text_of(header)
    except ValueError:  # e.g. a value json.dumps refuses
        text = json.dumps(header)
    return f"{action} at {name}/{key}: {text[:200]}", assemble(text, b.data)


def m_splice(rng: random.Random, b: Base) -> tuple[str, bytes]:
    """Whole entries: one dropped (a gap), copied under another name (an overlap), or data swapped."""
    header = json.loads(b.header_text)
    name = rng.choice(b.names())
    roll = rng.random()
    if roll < 0.4:
        del header[name]
        what = f"dropped {name}"
    elif roll < 0.7:
        header[name + ".copy"] = dict(header[name])
        what = f"copied {name}"
    else:
        other = rng.choice(b.names())
        header[name]["data_offsets"], header[other]["data_offsets"] = (header[other]["data_offsets"],
                                                                       header[name]["data_offsets"])
        what = f"swapped the offsets of {name} and {other}"
    return what, assemble(header, b.data)


FILE_MUTATIONS = {
    "header_bytes": m_header_bytes, "length_field": m_length_field, "truncate": m_truncate, "extend": m_extend,
    "reorder": m_reorder, "dtype": m_dtype, "shape": m_shape, "offsets": m_offsets, "non_utf8": m_non_utf8,
    "nesting": m_nesting, "metadata": m_metadata, "json_text": m_json_text, "tree": m_tree, "splice": m_splice,
}


@pytest.mark.parametrize("cls", list(FILE_MUTATIONS))
def test_fuzz_safetensors_file(cls, base, tmp_path):
    def case(rng: random.Random, i: int):
        what, raw = FILE_MUTATIONS[cls](rng, base)
        return what, file_case(tmp_path / str(i), raw)

    run_class(f"file.{cls}", case)


def test_the_unmutated_file_reads_like_the_library(base, tmp_path):
    assert file_case(tmp_path, base.raw)() == "accepted"


# --- a multi-file checkpoint and its index --------------------------------------------------------------


def write_sharded(directory: Path) -> dict:
    """Three shards of ``base_tensors`` and their index (what ``save_pretrained`` writes)."""
    from safetensors.torch import save_file

    tensors = base_tensors()
    names = sorted(tensors)
    weight_map = {}
    for k in range(3):
        shard = f"model-0000{k + 1}-of-00003.safetensors"
        part = {n: tensors[n] for n in names[k::3]}
        save_file(part, str(directory / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


HOSTILE_NAMES = ["/etc/passwd", "/tmp/x.safetensors", "../model-00001-of-00003.safetensors",
                 "sub/../../x.safetensors", "..", ".", "", "pytorch_model.bin", "model.bin", "model.pt",
                 "model-00001-of-00003.safetensors\x00.bin", "missing.safetensors", "sub/missing.safetensors",
                 "model-00001-of-00003.safetensors/", "./model-00002-of-00003.safetensors", "\ud800.safetensors",
                 "~/x.safetensors", "model.safetensors.index.json"]


def m_index(rng: random.Random, directory: Path, index: dict) -> str:
    """One change to the index or to a shard; returns what was done."""
    text_path = directory / "model.safetensors.index.json"
    wm = index["weight_map"]
    tensor = rng.choice(sorted(wm))
    shards = sorted(set(wm.values()))
    roll = rng.random()
    if roll < 0.25:
        wm[tensor] = rng.choice(HOSTILE_NAMES + [rng.choice(shards)] + [random_value(rng)])
        what = f"weight_map[{tensor}] = {wm[tensor]!r}"
    elif roll < 0.35:
        del wm[tensor]
        what = f"{tensor} dropped from the weight_map"
    elif roll < 0.45:
        wm[tensor + ".ghost"] = rng.choice(shards)
        what = f"ghost tensor placed in {wm[tensor + '.ghost']}"
    elif roll < 0.55:
        index["weight_map"] = random_value(rng)
        what = f"weight_map = {index['weight_map']!r}"
    elif roll < 0.7:
        text = json.dumps(index)
        cut = rng.randrange(len(text))
        text_path.write_text(rng.choice([text[:cut], text[:cut] + "\x00" + text[cut:], "[" * 100_000, "[]",
                                         "null", '"x"', "\ufeff" + text]), encoding="utf-8")
        return f"index text mangled at {cut}"
    elif roll < 0.8:
        shard = directory / rng.choice(shards)
        b = Base(shard.read_bytes())
        cls = rng.choice(list(FILE_MUTATIONS))
        what, raw = FILE_MUTATIONS[cls](rng, b)
        shard.write_bytes(raw)
        return f"{shard.name}: {cls}: {what}"
    elif roll < 0.9:  # a second copy of a shard: every tensor in it is in two files
        dup = rng.choice(shards)
        (directory / "copy.safetensors").write_bytes((directory / dup).read_bytes())
        if rng.random() < 0.5:
            wm[tensor] = "copy.safetensors"
        what = f"copy of {dup} (weight_map[{tensor}] = {wm[tensor]})"
    else:  # a shard moved into a subdirectory: valid when the index says so
        shard = rng.choice(shards)
        (directory / "sub").mkdir(exist_ok=True)
        (directory / shard).rename(directory / "sub" / shard)
        if rng.random() < 0.7:
            for t, f in wm.items():
                if f == shard:
                    wm[t] = f"sub/{shard}"
        what = f"{shard} moved into sub/"
    text_path.write_text(json.dumps(index), encoding="utf-8", errors="surrogatepass")
    return what


def test_fuzz_checkpoint_index(tmp_path):
    def case(rng: random.Random, i: int):
        directory = tmp_path / str(i)
        directory.mkdir()
        what = m_index(rng, directory, write_sharded(directory))
        return what, lambda: check_against_library(directory)

    run_class("index", case)


def test_the_unmutated_index_reads_like_the_library(tmp_path):
    write_sharded(tmp_path)
    assert check_against_library(tmp_path) == "accepted"


# --- plan YAML ---------------------------------------------------------------------------------------------


USER_PLAN = """\
mesh:
  axes: [tensor]
sharding:
  model.embed_tokens.weight: [tensor, null]
  model.layers.*.mlp.up_proj.weight: [tensor, null]
  model.layers.*.mlp.down_proj.weight: [null, tensor]
  lm_head: [null, null, null]
"""
FLAT_PLAN = "model.layers.*.mlp.gate_proj.weight: [tensor, null]\nmesh: {axes: [tensor], sizes: [2]}\n"
YAML_TOKENS = [
    ":", ": ", "- ", "[", "]", "{", "}", "*", "&a ", "*a", "<<: *a", "!!binary",
    "!!python/object/apply:os.system ['true']", "\t", "null", "~", "'", '"', "#", "%YAML 1.1\n", "---\n", "...\n",
    "? ", "|", ">", ",", "\n", "  ", "tensor", "fsdp", "[tensor, tensor]", "[[tensor, fsdp], null]", "1e400", ".nan",
    "-1", "99999999999999999999", "0x10", "yes", "=", "model.layers.*", "(", "\\", "\x00", "\ud800", "é",
]


def plan_bases() -> list[str]:
    """Valid plans for the tiny Llama: ours, the documented ones, and the built-in one as a user plan (less
    its bias rules, which a user plan may not give for a model without biases)."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "plans"
    builtin = resources.files("shardwise.families.llama").joinpath("plan.yaml").read_text()
    builtin = "".join(line for line in builtin.splitlines(keepends=True) if not line.strip().endswith("bias: [tensor]"))
    return [USER_PLAN, FLAT_PLAN, builtin] + [p.read_text() for p in sorted(docs.glob("*.yaml"))]


def mutate_text(rng: random.Random, text: str, tokens: list[str]) -> tuple[str, str]:
    lines = text.splitlines(keepends=True) or [""]
    roll = rng.random()
    i = rng.randrange(len(lines))
    if roll < 0.15:
        del lines[i]
        return "".join(lines), f"line {i} deleted"
    if roll < 0.25:
        lines.insert(i, lines[rng.randrange(len(lines))])
        return "".join(lines), f"a line copied to {i}"
    if roll < 0.35:
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return "".join(lines), f"lines {i} and {j} swapped"
    if roll < 0.45:
        cut = rng.randrange(len(text) + 1)
        return text[:cut], f"truncated at {cut}"
    if roll < 0.55:
        at = rng.randrange(len(text) + 1)
        return text[:at] + chr(rng.randrange(1, 0x300)) + text[at + 1:], f"character {at} replaced"
    if roll < 0.65:
        return " " * rng.randint(1, 3) + text if rng.random() < 0.5 else text.replace("  ", " ", rng.randint(1, 9)), \
            "indentation changed"
    token = rng.choice(tokens)
    at = rng.randrange(len(text) + 1)
    return text[:at] + token + text[at:], f"{token!r} inserted at {at}"


def mutate_tree(rng: random.Random, data: object) -> tuple[object, str]:
    """Replace, delete or add one node of a parsed document."""
    if not isinstance(data, (dict, list)) or not data:
        return random_value(rng), "replaced whole"
    node = data
    key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
    path = [key]
    while isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.7:
        node = node[key]
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
    action = rng.choice(["replace", "replace", "delete", "add"])
    if action == "replace":
        node[key] = rng.choice([random_value(rng), random_value(rng), "tensor", ["tensor", "tensor"], "fsdp",
                                [["tensor"], None], "model.layers.*", "*", "(", "", 0, -3, 2**40, 1.5, None])
    elif action == "delete":
        del node[key]
    elif isinstance(node, dict):
        node[rng.choice(["sizes", "axes", "units", "groups", "output", "activation_rank", "sequence_parallel",
                         "tp_splits", "mesh", "sharding", "x", "model.norm.weight"])] = random_value(rng)
    else:
        node.append(random_value(rng))
    return data, f"{action} at {path}"


def sanitize(value: object) -> object:
    """Strings yaml.safe_dump cannot write (lone surrogates) replaced: the tree mutation is about structure."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode()
    if isinstance(value, list):
        return [sanitize(v) for v in value]
    if isinstance(value, dict):
        return {sanitize(k): sanitize(v) for k, v in value.items()}
    return value


def mutated_plan(rng: random.Random) -> tuple[str, str]:
    import yaml

    text = rng.choice(plan_bases())
    if rng.random() < 0.1:
        return text, "unchanged"
    if rng.random() < 0.45:
        return mutate_text(rng, text, YAML_TOKENS)
    data = yaml.safe_load(text)
    if rng.random() < 0.2:  # family keys are parsed from user plans too (and then replaced by the family's)
        key = rng.choice(FAMILY_KEYS)
        data[key] = rng.choice([random_value(rng), float("inf"), float("nan"), "?", None, -1, 1.5, True,
                                {"dim": rng.choice([1, "x", float("inf"), None]), "residual": [], "norms": [],
                                 "inputs": {}, "rules": []}])
        return yaml.safe_dump(sanitize(data), sort_keys=False), f"{key} = {data[key]!r}"
    data, what = mutate_tree(rng, data)
    data = sanitize(data)
    if rng.random() < 0.3:
        return json.dumps(data, allow_nan=True), what + " (as JSON)"
    return yaml.safe_dump(data, sort_keys=False), what


def mutated_override(rng: random.Random) -> str:
    base = rng.choice(["lm_head.weight=[tensor,null]", "model.embed_tokens.weight=[null,null]",
                       "model.layers.*.mlp.up_proj.weight=[tensor, null]", "model.norm=[null, null, null]"])
    text, _ = mutate_text(rng, base, YAML_TOKENS)
    return text


def plan_case(directory: Path, checkpoint: Path, rng: random.Random, i: int) -> tuple[str, Callable[[], str]]:
    from shardwise.conformance import model_layout
    from shardwise.parallelize import check_runtime
    from shardwise.plan import resolve_plan

    text, what = mutated_plan(rng)
    path = directory / f"plan{i}.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    overrides = [mutated_override(rng)] if rng.random() < 0.3 else []
    tp = rng.choice([None, 1, 2, 2, 3, 4, 4, 8, 16])
    sequence_parallel = rng.random() < 0.2

    def check() -> str:
        try:
            plan = resolve_plan("llama", path, overrides, sequence_parallel=sequence_parallel)
            layout = model_layout(checkpoint, tp, plan=plan)
            check_runtime(layout)
        except ShardwiseError as exc:
            return refused(exc)
        return "accepted"

    return f"{what}; tp={tp} sp={sequence_parallel} overrides={overrides} text={text[:400]!r}", check


def test_fuzz_plan_yaml(tiny_checkpoint, tmp_path):
    run_class("plan", lambda rng, i: plan_case(tmp_path, tiny_checkpoint, rng, i))


# Inputs long runs found (SHARDWISE_FUZZ_CASES=5000), replayed on every run: lines added to a valid plan.
PLAN_CORPUS = [
    "activation_rank: '?'",  # ValueError from int() in plan._parse
    "activation_rank: [1]",  # TypeError
    "activation_rank: {a: 1}",  # TypeError
    "activation_rank: null",  # TypeError
    "activation_rank: .inf",  # OverflowError
    "activation_rank: .nan",  # ValueError
    "sequence_parallel: {dim: .inf, residual: [], norms: [], inputs: {}, rules: []}",  # OverflowError
    "sequence_parallel: {dim: x, residual: [], norms: [], inputs: {}, rules: []}",
    "mesh: {axes: [tensor], sizes: [99999999999999999999]}",
    "groups: [[1]]",
    "units: [1]",
]


@pytest.mark.parametrize("line", PLAN_CORPUS)
def test_plan_corpus(line, tiny_checkpoint, tmp_path):
    from shardwise.conformance import model_layout
    from shardwise.plan import resolve_plan

    path = tmp_path / "plan.yaml"
    path.write_text(USER_PLAN.replace("mesh:\n  axes: [tensor]\n", "") + line + "\n")
    with contextlib.suppress(ShardwiseError):
        model_layout(tiny_checkpoint, 2, plan=resolve_plan("llama", path))


# --- partition-config JSON ---------------------------------------------------------------------------------


PARTITION_BASES = [
    {"partitions": [{"name": "p0", "devices": [{"deviceId": 0, "numCores": 1}, {"deviceId": 1, "numCores": 1}]}],
     "connections": [{"devices": [0, 1], "type": "p2p"}]},
    {"partitions": [{"name": "p0", "devices": [{"deviceId": 0, "numCores": 1}]},
                    {"name": "big", "devices": [{"deviceId": 1, "numCores": 1}, {"deviceId": 2, "numCores": 1}]}]},
    {"partitions": [{"name": "solo", "devices": [{"deviceId": 3, "numCores": 2}]}], "connections": []},
]
JSON_TOKENS = ["{", "}", "[", "]", ",", ":", '"', "null", "true", "-1", "1e400", "NaN", "Infinity", "-0", "0.5",
               "99999999999999999999999", '"p0"', "\\u0000", "\\ud800", "\x00", "\xff", "//", "'"]


def partition_case(directory: Path, rng: random.Random, i: int) -> tuple[str, Callable[[], str]]:
    import copy

    from shardwise.topology import load_partition_config, resolve_topology

    data = copy.deepcopy(rng.choice(PARTITION_BASES))
    roll = rng.random()
    if roll < 0.1:
        text, what = json.dumps(data), "unchanged"
    elif roll < 0.45:
        data, what = mutate_tree(rng, data)
        text = json.dumps(sanitize(data))
    elif roll < 0.8:
        text, what = mutate_text(rng, json.dumps(data, indent=1), JSON_TOKENS)
    else:
        depth = rng.choice([100, 1000, 100_000])
        text, what = rng.choice([("[" * depth, f"{depth} unclosed ["),
                                 (json.dumps(data)[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}", "deep key"),
                                 ("\ufeff" + json.dumps(data), "BOM")])
    path = directory / f"pc{i}.json"
    raw = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.1:
        raw = raw.replace(b'"p0"', b'"p\xff0"')
    path.write_bytes(raw)
    device = rng.choice(["cpu", "cpu", "cuda", "cuda:0", "tpu", ""])
    partition = rng.choice([None, None, "p0", "big", "solo", "", "nope"])

    def check() -> str:
        try:
            resolve_topology(load_partition_config(path), device=device, partition=partition)
        except ShardwiseError as exc:
            return refused(exc)
        return "accepted"

    return f"{what}; device={device!r} partition={partition!r} text={text[:300]!r}", check


def test_fuzz_partition_json(tmp_path):
    run_class("partition", lambda rng, i: partition_case(tmp_path, rng, i))


# --- the table -----------------------------------------------------------------------------------------------


def test_fuzz_summary():
    """Print cases per class and outcome (``pytest -s tests/test_fuzz.py``); runs last in this module."""
    if not COUNTS:
        pytest.skip("no fuzz class ran in this session")
    rows = [f"{'class':<22}{'cases':>7}{'accepted':>10}{'refused':>9}{'failed':>8}{'seconds':>9}"]
    for cls in sorted(COUNTS):
        c = COUNTS[cls]
        rows.append(f"{cls:<22}{sum(c.values()):>7}{c['accepted']:>10}{c['refused']:>9}{c['failed']:>8}"
                    f"{SECONDS[cls]:>9.2f}")
    total = Counter()
    for c in COUNTS.values():
        total.update(c)
    rows.append(f"{'total':<22}{sum(total.values()):>7}{total['accepted']:>10}{total['refused']:>9}"
                f"{total['failed']:>8}{math.fsum(SECONDS.values()):>9.2f}")
    print("\n" + "\n".join(rows))
