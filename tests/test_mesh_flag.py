"""``--mesh AXIS=N,...``: the mesh from the command line, as torchprime's ``ici_mesh`` overrides give it."""

from __future__ import annotations

import json
import re

import pytest
from conftest import TORCHPRIME_FSDP_TP

from shardwise.errors import ShardwiseError
from shardwise.mesh import Mesh
from shardwise.plan import resolve_plan


def shardwise(*args):
    """``shardwise ARGS`` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from shardwise.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(result, pattern):
    code, _, err = result
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("shardwise: error:")]
    assert len(lines) == 1 and pattern in lines[0], err
    assert "Traceback" not in err


# torchprime's flat form (no `mesh:` section: torchprime sizes the mesh in its trainer config).
FLAT_FSDP_TP = TORCHPRIME_FSDP_TP


def test_parse_keeps_the_written_order_and_allows_sizes_of_one():
    mesh = Mesh.parse("data=1, fsdp=2,tensor=2")
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.axis_sizes == (1, 2, 2)
    assert mesh.world_size == 4 and mesh.coordinate(1, "tensor") == 1 and mesh.coordinate(2, "fsdp") == 1


@pytest.mark.parametrize("text, msg", [
    ("fsdp:2", "expected AXIS=SIZE"), ("fsdp=two", "is not an integer"), ("fsdp=0", "sizes are at least 1"),
    ("fsdp=2,fsdp=2", "given twice"), ("=2", "expected AXIS=SIZE"), ("", "expected AXIS=SIZE"),
])
def test_parse_errors_are_one_line(text, msg):
    with pytest.raises(ShardwiseError, match=msg):
        Mesh.parse(text)


def test_a_flat_torchprime_file_gets_its_mesh_from_the_flag(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text(FLAT_FSDP_TP)
    with pytest.raises(ShardwiseError, match="give --tp-degree or --mesh"):
        resolve_plan("llama", path).mesh()
    mesh = resolve_plan("llama", path, mesh="fsdp=2,tensor=2").mesh()
    assert mesh.describe() == "fsdp=2 x tensor=2"
    # The flag replaces a file's own mesh section too; the product must match the ranks given.
    plan = resolve_plan("llama", "docs/plans/llama-fsdp-tp.yaml", mesh="fsdp=1,tensor=2")
    assert plan.mesh(world_size=2).world_size == 2
    with pytest.raises(ShardwiseError, match="has 2 ranks but 4 devices"):
        plan.mesh(world_size=4)
    with pytest.raises(ShardwiseError, match="size 2 but --tp-degree is 4"):
        plan.mesh(tp_degree=4)


def test_plan_command_with_mesh(tmp_path, tiny_raw):
    (tmp_path / "config.json").write_text(json.dumps(tiny_raw))
    path = tmp_path / "flat.yaml"
    path.write_text(FLAT_FSDP_TP)
    code, out, err = shardwise("plan", "--model-path", str(tmp_path), "--sharding-config", str(path), "--mesh",
                               "fsdp=2,tensor=2", "--json")
    assert code == 0, err
    assert json.loads(out)["mesh"] == {"fsdp": 2, "tensor": 2}
    # An axis the plan uses but the mesh lacks, and a bad flag: one line each, exit 2.
    assert_one_line_error(shardwise("plan", "--model-path", str(tmp_path), "--sharding-config", str(path),
                                    "--mesh", "data=2,tensor=2"), "axis 'fsdp' is not in the mesh")
    assert_one_line_error(shardwise("plan", "--model-path", str(tmp_path), "--mesh", "tensor=x"),
                          "is not an integer")


def test_run_refuses_a_mesh_that_disagrees_with_the_ranks(tiny_model_dir, tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text(FLAT_FSDP_TP)
    assert_one_line_error(shardwise("run", "--model-path", str(tiny_model_dir), "--sharding-config", str(path),
                                    "--mesh", "fsdp=2,tensor=2", "--tp-degree", "4"),
                          "size 2 but --tp-degree is 4")
    assert_one_line_error(shardwise("shard", "--model-path", str(tiny_model_dir), "--sharding-config", str(path),
                                    "--mesh", "fsdp=2,tensor=2", "--compiled-model-path", str(tmp_path / "c")),
                          "pre-sharded checkpoints hold tensor-parallel meshes only")
    transposed = tmp_path / "transposed.yaml"
    transposed.write_text("model.layers.*.mlp.up_proj.weight: [null, tensor]\n")
    assert_one_line_error(shardwise("shard", "--model-path", str(tiny_model_dir), "--sharding-config",
                                    str(transposed), "--compiled-model-path", str(tmp_path / "c")),
                          "pre-sharded checkpoints hold plans the parallel layers compute with as stored")


def test_plan_lists_the_extra_collectives_of_a_non_megatron_torchprime_plan(tmp_path, tiny_raw):
    """docs/plans/torchprime-fsdp-tp-mixed.yaml (the sample in docs/plans.md): q_proj stored [fsdp, tensor] is
    gathered over its fsdp group and computed row-parallel (an all-reduce of its output); o_proj's output is
    placed by features over tensor and gathered back; the batch split over fsdp of the o_proj, decoder-layer and
    lm_head rules divides the batch (no extra collective)."""
    (tmp_path / "config.json").write_text(json.dumps(tiny_raw))
    layers = tiny_raw["num_hidden_layers"]
    code, out, err = shardwise("plan", "--model-path", str(tmp_path), "--sharding-config",
                               "docs/plans/torchprime-fsdp-tp-mixed.yaml", "--mesh", "fsdp=2,tensor=2")
    assert code == 0, err
    line = re.compile(r"^\s+(\S+)\s+(\d+) x .* over\s+(\d+) ranks\s+(\S+): .*<- extra$")
    # (kind, count, group size, what): one line per collective the fast plan does not have.
    got = sorted((m[1], int(m[2]), int(m[3]), m[4]) for m in map(line.match, out.splitlines()) if m)
    assert got == sorted([
        ("all-reduce", layers, 2, "model.layers.*.self_attn.q_proj"),  # row-parallel: its output summed
        ("all-gather", layers, 2, "model.layers.*.self_attn.o_proj"),  # [fsdp, null, tensor]: its 72 features in 2
    ]), out
    total = re.search(r"extra \(.*\): (\d+) collective\(s\), ([\d.]+) (\w+) sent per rank per token", out)
    assert total and int(total.group(1)) == 2 * layers, out
    assert "Data parallelism: the batch is split over fsdp: 2 replicas" in out
    # The Megatron-shaped FSDP x TP file costs no extra collectives at all.
    code, out, _ = shardwise("plan", "--model-path", str(tmp_path), "--sharding-config",
                             "docs/plans/llama-fsdp-tp.yaml")
    assert code == 0 and "q_proj.weight: weight stored split over fsdp" in out
