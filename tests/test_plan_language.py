"""The sharding-plan language: every rule of it, and every error, without weights or processes."""

from __future__ import annotations

import logging
import textwrap

import pytest

from shardwise.errors import ShardwiseError
from shardwise.layout import Segment, compute_layout
from shardwise.mesh import Mesh
from shardwise.plan import Rule, builtin_plan, load_plan, parse_spec, resolve_plan


def write_plan(tmp_path, text: str):
    path = tmp_path / "plan.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def user_plan(tmp_path, text: str, overrides=()):
    return resolve_plan("llama", write_plan(tmp_path, text), list(overrides))


def layout_of(shapes, config, plan, tp=None, mesh=None):
    return compute_layout(shapes, config, plan, mesh or plan.mesh(tp))


# --- names ------------------------------------------------------------------------------------------

def test_star_matches_integers_only():
    rx = Rule("model.layers.*.mlp.up_proj.weight", ("tensor", None)).regex
    assert rx.match("model.layers.0.mlp.up_proj.weight")
    assert rx.match("model.layers.125.mlp.up_proj.weight")
    assert not rx.match("model.layers.x.mlp.up_proj.weight")
    assert not rx.match("model.layers.0.1.mlp.up_proj.weight")
    assert not rx.match("model.layers..mlp.up_proj.weight")
    assert not Rule("model.*.weight", ()).regex.match("model.embed_tokens.weight")
    assert not rx.match("model.layers.0.mlp.up_proj.weight.extra")  # anchored at both ends


def test_star_over_a_non_integer_is_an_unmatched_rule(tmp_path, tiny_config, tiny_shapes):
    plan = user_plan(tmp_path, """
        sharding:
          model.*.weight: [tensor, null]
    """)
    with pytest.raises(ShardwiseError, match=r"rule 'model\.\*\.weight' matches no tensor or module"):
        layout_of(tiny_shapes, tiny_config, plan, 2)


def test_torchprime_typo_o_proj_weight_names_the_nearest_real_names(tmp_path, tiny_config, tiny_shapes):
    # torchprime's llama-fsdp-tp.yaml shipped this typo, silently replicating every o_proj.
    plan = user_plan(tmp_path, """
        sharding:
          model.layers.*.self_attn.o_proj_weight: [null, tensor]
    """)
    with pytest.raises(ShardwiseError) as err:
        layout_of(tiny_shapes, tiny_config, plan, 2)
    msg = str(err.value)
    assert "rule 'model.layers.*.self_attn.o_proj_weight' matches no tensor or module" in msg
    assert "nearest real names: model.layers.*.self_attn.o_proj.weight" in msg
    assert "\n" not in msg


# --- specs ------------------------------------------------------------------------------------------

def test_spec_entries_axis_list_or_null():
    assert parse_spec(["tensor", None], "x") == ("tensor", None)
    assert parse_spec([["fsdp", "tensor"], None], "x") == (("fsdp", "tensor"), None)
    assert parse_spec([None, None], "x") == (None, None)
    for bad in ("tensor", [1], [[]], [["tensor", 3]], [{"a": 1}]):
        with pytest.raises(ShardwiseError):
            parse_spec(bad, "x")


def test_axis_used_twice_in_one_spec(tmp_path):
    with pytest.raises(ShardwiseError, match="axis 'tensor' is used for more than one dimension"):
        user_plan(tmp_path, """
            sharding:
              model.layers.*.mlp.up_proj.weight: [tensor, tensor]
        """)
    with pytest.raises(ShardwiseError, match="axis 'fsdp' is used for more than one dimension"):
        parse_spec([["fsdp", "tensor"], "fsdp"], "x")


def test_axis_not_in_the_mesh(tmp_path, tiny_config, tiny_shapes):
    plan = user_plan(tmp_path, """
        sharding:
          model.layers.*.mlp.up_proj.weight: [model_parallel, null]
    """)
    with pytest.raises(ShardwiseError, match=r"up_proj.weight \(rule .*\): axis 'model_parallel' is not in the mesh "
                                             r"\(axes \['tensor'\]\)"):
        layout_of(tiny_shapes, tiny_config, plan, 2)


