"""parallel/shm_native.py: built once into the cache, typed, and never required: without a compiler, with a
failing one, or turned off, the collectives stay in Python (tests/test_shm.py runs both paths across ranks)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from shardwise.parallel import shm_native


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path))
    shm_native.load.cache_clear()
    yield tmp_path / "native"
    shm_native.load.cache_clear()


def _ptrs(*tensors: torch.Tensor):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def test_built_once_into_the_cache_and_sums_in_rank_order(fresh):
    lib = shm_native.load()
    assert lib is not None
    built = list(fresh.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left beside it
    stamp = built[0].stat().st_mtime_ns
    shm_native.load.cache_clear()
    assert shm_native.load() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    parts = [torch.randn(1001, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    out = torch.empty(1001)
    lib.sw_sum_f32(out.data_ptr(), _ptrs(*parts), 3, 1001)
    assert torch.equal(out, (parts[0] + parts[1]) + parts[2])
    halves = [p.bfloat16() for p in parts] + [torch.tensor([float("nan")] * 1001, dtype=torch.bfloat16)]
    out16 = torch.empty(1001, dtype=torch.bfloat16)
    lib.sw_sum_bf16(out16.data_ptr(), _ptrs(*halves[:3]), 3, 1001)
    assert torch.equal(out16.view(torch.int16), ((halves[0] + halves[1]) + halves[2]).view(torch.int16))
    # NaN stays NaN (torch's own bit patterns for it differ between its vector and scalar code; so may ours)
    lib.sw_sum_bf16(out16.data_ptr(), _ptrs(halves[0], halves[3]), 2, 1001)
    assert out16.isnan().all()


def test_arrive_publishes_and_counts_missing_peers(fresh):
    lib = shm_native.load()
    words = torch.zeros(24, dtype=torch.int64)  # flags at 8 and 16; rank 0 owns 8
    src, slot = torch.arange(6, dtype=torch.float32), torch.zeros(6)
    peers = (ctypes.c_int64 * 1)(16)
    spun = ctypes.c_int64(0)
    missing = lib.sw_arrive(src.data_ptr(), slot.data_ptr(), 24, words.data_ptr(), 8, peers, 1, 5, 50, spun)
    assert missing == 1 and spun.value == 50 and words[8] == 5 and torch.equal(slot, src)
    words[16] = 5  # the peer has arrived
    assert lib.sw_arrive(src.data_ptr(), slot.data_ptr(), 24, words.data_ptr(), 8, peers, 1, 5, 50, spun) == 0
    assert spun.value == 0


@pytest.mark.parametrize("how", ["off", "no-compiler", "failing-compiler"])
def test_unusable_means_python_and_no_file_left(fresh, monkeypatch, how):
    if how == "off":
        monkeypatch.setenv("SHARDWISE_NATIVE_COLLECTIVES", "0")
    elif how == "no-compiler":
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setattr(shm_native.shutil, "which", lambda name: None)
    else:
        monkeypatch.setenv("CC", "false")
    assert shm_native.load() is None
    assert not fresh.exists() or not list(fresh.iterdir())
