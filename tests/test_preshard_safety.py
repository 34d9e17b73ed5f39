"""Pre-sharding safety: one writer per rank, staleness checks that catch any content change, an untrusted
manifest, and files that know their own mesh."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_presharded import assert_same, on_load  # noqa: E402 - shared helpers

import shardwise.presharded as ps
from shardwise.errors import ShardwiseError
from shardwise.mesh import Mesh
from shardwise.presharded import (
    check_presharded,
    load_presharded_state,
    preshard,
    presharded_layout,
    presharded_mesh,
    rank_file,
    read_manifest,
    require_usable,
)

# ---------------------------------------------------------------------------------------------- A: one writer


WRITER = """
import json, logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
import shardwise.presharded as ps
real = ps._write_tensor
def slow(*a, **k):  # long enough for the two writers to overlap
    time.sleep(0.02)
    return real(*a, **k)
ps._write_tensor = slow
src, out, go, start, local = sys.argv[1:6]
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.002)
stats = ps.preshard(src, out, 4, "float32", start_rank=int(start), local_ranks=int(local), threads=2)
print(json.dumps({"written": stats.ranks_written, "skipped": stats.ranks_skipped}), flush=True)
"""


def run_writers(source: Path, out: Path, tmp_path: Path, ranges: list[tuple[int, int]]) -> list[tuple[dict, str]]:
    """Start one writer process per (start_rank, local_ranks), release them at once, and return
    (stats, stderr) of each."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(source), str(out), str(go), str(s), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s, n in ranges]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-2000:] for _, err in outs)
    return [(json.loads(stdout.splitlines()[-1]), err) for stdout, err in outs]


def test_two_writers_of_the_same_ranks_at_once(source, tmp_path):
    """The second waits for the first, then finds every file valid: each rank is written exactly once."""
    out = tmp_path / "c"
    results = run_writers(source, out, tmp_path, [(0, 4), (0, 4)])
    written = sorted(r for stats, _ in results for r in stats["written"])
    assert written == [0, 1, 2, 3]
    assert any("waiting for another shardwise writing rank" in err for _, err in results)
    assert not list((out / "weights").glob(".*tmp*"))
    for rank in range(4):
        assert_same(load_presharded_state(out, rank, 4, "float32", model_path=source)[0], on_load(source, 4, rank))


def test_writers_of_disjoint_ranks_run_in_parallel(source, tmp_path):
    """Two 'nodes' writing their own ranks into one directory at once neither wait for nor disturb each other."""
    out = tmp_path / "c"
    (first, err0), (second, err1) = run_writers(source, out, tmp_path, [(0, 2), (2, 2)])
    assert first == {"written": [0, 1], "skipped": []} and second == {"written": [2, 3], "skipped": []}
    assert "writing rank" not in err0 + err1
    for rank in range(4):
        assert_same(load_presharded_state(out, rank, 4, "float32", model_path=source)[0], on_load(source, 4, rank))


@pytest.mark.parametrize("where", ["compiled", "weights", "parent"])
def test_an_output_path_that_is_a_file_is_a_clear_error(source, tmp_path, where):
    out = tmp_path / "c"
    if where == "compiled":
        out.write_text("not a directory")
    elif where == "weights":
        out.mkdir()
        (out / "weights").write_text("not a directory")
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "c"
    with pytest.raises(ShardwiseError, match="not a directory|cannot create") as err:
        preshard(source, out, 2, "float32")
    assert "\n" not in str(err.value)
    if where != "parent":
        with pytest.raises(ShardwiseError):
            load_presharded_state(out, 0, 2, "float32")