def test_spec_longer_than_the_tensor(tmp_path, tiny_config, tiny_shapes):
    plan = user_plan(tmp_path, """
        sharding:
          model.norm.weight: [null, null]
    """)
    with pytest.raises(ShardwiseError, match=r"model.norm.weight .*spec \[null, null\] has 2 entries but the tensor "
                                             r"has 1 dimension"):
        layout_of(tiny_shapes, tiny_config, plan, 2)


def test_short_spec_leaves_trailing_dimensions_whole(tmp_path, tiny_config, tiny_shapes):
    plan = user_plan(tmp_path, """
        sharding:
          model.layers.*.mlp.up_proj.weight: [tensor]
          model.layers.*.mlp.gate_proj.weight: [tensor]
          model.layers.*.mlp.down_proj.weight: [null, tensor]
    """)
    t = layout_of(tiny_shapes, tiny_config, plan, 2).tensors["model.layers.0.mlp.up_proj.weight"]
    assert t.spec == ("tensor", None) and t.shards[1].local_shape == (48, 72)


def test_list_entry_splits_one_dimension_over_several_axes_outer_first(tmp_path, tiny_config, tiny_shapes):
    plan = user_plan(tmp_path, """
        mesh: {axes: [fsdp, tensor], sizes: [2, 2]}
        sharding:
          model.layers.*.mlp.up_proj.weight: [[fsdp, tensor], null]
          model.layers.*.mlp.gate_proj.weight: [[fsdp, tensor], null]
          model.layers.*.mlp.down_proj.weight: [null, [fsdp, tensor]]
    """)
    t = layout_of(tiny_shapes, tiny_config, plan).tensors["model.layers.0.mlp.up_proj.weight"]
    # rank = fsdp * 2 + tensor; part = fsdp * 2 + tensor as well (fsdp outer), 96 rows / 4 = 24 each.
    assert [s.dims[0] for s in t.shards] == [(Segment(24 * r, 24),) for r in range(4)]
    plan = user_plan(tmp_path, """
        mesh: {axes: [fsdp, tensor], sizes: [2, 2]}
        sharding:
          model.layers.*.mlp.up_proj.weight: [[tensor, fsdp], null]
          model.layers.*.mlp.gate_proj.weight: [[tensor, fsdp], null]
          model.layers.*.mlp.down_proj.weight: [null, [tensor, fsdp]]
    """)
    t = layout_of(tiny_shapes, tiny_config, plan).tensors["model.layers.0.mlp.up_proj.weight"]
    # tensor outer: rank 1 (fsdp 0, tensor 1) holds part 2.
    assert [s.dims[0][0].start for s in t.shards] == [0, 48, 24, 72]


# --- mesh section -----------------------------------------------------------------------------------

def test_mesh_section_with_sizes(tmp_path):
    plan = load_plan(write_plan(tmp_path, """
        mesh: {axes: [fsdp, tensor], sizes: [2, 2]}
        sharding:
          model.norm.weight: [fsdp]
    """))
    mesh = plan.mesh()
    assert mesh == Mesh(("fsdp", "tensor"), (2, 2)) and mesh.world_size == 4
    assert plan.mesh(tp_degree=2, world_size=4) == mesh
    with pytest.raises(ShardwiseError, match="gives axis 'tensor' size 2 but --tp-degree is 4"):
        plan.mesh(tp_degree=4)
    with pytest.raises(ShardwiseError, match="has 4 ranks but 8 devices were given"):
        plan.mesh(world_size=8)


def test_tp_degree_fills_the_tensor_axis_when_sizes_are_absent(tmp_path):
    assert builtin_plan("llama").mesh(tp_degree=3) == Mesh(("tensor",), (3,))
    assert builtin_plan("llama").mesh(world_size=4) == Mesh(("tensor",), (4,))
    two_d = load_plan(write_plan(tmp_path, "mesh: {axes: [fsdp, tensor]}\nsharding: {}\n"))
    with pytest.raises(ShardwiseError, match=r"give `sizes` for mesh axes \['fsdp', 'tensor'\]"):
        two_d.mesh(tp_degree=2)


@pytest.mark.parametrize("mesh", [
    "{axes: [fsdp, tensor], sizes: [2]}", "{axes: [tensor], sizes: [0]}", "{axes: [tensor, tensor]}",
    "{axes: tensor}", "{shape: [2]}", "[tensor]",
])
def test_bad_mesh_sections(tmp_path, mesh):
    with pytest.raises(ShardwiseError, match="mesh"):
        load_plan(write_plan(tmp_path, f"mesh: {mesh}\nsharding: {{}}\n"))


