"""Device partition configs: parsing, every error, machine fit, and a four-rank run end to end."""

from __future__ import annotations

import json

import pytest

from shardwise import topology
from shardwise.cli import main
from shardwise.errors import ShardwiseError
from shardwise.topology import load_partition_config, parse_partition_config, resolve_topology


def config(*devices, connections=None, name="p0"):
    data = {"partitions": [{"name": name, "devices": [{"deviceId": d, "numCores": c} for d, c in devices]}]}
    if connections is not None:
        data["connections"] = connections
    return data


def test_parse_and_resolve_cpu_partition(monkeypatch):
    monkeypatch.setattr(topology, "usable_cores", lambda: 8)
    cfg = parse_partition_config(config((0, 2), (1, 2), (2, 1), (3, 3)), "pc.json")
    topo = resolve_topology(cfg)
    assert topo.world_size == 4 and topo.kind == "cpu"
    assert topo.threads == (2, 2, 1, 3) and topo.devices == ("cpu",) * 4
    assert topo.link == "host"  # no connections: everything through the host


def test_connections_decide_the_ring_link(monkeypatch):
    monkeypatch.setattr(topology, "usable_cores", lambda: 8)
    full = parse_partition_config(config((0, 1), (1, 1), (2, 1), connections=[{"devices": [0, 1, 2], "type": "p2p"}]))
    assert full.link(0, 2) == "p2p" and resolve_topology(full).link == "p2p"
    part = parse_partition_config(config((0, 1), (1, 1), (2, 1), connections=[{"devices": [0, 1], "type": "p2p"}]))
    assert part.link(0, 1) == "p2p" and part.link(1, 2) == "host"
    assert resolve_topology(part).link == "host"  # the ring 0-1-2-0 has host hops


def test_several_partitions_need_a_name_to_plan_or_serve(monkeypatch):
    monkeypatch.setattr(topology, "usable_cores", lambda: 8)
    data = {"partitions": [config((0, 1))["partitions"][0], {"name": "big", "devices": [
        {"deviceId": 1, "numCores": 1}, {"deviceId": 2, "numCores": 1}]}]}
    cfg = parse_partition_config(data, "pc.json")
    with pytest.raises(ShardwiseError, match="has 2 partitions \\(p0, big\\); choose one with --partition NAME"):
        resolve_topology(cfg)
    assert resolve_topology(cfg, partition="big").world_size == 2
    with pytest.raises(ShardwiseError, match="no partition 'small'"):
        resolve_topology(cfg, partition="small")


@pytest.mark.parametrize("data, msg", [
    ([], "a partition config is a JSON object"),
    ({"partitions": []}, "`partitions` must be a non-empty list"),
    ({"partitions": [{"name": "p0", "devices": []}]}, "partition 'p0' has no devices"),
    ({"partitions": [{"name": "", "devices": []}]}, "name must be a non-empty string"),
    ({"partitions": [{"name": "p0", "devices": [{"deviceId": "0", "numCores": 1}]}]}, "deviceId must be an integer"),
    ({"partitions": [{"name": "p0", "devices": [{"deviceId": 0, "numCores": 0}]}]}, "numCores must be an integer >= 1"),
    ({"partitions": [{"name": "p0", "devices": [{"deviceId": 0, "numCores": 1.5}]}]}, "numCores must be an integer"),
    ({"partitions": [{"name": "p0", "devices": [{"deviceId": True, "numCores": 1}]}]}, "deviceId must be an integer"),
    ({"partitions": [{"name": "p0", "devices": [{"deviceId": 0}]}]}, "must be {\"deviceId\": int"),
    ({"partitions": [{"name": "p0", "devices": {"deviceId": 0}}]}, "`devices` must be a list"),
    (config((0, 1), (0, 1)), "device 0 is listed twice"),
    (config((0, 1), connections=[{"devices": [0, 7], "type": "p2p"}]), "names device 7, which no partition lists"),
    (config((0, 1), (1, 1), connections=[{"devices": [0, 1], "type": "pcie"}]), "type 'pcie' is not one of p2p"),
    (config((0, 1), (1, 1), connections=[{"devices": [0], "type": "p2p"}]), "at least two device ids"),
    (config((0, 1), (1, 1), connections={"devices": [0, 1]}), "`connections` must be a list"),
    ({"partitions": [{"name": "p0", "devices": [{"deviceId": 0, "numCores": 1}]}], "links": []}, "unknown key 'links'"),
])
def test_invalid_configs(data, msg):
    with pytest.raises(ShardwiseError) as err:
        parse_partition_config(data, "pc.json")
    assert msg in str(err.value) and str(err.value).startswith("pc.json: ")


