"""FSDP x TP at inference: weights stored split over fsdp, gathered when used, results identical to TP."""

from __future__ import annotations

import pytest
import torch

from shardwise.layout import compute_layout
from shardwise.mesh import Mesh
from shardwise.parallel.fsdp import _placement
from shardwise.parallelize import check_runtime
from shardwise.plan import resolve_plan

FSDP_TP = """
mesh: {axes: [fsdp, tensor], sizes: [2, 2]}
sharding:
  model.embed_tokens.weight: [tensor, fsdp]
  model.layers.*.self_attn.q_proj.weight: [tensor, fsdp]
  model.layers.*.self_attn.k_proj.weight: [tensor, fsdp]
  model.layers.*.self_attn.v_proj.weight: [tensor, fsdp]
  model.layers.*.self_attn.o_proj.weight: [fsdp, tensor]
  model.layers.*.mlp.gate_proj.weight: [tensor, fsdp]
  model.layers.*.mlp.up_proj.weight: [tensor, fsdp]
  model.layers.*.mlp.down_proj.weight: [fsdp, tensor]
  model.layers.*.input_layernorm.weight: [fsdp]
  model.layers.*.post_attention_layernorm.weight: [fsdp]
  model.norm.weight: [fsdp]
  lm_head.weight: [tensor, fsdp]
  lm_head: [null, null, null]
"""


def test_without_axes_gives_the_tensor_parallel_plan(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(FSDP_TP)
    plan = resolve_plan("llama", path).without_axes(("fsdp",))
    assert plan.spec_for("model.layers.0.mlp.up_proj.weight") == ("tensor", None)
    assert plan.spec_for("model.norm.weight") == (None,)
    assert resolve_plan("llama", None, ["x=[[fsdp,tensor,data]]"]).without_axes(("fsdp",)).spec_for("x") == \
        (("tensor", "data"),)


def test_pieces_of_a_storage_group_rebuild_the_tensor_parallel_shard(tmp_path, tiny_config, tiny_shapes):
    """Pure check of the placement maps: gathering the fsdp group's pieces gives exactly the TP shard."""
    path = tmp_path / "p.yaml"
    path.write_text(FSDP_TP.replace("sizes: [2, 2]", "sizes: [3, 2]"))  # 72 / 3 and uneven 101-row vocab
    plan = resolve_plan("llama", path)
    mesh = Mesh(("fsdp", "tensor"), (3, 2))
    full = compute_layout(tiny_shapes, tiny_config, plan, mesh)
    tp = compute_layout(tiny_shapes, tiny_config, plan.without_axes(("fsdp",)), mesh)
    for name, t in full.tensors.items():
        source = torch.arange(torch.Size(t.shape).numel(), dtype=torch.float64).view(t.shape) + 1
        for rank in range(mesh.world_size):
            group = [r for r in range(6) if mesh.coordinate(r, "tensor") == mesh.coordinate(rank, "tensor")]
            target = tp.tensors[name].shards[rank]
            out = torch.zeros(target.local_shape, dtype=torch.float64)
            for peer in group:
                piece = _read(source, t.shards[peer])
                li, ti = _placement(t.shards[peer], target)
                if any(len(i) == 0 for i in li):
                    continue
                sel = piece
                for d, idx in enumerate(li):
                    sel = sel.index_select(d, idx)
                out[torch.meshgrid(*ti, indexing="ij")] = sel
            assert torch.equal(out, _read(source, target)), (name, rank)


def _read(source: torch.Tensor, shard) -> torch.Tensor:
    """What the loader puts in a rank's tensor: source rows per segment, zeros for padding."""
    out = torch.zeros(shard.local_shape, dtype=source.dtype)
    index = []
    for segs in shard.dims:
        rows, pos = [], 0
        for seg in segs:
            rows += [(pos + i, None if seg.start is None else seg.start + i) for i in range(seg.length)]
            pos += seg.length
        index.append(rows)
    for idx in torch.cartesian_prod(*[torch.arange(len(r)) for r in index]).view(-1, len(index)).tolist():
        src = [index[d][i][1] for d, i in enumerate(idx)]
        if None not in src:
            out[tuple(idx)] = source[tuple(src)]
    return out


def test_one_dimension_over_tensor_and_fsdp_gathers_over_the_right_group(tmp_path, tiny_config, tiny_shapes):
    """[[tensor, fsdp], null] (tensor outer) is gathered within the storage group; [[fsdp, tensor], null]
    interleaves the parts across tensor ranks, so its compute shard needs pieces from every rank."""
    from shardwise.redistribute import redistribution

    path = tmp_path / "p.yaml"
    path.write_text(FSDP_TP.replace("up_proj.weight: [tensor, fsdp]", "up_proj.weight: [[tensor, fsdp], null]")
                    .replace("gate_proj.weight: [tensor, fsdp]", "gate_proj.weight: [[fsdp, tensor], null]"))
    plan = resolve_plan("llama", path)
    layout = compute_layout(tiny_shapes, tiny_config, plan, plan.mesh())
    check_runtime(layout)
    red = redistribution(layout, tiny_config, plan)
    up, gate = red.moves["model.layers.0.mlp.up_proj.weight"], red.moves["model.layers.0.mlp.gate_proj.weight"]
    assert (up.kind, up.group, up.group_size, up.extra) == ("gather", "storage", 2, False)
    assert (gate.kind, gate.group, gate.group_size, gate.extra) == ("gather", "world", 4, True)


def _rank_logits(rank, world, model_path, plan_path, out_dir):
    from shardwise.generation import generate
    from shardwise.plan import resolve_plan
    from shardwise.sharded_model import load_sharded

    plan = resolve_plan("llama", plan_path) if plan_path else None
    sharded = load_sharded(model_path, "float32", plan)
    gen = generate(sharded.module, [[5, 6, 7, 8, 9], [10, 11]], 6, 0, (), comm=sharded.comm, keep_logits=True)
    # Every weight as the modules see it (a stored-split one is gathered on this access).
    weights = {n: m.weight.detach().clone() for n, m in sharded.module.named_modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor)}
    if rank == 0:
        torch.save({"tokens": gen.tokens, "logits": gen.step_logits, "held": sharded.stats.bytes_held,
                    "weights": weights}, f"{out_dir}/out.pt")


@pytest.mark.slow
def test_fsdp_by_tensor_generates_exactly_what_tensor_parallelism_alone_does(tiny_checkpoint, tmp_path):
    from shardwise.parallel.launch import launch

    plan = tmp_path / "fsdp_tp.yaml"
    plan.write_text(FSDP_TP)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    launch(_rank_logits, 4, (str(tiny_checkpoint), str(plan), str(tmp_path / "a")))
    launch(_rank_logits, 2, (str(tiny_checkpoint), None, str(tmp_path / "b")))
    two_d, tp = torch.load(tmp_path / "a/out.pt"), torch.load(tmp_path / "b/out.pt")
    assert two_d["weights"].keys() == tp["weights"].keys()
    assert all(torch.equal(two_d["weights"][n], w) for n, w in tp["weights"].items())  # bit for bit
    assert two_d["tokens"] == tp["tokens"]
    # Same weights and the same reductions; the CPU BLAS may still round a matmul differently when its
    # buffers land at other addresses (MKL documents this), so logits agree to float32 rounding.
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(two_d["logits"], tp["logits"]))
    assert two_d["held"] < tp["held"]  # each rank stores half of its tensor-parallel shard (norms too)
