"""--compile-decode: the decode step through torch.compile, one graph per token-generation bucket; the same
tokens as the eager steps, in one process and tensor-parallel through `shardwise run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import shardwise
from shardwise.compiled_decode import CompiledDecode
from shardwise.decode_buckets import DecodeBuckets
from shardwise.generation import generate


def test_compiled_decode_generates_the_eager_tokens_with_one_graph_per_bucket(tiny_models):
    sharded = shardwise.load_sharded(tiny_models["gqa9_tied"])  # one process: world size 1
    prompts = [[5, 9, 13], [7, 8, 9, 10, 11, 12]]
    buckets = DecodeBuckets.resolve([8], [16, 32], 8, 32)
    eager = generate(sharded.module, prompts, 14, 0, (), keep_logits=True, buckets=buckets)
    compiled = CompiledDecode(sharded.module)
    with torch._inductor.config.patch(fx_graph_cache=False):  # compiled here, so the graph passes run
        out = generate(sharded.module, prompts, 14, 0, (), keep_logits=True, buckets=buckets, compiled=compiled)
    assert out.tokens == eager.tokens
    # Each layer's attention and every linear of both graphs ran as reductions (decode_attention.py, matvec.py).
    layers = len(sharded.module.model.layers)
    assert compiled.attention.rewritten == 2 * layers and compiled.matvec.rewritten > 2 * layers
    for a, b in zip(eager.step_logits, out.step_logits):
        assert torch.allclose(a, b, atol=1e-4)
    # Slots 8..21 were written: steps over the 16-slot bucket, then the 32-slot one; a graph each, not a step each.
    assert compiled.shapes == {(2, 16), (2, 32)}
    # The two steps that compiled are left out of the decode timing (their seconds are compile_seconds).
    assert out.decode_steps == eager.decode_steps - 2 and compiled.compile_seconds > 0
    again = generate(sharded.module, prompts, 14, 0, (), buckets=buckets, compiled=compiled)
    assert again.tokens == eager.tokens and compiled.shapes == {(2, 16), (2, 32)}
    assert again.decode_steps == eager.decode_steps


def test_compiled_decode_needs_buckets(tiny_models):
    sharded = shardwise.load_sharded(tiny_models["gqa9_tied"])
    with pytest.raises(ValueError, match="buckets"):
        generate(sharded.module, [[5, 9]], 4, 0, (), compiled=CompiledDecode(sharded.module))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "cuda"])  # cuda: simulated GPUs under the device checks (docs/gpu.md)
def test_run_compile_decode_tp2_matches_hf_tokens(tiny_model_dir, tmp_path, device):
    # A private inductor cache, so the first run compiles and a second one must find it there.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    if device == "cuda":
        env["SHARDWISE_CHECK_DEVICES"] = "1"

    def run():
        return subprocess.run(
            [sys.executable, "-m", "shardwise", "run", "--model-path", str(tiny_model_dir), "--tp-degree", "2",
             "--device", device,
             "--no-chat-template", "--prompt", "w5 w6 w7", "--max-new-tokens", "10", "--compile-decode",
             "--context-encoding-buckets", "4", "--token-generation-buckets", "16", "--check-accuracy-mode",
             "token-matching", "--benchmark", "--benchmark-iterations", "1", "--output-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=600, env=env)

    proc = run()
    assert proc.returncode == 0, proc.stderr
    assert "passed: greedy tokens identical to HF transformers" in proc.stderr
    report = json.loads((tmp_path / "benchmark_report.json").read_text())
    assert report["options"]["compile_decode"] is True
    if device == "cuda":  # simulated GPUs: the bucketed steps run eagerly under the device checks, and say so
        assert "collectives checked, 0 violations" in proc.stderr
        assert "ran eagerly on the simulated GPUs" in proc.stderr
    else:
        assert "Compiled decode: 1 graph(s) (batch, KV slots: 1x16)" in proc.stderr
        assert "from inductor's cache" not in proc.stderr
        assert report["compile_seconds"] > 0
        # How long each rank waited for the other at the shared-memory collectives, over the timed runs.
        wait = report["collective_wait"]
        assert len(wait["seconds_per_rank"]) == 2 and all(0 <= s < 1 for s in wait["share_of_generation_per_rank"])
        assert "Ranks waited for each other at collectives:" in proc.stderr
        # Nothing in the graph differs between runs (collectives are found by creation number, not address).
        again = run()
        assert again.returncode == 0, again.stderr
        assert "1x16) in" in again.stderr and "1 from inductor's cache" in again.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs: mode reduce-overhead)")
def test_compiled_decode_on_a_gpu_generates_the_eager_tokens(tiny_models):
    """On a real GPU the step is captured in CUDA graphs (reduce-overhead) over the static KV cache."""
    sharded = shardwise.load_sharded(tiny_models["gqa9_tied"], device="cuda")
    prompts = [[5, 9, 13], [7, 8, 9, 10, 11, 12]]
    buckets = DecodeBuckets.resolve([8], [16, 32], 8, 32)
    eager = generate(sharded.module, prompts, 14, 0, (), buckets=buckets, device="cuda")
    compiled = CompiledDecode(sharded.module, "cuda")
    for _ in range(2):  # the second pass replays the captured graphs
        out = generate(sharded.module, prompts, 14, 0, (), buckets=buckets, device="cuda", compiled=compiled)
        assert out.tokens == eager.tokens and compiled.shapes == {(2, 16), (2, 32)}


class _Flagged(torch.nn.Module):
    """A module whose forward reads an attribute, as a column-parallel lm_head reads gather_output."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.double = False

    def forward(self, x):
        y = self.proj(x)
        return y * 2 if self.double else y


def test_compiled_step_guards_keep_module_flags_and_inputs_but_not_structure():
    from shardwise.compiled_decode import _keep_guard
    torch._dynamo.reset()
    module = _Flagged()
    counts = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(module, backend=counts, dynamic=False, options={"guard_filter_fn": _keep_guard})
    x = torch.randn(1, 4)
    with torch.no_grad():
        assert torch.equal(compiled(x), module(x))
        module.double = True  # a flag's value is still guarded: a new graph, the right answer
        assert torch.equal(compiled(x), module(x)) and counts.frame_count == 2
        assert compiled(torch.randn(2, 4)).shape == (2, 4) and counts.frame_count == 3  # inputs still guarded
        module.proj.weight.data.mul_(3)  # new values in place: read at every call, no recompilation
        assert torch.equal(compiled(x), module(x)) and counts.frame_count == 3
