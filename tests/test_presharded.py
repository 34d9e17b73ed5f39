"""Pre-sharded checkpoints: identical to shard-on-load, never stale, crash-safe, resumable, reshardable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shardwise.checkpoint import CheckpointSource, MapUnavailable, can_map
from shardwise.conformance import model_layout
from shardwise.errors import ShardwiseError
from shardwise.loader import load_rank_state
from shardwise.plan import builtin_plan
from shardwise.presharded import load_presharded_state, preshard, rank_file, read_manifest


def on_load(path, tp, rank, dtype=torch.float32):
    return load_rank_state(CheckpointSource(path), model_layout(path, tp), rank, dtype)[0]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k




def test_presharded_equals_shard_on_load(source, tmp_path):
    stats = preshard(source, tmp_path / "c", 3, "bfloat16")
    assert stats.ranks_written == [0, 1, 2] and stats.ranks_skipped == []
    manifest = read_manifest(tmp_path / "c")
    assert manifest["mesh"] == {"axes": ["tensor"], "sizes": [3]} and manifest["dtype"] == "bfloat16"
    for rank in range(3):
        state, _ = load_presharded_state(tmp_path / "c", rank, 3, "bfloat16", model_path=source)
        assert_same(state, on_load(source, 3, rank, torch.bfloat16))


def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds ``tensor``'s data in this process (from /proc/self/maps), if any."""
    ptr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not can_map(), reason="this kernel cannot map pages in on request (MADV_POPULATE_READ)")
def test_presharded_tensors_are_private_views_of_the_rank_file(source, tmp_path):
    """Loaded from a rank file, tensors are its pages (nothing copied); writes stay in the process."""
    preshard(source, tmp_path / "c", 2, "float32")
    state, stats = load_presharded_state(tmp_path / "c", 1, 2, "float32")
    assert stats.bytes_mapped == stats.bytes_held > 0
    assert {mapped_file(t) for t in state.values()} == {str(rank_file(tmp_path / "c", 1))}
    name = "model.layers.0.self_attn.q_proj.weight"
    original = state[name].clone()
    state[name].zero_()
    again, _ = load_presharded_state(tmp_path / "c", 1, 2, "float32", model_path=source)
    assert torch.equal(again[name], original) and original.any()


def _rewrite_one_tensor(path: Path):
    from safetensors.torch import load_file, save_file

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    f = path / index[name]
    tensors = load_file(str(f))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("change,expected", [
    ("source", "the source checkpoint changed"),
    ("tp", "the TP degree changed (files are for tensor 2, asked for tensor 3)"),
    ("dtype", "the dtype changed (files are float32, asked for bfloat16)"),
    ("plan", "the sharding plan changed"),
])
def test_stale_files_are_refused_with_the_reason(source, tmp_path, change, expected):
    preshard(source, tmp_path / "c", 2, "float32")
    tp, dtype, plan = 2, "float32", None
    if change == "source":
        _rewrite_one_tensor(source)
    elif change == "tp":
        tp = 3
    elif change == "dtype":
        dtype = "bfloat16"
    from shardwise import presharded

    if change == "plan":
        plan = builtin_plan("llama").with_overrides([f"model.layers.*.mlp.{n}.weight=[null,null]"
                                                     for n in ("gate_proj", "up_proj", "down_proj")])
        _, problems = presharded.check_presharded(tmp_path / "c", tp, dtype, source, plan)
        assert expected in "; ".join(problems)
        return
    with pytest.raises(ShardwiseError, match="is stale") as err:
        load_presharded_state(tmp_path / "c", 0, tp, dtype, model_path=source)
    assert expected in str(err.value) and "shardwise shard" in str(err.value)


def test_reshard_without_the_source(source, tmp_path):
    preshard(source, tmp_path / "c", 4, "float32")
    expected = {r: on_load(source, 2, r) for r in range(2)}
    shutil.rmtree(source)  # the original checkpoint is gone
    for rank in range(2):
        state, _ = load_presharded_state(tmp_path / "c", rank, 2, "float32", reshard=True)
        assert_same(state, expected[rank])