def test_duplicate_partition_names_and_devices_across_partitions():
    one = config((0, 1))["partitions"][0]
    with pytest.raises(ShardwiseError, match="partition name 'p0' appears twice"):
        parse_partition_config({"partitions": [one, {**one, "devices": [{"deviceId": 1, "numCores": 1}]}]})
    with pytest.raises(ShardwiseError, match="device 0 is listed twice \\(in partition 'p0' and 'p1'\\)"):
        parse_partition_config({"partitions": [one, {**one, "name": "p1"}]})


def test_partition_larger_than_the_machine(monkeypatch):
    monkeypatch.setattr(topology, "usable_cores", lambda: 2)
    cfg = parse_partition_config(config((0, 1), (1, 1), (2, 1)), "pc.json")
    topo = resolve_topology(cfg)  # more cores than the machine has: the ranks share them, one thread each
    assert topo.threads == (1, 1, 1) and "asks for 3 cores in all but this process may use 2" in topo.capped
    assert resolve_topology(parse_partition_config(config((0, 1), (1, 1)), "pc.json")).capped == ""
    monkeypatch.setattr(topology, "cuda_device_count", lambda: 2)
    with pytest.raises(ShardwiseError, match="needs cuda:2, but this machine has 2 CUDA devices"):
        resolve_topology(parse_partition_config(config((0, 1), (2, 1)), "pc.json"), device="cuda")
    topo = resolve_topology(parse_partition_config(config((1, 1), (0, 1)), "pc.json"), device="cuda")
    assert topo.devices == ("cuda:1", "cuda:0") and topo.kind == "cuda"


def test_real_usable_cores_are_the_affinity_set():
    import os

    assert topology.usable_cores() == len(os.sched_getaffinity(0))


