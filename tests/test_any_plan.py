"""Any plan runs (GSPMD semantics): every weight spec, on meshes of 2 and 4 ranks, generates what one process does.

The plans include torchprime-shaped files in its flat form (state-dict name with ``*`` -> one entry per
dimension, an axis or null; no ``mesh:`` section, the mesh given as ``--mesh`` gives it), written from
torchprime's documented semantics: the 2-D FSDP x TP Llama layout, and an FSDP layout in the Qwen style
of the issue (``q_proj.weight: [fsdp, tensor]``, ``down_proj.weight: [tensor, fsdp]``), which splits
every projection on the dimension the parallel layers do not consume. For each run the planner's
per-rank bytes and weight all-gathers per forward are compared with what the ranks measured.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TORCHPRIME_FSDP_TP, TORCHPRIME_FSDP_TP_ACTIVATIONS

from shardwise.capacity import estimate_capacity
from shardwise.plan import generic_name

PLANS = {
    "builtin": None,
    # Megatron's opposite: every weight split on the dimension the layers read whole.
    "transposed": """
model.embed_tokens.weight: [null, tensor]
model.layers.*.self_attn.q_proj.weight: [null, tensor]
model.layers.*.self_attn.k_proj.weight: [null, tensor]
model.layers.*.self_attn.v_proj.weight: [null, tensor]
model.layers.*.self_attn.o_proj.weight: [tensor, null]
model.layers.*.mlp.gate_proj.weight: [null, tensor]
model.layers.*.mlp.up_proj.weight: [null, tensor]
model.layers.*.mlp.down_proj.weight: [tensor, null]
model.layers.*.input_layernorm.weight: [tensor]
model.norm.weight: [tensor]
lm_head.weight: [null, tensor]
model.layers.*.mlp: [null, null, tensor]
model.layers.*[0]: [null, null, tensor]
lm_head: [null, null, tensor]
""",
    # torchprime's 2-D FSDP x TP Llama layout, flat form.
    "torchprime_fsdp_tp": TORCHPRIME_FSDP_TP + "model.layers.*.input_layernorm.weight: [fsdp]\n"
    "model.layers.*.post_attention_layernorm.weight: [fsdp]\n" + TORCHPRIME_FSDP_TP_ACTIVATIONS,
    # The FSDP Qwen-style file at a mesh with tensor > 1 (refused before: "cannot consume dimension 1").
    "torchprime_fsdp_qwen": """
model.embed_tokens.weight: [fsdp, tensor]
model.layers.*.self_attn.q_proj.weight: [fsdp, tensor]
model.layers.*.self_attn.k_proj.weight: [fsdp, tensor]
model.layers.*.self_attn.v_proj.weight: [fsdp, tensor]
model.layers.*.self_attn.o_proj.weight: [tensor, fsdp]
model.layers.*.mlp.gate_proj.weight: [fsdp, tensor]
model.layers.*.mlp.up_proj.weight: [fsdp, tensor]
model.layers.*.mlp.down_proj.weight: [tensor, fsdp]
model.norm.weight: [fsdp]
lm_head.weight: [fsdp, tensor]
""",
    # One dimension over two axes in both orders, half a layer split, the rest replicated.
    "mixed": """