def test_flat_torchprime_form_and_unknown_keys(tmp_path):
    flat = load_plan(write_plan(tmp_path, "model.layers.*.mlp.up_proj.weight: [tensor, null]\n"))
    assert flat.spec_for("model.layers.3.mlp.up_proj.weight") == ("tensor", None)
    with pytest.raises(ShardwiseError, match="unknown top-level key 'shardings'"):
        load_plan(write_plan(tmp_path, "sharding: {}\nshardings: {}\n"))


# --- overrides --------------------------------------------------------------------------------------

def test_set_overrides_replace_or_add_rules(tiny_config, tiny_shapes):
    plan = resolve_plan("llama", None, ["lm_head.weight=[null,null]", "model.embed_tokens.weight=[null,null]",
                                        "model.layers.*.mlp.up_proj.weight=[tensor]"])
    layout = layout_of(tiny_shapes, tiny_config, plan, 2)
    assert layout.tensors["lm_head.weight"].replicated
    assert layout.tensors["model.layers.1.mlp.up_proj.weight"].spec == ("tensor", None)
    for bad, msg in [("lm_head.weight", "expected NAME=\\[spec\\]"), ("x=[tensor", "not valid YAML"),
                     ("x=[\x07]", "not valid YAML"),  # a reader error: no .problem to quote
                     ("=[tensor]", "name before '=' is empty"), ("x=tensor", "a partition spec is a list")]:
        with pytest.raises(ShardwiseError, match=msg):
            resolve_plan("llama", None, [bad])


def test_set_with_a_typo_is_refused_like_a_file_rule(tiny_config, tiny_shapes):
    plan = resolve_plan("llama", None, ["model.layers.*.mlp.up_proj_weight=[tensor,null]"])
    with pytest.raises(ShardwiseError, match="nearest real names: model.layers.*.mlp.up_proj.weight"):
        layout_of(tiny_shapes, tiny_config, plan, 2)


# --- uncovered tensors ------------------------------------------------------------------------------

def test_uncovered_tensors_are_replicated_listed_and_logged(tmp_path, tiny_config, tiny_shapes, caplog):
    plan = user_plan(tmp_path, """
        sharding:
          model.embed_tokens.weight: [tensor, null]
          lm_head.weight: [tensor, null]
    """)
    with caplog.at_level(logging.INFO, logger="shardwise"):
        layout = layout_of(tiny_shapes, tiny_config, plan, 2)
    assert "model.norm.weight" in layout.uncovered and "model.embed_tokens.weight" not in layout.uncovered
    assert "model.layers.0.mlp.up_proj.weight" in layout.uncovered
    assert all(layout.tensors[n].replicated for n in layout.uncovered)
    assert "match no rule and are replicated on every rank" in caplog.text
    assert "model.layers.*.mlp.up_proj.weight" in caplog.text


# --- activation rules -------------------------------------------------------------------------------

def test_module_rules_shard_outputs_and_tuple_index(tmp_path, tiny_config, tiny_shapes):
    assert Rule("model.layers.*[0]", ()).module == "model.layers.*"
    assert Rule("model.layers.*[0]", ()).output_index == 0
    assert Rule("lm_head", ()).output_index is None
    plan = user_plan(tmp_path, """
        sharding:
          model.layers.*.mlp.up_proj.weight: [tensor, null]
          model.layers.*.mlp.gate_proj.weight: [tensor, null]
          model.layers.*.mlp.down_proj.weight: [null, tensor]
          model.layers.*.mlp.up_proj: [null, null, tensor]
          model.layers.*[0]: [null, null, null]
          lm_head: [null, null, null]
    """)
    layout = layout_of(tiny_shapes, tiny_config, plan, 2)
    assert layout.activations == {"model.layers.*.mlp.up_proj": (None, None, "tensor"),
                                  "model.layers.*[0]": (None, None, None), "lm_head": (None, None, None)}