def test_load_errors(tmp_path):
    with pytest.raises(ShardwiseError, match="does not exist"):
        load_partition_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{partitions")
    with pytest.raises(ShardwiseError, match="not valid JSON"):
        load_partition_config(bad)


def test_cli_partition_and_plan_errors_are_one_line_before_any_rank(tiny_model_dir, tmp_path, capsys):
    pc = tmp_path / "pc.json"
    pc.write_text(json.dumps(config((0, 1), (0, 1))))
    assert main(["run", "--model-path", str(tiny_model_dir), "--partition-config", str(pc)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shardwise: error: ") and "device 0 is listed twice" in err and "\n" not in err
    plan = tmp_path / "plan.yaml"
    plan.write_text("sharding:\n  model.layers.*.self_attn.o_proj_weight: [null, tensor]\n")
    assert main(["run", "--model-path", str(tiny_model_dir), "--sharding-config", str(plan)]) == 2
    err = capsys.readouterr().err.strip()
    assert "nearest real names: model.layers.*.self_attn.o_proj.weight" in err and "\n" not in err
    assert main(["run", "--model-path", str(tiny_model_dir), "--set", "model.norm.weight=[tensor, null]"]) == 2
    assert "spec [tensor, null] has 2 entries but the tensor has 1 dimension" in capsys.readouterr().err
    pc.write_text(json.dumps(config((0, 1), (1, 1))))
    assert main(["run", "--model-path", str(tiny_model_dir), "--partition-config", str(pc), "--tp-degree", "4"]) == 2
    assert "the mesh tensor=4 has 4 ranks but 2 devices were given" in capsys.readouterr().err


@pytest.mark.slow
def test_four_cpu_ranks_from_a_partition_config_match_hf(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Four ranks (9 heads, 3 KV heads, vocab 101: padded heads and rows) generate HF's greedy tokens.

    The machine has 2 cores; the test pretends it has 4 so a 4 x 1-core partition is accepted (the
    ranks then share the 2 cores, which is slow but correct).
    """
    monkeypatch.setattr(topology, "usable_cores", lambda: 4)
    pc = tmp_path / "pc.json"
    pc.write_text(json.dumps(config((0, 1), (1, 1), (2, 1), (3, 1), connections=[{"devices": [0, 1, 2, 3],
                                                                                  "type": "p2p"}])))
    # The file alone splits the MLP by halves and leaves lm_head (tied to a split embedding) without a rule;
    # the --set overrides below complete it, and are applied before any check.
    plan = tmp_path / "plan.yaml"
    plan.write_text("""
mesh: {axes: [tensor]}
sharding:
  model.embed_tokens.weight: [tensor, null]
  model.layers.*.self_attn.q_proj.weight: [tensor, null]
  model.layers.*.self_attn.k_proj.weight: [tensor, null]
  model.layers.*.self_attn.v_proj.weight: [tensor, null]
  model.layers.*.self_attn.o_proj.weight: [null, tensor]
  model.layers.*.mlp.gate_proj.weight: [tensor, null]
  model.layers.*.mlp.up_proj.weight: [null, null]
  model.layers.*.mlp.down_proj.weight: [null, null]
  lm_head: [null, null, null]
""")
    rc = main(["run", "--model-path", str(tiny_model_dir), "--partition-config", str(pc),
               "--sharding-config", str(plan),
               "--set", "model.layers.*.mlp.up_proj.weight=[tensor,null]",
               "--set", "model.layers.*.mlp.down_proj.weight=[null,tensor]",
               "--set", "lm_head.weight=[tensor,null]",
               "--prompt", "w5 w17 w3 w99 w42", "--prompt", "w7 w8", "--batch-size", "2",
               "--max-new-tokens", "8", "--seq-len", "32", "--check-accuracy-mode", "token-matching"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Accuracy check (token-matching) passed" in out.err
    assert "partition 'p0' (cpu, p2p links)" in out.err and "threads per rank 1,1,1,1" in out.err


def _report_threads(rank, world, out_dir):
    from pathlib import Path

    import torch

    (Path(out_dir) / f"rank{rank}").write_text(str(torch.get_num_threads()))


@pytest.mark.slow
def test_launch_gives_each_rank_its_own_thread_count(tmp_path):
    from shardwise.parallel.launch import launch

    launch(_report_threads, 2, (str(tmp_path),), threads=(2, 1))
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["2", "1"]
    with pytest.raises(ShardwiseError, match="must give each of the 2 local ranks at least 1"):
        launch(_report_threads, 2, (str(tmp_path),), threads=(1,))


# The Cloud AI 100 documentation's partition examples, as written there: 16 numCores per device.
AI100_P2P_4 = {"partitions": [{"name": "partition0", "devices": [{"deviceId": d, "numCores": 16} for d in range(4)]}],
               "connections": [{"devices": [0, 1, 2, 3], "type": "p2p"}]}
AI100_HOST_2 = {"partitions": [{"name": "partition0", "devices": [{"deviceId": d, "numCores": 16} for d in range(2)]}]}


def test_accelerator_partition_examples_share_this_machines_cores(monkeypatch):
    monkeypatch.setattr(topology, "usable_cores", lambda: 2)
    p2p = resolve_topology(parse_partition_config(AI100_P2P_4, "p2p.json"))
    assert p2p.threads == (1, 1, 1, 1) and p2p.link == "p2p"
    assert "asks for 64 cores in all but this process may use 2: numCores capped" in p2p.capped
    host = resolve_topology(parse_partition_config(AI100_HOST_2, "host.json"))
    assert host.threads == (1, 1) and host.link == "host"
    monkeypatch.setattr(topology, "cuda_device_count", lambda: 4)  # on GPUs, deviceId picks the GPU
    assert resolve_topology(parse_partition_config(AI100_P2P_4), device="cuda").devices == tuple(
        f"cuda:{d}" for d in range(4))


@pytest.mark.slow
def test_several_partitions_run_one_job_each(tiny_model_dir, tmp_path, capsys):
    """The host example and a second partition in one file, on this machine's real cores: two jobs."""
    data = {"partitions": [AI100_HOST_2["partitions"][0],
                           {"name": "partition1", "devices": [{"deviceId": d, "numCores": 16} for d in (2, 3)]}],
            "connections": [{"devices": [2, 3], "type": "p2p"}]}
    pc = tmp_path / "pc.json"
    pc.write_text(json.dumps(data))
    rc = main(["run", "--model-path", str(tiny_model_dir), "--partition-config", str(pc), "--no-chat-template",
               "--prompt", "w5 w17 w3", "--max-new-tokens", "4", "--check-accuracy-mode", "token-matching"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Partition 'partition0': job 1 of 2" in out.err and "Partition 'partition1': job 2 of 2" in out.err
    assert out.err.count("numCores capped") == 2 and out.err.count("Accuracy check (token-matching) passed") == 2
    assert "partition 'partition1' (cpu, p2p links)" in out.err and out.out.count("Prompt: w5 w17 w3") == 2


SEVERAL = {"partitions": [{"name": "pair", "devices": [{"deviceId": d, "numCores": 4} for d in (0, 1)]},
                          {"name": "quad", "devices": [{"deviceId": d, "numCores": 4} for d in (2, 3, 4, 5)]}],
           "connections": [{"devices": [2, 3, 4, 5], "type": "p2p"}]}


def test_plan_without_partition_reports_every_partition(tmp_path, tiny_raw, capsys):
    """Each partition is its own job (as `run` runs them), so `plan` gives one section per partition."""
    (tmp_path / "config.json").write_text(json.dumps(tiny_raw))
    pc = tmp_path / "pc.json"
    pc.write_text(json.dumps(SEVERAL))
    assert main(["plan", "--model-path", str(tmp_path), "--partition-config", str(pc)]) == 0
    out = capsys.readouterr().out
    sections = out.split("Partition ")[1:]
    assert [s.splitlines()[0] for s in sections] == ["'pair': job 1 of 2", "'quad': job 2 of 2"]
    assert "mesh tensor=2 (2 ranks)" in sections[0] and "mesh tensor=4 (4 ranks)" in sections[1]
    assert "over   2 ranks" in sections[0] and "over   4 ranks" in sections[1]
    assert main(["plan", "--model-path", str(tmp_path), "--partition-config", str(pc), "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)["partitions"]
    assert list(reports) == ["pair", "quad"] and [r["mesh"] for r in reports.values()] == [{"tensor": 2},
                                                                                          {"tensor": 4}]
    # --partition picks one: the plain report, as with a config of one partition.
    assert main(["plan", "--model-path", str(tmp_path), "--partition-config", str(pc), "--partition", "quad"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Model ") and "mesh tensor=4 (4 ranks)" in out and "Partition " not in out


def test_serve_with_several_partitions_needs_one_before_loading(tmp_path, capsys):
    pytest.importorskip("fastapi")
    pc = tmp_path / "pc.json"
    pc.write_text(json.dumps(SEVERAL))
    assert main(["serve", "--model-path", str(tmp_path / "absent"), "--partition-config", str(pc)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"shardwise: error: {pc} has 2 partitions (pair, quad); a server is one job: choose one with "
                   "--partition NAME")