model.layers.*.mlp.gate_proj.weight: [[tensor, fsdp], null]
model.layers.*.mlp.up_proj.weight: [[fsdp, tensor], null]
model.layers.*.mlp.down_proj.weight: [null, [tensor, fsdp]]
model.layers.*.self_attn.q_proj.weight: [tensor, null]
model.embed_tokens.weight: [[fsdp, tensor], null]
lm_head.weight: [[fsdp, tensor], null]
""",
}

# The built-in plan, to change one weight at a time: a linear stored split over `tensor` on the dimension
# its layer does not compute with runs as stored (redistribute.py: row-parallel q/k/v/gate/up/lm_head,
# column-parallel o/down), next to partners that run the built-in way.
BUILTIN = {
    "model.embed_tokens.weight": "[tensor, null]",
    "model.layers.*.self_attn.q_proj.weight": "[tensor, null]",
    "model.layers.*.self_attn.k_proj.weight": "[tensor, null]",
    "model.layers.*.self_attn.v_proj.weight": "[tensor, null]",
    "model.layers.*.self_attn.o_proj.weight": "[null, tensor]",
    "model.layers.*.mlp.gate_proj.weight": "[tensor, null]",
    "model.layers.*.mlp.up_proj.weight": "[tensor, null]",
    "model.layers.*.mlp.down_proj.weight": "[null, tensor]",
    "lm_head.weight": "[tensor, null]",
    "lm_head": "[null, null, null]",
}


def _builtin_with(changes: dict[str, str]) -> str:
    """The built-in plan with some rules changed (``q_proj.weight`` for the layers' rule)."""
    def full(short: str) -> str:
        layer = "self_attn" if short[0] in "qkvo" else "mlp"
        return short if short.startswith(("lm_head", "model.")) else f"model.layers.*.{layer}.{short}"

    rules = dict(BUILTIN, **{full(k): v for k, v in changes.items()})
    return "".join(f"{k}: {v}\n" for k, v in rules.items())


_IN, _OUT = "[null, tensor]", "[tensor, null]"
SWAPPED = {
    "q_in": _builtin_with({"q_proj.weight": _IN}),
    "kv_gate_up_in": _builtin_with({f"{p}.weight": _IN for p in ("k_proj", "v_proj", "gate_proj", "up_proj")}),
    "head_in": _builtin_with({"model.embed_tokens.weight": _IN, "lm_head.weight": _IN}),
    "o_out": _builtin_with({"o_proj.weight": _OUT}),
    "down_out": _builtin_with({"down_proj.weight": _OUT}),
    "fsdp_in": _builtin_with({**{f"{p}.weight": "[fsdp, tensor]" for p in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                                                          "up_proj", "lm_head", "model.embed_tokens")},
                              "o_proj.weight": "[tensor, fsdp]", "down_proj.weight": "[tensor, fsdp]"}),
}

PROMPTS = [[5, 6, 7, 8, 9], [10, 11]]
NEW_TOKENS = 5


def _plan_files(tmp_path, mesh: str, plans: dict[str, str | None] = PLANS) -> dict[str, str | None]:
    """The plans as files; on a data x tensor mesh the storage axis is called data."""
    out: dict[str, str | None] = {}
    for key, text in plans.items():
        if text is None:
            out[key] = None
            continue
        path = tmp_path / f"{key}.yaml"
        path.write_text(text.replace("fsdp", "data") if "data=" in mesh else text)
        out[key] = str(path)
    return out


