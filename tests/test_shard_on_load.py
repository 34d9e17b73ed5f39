"""Each rank reads exactly its slices: counted bytes, and loaded values equal to slices of the source."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from shardwise.checkpoint import CheckpointSource, MapUnavailable, SliceReader, can_map
from shardwise.config import load_config
from shardwise.conformance import model_layout
from shardwise.loader import load_rank_state


@pytest.mark.parametrize("map_all", [False, True], ids=["default", "map-every-contiguous-slice"])
@pytest.mark.parametrize("tp", [2, 3, 4, 6])  # at 3 and 6, heads and vocab are padded
def test_each_rank_reads_only_its_slices(tiny_models, tp, map_all, monkeypatch):
    if map_all:  # tiny tensors are below the size worth a mapping; map them all to test the views
        monkeypatch.setattr(SliceReader, "MAP_MIN_BYTES", 0)
    path = tiny_models["gqa9_tied"]
    source = CheckpointSource(path)
    layout = model_layout(path, tp)
    full = {}
    for f in source.files:
        full.update(load_file(str(f)))
    split_bytes = sum(full[n].numel() * 4 for n, t in layout.tensors.items() if t.source == n and not t.replicated)
    replicated_bytes = sum(full[n].numel() * 4 for n in layout.replicated_names)
    for rank in range(tp):
        state, stats = load_rank_state(source, layout, rank, torch.float32)
        # The bytes this rank fetched are exactly its slices (padding is not read) ...
        expected = sum(t.shards[rank].source_numel * 4 for n, t in layout.tensors.items() if t.source == n)
        assert stats.bytes_read == expected
        assert (stats.bytes_mapped > 0) == (map_all and can_map())
        # ... which is far less than the checkpoint: its share of split tensors plus the replicated ones.
        # (KV heads may be replicated when heads don't divide, hence the 2x allowance on the split share.)
        assert stats.bytes_read <= 2 * split_bytes / tp + replicated_bytes
        assert stats.bytes_read < source.total_bytes
        # And what it holds is really those slices of the source tensors.
        for name, tensor in state.items():
            shard = layout.tensors[name].shards[rank]
            pos = 0
            for seg in shard.dims[layout.tensors[name].split_dims[0]] if layout.tensors[name].split_dims else ():
                dim = layout.tensors[name].split_dims[0]
                got = tensor.narrow(dim, pos, seg.length)
                if seg.start is None:
                    assert not got.any()
                else:
                    assert torch.equal(got, full[name].narrow(dim, seg.start, seg.length))
                pos += seg.length
            if not layout.tensors[name].split_dims:
                assert torch.equal(tensor, full[name])


def test_no_whole_tensor_reads(tiny_models, monkeypatch):
    """Loading never goes through a whole-file or whole-tensor API."""
    import safetensors
    import safetensors.torch

    def forbidden(*a, **k):
        raise AssertionError("whole-tensor read")

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr(safetensors, "safe_open", forbidden)
    path = tiny_models["llama3_rope"]
    load_rank_state(CheckpointSource(path), model_layout(path, 2), 1, torch.bfloat16)


def test_dtype_cast_on_the_way(tiny_models):
    path = tiny_models["qwen2_bias"]
    state, _ = load_rank_state(CheckpointSource(path), model_layout(path, 2), 0, torch.bfloat16)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert load_config(path).qkv_bias and "model.layers.0.self_attn.q_proj.bias" in state


def test_reader_counts_bytes(tiny_models):
    source = CheckpointSource(tiny_models["gqa9_tied"])
    reader = SliceReader(source)
    view = reader.source_view("model.norm.weight")
    assert view.shape == (72,) and reader.bytes_read == 0
    reader.close()


def _contiguous_slice_bytes(layout, rank, itemsize):
    """Bytes of the slices that are one byte range of their file (whole rows, no padding)."""
    total = 0
    for name, t in layout.tensors.items():
        shard = t.shards[rank]
        if t.source != name or shard.has_padding or len(shard.dims[0]) != 1:
            continue
        if all(len(segs) == 1 and segs[0].start == 0 for segs in shard.dims[1:]):
            total += shard.source_numel * itemsize
    return total


needs_mapping = pytest.mark.skipif(not can_map(), reason="this kernel cannot map pages in on request")


@needs_mapping
def test_contiguous_slices_are_views_of_the_file_and_copy_on_write(tiny_models, monkeypatch):
    """Whole-row slices in the file's dtype are mapped, not copied; writing to them never reaches the file."""
    monkeypatch.setattr(SliceReader, "MAP_MIN_BYTES", 0)
    path = tiny_models["gqa9_tied"]
    source = CheckpointSource(path)
    layout = model_layout(path, 3)
    state, stats = load_rank_state(source, layout, 1, torch.float32)
    expected = _contiguous_slice_bytes(layout, 1, 4)
    assert 0 < stats.bytes_mapped == expected < stats.bytes_held
    name = "model.layers.0.mlp.up_proj.weight"  # column-parallel: whole rows
    from test_presharded import mapped_file

    assert mapped_file(state[name]) == str(source.tensors[name].file)
    assert mapped_file(state["model.layers.0.mlp.down_proj.weight"]) != str(source.tensors[name].file)
    before = load_file(str(source.tensors[name].file))[name].clone()
    state[name].fill_(7.0)  # private mapping: this process gets its own copy of the pages
    assert torch.equal(load_file(str(source.tensors[name].file))[name], before)
    again, _ = load_rank_state(source, layout, 1, torch.float32)
    assert not torch.equal(again[name], state[name]) and not (again[name] == 7.0).all()