def test_partial_and_corrupt_files_are_redone(source, tmp_path):
    preshard(source, tmp_path / "c", 2, "float32")
    f0 = rank_file(tmp_path / "c", 0)
    with open(f0, "r+b") as f:  # truncated, as if the disk filled up
        f.truncate(f0.stat().st_size - 16)
    with pytest.raises(ShardwiseError, match="incomplete: rank 0"):
        load_presharded_state(tmp_path / "c", 1, 2, "float32")
    stats = preshard(source, tmp_path / "c", 2, "float32")
    assert stats.ranks_written == [0] and stats.ranks_skipped == [1]
    load_presharded_state(tmp_path / "c", 0, 2, "float32")


KILL_SCRIPT = """
import sys, time
import shardwise.checkpoint as ck
real = ck.SliceReader.read
def slow(self, *a, **k):
    time.sleep(0.05)
    return real(self, *a, **k)
ck.SliceReader.read = slow
from shardwise.presharded import preshard
preshard(sys.argv[1], sys.argv[2], 4, "float32", threads=1)
"""


@pytest.mark.slow
def test_killed_preshard_leaves_nothing_acceptable_and_resumes(source, tmp_path):
    out = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(source), str(out)])
    weights = out / "weights"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not rank_file(out, 1).exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # mid-way through rank 2 or so
    proc.wait()
    finished = [r for r in range(4) if rank_file(out, r).exists()]
    assert 0 < len(finished) < 4
    # No manifest yet, or one whose files are incomplete: either way nothing loads.
    with pytest.raises(ShardwiseError):
        load_presharded_state(out, 0, 4, "float32")
    stats = preshard(source, out, 4, "float32")
    assert stats.ranks_skipped == finished and sorted(stats.ranks_written + finished) == [0, 1, 2, 3]
    assert not list(weights.glob(".*tmp*"))
    for rank in range(4):
        assert_same(load_presharded_state(out, rank, 4, "float32")[0], on_load(source, 4, rank))


def test_unmappable_rank_files_are_read_instead(source, tmp_path, monkeypatch):
    import shardwise.presharded as ps

    preshard(source, tmp_path / "c", 2, "float32")

    def refuse(*args):
        raise MapUnavailable("no mappings on this file system")

    monkeypatch.setattr(ps, "map_populated", refuse)
    state, stats = load_presharded_state(tmp_path / "c", 0, 2, "float32")
    assert stats.bytes_mapped == 0
    assert_same(state, on_load(source, 2, 0))