def _rank_generate(rank, world, model_path, plans, mesh, out_dir, prompts):
    from shardwise.parallel.comm import Collectives
    from shardwise.parallel.fsdp import StorageGather
    from shardwise.parallel.swapped import InputSplitLinear, OutputSplitLinear
    from shardwise.plan import resolve_plan
    from shardwise.sharded_model import load_sharded

    calls = {"gather": 0, "forward": 0}
    forward, count = StorageGather.forward, Collectives._count
    sent = {"bytes": 0.0}  # what this rank sent, over every group it is in (the planner's ring model)

    def counted(self, local):
        calls["gather"] += 1
        return forward(self, local)

    def counted_bytes(self, kind, nbytes, factor):
        count(self, kind, nbytes, factor)
        sent["bytes"] += factor * (self.world_size - 1) / self.world_size * nbytes

    StorageGather.forward = counted
    Collectives._count = counted_bytes
    results = {}
    for key, path in plans.items():
        plan = resolve_plan("llama", path, mesh=mesh)
        sharded = load_sharded(model_path, "float32", plan)
        sharded.module.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
        sent["bytes"] = 0.0
        _generate(sharded, prompts, 1)  # the prefill alone
        prefill = sent["bytes"]
        calls["gather"] = calls["forward"] = 0
        sent["bytes"] = 0.0
        gen = _generate(sharded, prompts, NEW_TOKENS, keep_logits=True)
        results[key] = {"tokens": gen.tokens, "logits": gen.step_logits, "held": sharded.stats.bytes_held,
                        "gathers_per_forward": calls["gather"] / max(1, calls["forward"]),
                        "swapped": sorted({f"{type(m).__name__} {n}" for n, m in sharded.module.named_modules()
                                           if isinstance(m, (InputSplitLinear, OutputSplitLinear))}),
                        "sent_per_token": (sent["bytes"] - prefill) / (NEW_TOKENS - 1)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def _generate(sharded, prompts, new_tokens, **kw):
    """Generation as the runner does it: a batch the plan splits over fsdp/data is divided among replicas."""
    from shardwise.generation import generate
    from shardwise.parallel.data import generate_split

    if sharded.batch_split is not None:
        return generate_split(sharded.batch_split, sharded.module, prompts, new_tokens, 0, (), **kw)
    return generate(sharded.module, prompts, new_tokens, 0, (), comm=sharded.comm, **kw)


def _run(model_path, plans, mesh, out_dir, prompts=PROMPTS):
    from shardwise.mesh import Mesh
    from shardwise.parallel.launch import launch

    out_dir.mkdir()
    world = Mesh.parse(mesh).world_size
    launch(_rank_generate, world, (str(model_path), plans, mesh, str(out_dir), prompts))
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def _check(model_path, tmp_path, mesh, reference, plans, prompts=PROMPTS):
    ranks = _run(model_path, plans, mesh, tmp_path / mesh.replace("=", "").replace(",", "_"), prompts)
    for key, path in plans.items():
        got = ranks[0][key]
        assert got["tokens"] == reference["tokens"], (mesh, key)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(got["logits"], reference["logits"])), \
            (mesh, key)
        # The planner agrees with what the ranks measured: bytes held and weight all-gathers per forward.
        report = estimate_capacity(model_path, sharding_config=path, mesh=mesh, torch_dtype="float32",
                                   batch_size=len(prompts))
        assert [r.param_bytes for r in report.ranks] == [r[key]["held"] for r in ranks], (mesh, key)
        # Bytes each rank sent per generated token, over all its groups (tensor, storage, every rank).
        assert all(r[key]["sent_per_token"] == pytest.approx(report.sent_per_rank) for r in ranks), \
            (mesh, key, [r[key]["sent_per_token"] for r in ranks], report.sent_per_rank)
        gathers = sum(c.count for c in report.collectives if c.what.split(": ")[1].startswith(("stored", "weight")))
        assert all(r[key]["gathers_per_forward"] == gathers for r in ranks), (mesh, key, gathers)
        # The linears the planner computes swapped (their activation collectives) are the ones the ranks built.
        planned = {c.what.split(": ")[0] for c in report.collectives if ": computed " in c.what}
        assert {generic_name(n.split()[1]) for n in got["swapped"]} == planned, (mesh, key)
    return ranks


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    """What one process generates (the built-in plan on a mesh of one rank)."""
    return _run(tiny_models["gqa9_tied"], {"builtin": None}, "tensor=1", tmp_path_factory.mktemp("ref") / "one")[0]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp=1,tensor=2", "fsdp=2,tensor=1", "fsdp=2,tensor=2", "data=2,tensor=2"])
def test_every_plan_generates_what_one_process_does(tiny_models, tmp_path, reference, mesh):
    ranks = _check(tiny_models["gqa9_tied"], tmp_path, mesh, reference["builtin"], _plan_files(tmp_path, mesh))
    held = {key: max(r[key]["held"] for r in ranks) for key in PLANS}
    if mesh == "fsdp=2,tensor=2":  # storage over fsdp halves what a rank holds, however it is split
        assert held["torchprime_fsdp_tp"] * 2 == held["builtin"]