def test_a_file_system_without_flock_writes_unlocked_with_a_warning(source, tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(ps.fcntl, "flock", no_flock)
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        stats = preshard(source, tmp_path / "c", 2, "float32")
    assert stats.ranks_written == [0, 1] and "going on without locking" in caplog.text
    load_presharded_state(tmp_path / "c", 0, 2, "float32", model_path=source)


def test_only_the_locked_ranks_debris_is_removed(source, tmp_path, monkeypatch):
    """Temporary files are removed only for ranks this writer holds: other nodes' stay."""
    weights = tmp_path / "c" / "weights"
    weights.mkdir(parents=True)

    def debris(rank: int, host: str, pid: int) -> Path:
        path = weights / f".tp{rank}_sharded_checkpoint.safetensors.tmp-{host}-{pid}"
        path.write_bytes(b"partial")
        return path

    mine, theirs = debris(0, "othernode", 7), debris(3, "othernode", 7)
    preshard(source, tmp_path / "c", 4, "float32", start_rank=0, local_ranks=2)
    assert not mine.exists() and theirs.exists()
    # Without flock only this host's dead processes' files are known to be debris.
    monkeypatch.setattr(ps.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "no")))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    gone, live, other = debris(1, ps._host(), int(dead)), debris(1, ps._host(), os.getppid()), debris(1, "node", 7)
    rank_file(tmp_path / "c", 1).unlink()
    preshard(source, tmp_path / "c", 4, "float32", start_rank=0, local_ranks=2)
    assert not gone.exists() and live.exists() and other.exists()


def test_written_files_get_the_usual_permissions(source, tmp_path):
    """Files written under temporary names are as readable as the rank files (not mkstemp's 0600)."""
    preshard(source, tmp_path / "c", 2, "float32")
    mode = rank_file(tmp_path / "c", 0).stat().st_mode
    for path in (tmp_path / "c" / "weights" / "manifest.json", tmp_path / "c" / "config.json"):
        assert path.stat().st_mode == mode, path


# ---------------------------------------------------------------------------------------------- B: staleness


