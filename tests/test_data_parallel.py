"""Data parallelism: a batch the plan splits over fsdp/data is divided among replicas, each generating its rows.

Three prompts of different lengths over two replicas (an uneven split: the second replica fills its
share with a placeholder row), on data x tensor, fsdp x tensor (weights stored over fsdp, gathered on
every forward, so replicas must step together) and fsdp alone; each must generate exactly what one
process generates for the whole batch, and each replica's forwards must carry only its share.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TORCHPRIME_FSDP_TP, TORCHPRIME_FSDP_TP_ACTIVATIONS

from shardwise.capacity import estimate_capacity
from shardwise.conformance import model_layout
from shardwise.mesh import Mesh
from shardwise.parallel.data import batch_axes, local_batch, share
from shardwise.plan import resolve_plan

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
NEW_TOKENS = 6

DATA_TP = ["model.layers.*=[[data],null,null]", "lm_head=[data,null,null]"]  # on the built-in plan

FSDP_TP = TORCHPRIME_FSDP_TP + "model.layers.*.input_layernorm.weight: [fsdp]\n" + TORCHPRIME_FSDP_TP_ACTIVATIONS

FSDP_ONLY = """
model.layers.*.mlp.up_proj.weight: [fsdp, null]
model.layers.*.self_attn.o_proj.weight: [null, fsdp]
model.norm.weight: [fsdp]
model.embed_tokens: [fsdp, null, null]
model.layers.*: [fsdp, null, null]
"""


def test_shares_are_contiguous_and_padded_to_equal_rows():
    assert [list(share(3, 2, i)) for i in range(2)] == [[0, 1], [2]]
    assert [list(share(1, 3, i)) for i in range(3)] == [[0], [], []]
    assert local_batch(3, 2) == 2 and local_batch(4, 2) == 2 and local_batch(1, 3) == 1


@pytest.mark.parametrize("rules, axes", [
    (["model.layers.*=[fsdp,null,null]", "lm_head=[fsdp,null,null]"], ("fsdp",)),
    (["model.layers.*=[fsdp,null,tensor]"], ("fsdp",)),
    (["model.layers.*=[[data,fsdp],null,null]"], ("data", "fsdp")),
    (["model.layers.*=[fsdp,null,null]", "lm_head=[null,null,null]"], ("fsdp",)),  # whole: assembled at the end
    # Not a consistent batch split: placed at the boundary and gathered back, as before.
    (["model.layers.*=[fsdp,null,null]", "lm_head=[data,null,null]"], ()),
    (["model.layers.*=[tensor,null,null]"], ()),
    (["model.layers.*=[[fsdp,tensor],null,null]"], ()),
    (["model.layers.*=[fsdp,null,null]", "model.norm=[null,null,fsdp]"], ()),
    (["model.layers.*=[null,fsdp,null]"], ()),
])
def test_the_trigger_is_a_consistent_batch_split_over_non_tensor_axes(tiny_models, rules, axes):
    model = tiny_models["gqa9_tied"]
    plan = resolve_plan("llama", None, rules, mesh="data=2,fsdp=2,tensor=2")
    assert batch_axes(model_layout(model, plan=plan, mesh=plan.mesh())) == axes


def _plan(tmp_path, plan) -> tuple[str | None, list[str]]:
    """(plan file, overrides): a file's text, or overrides of the built-in plan."""
    if isinstance(plan, list):
        return None, plan
    path = tmp_path / "plan.yaml"
    path.write_text(plan)
    return str(path), []