@pytest.mark.slow
def test_smollm2_torchprime_plans_on_fsdp_by_tensor(smollm2, tmp_path):
    """The real model (tied embeddings, 9 heads / 3 KV heads) under torchprime's 2-D file at fsdp=2 x tensor=2.

    (The Qwen-style file's projections compute as stored, after fsdp's gathers; its embedding is gathered over
    all four ranks at every step: the tiny models cover it.)"""
    prompts = [[1, 504, 3458, 282, 4649, 314, 7042, 47]]
    reference = _run(smollm2, {"builtin": None}, "tensor=1", tmp_path / "one", prompts)[0]["builtin"]
    plans = {k: v for k, v in _plan_files(tmp_path, "fsdp=2,tensor=2").items()
             if k == "torchprime_fsdp_tp"}
    _check(smollm2, tmp_path, "fsdp=2,tensor=2", reference, plans, prompts)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp=1,tensor=2", "fsdp=2,tensor=2"])
def test_linears_stored_on_their_other_dimension_compute_as_stored(tiny_models, tmp_path, reference, mesh):
    """q/k/v/gate/up/lm_head stored split by input columns compute row-parallel, o/down stored split by output
    rows compute column-parallel (over fsdp x tensor after fsdp's own gather): no weight crosses every rank,
    and the tokens are those of one process."""
    ranks = _check(tiny_models["gqa9_tied"], tmp_path, mesh, reference["builtin"],
                   _plan_files(tmp_path, mesh, SWAPPED))
    names = {key: ranks[0][key]["swapped"] for key in SWAPPED}
    assert names["q_in"] == [f"InputSplitLinear model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    assert names["o_out"] == [f"OutputSplitLinear model.layers.{i}.self_attn.o_proj" for i in (0, 1)]
    assert names["down_out"] == [f"OutputSplitLinear model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert names["head_in"] == ["InputSplitLinear lm_head"]
    # The tied table looks up its hidden columns from the same piece: no weight moves at all.
    assert all(r["head_in"]["gathers_per_forward"] == 0 for r in ranks)
    assert len(names["kv_gate_up_in"]) == 2 * 4
    assert len(names["fsdp_in"]) == 2 * 7 + 1  # every projection of both layers, and lm_head

ALL_SWAPPED = _builtin_with({**{f"{p}.weight": _IN for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                                              "lm_head")},
                             "o_proj.weight": _OUT, "down_proj.weight": _OUT})
SEQUENCE_PARALLEL = """model.embed_tokens: [null, tensor, null]
model.layers.*.self_attn.o_proj: [null, tensor, null]
model.layers.*.mlp.down_proj: [null, tensor, null]
model.layers.*.input_layernorm: [null, tensor, null]
model.layers.*.post_attention_layernorm: [null, tensor, null]
model.layers.*: [null, tensor, null]
model.norm: [null, null, null]
"""


# Column-parallel outputs (q/k/v, gate/up: split by features over tensor as computed) split over tensor along
# another dimension: gathered by features, placed, and the rank's own features sliced back (GSPMD: any spec runs).
# (k_proj keeps its features split and is placed over fsdp alone: its local features are sliced and gathered.)
ACROSS_FEATURES = """
model.embed_tokens.weight: [tensor, null]
model.layers.*.self_attn.q_proj.weight: [tensor, null]
model.layers.*.self_attn.k_proj.weight: [tensor, null]
model.layers.*.self_attn.v_proj.weight: [tensor, null]
model.layers.*.self_attn.o_proj.weight: [null, tensor]
model.layers.*.mlp.gate_proj.weight: [tensor, null]
model.layers.*.mlp.up_proj.weight: [tensor, null]
model.layers.*.mlp.down_proj.weight: [null, tensor]
lm_head.weight: [tensor, null]
model.layers.*.self_attn.q_proj: [null, tensor, null]
model.layers.*.self_attn.v_proj: [tensor, null, null]
model.layers.*.mlp.up_proj: [[fsdp, tensor], null, null]
model.layers.*.mlp.gate_proj: [fsdp, tensor, null]
model.layers.*.self_attn.k_proj: [fsdp, null, tensor]
"""


@pytest.mark.slow
@pytest.mark.parametrize(("model", "mesh"), [("llama3_rope", "tensor=3"), ("qwen2_bias", "tensor=4")])
def test_swapped_linears_with_padding_and_biases(tiny_models, tmp_path, model, mesh):
    """Every projection swapped where sizes do not divide (llama3_rope at 3: hidden 64 and intermediate 100
    padded, 8/2 heads replicated or padded) and with q/k/v biases and padded heads (qwen2_bias at 4: 6/2 heads),
    with sequence parallelism too: the tokens of one process, the planner's bytes."""
    reference = _run(tiny_models[model], {"builtin": None}, "tensor=1", tmp_path / "one")[0]["builtin"]
    plans = {"all_swapped": ALL_SWAPPED, "all_swapped_sp": ALL_SWAPPED + SEQUENCE_PARALLEL}
    ranks = _check(tiny_models[model], tmp_path, mesh, reference, _plan_files(tmp_path, mesh, plans))
    assert all(len(ranks[0][key]["swapped"]) == 2 * 7 + 1 for key in plans)


def _rank_sample(rank, world, model_path, plan_path, out):
    from shardwise.generation import Sampling, generate
    from shardwise.plan import resolve_plan
    from shardwise.sharded_model import load_sharded

    sharded = load_sharded(model_path, "float32", resolve_plan("llama", plan_path, mesh="tensor=2"))
    result = {}
    for name, sampling in (("greedy", Sampling()), ("top_k", Sampling(top_k=5, top_p=0.9, temperature=0.8, seed=3))):
        for ods in (False, True):
            g = generate(sharded.module, PROMPTS, 8, 0, (), sampling, sharded.comm, keep_logits=True,
                         on_device_sampling=ods)
            result[(name, ods)] = (g.tokens, g.step_logits)
    if rank == 0:
        torch.save(result, out)


@pytest.mark.slow
def test_on_device_sampling_over_a_row_parallel_lm_head(tiny_models, tmp_path):
    """lm_head computed row-parallel (stored [null, tensor]): on-device sampling reads its vocabulary shard
    (gather_output off, local_index) and picks the tokens the gathered path picks; kept logits agree."""
    from shardwise.parallel.launch import launch

    plan = tmp_path / "head_in.yaml"
    plan.write_text(SWAPPED["head_in"])
    out = tmp_path / "result.pt"
    launch(_rank_sample, 2, (str(tiny_models["gqa9_tied"]), str(plan), str(out)))
    r = torch.load(out)
    for name in ("greedy", "top_k"):
        assert r[(name, False)][0] == r[(name, True)][0], name
        assert all(torch.equal(a, b) for a, b in zip(r[(name, False)][1], r[(name, True)][1])), name
    assert r[("top_k", True)][0] != r[("greedy", True)][0]  # sampling did sample


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["fsdp=1,tensor=2", "fsdp=2,tensor=2"])
def test_column_parallel_output_split_across_features_generates_what_one_process_does(
        tiny_models, tmp_path, reference, mesh):
    path = tmp_path / "across.yaml"
    path.write_text(ACROSS_FEATURES)
    _check(tiny_models["gqa9_tied"], tmp_path, mesh, reference["builtin"], {"across": str(path)})
    report = estimate_capacity(tiny_models["gqa9_tied"], sharding_config=str(path), mesh=mesh,
                               torch_dtype="float32", batch_size=len(PROMPTS))
    regathered = [c for c in report.extra if "column-parallel output gathered to be placed" in c.what]
    # q_proj, v_proj, up_proj, gate_proj: each gathered whole before it is placed, once per layer.
    layers = json.loads((tiny_models["gqa9_tied"] / "config.json").read_text())["num_hidden_layers"]
    assert len(regathered) == 4 and all(c.count == layers for c in regathered), regathered