def test_column_parallel_output_split_over_tensor_across_features_is_regathered(tmp_path, tiny_config, tiny_shapes):
    """Not refused (GSPMD: any valid spec runs): placed on the whole output, its features gathered first."""
    from shardwise.parallel.activations import placed_rules
    from shardwise.parallelize import native_outputs

    plan = user_plan(tmp_path, """
        sharding:
          model.layers.*.mlp.up_proj.weight: [tensor, null]
          model.layers.*.mlp.gate_proj.weight: [tensor, null]
          model.layers.*.mlp.down_proj.weight: [null, tensor]
          model.layers.*.mlp.up_proj: [null, tensor, null]
          model.layers.*.mlp.gate_proj: [null, null, tensor]
    """)
    layout = layout_of(tiny_shapes, tiny_config, plan, 2)
    placed = placed_rules(layout, native_outputs(layout))
    assert {(p.module, p.spec, p.regather) for p in placed} == {
        (f"model.layers.{i}.mlp.up_proj", (None, "tensor", None), True) for i in range(tiny_config.num_layers)}


@pytest.mark.parametrize("rule, msg", [
    ("model.layers.*.mlp: [null, null, null, null]", "has 4 entries but module outputs have 3 dimensions"),
    ("model.layers.*.mlp: [data, null, null]", "axis 'data' is not in the mesh"),
    ("model.layerz.*[0]: [null, null, null]", "matches no module; nearest real names: model.layers.*"),
])
def test_activation_rule_errors(tmp_path, tiny_config, tiny_shapes, rule, msg):
    rules = ("sharding:\n  lm_head.weight: [tensor, null]\n  model.embed_tokens.weight: [tensor, null]\n  "
             "model.layers.*.mlp.up_proj.weight: [tensor, null]\n  "
             "model.layers.*.mlp.gate_proj.weight: [tensor, null]\n  "
             "model.layers.*.mlp.down_proj.weight: [null, tensor]\n  ")
    plan = user_plan(tmp_path, rules + rule + "\n")
    with pytest.raises(ShardwiseError, match=msg.replace("*", r"\*").replace("[", r"\[")):
        layout_of(tiny_shapes, tiny_config, plan, 2)


# --- uneven splits: padded where exact, refused where not ----------------------------------------------

def test_uneven_splits_are_padded_where_exact(tiny_config, tiny_shapes):
    layout = layout_of(tiny_shapes, tiny_config, builtin_plan("llama"), 5)
    up = layout.tensors["model.layers.0.mlp.up_proj.weight"]  # 96 rows over 5: 20 per rank, last padded
    assert [s.local_shape[0] for s in up.shards] == [20] * 5
    assert up.shards[4].dims[0] == (Segment(80, 16), Segment(None, 4))
    down = layout.tensors["model.layers.0.mlp.down_proj.weight"]  # the matching row-parallel columns
    assert down.shards[4].dims[1] == (Segment(80, 16), Segment(None, 4))
    vocab = layout.tensors["model.embed_tokens.weight"]  # 101 rows over 5: 21 per rank
    assert vocab.shards[4].dims[0] == (Segment(84, 17), Segment(None, 4))
    q = layout.tensors["model.layers.0.self_attn.q_proj.weight"]  # 9 heads over 5 ranks: whole, padded heads
    assert all(sum(s.length for s in shard.dims[0]) % 8 == 0 for shard in q.shards)
    assert sum(seg.length for shard in q.shards for seg in shard.dims[0] if seg.start is not None) >= 9 * 8


@pytest.mark.parametrize("rules, tp, move", [
    ("model.norm.weight: [tensor]", 2, "gather"),  # the layers read norms whole: gathered on use
    ("model.layers.*.input_layernorm.weight: [tensor]", 5, "gather"),  # 72 over 5: stored padded, gathered
    # an input dimension over tensor: no move, the layer computes row-parallel (tests/test_swapped.py)
    ("model.layers.*.mlp.up_proj.weight: [null, tensor]", 2, "none"),
    ("model.layers.*.mlp.down_proj.weight: [null, null]", 2, "slice"),  # half a layer split: sliced at load
])
def test_splits_the_layers_cannot_compute_with_are_redistributed(tiny_config, tiny_shapes, rules, tp, move):
    """GSPMD semantics: any split is stored as written; the layers compute with the built-in plan's split."""
    from shardwise.redistribute import redistribution

    name, spec = rules.split(": ")
    plan = resolve_plan("llama", None, [f"{name}={spec}"])
    layout = layout_of(tiny_shapes, tiny_config, plan, tp)
    red = redistribution(layout, tiny_config, plan)
    builtin = layout_of(tiny_shapes, tiny_config, builtin_plan("llama"), tp)
    weight = name.replace("*", "0")
    assert red.moves[weight].kind == move
    assert red.compute.tensors[weight].shards == builtin.tensors[weight].shards
    if move in ("gather", "none"):  # stored as the plan says, computed as tensor parallelism has it
        assert red.storage.tensors[weight].shards == layout.tensors[weight].shards
    else:  # the loader reads only the compute shard
        assert red.storage.tensors[weight].shards == builtin.tensors[weight].shards
    untouched = "model.layers.1.self_attn.q_proj.weight"
    assert red.moves[untouched].kind == "none"