@needs_mapping
def test_nothing_is_mapped_when_the_dtype_changes_or_mapping_is_off(tiny_models, monkeypatch):
    monkeypatch.setattr(SliceReader, "MAP_MIN_BYTES", 0)
    path = tiny_models["gqa9_tied"]
    source, layout = CheckpointSource(path), model_layout(path, 2)
    cast, cast_stats = load_rank_state(source, layout, 0, torch.bfloat16)
    assert cast_stats.bytes_mapped == 0
    copied, copied_stats = load_rank_state(source, layout, 0, torch.float32, map_weights=False)
    mapped, mapped_stats = load_rank_state(source, layout, 0, torch.float32)
    assert copied_stats.bytes_mapped == 0 < mapped_stats.bytes_mapped
    assert copied_stats.bytes_read == mapped_stats.bytes_read
    for name in copied:
        assert torch.equal(copied[name], mapped[name])
        assert torch.equal(cast[name], mapped[name].to(torch.bfloat16))


def test_slices_that_cannot_be_mapped_are_copied(tiny_models, monkeypatch):
    import shardwise.checkpoint as ck

    def refuse(*args):
        raise MapUnavailable("Too many open files")

    monkeypatch.setattr(SliceReader, "MAP_MIN_BYTES", 0)
    monkeypatch.setattr(ck, "map_populated", refuse)
    path = tiny_models["gqa9_tied"]
    source, layout = CheckpointSource(path), model_layout(path, 2)
    state, stats = load_rank_state(source, layout, 1, torch.float32)
    reference, reference_stats = load_rank_state(source, layout, 1, torch.float32, map_weights=False)
    assert stats.bytes_mapped == 0 and stats.bytes_read == reference_stats.bytes_read
    for name in reference:
        assert torch.equal(state[name], reference[name])


def test_a_truncated_file_is_a_clear_error(tiny_models, tmp_path, monkeypatch):
    """Caught from the header before any read; cut between reading headers and loading, an error
    rather than a crash. (Cut while its mapped weights are in use, a file raises SIGBUS, as any
    memory-mapped file does: checkpoints are replaced by writing a new file and renaming it.)"""
    import shutil

    from shardwise.errors import ShardwiseError

    monkeypatch.setattr(SliceReader, "MAP_MIN_BYTES", 0)
    path = tmp_path / "m"
    shutil.copytree(tiny_models["gqa9_tied"], path)
    victim = sorted(path.glob("*.safetensors"))[0]
    size = victim.stat().st_size
    source, layout = CheckpointSource(path), model_layout(path, 2)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ShardwiseError, match="truncated"):
        CheckpointSource(path)
    with pytest.raises(ShardwiseError, match="truncated"):
        load_rank_state(source, layout, 0, torch.float32)
