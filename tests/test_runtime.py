"""Ranks that fail take the others down with a clear message; torchrun runs the same code."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

import pytest
import torch.distributed as dist

from shardwise.errors import ShardwiseError
from shardwise.parallel.launch import launch


def _one_rank_fails(rank, world):
    if rank == 1:
        raise ShardwiseError("simulated failure on rank 1")
    dist.barrier()  # rank 0 would wait here forever if nobody stopped it


def _one_rank_dies(rank, world):
    if rank == 2:
        os._exit(7)
    dist.barrier()


@pytest.mark.slow
def test_failing_rank_stops_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where torch leaves a failed rank's error file
    monkeypatch.setattr(tempfile, "tempdir", None)
    start = time.monotonic()
    with pytest.raises(ShardwiseError, match="rank 1 failed: simulated failure on rank 1"):
        launch(_one_rank_fails, 2)
    assert time.monotonic() - start < 60
    assert list(tmp_path.iterdir()) == []  # nothing left behind: no pytorch-errorfile-*.pickle


@pytest.mark.slow
def test_dying_rank_stops_the_others():
    start = time.monotonic()
    with pytest.raises(ShardwiseError, match="rank 2 died"):
        launch(_one_rank_dies, 3)
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_runs_under_torchrun(smollm2, tmp_path, torchrun):
    """`shardwise run` under torchrun: same code path, rank 0 prints the answer."""
    torchrun, env, port = torchrun
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "-m",
         "shardwise", "run", "--model-path", str(smollm2),
         "--tp-degree", "2", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("Output:") == 1
    assert "Paris" in proc.stdout