@pytest.fixture(scope="module")
def large_source(tmp_path_factory) -> Path:
    """A one-file Llama of ~6.5 MB: large enough that 16 sampled 64 KiB blocks leave most of it unread."""
    from safetensors.torch import save_file

    hidden, inter, vocab = 128, 4096, 256
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "tie_word_embeddings": False, "torch_dtype": "float32"}
    path = tmp_path_factory.mktemp("large") / "src"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    p = "model.layers.0."
    shapes = {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
              p + "self_attn.k_proj.weight": (64, hidden), p + "self_attn.v_proj.weight": (64, hidden),
              p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
              p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
              p + "post_attention_layernorm.weight": (hidden,), "model.embed_tokens.weight": (vocab, hidden),
              "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    save_file({n: torch.randn(s, generator=g) for n, s in shapes.items()}, str(path / "model.safetensors"))
    return path


@pytest.fixture
def large(large_source, tmp_path):
    """A private copy of the large source, pre-sharded at TP 2."""
    src = tmp_path / "src"
    shutil.copytree(large_source, src)
    preshard(src, tmp_path / "c", 2, "float32")
    return src, tmp_path / "c"


def old_fingerprint(path: Path, samples: int = 16, block: int = 1 << 16) -> str:
    """shardwise's fingerprint before manifest version 2: header plus 16 sampled 64 KiB blocks."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        digest.update(f.read(n))
        for i in range(samples):
            f.seek(8 + n + (size - 8 - n - block) * i // max(1, samples - 1) if size - 8 - n > block else 8 + n)
            digest.update(f.read(block))
    return digest.hexdigest()


def unsampled_offset(path: Path, tensor: str) -> int:
    """A byte in the middle of ``tensor``'s data that the old fingerprint's blocks do not cover."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = json.loads(f.read(n))[tensor]["data_offsets"]
    size, data = path.stat().st_size, 8 + n
    sampled = [(data + (size - data - (1 << 16)) * i // 15, 1 << 16) for i in range(16)]
    for offset in range(data + (begin + end) // 2, data + end, 4096):
        if not any(lo <= offset < lo + length + 8 for lo, length in sampled):
            return offset
    raise AssertionError("no unsampled offset")


def flip_bytes(path: Path, offset: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(8)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_an_edit_between_the_old_samples_is_caught_by_default(large, keep_mtime):
    """One mid-tensor edit that 16 sampled blocks miss; with mtime set back too (ctime still moves)."""
    src, compiled = large
    f = src / "model.safetensors"
    before = old_fingerprint(f)
    load_presharded_state(compiled, 0, 2, "float32", model_path=src)
    flip_bytes(f, unsampled_offset(f, "model.layers.0.mlp.down_proj.weight"), keep_mtime)
    assert old_fingerprint(f) == before  # what version 1 would have accepted
    with pytest.raises(ShardwiseError, match=r"is stale: the source checkpoint changed \(model.safetensors\)"):
        load_presharded_state(compiled, 0, 2, "float32", model_path=src)


def test_an_edit_that_keeps_the_identity_is_caught_only_by_full(large, monkeypatch):
    """What "auto" trusts: a file whose identity is unchanged. Simulate an edit that keeps every field
    (only possible by bypassing the file system or forging the clock): "full" still catches it."""
    src, compiled = large
    monkeypatch.setattr(ps, "_identity", lambda st: [st.st_size, 0, 0, st.st_ino, st.st_dev])
    shutil.rmtree(compiled)
    preshard(src, compiled, 2, "float32")
    f = src / "model.safetensors"
    flip_bytes(f, unsampled_offset(f, "model.layers.0.mlp.gate_proj.weight"))
    load_presharded_state(compiled, 0, 2, "float32", model_path=src)  # the documented blind spot
    with pytest.raises(ShardwiseError, match="the source checkpoint changed"):
        load_presharded_state(compiled, 0, 2, "float32", model_path=src, verify="full")


def test_a_byte_identical_copy_is_accepted_and_hashed_once(large, monkeypatch, caplog):
    src, compiled = large
    copy = src.parent / "copy"
    shutil.copytree(src, copy)
    with caplog.at_level(logging.INFO, logger="shardwise"):
        load_presharded_state(compiled, 1, 2, "float32", model_path=copy)
    assert "Checking the content of 1 source file" in caplog.text
    assert (compiled / "weights" / f".verified-{ps._host()}.json").is_file()

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed again")

    monkeypatch.setattr(ps, "_hash_file", no_hashing)
    load_presharded_state(compiled, 1, 2, "float32", model_path=copy)  # remembered for this identity
    load_presharded_state(compiled, 1, 2, "float32", model_path=src)  # as the manifest recorded it


def test_verification_levels(large, monkeypatch):
    src, compiled = large
    calls = []
    real = ps._hash_file
    monkeypatch.setattr(ps, "_hash_file", lambda *a: calls.append(a) or real(*a))
    require_usable(compiled, 2, "float32", src)
    assert calls == []  # identity unchanged: nothing read
    require_usable(compiled, 2, "float32", src, verify="full")
    require_usable(compiled, 2, "float32", src, verify="full")
    assert len(calls) == 2  # always re-read
    f = src / "model.safetensors"
    flip_bytes(f, unsampled_offset(f, "model.layers.0.mlp.up_proj.weight"))
    require_usable(compiled, 2, "float32", src, verify="header")  # content is not looked at
    with pytest.raises(ShardwiseError, match="verify must be one of auto, full, header"):
        require_usable(compiled, 2, "float32", src, verify="sometimes")


def test_a_header_change_is_caught_at_every_level(source, tmp_path):
    from safetensors.torch import load_file, save_file

    preshard(source, tmp_path / "c", 2, "float32")
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.norm.weight"
    tensors = load_file(str(source / index[name]))
    save_file(tensors, str(source / index[name]), metadata={"format": "pt", "edited": "yes"})
    for verify in ("header", "auto", "full"):
        _, problems = check_presharded(tmp_path / "c", 2, "float32", source, verify=verify)
        assert problems == [f"the source checkpoint changed ({index[name]})"]


def test_a_second_preshard_reads_nothing_and_resumes_without_hashing(large, monkeypatch):
    src, compiled = large
    monkeypatch.setattr(ps, "_hash_file", lambda *a: (_ for _ in ()).throw(AssertionError("hashed again")))
    stats = preshard(src, compiled, 2, "float32")
    assert stats.ranks_written == [] and stats.ranks_skipped == [0, 1]
    (compiled / "weights" / "manifest.json").unlink()  # interrupted before the manifest: this host's record
    rank_file(compiled, 1).unlink()
    stats = preshard(src, compiled, 2, "float32")
    assert stats.ranks_written == [1] and stats.ranks_skipped == [0]


def test_preshard_hashes_while_writing_and_stamps_the_key_last(large, monkeypatch):
    """Rank files finished before the hashes are in wait for the key: none is ever renamed without it."""
    src, compiled = large
    shutil.rmtree(compiled)
    real = ps._hash_file

    def slow_hash(*a):
        time.sleep(0.3)
        return real(*a)

    renamed = []
    real_seal = ps._seal
    monkeypatch.setattr(ps, "_hash_file", slow_hash)
    monkeypatch.setattr(ps, "_seal", lambda rf, key, durable: renamed.append(key) or real_seal(rf, key, durable))
    preshard(src, compiled, 2, "float32", verify="full")
    manifest = read_manifest(compiled)
    assert renamed == [manifest["key"]] * 2
    for rank in range(2):
        assert_same(load_presharded_state(compiled, rank, 2, "float32", model_path=src)[0], on_load(src, 2, rank))


def test_a_source_that_changes_while_being_hashed_fails_the_preshard(large, monkeypatch):
    src, compiled = large
    shutil.rmtree(compiled)
    stats = iter(range(1000))
    monkeypatch.setattr(ps, "_identity", lambda st: [st.st_size, next(stats), 0, st.st_ino, st.st_dev])
    with pytest.raises(ShardwiseError, match="changed while it was being read"):
        preshard(src, compiled, 2, "float32")
    assert not rank_file(compiled, 0).exists() and not list((compiled / "weights").glob(".*tmp*"))


def test_a_version_1_manifest_asks_for_a_re_shard(source, tmp_path):
    preshard(source, tmp_path / "c", 2, "float32")
    path = tmp_path / "c" / "weights" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 1}))
    with pytest.raises(ShardwiseError, match="made by an older shardwise .*re-shard"):
        load_presharded_state(tmp_path / "c", 0, 2, "float32", model_path=source)
    preshard(source, tmp_path / "c", 2, "float32")  # re-sharding replaces it
    assert read_manifest(tmp_path / "c")["version"] == ps.VERSION
    load_presharded_state(tmp_path / "c", 0, 2, "float32", model_path=source)


# ---------------------------------------------------------------------------------------------- C: manifest


def _set(path: list, value):
    def change(m):
        target = m
        for k in path[:-1]:
            target = target[k]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return m
    return change


CORRUPTIONS = {
    "not json": (lambda m: "{not json", "is not valid JSON"),
    "a list": (lambda m: [m], "not a shardwise pre-sharded checkpoint manifest"),
    "another format": (_set(["format"], "other"), "not a shardwise pre-sharded checkpoint manifest"),
    "newer": (_set(["version"], 99), "made by a newer shardwise"),
    "no key": (_set(["key"], KeyError), "the field 'key' is missing"),
    "key not a string": (_set(["key"], 5), "the field 'key' must be a string"),
    "mesh size 0": (_set(["mesh", "sizes"], [0]), "the field 'mesh' must be"),
    "mesh axes a string": (_set(["mesh", "axes"], "tensor"), "the field 'mesh' must be"),
    "mesh sizes a bool": (_set(["mesh", "sizes"], [True]), "the field 'mesh' must be"),
    "dtype": (_set(["dtype"], "float99"), "the field 'dtype' must be one of"),
    "dtype a list": (_set(["dtype"], ["float32"]), "the field 'dtype' must be one of"),
    "config not an object": (_set(["config"], [1]), "the field 'config' must be"),
    "config lacks a field": (_set(["config", "hidden_size"], KeyError), "its config cannot be read"),
    "config unsupported": (_set(["config", "architectures"], ["GPT2"]), "unsupported architecture"),
    "plan rules": (_set(["plan", "rules"], [[1, [], True]]), "the field 'plan' must be"),
    "plan missing": (_set(["plan"], KeyError), "the field 'plan' is missing"),
    "tensors shape": (_set(["tensors", "model.norm.weight"], [["72"], "F32"]), "the field 'tensors' must be"),
    "tensors dtype": (_set(["tensors", "model.norm.weight"], [[72], "Q9"]), "the field 'tensors' must be"),
    "tensors dtype a list": (_set(["tensors", "model.norm.weight"], [[72], ["F32"]]), "the field 'tensors' must be"),
    "source a string": (_set(["source"], "abc"), "the field 'source' must be"),
    "source entry": (_set(["source", 0, "sha256"], KeyError), "the field 'source' must be"),
    "identity": (_set(["source_identity", "files"], {"x": [1]}), "the field 'source_identity' must be"),
}


@pytest.fixture
def presharded(source, tmp_path):
    preshard(source, tmp_path / "c", 2, "float32")
    return tmp_path / "c"


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_malformed_manifest_is_a_clear_error(presharded, source, name):
    path = presharded / "weights" / "manifest.json"
    corrupt, message = CORRUPTIONS[name]
    changed = corrupt(json.loads(path.read_text()))
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(ShardwiseError, match=message) as err:
        read_manifest(presharded)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    for kwargs in ({}, {"model_path": source}, {"reshard": True}):
        with pytest.raises(ShardwiseError):
            load_presharded_state(presharded, 0, 2, "float32", **kwargs)
    preshard(source, presharded, 2, "float32")  # a re-shard rewrites it
    load_presharded_state(presharded, 0, 2, "float32", model_path=source)


def test_an_unreadable_or_missing_manifest(presharded):
    path = presharded / "weights" / "manifest.json"
    path.unlink()
    assert read_manifest(presharded) is None and read_manifest(presharded.parent / "nothing") is None
    with pytest.raises(ShardwiseError, match="no pre-sharded checkpoint"):
        load_presharded_state(presharded, 0, 2, "float32")
    path.mkdir()
    with pytest.raises(ShardwiseError, match="cannot read"):
        read_manifest(presharded)


@pytest.mark.parametrize("change", [
    lambda m: m["tensors"].pop("model.embed_tokens.weight"),
    lambda m: m["tensors"].__setitem__("model.norm.weight", [[72, 3, 2], "F32"]),
    lambda m: m["tensors"].__setitem__("model.layers.0.self_attn.q_proj.weight", [[5, 72], "F32"]),
    lambda m: m["plan"]["rules"].append(["model.norm.weight", ["nowhere"], True]),
    lambda m: m["plan"].__setitem__("mesh_axes", ["tensor", "tensor"]),
    lambda m: m["config"].__setitem__("num_attention_heads", "nine"),
])
def test_an_inconsistent_manifest_never_escapes_as_another_exception(presharded, change):
    """Well-formed but inconsistent content: whatever later step trips on it raises ShardwiseError."""
    path = presharded / "weights" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    for tp, reshard in ((2, False), (3, True), (None, False)):
        only_shardwise_errors(load_presharded_state, presharded, 0, tp, "float32", reshard=reshard)
    only_shardwise_errors(presharded_layout, manifest, 2)
    only_shardwise_errors(presharded_layout, manifest, 3)


def only_shardwise_errors(fn, *args, **kwargs) -> None:
    """``fn`` may succeed (the inconsistency need not matter to it) or raise ShardwiseError, nothing else."""
    try:
        fn(*args, **kwargs)
    except ShardwiseError as exc:
        assert "\n" not in str(exc)


# ---------------------------------------------------------------------------------------------- D: own shape


def test_a_presharded_checkpoint_knows_its_mesh(source, tmp_path):
    with pytest.raises(ShardwiseError, match="no pre-sharded checkpoint"):
        presharded_mesh(tmp_path / "c")
    preshard(source, tmp_path / "c", 3, "float32")
    assert presharded_mesh(tmp_path / "c") == Mesh(("tensor",), (3,))
    assert check_presharded(tmp_path / "c", None, "float32", source)[1] == []
    assert require_usable(tmp_path / "c", None, reshard=True)[1] is False  # nothing to re-slice
    for rank in range(3):
        state, _ = load_presharded_state(tmp_path / "c", rank, None, model_path=source)
        assert_same(state, on_load(source, 3, rank))
    config, layout = presharded_layout(read_manifest(tmp_path / "c"))
    assert layout.mesh.world_size == 3
    with pytest.raises(ShardwiseError, match="rank 3 is not within the pre-sharded checkpoint's 3 ranks"):
        load_presharded_state(tmp_path / "c", 3)
    with pytest.raises(ShardwiseError, match=r"is stale: the TP degree changed \(files are for tensor 3, asked for "
                                             r"tensor 2\).*--reshard"):
        require_usable(tmp_path / "c", 2, "float32")