def test_tied_lm_head_split_otherwise_is_refused(tiny_config, tiny_shapes):
    plan = resolve_plan("llama", None, ["lm_head.weight=[null, tensor]"])
    with pytest.raises(ShardwiseError, match="lm_head.weight is tied to model.embed_tokens.weight"):
        layout_of(tiny_shapes, tiny_config, plan, 2)


def test_embedding_hidden_split_is_accepted_when_it_divides(tiny_raw):
    from shardwise.config import config_from_dict
    from shardwise.families import state_dict_shapes

    untied = config_from_dict({**tiny_raw, "tie_word_embeddings": False})
    plan = resolve_plan("llama", None, ["model.embed_tokens.weight=[null,tensor]"])
    t = layout_of(state_dict_shapes(untied), untied, plan, 4).tensors["model.embed_tokens.weight"]
    assert [s.local_shape for s in t.shards] == [(101, 18)] * 4


def test_tied_weights_must_be_split_alike(tiny_config, tiny_shapes):
    plan = resolve_plan("llama", None, ["lm_head.weight=[null,null]"])
    with pytest.raises(ShardwiseError, match=r"lm_head.weight is tied to model.embed_tokens.weight "
                                             r"\(tie_word_embeddings\), so both must be split the same way; "
                                             r"the plan gives \[null, null\] and \[tensor, null\]"):
        layout_of(tiny_shapes, tiny_config, plan, 2)


def test_storage_axis_splits_norms_evenly_or_padded(tmp_path, tiny_config, tiny_shapes):
    text = """
        mesh: {axes: [fsdp, tensor], sizes: [%d, 1]}
        sharding:
          model.norm.weight: [fsdp]
    """
    t = layout_of(tiny_shapes, tiny_config, user_plan(tmp_path, text % 4)).tensors["model.norm.weight"]
    assert [s.local_shape for s in t.shards] == [(18,)] * 4
    # 72 over 5: stored padded (15 per rank, the last 12 + 3 zeros); gathering places rows by source index.
    t = layout_of(tiny_shapes, tiny_config, user_plan(tmp_path, text % 5)).tensors["model.norm.weight"]
    assert [s.local_shape for s in t.shards] == [(15,)] * 5
    assert t.shards[4].dims[0] == (Segment(60, 12), Segment(None, 3))


def test_builtin_plan_files_parse_and_cover_the_family(tiny_config, tiny_shapes):
    plan = builtin_plan("llama")
    layout = layout_of(tiny_shapes, tiny_config, plan, 3)
    assert set(layout.uncovered) == {n for n in tiny_shapes if "norm" in n}
    assert layout.tensors["lm_head.weight"].source == "model.embed_tokens.weight"


def test_documented_fsdp_tp_example(tiny_config, tiny_shapes):
    from pathlib import Path

    from shardwise.parallelize import check_runtime

    example = Path(__file__).resolve().parents[1] / "docs/plans/llama-fsdp-tp.yaml"
    plan = resolve_plan("llama", example)
    layout = layout_of(tiny_shapes, tiny_config, plan)
    assert layout.mesh == Mesh(("fsdp", "tensor"), (2, 4)) and not layout.uncovered
    up = layout.tensors["model.layers.0.mlp.up_proj.weight"]
    assert [s.local_shape for s in up.shards] == [(24, 36)] * 8
    norm = layout.tensors["model.norm.weight"]
    assert [s.dims[0][0].start for s in norm.shards] == [0, 0, 0, 0, 36, 36, 36, 36]  # fsdp is the outer axis
    check_runtime(layout)  # the batch rules run too: placed at the boundary, gathered back (parallel/activations.py)