def _rank(rank, world, model_path, plan, mesh, out_dir, eos):
    from shardwise.parallel.data import generate_split
    from shardwise.sharded_model import load_sharded

    sharded = load_sharded(model_path, "float32", resolve_plan("llama", plan[0], plan[1], mesh=mesh))
    rows = []
    sharded.module.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    split = sharded.batch_split
    greedy = generate_split(split, sharded.module, PROMPTS, NEW_TOKENS, 0, (), keep_logits=True)
    forward_rows, rows[:] = list(rows), []
    stopped = generate_split(split, sharded.module, PROMPTS, NEW_TOKENS, 0, eos)
    torch.save({"tokens": greedy.tokens, "logits": greedy.step_logits, "rows_per_rank": greedy.rows_per_rank,
                "forward_rows": forward_rows, "cache": greedy.cache_bytes, "eos_tokens": stopped.tokens,
                "eos_forwards": len(rows), "replica": split.index}, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def reference(tiny_models):
    """One process, the whole batch: without EOS, and with an EOS that ends the last row first."""
    from shardwise.generation import generate
    from shardwise.sharded_model import load_sharded

    sharded = load_sharded(tiny_models["gqa9_tied"], "float32")
    whole = generate(sharded.module, PROMPTS, NEW_TOKENS, 0, (), keep_logits=True)
    eos = (whole.tokens[2][0],)  # the last row (the second replica's only row) stops at its first token
    stopped = generate(sharded.module, PROMPTS, NEW_TOKENS, 0, eos)
    return whole, eos, stopped


@pytest.mark.slow
@pytest.mark.parametrize("mesh, plan, rows", [
    ("data=2,tensor=2", DATA_TP, [2, 2, 1, 1]),
    ("fsdp=2,tensor=2", FSDP_TP, [2, 2, 1, 1]),
    ("fsdp=2", FSDP_ONLY, [2, 1]),
])
def test_replicas_generate_their_rows_and_one_process_output(tiny_models, tmp_path, reference, mesh, plan, rows):
    from shardwise.parallel.launch import launch

    whole, eos, stopped = reference
    model = tiny_models["gqa9_tied"]
    path, overrides = _plan(tmp_path, plan)
    world = Mesh.parse(mesh).world_size
    launch(_rank, world, (str(model), (path, overrides), mesh, str(tmp_path), eos))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    report = estimate_capacity(model, sharding_config=path, overrides=overrides, mesh=mesh, torch_dtype="float32",
                               batch_size=len(PROMPTS), seq_len=max(map(len, PROMPTS)) + NEW_TOKENS)
    for r, got in enumerate(ranks):
        assert got["tokens"] == whole.tokens, (mesh, r)
        assert len(got["logits"]) == len(whole.step_logits)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(got["logits"], whole.step_logits))
        assert got["rows_per_rank"] == rows
        # Every forward carried the replica's share (two rows, one of them a placeholder on the second), not 3.
        assert got["forward_rows"] == [2] * NEW_TOKENS
        # Early-finishing rows: the second replica is done at once but steps on with the first.
        assert got["eos_tokens"] == stopped.tokens
        assert got["eos_forwards"] == max(map(len, stopped.tokens))
        # The planner counts one replica's rows: its KV cache is what the rank allocated.
        assert report.ranks[r].kv_cache_bytes == got["cache"], (mesh, r)
    assert report.rank_batch == 2
    assert not [c for c in report.extra if "[fsdp, null, null]" in c.what or "[[data], null, null]" in c.what]
    assert len(stopped.tokens[2]) == 1 < max(map(len, stopped.tokens))


@pytest.mark.slow
def test_run_divides_the_batch_and_matches_hf(tiny_model_dir, tmp_path):
    """`shardwise run` end to end on fsdp=2: HF's greedy tokens, and the report says who generated what."""
    import json

    from shardwise.runner import RunOptions, run

    path = tmp_path / "plan.yaml"
    path.write_text(FSDP_ONLY)
    result = run(RunOptions(str(tiny_model_dir), sharding_config=str(path), mesh="fsdp=2", batch_size=3,
                            prompts=["w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14"], chat_template=False,
                            max_new_tokens=6, check_accuracy_mode="token-matching", benchmark=True,
                            benchmark_iterations=1, output_dir=str(tmp_path)))
    assert result.rows_per_rank == [2, 1]
    assert "identical" in result.accuracy
    assert json.loads((tmp_path / "benchmark_report.json").read_text())["rows_per_rank"] == [2, 1]
