"""The capacity estimate: its figures equal what ranks really hold, from config and headers alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shardwise.capacity import Collective, estimate_capacity
from shardwise.checkpoint import CheckpointSource
from shardwise.cli import main
from shardwise.config import config_from_dict, load_config
from shardwise.conformance import model_layout
from shardwise.errors import ShardwiseError
from shardwise.families import state_dict_shapes
from shardwise.loader import load_rank_state

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "configs"


def test_state_dict_shapes_match_a_real_checkpoint(tiny_checkpoint, tiny_config):
    assert state_dict_shapes(tiny_config, "F32") == CheckpointSource(tiny_checkpoint).shapes()


@pytest.mark.parametrize("extra", [{"tie_word_embeddings": False}, {"attention_bias": True, "mlp_bias": True},
                                   {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}])
def test_state_dict_shapes_match_transformers(tiny_raw, extra):
    import transformers

    raw = {**tiny_raw, **extra}
    cls = getattr(transformers, raw["architectures"][0])
    cfg_cls = getattr(transformers, raw["architectures"][0].replace("ForCausalLM", "Config"))
    kwargs = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        model = cls(cfg_cls(**kwargs))
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if raw["tie_word_embeddings"]:
        expected.pop("lm_head.weight")
    got = {n: s for n, (s, _) in state_dict_shapes(config_from_dict(raw)).items()}
    assert got == expected


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_param_bytes_equal_what_each_rank_loads(tiny_checkpoint, tp, dtype):
    report = estimate_capacity(tiny_checkpoint, tp_degree=tp, torch_dtype=dtype)
    assert report.shapes_from == "safetensors headers"
    source = CheckpointSource(tiny_checkpoint)
    layout = model_layout(tiny_checkpoint, tp, source=source)
    for rank in range(tp):
        _, stats = load_rank_state(source, layout, rank, getattr(torch, dtype), threads=1)
        assert report.ranks[rank].param_bytes == stats.bytes_held


def test_config_alone_gives_the_same_figures_as_headers(tiny_checkpoint):
    from_dir = estimate_capacity(tiny_checkpoint, tp_degree=4, batch_size=2, seq_len=40)
    from_config = estimate_capacity(tiny_checkpoint / "config.json", tp_degree=4, batch_size=2, seq_len=40)
    assert from_config.shapes_from == "config.json"
    assert [(r.param_bytes, r.kv_cache_bytes, r.activation_bytes) for r in from_dir.ranks] == \
           [(r.param_bytes, r.kv_cache_bytes, r.activation_bytes) for r in from_config.ranks]


def _rank_figures(rank, world, model_path, prompts, new_tokens, out_dir):
    from shardwise.generation import generate
    from shardwise.sharded_model import load_sharded

    sharded = load_sharded(model_path, "float32")
    gen = generate(sharded.module, prompts, new_tokens, 0, (), comm=sharded.comm)
    torch.save({"held": sharded.stats.bytes_held, "cache": gen.cache_bytes}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_param_and_kv_bytes_equal_a_real_two_rank_run(tiny_checkpoint, tmp_path):
    """Two spawned ranks: 3 KV heads over 2 ranks means one padded KV head, which the cache holds too."""
    from shardwise.parallel.launch import launch

    prompts, new_tokens = [[5, 6, 7, 8], [9, 10]], 6
    launch(_rank_figures, 2, (str(tiny_checkpoint), prompts, new_tokens, str(tmp_path)))
    report = estimate_capacity(tiny_checkpoint, tp_degree=2, batch_size=2, seq_len=4 + new_tokens,
                               torch_dtype="float32")
    for rank in range(2):
        real = torch.load(tmp_path / f"rank{rank}.pt")
        assert report.ranks[rank].param_bytes == real["held"]
        assert report.ranks[rank].kv_cache_bytes == real["cache"]
    # 2 KV heads per rank (3 real + 1 padding) x head_dim 8 x k and v x 2 layers x 2 x 10 positions x 4 bytes
    assert report.ranks[1].kv_cache_bytes == 2 * 8 * 2 * 2 * 2 * 10 * 4


def test_collectives_per_token(tiny_raw, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_raw))
    report = estimate_capacity(cfg, tp_degree=4, batch_size=3, torch_dtype="bfloat16")
    kinds = {(c.kind, c.what.split(":")[0]): c for c in report.collectives}
    assert kinds[("all-reduce", "model.layers.*.self_attn.o_proj")].count == 2
    assert kinds[("all-reduce", "model.layers.*.mlp.down_proj")].count == 2
    assert kinds[("all-reduce", "model.embed_tokens")].count == 1
    assert kinds[("all-reduce", "model.embed_tokens")].bytes == 3 * 72 * 2
    lm = kinds[("all-gather", "lm_head")]
    assert lm.count == 1 and lm.bytes == 3 * 26 * 4 * 2  # 101 rows padded to 4 x 26
    assert all(c.group == 4 for c in report.collectives)
    sent = sum(c.count * c.sent_per_rank() for c in report.collectives)
    assert report.sent_per_rank == pytest.approx(sent)
    assert Collective("all-reduce", 1, 1000, "x", 4).sent_per_rank() == 1500  # 2(N-1)/N
    assert Collective("all-gather", 1, 1000, "x", 4).sent_per_rank() == 750  # (N-1)/N
    ar = Collective("all-reduce", 1, 1000, "x", 4)
    assert ar.seconds(1e9, 1e-5) == pytest.approx(6 * 1e-5 + 1500 / 1e9)  # 2(N-1) hops
    host, p2p = report.comm_seconds("host"), report.comm_seconds("p2p")
    assert host > p2p > 0
    assert estimate_capacity(cfg, tp_degree=1).collectives == []


def test_partition_config_sets_ranks_devices_and_link(tmp_path):
    pc = tmp_path / "pc.json"
    devices = [{"deviceId": i, "numCores": 1} for i in range(4, 8)]
    pc.write_text(json.dumps({"partitions": [{"name": "p", "devices": devices}],
                              "connections": [{"devices": [4, 5, 6, 7], "type": "p2p"}]}))
    cfg = CONFIGS / "llama-3.1-8b/config.json"
    report = estimate_capacity(cfg, partition_config=pc, device="cuda", device_memory_gib=16)
    assert report.mesh.world_size == 4 and report.link == "p2p"
    assert [r.device for r in report.ranks] == ["cuda:4", "cuda:5", "cuda:6", "cuda:7"]
    assert report.ranks[0].memory_bytes == 16 * 1024 ** 3
    pc.write_text(json.dumps({"partitions": [{"name": "p", "devices": devices}]}))
    assert estimate_capacity(cfg, partition_config=pc, device_memory_gib=16).link == "host"


def test_kv_cache_counts_replicated_kv_heads_for_405b():
    report = estimate_capacity(CONFIGS / "llama-3.1-405b/config.json", tp_degree=64, seq_len=4096, batch_size=2,
                        device_memory_gib=24)
    # 8 KV heads over 64 ranks: each rank holds one (replicated) KV head.
    assert all(r.kv_cache_bytes == 2 * 4096 * 126 * 1 * 128 * 2 * 2 for r in report.ranks)
    config = load_config(CONFIGS / "llama-3.1-405b/config.json")
    full = sum(torch.Size(s).numel() for s, _ in state_dict_shapes(config).values()) * 2
    assert sum(r.param_bytes for r in report.ranks) >= full  # replication and padding only add
    assert 800e9 < full < 820e9  # 405B parameters in bf16


def test_capacity_errors(tiny_raw, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_raw))
    with pytest.raises(ShardwiseError, match="exceeds the model's 9 attention heads"):
        estimate_capacity(cfg, tp_degree=16)
    with pytest.raises(ShardwiseError, match="--torch-dtype 'int3'"):
        estimate_capacity(cfg, tp_degree=2, torch_dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ShardwiseError, match="give --device-memory-gib"):
            estimate_capacity(cfg, tp_degree=2, device="cuda")
    with pytest.raises(ShardwiseError, match="nearest real names"):
        estimate_capacity(cfg, tp_degree=2, overrides=["model.layers.*.self_attn.o_proj_weight=[null,tensor]"])


def test_cli_plan_text_and_json(tiny_raw, tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_raw))
    assert main(["plan", "--model-path", str(cfg), "--tp-degree", "2", "--device-memory-gib", "1"]) == 0
    out = capsys.readouterr().out
    assert "mesh tensor=2" in out and "Fits: yes" in out and "row-parallel output, summed" in out
    assert main(["plan", "--model-path", str(cfg), "--tp-degree", "2", "--json", "--host-gbps", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 2 and len(data["ranks"]) == 2 and data["links"]["host_gbps"] == 1
    assert data["per_token"]["link"] == "host"
    assert main(["plan", "--model-path", str(cfg), "--tp-degree", "99"]) == 2
    assert capsys.readouterr().err.startswith("shardwise: error: ")


def test_two_d_mesh_rings_per_axis_and_fsdp_gathers(tiny_raw, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_raw))
    example = Path(__file__).resolve().parents[1] / "docs/plans/llama-fsdp-tp.yaml"
    report = estimate_capacity(cfg, sharding_config=example, batch_size=4, seq_len=16, torch_dtype="float32")
    one_d = estimate_capacity(cfg, tp_degree=4, batch_size=4, seq_len=16, torch_dtype="float32")
    assert report.mesh.world_size == 8
    # The batch rules (model.layers.*, lm_head: [fsdp, ...]) divide the batch between the two fsdp replicas:
    # each caches and sums its 2 rows, and nothing is placed and gathered back at the boundary.
    assert report.rank_batch == 2 and "batch 4 (2 per replica)" in report.format()
    assert "Data parallelism: the batch is split over fsdp: 2 replicas, each generating 2 of the 4 rows" in \
        report.format()
    assert report.ranks[0].kv_cache_bytes * 2 == one_d.ranks[0].kv_cache_bytes
    assert not report.extra
    by_what = {c.what.split(":")[0]: c for c in report.collectives}
    assert by_what["model.layers.*.mlp.down_proj"].group == 4  # row-parallel sum over the tensor axis
    assert by_what["model.layers.*.mlp.down_proj"].bytes == 2 * 72 * 4  # one replica's rows
    # Placed (not divided) when the batch rules disagree: every replica computes the whole batch.
    mixed = estimate_capacity(cfg, sharding_config=example, batch_size=4, seq_len=16, torch_dtype="float32",
                              overrides=["lm_head=[[fsdp,tensor],null,null]"])
    assert mixed.ranks[0].kv_cache_bytes == one_d.ranks[0].kv_cache_bytes
    placed = [c for c in mixed.extra if c.what.startswith("model.layers.*: output placed as [fsdp, null, null]")]
    assert placed and placed[0].count == 2 and placed[0].group == 2 and placed[0].bytes == 4 * 72 * 4
    gather = by_what["model.layers.*.mlp.up_proj.weight"]  # stored split over fsdp, gathered each step
    assert gather.kind == "all-gather" and gather.group == 2 and gather.count == 2
    assert gather.bytes == 24 * 72 * 4  # this rank's tensor slice (96 / 4 rows), whole along fsdp


def test_directory_without_weights_plans_from_its_config(tiny_raw, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_raw))
    report = estimate_capacity(tmp_path, tp_degree=3)
    assert report.shapes_from == "config.json" and report.mesh.world_size == 3
