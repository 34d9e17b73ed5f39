"""Decoder bucketing (NxD's --enable-bucketing, --context-encoding-buckets, --token-generation-buckets):
the same tokens and logits as without buckets, on tiny models, in one process and through `shardwise run`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import shardwise
from shardwise.decode_buckets import DecodeBuckets, default_buckets
from shardwise.errors import ShardwiseError
from shardwise.generation import generate


@pytest.mark.parametrize("name", ["gqa9_tied", "mistral_window"])  # full attention; a sliding window of 6
def test_bucketed_generation_equals_unbucketed(tiny_models, name):
    sharded = shardwise.load_sharded(tiny_models[name])  # one process: world size 1
    prompts = [[5, 9, 13], [7, 8, 9, 10, 11, 12]]
    buckets = DecodeBuckets.resolve([4, 8, 16], [16, 24, 32, 64], 16, 64)
    plain = generate(sharded.module, prompts, 14, 0, (), keep_logits=True)
    bucketed = generate(sharded.module, prompts, 14, 0, (), keep_logits=True, buckets=buckets)
    assert bucketed.tokens == plain.tokens  # prompts padded 6 -> 8; decode over 16, then 24 KV slots
    for a, b in zip(plain.step_logits, bucketed.step_logits):
        assert torch.allclose(a, b, atol=1e-4)


def test_bucket_choice_and_defaults():
    assert default_buckets(1024) == (128, 256, 512, 1024) and default_buckets(100) == (100,)
    b = DecodeBuckets.resolve([32, 8], None, 64, 512)
    assert b.context == (8, 32) and b.kv == (128, 256, 512)
    assert b.context_length(9) == 32 and b.kv_length(129) == 256 and b.room(5) == 504
    with pytest.raises(ShardwiseError, match="a prompt of 40 tokens exceeds the largest context-encoding bucket"):
        b.context_length(40)
    with pytest.raises(ShardwiseError, match="positive token counts"):
        DecodeBuckets.resolve([0], None, 64, 512)
    # A context bucket as large as the largest KV bucket (NxD's tutorial: 2048 and 2048) is not padded to.
    full = DecodeBuckets.resolve([64], [64], 64, 512)
    assert full.context_length(10) == 10 and full.room(10) == 54


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "shardwise", *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.slow
def test_run_with_bucketing_matches_hf_tokens(tiny_model_dir):
    proc = _cli("run", "--model-path", str(tiny_model_dir), "--tp-degree", "2", "--no-chat-template",
                "--prompt", "w5 w6 w7", "--prompt", "w9 w10 w11 w12 w13", "--batch-size", "2", "--max-new-tokens", "12",
                "--enable-bucketing", "--context-encoding-buckets", "4", "8", "--token-generation-buckets", "12", "32",
                "--check-accuracy-mode", "token-matching")
    assert proc.returncode == 0, proc.stderr
    assert "passed: greedy tokens identical to HF transformers" in proc.stderr


def test_bucket_flags_are_checked_before_any_rank_starts(tiny_model_dir):
    common = ["run", "--model-path", str(tiny_model_dir), "--no-chat-template", "--prompt", "w5 w6 w7 w8 w9"]
    proc = _cli(*common, "--context-encoding-buckets", "8")
    assert proc.returncode == 2 and "need --enable-bucketing" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli(*common, "--enable-bucketing", "--context-encoding-buckets", "4", "--token-generation-buckets", "64")
    assert proc.returncode == 2 and "exceeds the largest context-encoding bucket (4)" in proc.stderr