def test_a_failure_while_finishing_a_file_leaves_no_debris(source, tmp_path, monkeypatch):
    """A rank file that cannot be renamed into place fails the run cleanly; the next run completes it."""
    real = Path.replace

    def replace(self, target):
        if Path(target).name == rank_file(tmp_path / "c", 1).name:
            raise OSError(122, "Disk quota exceeded")
        return real(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(OSError, match="quota"):
        preshard(source, tmp_path / "c", 3, "float32", threads=2)
    assert not list((tmp_path / "c" / "weights").glob(".*tmp*"))
    assert not rank_file(tmp_path / "c", 1).exists()
    monkeypatch.setattr(Path, "replace", real)
    stats = preshard(source, tmp_path / "c", 3, "float32")
    assert 1 in stats.ranks_written
    for rank in range(3):
        assert_same(load_presharded_state(tmp_path / "c", rank, 3, "float32")[0], on_load(source, 3, rank))


INTERRUPT_SCRIPT = """
import sys, time
import shardwise.presharded as ps
real = ps._write_tensor
def slow(*a, **k):
    if not slow.announced:
        slow.announced = True
        print("writing", flush=True)
    time.sleep(0.1)
    return real(*a, **k)
slow.announced = False
ps._write_tensor = slow
from shardwise.presharded import preshard
try:
    preshard(sys.argv[1], sys.argv[2], 4, "float32", threads=2)
except KeyboardInterrupt:
    print("interrupted", time.monotonic(), flush=True)
    sys.exit(130)
"""


@pytest.mark.slow
def test_ctrl_c_stops_a_preshard_promptly(source, tmp_path):
    """Ctrl-C stops every writer thread at its next piece instead of finishing all rank files.

    The time asserted is until ``preshard`` has stopped its threads, cleaned up and raised: the
    interpreter's own shutdown afterwards is not pre-sharding's (and the CLI skips most of it).
    Pieces take 0.1 s each, so finishing the 4 files would take seconds.
    """
    out = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPT_SCRIPT, str(source), str(out)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # the threads are at work, not still setting up
    time.sleep(0.3)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stdout.startswith("interrupted"), stdout
    assert float(stdout.split()[1]) - start < 1.0  # CLOCK_MONOTONIC: one clock for all processes
    assert len([r for r in range(4) if rank_file(out, r).exists()]) < 4
    assert not list((out / "weights").glob(".*tmp*"))


RSS_SCRIPT = """
import resource, sys, torch
from shardwise.checkpoint import can_map, CheckpointSource, MapUnavailable
from shardwise.conformance import model_layout
from shardwise.loader import load_rank_state
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
path, tp = sys.argv[1], int(sys.argv[2])
layout = model_layout(path, tp)
base = rss("VmRSS")
state, stats = load_rank_state(CheckpointSource(path), layout, tp - 1, torch.float32)
print(rss("VmHWM") - base, stats.bytes_held)
"""


@pytest.mark.slow
def test_peak_memory_is_the_shard_plus_a_bounded_buffer(tmp_path):
    """A rank's peak resident memory stays within its shard + 10% + 256 MB, not the checkpoint size."""
    from safetensors.torch import save_file

    hidden, inter, layers, vocab = 1024, 4096, 8, 32000
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
           "num_key_value_heads": 4, "tie_word_embeddings": False, "torch_dtype": "float32"}
    path = tmp_path / "big"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": torch.ones(hidden, hidden),
             p + "self_attn.o_proj.weight": torch.ones(hidden, hidden),
             p + "self_attn.k_proj.weight": torch.ones(256, hidden),
             p + "self_attn.v_proj.weight": torch.ones(256, hidden),
             p + "mlp.gate_proj.weight": torch.ones(inter, hidden), p + "mlp.up_proj.weight": torch.ones(inter, hidden),
             p + "mlp.down_proj.weight": torch.ones(hidden, inter), p + "input_layernorm.weight": torch.ones(hidden),
             p + "post_attention_layernorm.weight": torch.ones(hidden)}
        save_file(t, str(path / f"layer{i}.safetensors"))
    save_file({"model.embed_tokens.weight": torch.ones(vocab, hidden), "lm_head.weight": torch.ones(vocab, hidden),
               "model.norm.weight": torch.ones(hidden)}, str(path / "embed.safetensors"))
    total = CheckpointSource(path).total_bytes
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), "4"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak, shard = map(int, proc.stdout.split())
    assert shard < total / 3
    assert peak <= shard * 1.1 + (256 << 20), f"peak {peak / 2**20:.0f} MiB for a {shard / 2**20:.0f} MiB shard"


@pytest.mark.slow
def test_two_nodes_with_torchrun(smollm2, tmp_path, torchrun):
    """Two 'nodes' on loopback: each pre-shards only its own rank, then torchrun --nnodes 2 runs them."""
    torchrun, env, port = torchrun
    compiled = tmp_path / "compiled"
    for node in (0, 1):  # NxD's spellings of the flags
        subprocess.run([sys.executable, "-m", "shardwise", "shard", "--model-path", str(smollm2),
                        "--compiled-model-path", str(compiled), "--tp-degree", "2", "--start_rank_id", str(node),
                        "--local_ranks_size", "1"], check=True, env=env, capture_output=True, timeout=300)
    procs = [subprocess.Popen([torchrun, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "shardwise", "run",
                               "--model-path", str(smollm2), "--compiled-model-path", str(compiled), "--skip-sharding",
                               "--tp-degree", "2", "--max-new-tokens", "8"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs[0][1][-1500:] + outs[1][1][-1500:]
    assert "Paris" in outs[0][0] and "Loading pre-sharded weights" in outs[0][1]


def test_a_user_plan_is_checked_against_itself(source, tmp_path):
    """Files pre-sharded with a user's plan load with that plan (not judged against the family's)."""
    from shardwise.loader import load_rank_state

    plan = builtin_plan("llama").with_overrides([f"model.layers.*.mlp.{n}.weight=[null,null]"
                                                 for n in ("gate_proj", "up_proj", "down_proj")])
    preshard(source, tmp_path / "c", 2, "float32", plan)
    layout = model_layout(source, 2, plan)
    for rank in range(2):
        state, _ = load_presharded_state(tmp_path / "c", rank, 2, "float32", model_path=source, plan=plan)
        assert_same(state, load_rank_state(CheckpointSource(source), layout, rank, torch.float32)[0])
    with pytest.raises(ShardwiseError, match="the sharding plan changed"):
        load_presharded_state(tmp_path / "c", 0, 2, "float32", model_path=source)
