"""bench/load.py derives floors (lower bounds) from what it measured; check the arithmetic it reports."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_load", Path(__file__).parent.parent / "bench" / "load.py")
bench_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_load)
GB = bench_load.GB


def _results(sol_s: float = 0.25, hf_s: float = 0.5, write_s: float = 1.0) -> dict:
    ok = {"status": "ok"}
    return {
        "machine": {"page_cache_fresh_gbps": 2.0, "page_cache_gbps": 10.0},
        "needed_bytes": {"node": 4 * GB},
        "methods": {
            "shard_on_load": {"warm": {**ok, "seconds": sol_s, "bytes_held_per_rank": [2 * GB, 2 * GB],
                                       "bytes_mapped_per_rank": [1.5 * GB, 1.5 * GB]}},
            "hf_tp": {"warm": {**ok, "seconds": hf_s}},
            "preshard_write": {**ok, "seconds": write_s, "runs": [{"bytes_written": 4 * GB}]},
        },
    }


def test_floors_follow_copied_and_written_bytes():
    floors = bench_load.machine_floors(_results())
    # 1 GB copied by the node at 2 GB/s of fresh memory: 0.5 s, however fast the loader is.
    assert floors["shard_on_load copied bytes (node)"] == pytest.approx(1 * GB)
    assert floors["shard_on_load floor s (copied bytes / fresh-memory GB/s)"] == pytest.approx(0.5)
    assert floors["shard_on_load_s / its floor"] == pytest.approx(0.5)
    # 4 GB needed in 0.5 s = 8 GB/s against 10 GB/s of page cache.
    assert floors["allowed by the floor estimate: shard_on_load GB/s / page-cache GB/s"] == pytest.approx(0.8)
    assert floors["allowed by the floor estimate: hf_tp_s / shard_on_load_s"] == pytest.approx(1.0)
    assert floors["preshard_write estimate s (bytes written / fresh-memory GB/s)"] == pytest.approx(2.0)
    assert floors["preshard_write_s / its estimate"] == pytest.approx(0.5)
    assert floors["write estimate / shard_on_load_s"] == pytest.approx(8.0)
    # With both at their estimates the end-to-end ratio no longer depends on the rate.
    key = "with both at their estimates: (preshard_write_s + presharded_s) / shard_on_load_s"
    assert floors[key] == pytest.approx(4.0)


def test_nothing_copied_gives_no_load_floor():
    res = _results()
    res["methods"]["shard_on_load"]["warm"]["bytes_mapped_per_rank"] = [2 * GB, 2 * GB]  # all mapped
    floors = bench_load.machine_floors(res)
    assert not any(k.startswith("shard_on_load") for k in floors) and "write estimate / shard_on_load_s" in floors


def test_floors_skip_what_was_not_measured():
    res = _results()
    del res["methods"]["preshard_write"]
    res["methods"]["shard_on_load"]["warm"].pop("bytes_mapped_per_rank")  # results from before it was recorded
    assert bench_load.machine_floors(res) == {}


def test_targets_quote_the_reachable_ratio():
    res = _results()
    _, targets = bench_load.ratios_and_targets(
        {**res, "methods": {**res["methods"], "shard_on_load": {"warm": {
            **res["methods"]["shard_on_load"]["warm"], "gbps": 16.0, "bytes_logical_per_rank": [2 * GB, 2 * GB],
            "peak_rss_per_rank": [1 * GB, 1 * GB]}}}, "needed_bytes": {"node": 4 * GB},
         "machine": {**res["machine"], "cold_disk_gbps": 1.0}}, ["warm"])
    by_name = {t["target"]: t for t in targets}
    page_cache = by_name["warm shard-on-load >= 80% of page-cache bandwidth"]
    assert page_cache["met"] and "allowed by the floor estimate (floors below): 0.80" in page_cache["how"]
    hf = by_name["warm shard-on-load >= 3x HF transformers"]
    assert "allowed by the floor estimate (floors below): 1.00" in hf["how"]
    e2e = by_name["pre-shard end to end (write + load) <= 2x shard-on-load (warm)"]
    assert "would take 8.00x this shard-on-load time (the writer ran at 0.50x that estimate)" in e2e["how"]


def test_a_failing_stream_raises_instead_of_hanging():
    def prepare(i):
        if i == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="failed while preparing"):
        bench_load._timed_streams(2, prepare, lambda i, _: 0)

    def work(i, _):
        if i == 0:
            raise RuntimeError("boom")
        return 10

    with pytest.raises(RuntimeError, match="failed while measuring"):
        bench_load._timed_streams(2, lambda i: None, work)
    assert bench_load._timed_streams(2, lambda i: None, lambda i, _: 5)[1] == 10
