"""Which move each weight spec gets when a linear is stored split on the dimension its layer does not compute with.

Pure: layouts from the tiny Llama's config (9/3 heads of 8, hidden 72, intermediate 96, vocabulary 101, tied
embeddings); the runs themselves are in tests/test_any_plan.py.
"""

from __future__ import annotations

import pytest
import torch

from shardwise import redistribute
from shardwise.layout import Segment, compute_layout
from shardwise.mesh import Mesh
from shardwise.parallel.swapped import _pick, _picker
from shardwise.plan import resolve_plan
from shardwise.redistribute import redistribution

Q, OPROJ = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
UP, DOWN = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


def _red(config, shapes, sets: list[str], mesh: str):
    plan = resolve_plan("llama", None, sets, mesh=mesh)
    layout = compute_layout(shapes, config, plan, Mesh.parse(mesh))
    return layout, redistribution(layout, config, plan)


def _move(red, name):
    m = red.moves[name]
    return m.kind, m.group, m.layer


@pytest.mark.parametrize(("sets", "mesh", "expected"), [
    # The fast path keeps its moves and its layers.
    ([], "tensor=2", {Q: ("none", None, None), OPROJ: ("none", None, None), HEAD: ("none", None, None)}),
    (["model.layers.*.self_attn.q_proj.weight=[tensor, fsdp]"], "fsdp=2,tensor=2",
     {Q: ("gather", "storage", None)}),
    # A column-parallel weight split by input columns computes row-parallel; its partners as before.
    (["model.layers.*.self_attn.q_proj.weight=[null, tensor]"], "tensor=2",
     {Q: ("none", None, "row-parallel"), OPROJ: ("none", None, None)}),
    (["model.layers.*.mlp.up_proj.weight=[null, tensor]"], "tensor=2",
     {UP: ("none", None, "row-parallel"), DOWN: ("none", None, None)}),
    # Over fsdp too: fsdp's own gather of the piece, then row-parallel.
    (["model.layers.*.self_attn.q_proj.weight=[fsdp, tensor]"], "fsdp=2,tensor=2",
     {Q: ("gather", "storage", "row-parallel")}),
    # A row-parallel weight split by output rows computes column-parallel.
    (["model.layers.*.self_attn.o_proj.weight=[tensor, null]"], "tensor=2", {OPROJ: ("none", None, "column-parallel")}),
    (["model.layers.*.mlp.down_proj.weight=[tensor, fsdp]"], "fsdp=2,tensor=2",
     {DOWN: ("gather", "storage", "column-parallel")}),
    # Tied: lm_head computes row-parallel from the shared piece, the embedding looks up its hidden columns.
    (["model.embed_tokens.weight=[null, tensor]", "lm_head.weight=[null, tensor]"], "tensor=2",
     {HEAD: ("none", None, "row-parallel"), EMBED: ("none", None, "hidden-parallel")}),
    (["model.embed_tokens.weight=[fsdp, tensor]", "lm_head.weight=[fsdp, tensor]"], "fsdp=2,tensor=2",
     {HEAD: ("gather", "storage", "row-parallel"), EMBED: ("gather", "storage", "hidden-parallel")}),
    # Hidden 72 over 5 does not divide: the lookup's gather would need padding, so the table is gathered.
    (["model.embed_tokens.weight=[null, tensor]", "lm_head.weight=[null, tensor]"], "tensor=5",
     {HEAD: ("none", None, "row-parallel"), EMBED: ("gather", "world", None)}),
    # The storage group's pieces (quarters 2t' + t) do not make the tensor half of the columns: gathered.
    (["model.layers.*.self_attn.q_proj.weight=[null, [fsdp, tensor]]"], "fsdp=2,tensor=2",
     {Q: ("gather", "world", None)}),
    # Not a linear's weight: norms are gathered as before.
    (["model.norm.weight=[tensor]"], "tensor=2", {"model.norm.weight": ("gather", "world", None)}),
])
def test_which_move_each_spec_gets(tiny_config, tiny_shapes, sets, mesh, expected):
    _, red = _red(tiny_config, tiny_shapes, sets, mesh)
    assert {n: _move(red, n) for n in expected} == expected
    assert red.trivial == (not sets)
    for m in red.layers():  # swapped moves cost no extra weight traffic: only fsdp's gather of the piece
        assert not m.extra and m.group in (None, "storage")


def test_the_swapped_piece_is_the_stored_split_without_storage_axes(tiny_config, tiny_shapes):
    _, red = _red(tiny_config, tiny_shapes, ["model.layers.*.self_attn.q_proj.weight=[fsdp, tensor]",
                                             "model.layers.*.mlp.down_proj.weight=[tensor, fsdp]"], "fsdp=2,tensor=2")
    # Rank 3 is (fsdp 1, tensor 1): it computes with the second half of q's input columns, all 72 output rows,
    # and keeps its heads of the output (the compute layout's column-parallel shard, unchanged).
    assert red.target(Q).shards[3].dims == ((Segment(0, 72),), (Segment(36, 36),))
    assert red.target(Q) is red.swapped.tensors[Q]
    assert red.compute.tensors[Q].shards[3] == compute_layout(
        tiny_shapes, tiny_config, resolve_plan("llama"), Mesh.parse("tensor=2")).tensors[Q].shards[1]
    assert red.target(DOWN).shards[3].dims == ((Segment(36, 36),), (Segment(0, 96),))
    # What the rank holds is the plan's piece: its fsdp half of the rows, by whole GQA groups (2 of 3, one padded:
    # 6 heads of 8 rows), of those columns.
    assert red.storage.tensors[Q].shards[3].local_shape == (48, 36)


def test_decode_costs_and_the_decision_follows_them(tiny_config, tiny_shapes, monkeypatch):
    layout, red = _red(tiny_config, tiny_shapes, ["model.layers.*.self_attn.q_proj.weight=[null, tensor]",
                                                  "model.layers.*.mlp.down_proj.weight=[tensor, null]"], "tensor=2")
    # Per rank per decode token, in elements: q's all-reduce of 72 outputs (2(T-1)/T of it) against gathering
    # its 72 x 36 piece; down's all-gathers of 48 input and 36 output features less the 72-wide all-reduce.
    assert redistribute.swap_cost("row-parallel", layout, red.compute, red.swapped, Q, 1) == 72
    assert redistribute.swap_cost("column-parallel", layout, red.compute, red.swapped, DOWN, 1) == 48 + 36 - 72
    monkeypatch.setattr(redistribute, "swap_cost", lambda *a: 10 ** 9)  # a swap dearer than the gather
    _, red = _red(tiny_config, tiny_shapes, ["model.layers.*.self_attn.q_proj.weight=[null, tensor]"], "tensor=2")
    assert _move(red, Q) == ("gather", "world", None) and red.swapped is None


def test_picking_features_runs_or_scattered_with_zero_padding():
    x = torch.arange(12.0).reshape(2, 6)
    run = _picker([2, 3, 4, -1], 6)  # a run of real features then padding: a narrow and a pad, no index
    assert run == (2, 3, 1)
    assert _pick(x, run).tolist() == [[2, 3, 4, 0], [8, 9, 10, 0]]
    scattered = _picker([4, -1, 0, 1], 6)
    assert isinstance(scattered, torch.Tensor)
    assert _pick(x, scattered).tolist() == [[4, 0, 0, 1], [10, 0, 6, 7]]
