"""Context parallelism: a prompt the plan splits by sequence over ``context`` is prefilled in chunks.

Each context rank runs the prefill on its own chunk of the prompt (keys and values gathered over the
context group, the KV cache whole on every rank), then decodes as before; the tokens must be exactly
what one process generates, the logits within tolerance.
"""

from __future__ import annotations

import pytest
import torch

from shardwise.capacity import estimate_capacity
from shardwise.conformance import model_layout
from shardwise.mesh import Mesh
from shardwise.parallel.context import chunk_of, sequence_axes
from shardwise.plan import resolve_plan

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
NEW_TOKENS = 5
CONTEXT = ["model.layers.*=[null,context,null]", "model.embed_tokens=[null,context,null]"]


def test_chunks_are_equal_with_the_padding_in_front():
    assert chunk_of(5, 2) == (3, 1) and chunk_of(4, 2) == (2, 0) and chunk_of(2, 3) == (1, 1)


@pytest.mark.parametrize("rules, axes", [
    (CONTEXT, ("context",)),
    (["model.layers.*=[data,context,null]"], ("context",)),
    (["model.layers.*=[null,context,null]", "model.embed_tokens=[null,data,null]"], ()),
    (["model.layers.*=[null,context,null]", "lm_head=[null,null,context]"], ()),
    (["model.layers.*=[null,context,null]", "model.norm=[null,data,null]"], ()),
])
def test_the_trigger_is_a_consistent_sequence_split_over_non_tensor_axes(tiny_models, rules, axes):
    plan = resolve_plan("llama", None, rules, mesh="data=2,context=2,tensor=2")
    assert sequence_axes(model_layout(tiny_models["gqa9_tied"], plan=plan, mesh=plan.mesh())) == axes


def _rank(rank, world, model_path, mesh, rules, out_dir):
    from shardwise.generation import generate
    from shardwise.parallel.data import generate_split
    from shardwise.sharded_model import load_sharded

    sharded = load_sharded(model_path, "float32", resolve_plan("llama", None, rules, mesh=mesh))
    tokens = []
    sharded.module.model.embed_tokens.register_forward_pre_hook(lambda _m, args: tokens.append(args[0].shape[1]))
    if sharded.batch_split is not None:  # with the batch over data too: each replica prefills its rows in chunks
        gen = generate_split(sharded.batch_split, sharded.module, PROMPTS, NEW_TOKENS, 0, (), keep_logits=True)
    else:
        gen = generate(sharded.module, PROMPTS, NEW_TOKENS, 0, (), comm=sharded.comm, keep_logits=True)
    torch.save({"tokens": gen.tokens, "logits": gen.step_logits, "cache": gen.cache_bytes,
                "embedded": tokens, "prefills": sharded.context.prefills}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("mesh, rules", [
    ("context=2,tensor=2", CONTEXT),
    ("context=3,tensor=1", CONTEXT),
    ("data=2,context=2,tensor=1", [r.replace("[null,", "[data,") for r in CONTEXT]),
])
def test_chunked_prefill_generates_what_one_process_does(tiny_models, tmp_path, mesh, rules):
    from shardwise.generation import generate
    from shardwise.parallel.launch import launch
    from shardwise.sharded_model import load_sharded

    model = tiny_models["gqa9_tied"]
    whole = generate(load_sharded(model, "float32").module, PROMPTS, NEW_TOKENS, 0, (), keep_logits=True)
    world = Mesh.parse(mesh).world_size
    launch(_rank, world, (str(model), mesh, rules, str(tmp_path)))
    parts = Mesh.parse(mesh).size("context")
    chunk = chunk_of(max(map(len, PROMPTS)), parts)[0]
    report = estimate_capacity(model, overrides=rules, mesh=mesh, torch_dtype="float32", batch_size=len(PROMPTS),
                               seq_len=max(map(len, PROMPTS)) + NEW_TOKENS)
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["tokens"] == whole.tokens, (mesh, r)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(got["logits"], whole.step_logits))
        # The prefill embedded only this rank's chunk of the 5-token prompt; decode steps one token each.
        assert got["embedded"] == [chunk] + [1] * (NEW_TOKENS - 1) and got["prefills"] == 1
        assert report.ranks[r].kv_cache_bytes == got["cache"]  # whole on every context rank
        if mesh == "context=3,tensor=1":
            assert got["cache"] == whole.cache_bytes
    assert not report.extra  # nothing placed and gathered back per decode step


def test_planner_counts_one_chunk_of_queries_and_a_whole_cache(tiny_models):
    common = dict(mesh="context=2,tensor=2", torch_dtype="float32", batch_size=2, seq_len=64)
    chunked = estimate_capacity(tiny_models["gqa9_tied"], overrides=CONTEXT, **common)
    whole = estimate_capacity(tiny_models["gqa9_tied"], **common)
    assert [r.kv_cache_bytes for r in chunked.ranks] == [r.kv_cache_bytes for r in whole.ranks]
    assert all(c.activation_bytes < w.activation_bytes for c, w in zip(chunked.ranks, whole.ranks))
    assert not chunked.extra
    assert "Context parallelism: prompts are prefilled in 2 chunks over context" in chunked.format()
    assert "Context parallelism" not in whole.format()
