"""The GPU path: rank -> device mapping, the device checks, and one test per bug the checks exist for.

CI has no GPU, so the multi-GPU code path runs here as simulated GPUs: ``SHARDWISE_CHECK_DEVICES=1``
with ``device="cuda"`` on a machine without CUDA (parallel/devices.py). The bugs, as the old code had
them (docs/gpu.md shows each of these tests failing on it):

1. ``--device cuda`` without a partition config put every rank on ``cuda:0``;
2. ``max_over_ranks`` all-reduced a host float64 tensor, on an NCCL-only group (``default_backend``);
3. non-greedy sampling broadcast host token tensors over that group;
4. torchrun's ``LOCAL_RANK`` did not choose the GPU;
and the device was set only after the process group had been created.

The ``gpu`` test runs TP 1 generation on a real GPU when there is one and skips cleanly otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from shardwise.errors import ShardwiseError
from shardwise.parallel.launch import default_backend, launch

try:
    from shardwise.parallel import devices as dev
except ImportError:  # code without a device layer (the old code): each test fails on its own, saying so
    class _Missing:
        def __getattr__(self, name):
            raise AssertionError(f"no device layer: shardwise.parallel.devices.{name} does not exist")

    dev = _Missing()

PROMPTS = [[3, 17, 5, 9, 11, 2], [7, 1, 4]]
NEW_TOKENS = 6
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture
def checks(monkeypatch):
    monkeypatch.setenv("SHARDWISE_CHECK_DEVICES", "1")


# -- the rank -> device mapping ----------------------------------------------------------------------


def test_local_launch_gives_each_local_rank_its_own_gpu(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert [dev.rank_device("cuda", r, 0, None, 4) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    # The second node of a two-node launch (--start-rank-id 4 --local-ranks-size 4): local indices 0..3.
    assert [dev.rank_device("cuda", r, 4, None, 4) for r in range(4, 8)] == [f"cuda:{i}" for i in range(4)]
    assert dev.rank_device("cpu", 3, 0, None, 4) == "cpu"
    assert dev.rank_device("cuda:5", 0, 0, None, 1) == "cuda:5"
    with pytest.raises(ShardwiseError, match="names one GPU but 2 ranks run on this host"):
        dev.rank_device("cuda:0", 1, 0, None, 2)
    with pytest.raises(ShardwiseError, match="is not cpu, cuda or cuda:<index>"):
        dev.rank_device("tpu", 0)


def test_torchrun_local_rank_chooses_the_gpu(monkeypatch):
    """Bug 4: under torchrun the GPU is LOCAL_RANK, not the global rank (rank 5 of 8 on 4-GPU nodes)."""
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dev.local_rank(5) == 1
    assert dev.rank_device("cuda", 5, 0, None, 4) == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ShardwiseError, match="LOCAL_RANK='x' is not an integer"):
        dev.rank_device("cuda", 5)


def test_partition_config_device_ids_choose_the_gpu(tmp_path, checks):
    from shardwise.topology import load_partition_config, resolve_topology

    path = tmp_path / "partitions.json"
    path.write_text(json.dumps({"partitions": [{"name": "p0", "devices": [{"deviceId": 3, "numCores": 1},
                                                                           {"deviceId": 5, "numCores": 1}]}]}))
    topology = resolve_topology(load_partition_config(path), "cuda")  # simulated GPUs: no CUDA needed here
    assert topology.devices == ("cuda:3", "cuda:5")
    assert [dev.rank_device("cuda", r, 0, topology.devices, 2) for r in range(2)] == ["cuda:3", "cuda:5"]


def test_cuda_runs_get_a_cpu_backend_for_host_scalars():
    """Bug 2, the backend half: an NCCL-only group has no way to carry the host-side scalars."""
    assert default_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert default_backend("cuda:1") == "cpu:gloo,cuda:nccl"
    assert default_backend("cpu") == "gloo"


def test_state_to_device_staging_copies_every_byte():
    """The double-buffered staging loop (run here without pinned memory, to CPU): chunks smaller and
    larger than a buffer, odd sizes, bool, bfloat16 and empty tensors arrive intact, and each host
    tensor leaves the input dict as it is copied."""
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(37, 11, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
             "c": torch.rand(13, 3, generator=g) > 0.5, "d": torch.empty(0, 4), "e": torch.arange(1000)}
    expected = {n: t.clone() for n, t in state.items()}
    out = dev.state_to_device(state, "cpu", staging_bytes=96, pinned=False)
    assert state == {}
    assert list(out) == list(expected)
    for name, t in expected.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name


# -- the device checks, in real ranks (gloo standing in for NCCL) --------------------------------------


def _scenarios(rank, world, path, result_file):
    """Rank body under device checks on simulated GPUs: the new code passes; each old pattern is refused."""
    from shardwise import generate, load_sharded
    from shardwise.generation import Sampling, sample

    device = dev.bound_device()
    model = load_sharded(path, "float32", device=device)
    comm = model.comm
    results = {"device": device, "backend": dev._STATE.backend}
    greedy = generate(model.module, PROMPTS, NEW_TOKENS, 0, (), comm=comm, device=device, keep_logits=True)
    sampled = generate(model.module, PROMPTS, NEW_TOKENS, 0, (), Sampling(top_k=8, temperature=0.9, seed=3),
                       comm=comm, device=device)
    results.update(greedy=greedy.tokens, sampled=sampled.tokens, logits_type=type(greedy.step_logits[0]).__name__,
                   max=comm.max_over_ranks([float(rank), 1.0]), clean=dev.checked_count())

    def refused(name, action):
        try:
            action()
            results[name] = None
        except dev.DeviceCheckError as exc:
            results[name] = str(exc)

    # Bug 2 as the old max_over_ranks did it: a host float64 tensor through the device collectives.
    refused("host_all_gather", lambda: comm.all_gather(torch.tensor([1.0, 2.0], dtype=torch.float64)[None], dim=0))
    # Bug 3 as the old generate did it: sample on host logits, broadcast the host tokens.
    logits = dev.put(torch.randn(2, 10, generator=torch.Generator().manual_seed(1)), device)
    refused("host_tokens", lambda: comm.broadcast(sample(logits.cpu(), Sampling(top_k=5), torch.Generator())))
    # The old load_rank_model: torch.cuda.set_device after the group existed.
    refused("late_bind", lambda: dev.bind_device(device, rank))
    # A collective before any device was bound.
    dev.release_device()
    refused("unbound", lambda: comm.all_reduce(torch.ones(3)))
    if rank == 0:
        torch.save(results, result_file)


@pytest.fixture(scope="module")
def simulated_run(tiny_models, tmp_path_factory):
    """One 2-rank run on simulated GPUs with device checks on, and the same generation on plain CPU."""
    out = tmp_path_factory.mktemp("devices") / "result.pt"
    old = os.environ.get("SHARDWISE_CHECK_DEVICES")
    os.environ["SHARDWISE_CHECK_DEVICES"] = "1"
    try:
        launch(_scenarios, 2, (str(tiny_models["gqa9_tied"]), str(out)), default_backend("cuda"), device="cuda")
    finally:
        if old is None:
            del os.environ["SHARDWISE_CHECK_DEVICES"]
        else:
            os.environ["SHARDWISE_CHECK_DEVICES"] = old
    return torch.load(out)


def _plain_generate(path, sampling=None, prompts=PROMPTS):
    from shardwise import generate, load_sharded
    from shardwise.generation import Sampling

    model = load_sharded(path, "float32")
    return generate(model.module, prompts, NEW_TOKENS, 0, (), sampling or Sampling(), comm=model.comm).tokens


@pytest.mark.slow
def test_simulated_gpus_run_clean_and_match_cpu(simulated_run, tiny_models):
    """The whole TP 2 path (load, prefill, decode, greedy and sampled, timings) passes every check on
    simulated GPUs, and device placement changes no token."""
    r = simulated_run
    assert r["device"] == "cuda:0" and r["backend"] == "cpu:gloo,cuda:nccl"
    checked, violations = r["clean"]
    assert violations == 0 and checked > 4 * NEW_TOKENS  # two all-reduces per layer per step, at least
    assert r["greedy"] == _plain_generate(str(tiny_models["gqa9_tied"]))
    assert r["logits_type"] == "Tensor"  # kept logits come back to the host as plain tensors
    assert r["max"] == [1.0, 1.0]
    assert all(len(row) == NEW_TOKENS for row in r["sampled"])


@pytest.mark.slow
def test_bug1_every_rank_on_cuda0_is_refused():
    """Bug 1: two local ranks of one run on one GPU (what a bare "cuda" gave every rank) fail at once,
    naming both ranks, instead of hanging in NCCL."""
    os.environ["SHARDWISE_CHECK_DEVICES"] = "1"
    try:
        with pytest.raises(ShardwiseError, match=r"both claim cuda:0 on this host: one GPU per local rank"):
            launch(_scenarios, 2, ("unused", "unused"), default_backend("cuda"), device="cuda",
                   devices=("cuda:0", "cuda:0"))
    finally:
        del os.environ["SHARDWISE_CHECK_DEVICES"]


def _max_over_ranks(rank, world):
    from shardwise.parallel.comm import Collectives

    Collectives().max_over_ranks([1.0])


@pytest.mark.slow
def test_bug2_host_scalars_on_an_nccl_only_group_are_refused(simulated_run):
    """Bug 2: the slowest rank's timings are host values; the old NCCL-only group could not carry them,
    and the old code sent them through the device collectives."""
    assert simulated_run["host_all_gather"] == (
        "device check failed: rank 0: host float64 tensor [1, 2] reached device collective all_gather; "
        "this rank's device is cuda:0")
    os.environ["SHARDWISE_CHECK_DEVICES"] = "1"
    try:
        with pytest.raises(ShardwiseError, match=r"host_all_gather of a host tensor on a group without a CPU "
                                                 r"backend \(nccl\)"):
            launch(_max_over_ranks, 2, (), "nccl", device="cuda")  # the old default_backend("cuda")
    finally:
        del os.environ["SHARDWISE_CHECK_DEVICES"]


@pytest.mark.slow
def test_bug3_sampled_tokens_broadcast_from_the_host_are_refused(simulated_run):
    """Bug 3: sampling on host logits and broadcasting the host tokens; generate now samples on the device
    (the sampled run above passed every check)."""
    assert simulated_run["host_tokens"].startswith("device check failed: rank 0: host int64 tensor [2] reached "
                                                   "device collective broadcast")


@pytest.mark.slow
def test_device_bound_after_the_group_or_not_at_all_is_refused(simulated_run):
    assert "bound cuda:0 after its process group was created" in simulated_run["late_bind"]
    assert "all_reduce ran before this rank's device was bound" in simulated_run["unbound"]


@pytest.mark.slow
def test_cli_run_logs_the_device_check_summary(smollm2, tmp_path):
    """`shardwise run --device cuda` at TP 2 on simulated GPUs: the real model, the CLI's whole path, the
    answer unchanged, and rank 0's one summary line."""
    env = {**os.environ, "SHARDWISE_CHECK_DEVICES": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "shardwise", "run", "--model-path", str(smollm2), "--device", "cuda",
                           "--tp-degree", "2", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "device checks:" in line]
    assert len(lines) == 1 and lines[0].endswith("collectives checked, 0 violations"), proc.stderr[-2000:]
    assert int(lines[0].split("device checks: ")[1].split()[0]) > 30 * 8  # 30 layers x 2 all-reduces a token


@pytest.mark.slow
def test_engine_on_simulated_gpus_passes_the_checks(tiny_models, tmp_path, monkeypatch):
    """The resident engine's path too: step headers and plans (host helpers), engine-sampled tokens,
    a weight swap (weights staged to the device, errors gathered as objects)."""
    import shutil

    from conftest import save_word_tokenizer

    from shardwise.engine import Engine
    from shardwise.generation import Sampling

    monkeypatch.setenv("SHARDWISE_CHECK_DEVICES", "1")
    path = tmp_path / "model"
    shutil.copytree(tiny_models["gqa9_tied"], path)
    save_word_tokenizer(path, json.loads((path / "config.json").read_text())["vocab_size"])
    with Engine(model_path=str(path), tp_degree=2, seq_len=32, max_batch_size=2, device="cuda") as engine:
        greedy = engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS)[0].token_ids
        sampled = engine.generate([PROMPTS[1]], Sampling(top_k=8, seed=2), max_new_tokens=NEW_TOKENS)[0].token_ids
        engine.swap_weights(str(path))
        again = engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS)[0].token_ids
    monkeypatch.delenv("SHARDWISE_CHECK_DEVICES")
    expected = _plain_generate(str(path), None, [PROMPTS[0]])[0]
    assert greedy == again == expected[:len(greedy)] and len(sampled) >= 1


# -- a real GPU, when there is one ----------------------------------------------------------------------


def _gpu_worker(rank, world, path, result_file):
    from shardwise import generate, load_sharded

    device = dev.bound_device()
    model = load_sharded(path, "float32", device=device)
    assert all(p.device == torch.device(device) for p in model.module.parameters())
    out = generate(model.module, PROMPTS, NEW_TOKENS, 0, (), comm=model.comm, device=device)
    torch.save((device, out.tokens), result_file)


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA (the GPU path is checked without one by the tests above)")
def test_tp1_generation_on_a_gpu(tiny_models, tmp_path, checks):
    out = tmp_path / "gpu.pt"
    launch(_gpu_worker, 1, (str(tiny_models["gqa9_tied"]), str(out)), default_backend("cuda"), device="cuda")
    device, tokens = torch.load(out)
    assert device == "cuda:0"
    assert tokens == _plain_generate(str(tiny_models["gqa9_tied"]))
    state = {"w": torch.randn(1000, 33)}
    moved = dev.state_to_device(dict(state), "cuda:0", staging_bytes=4096)
    assert moved["w"].is_cuda and torch.equal(moved["w"].cpu(), state["w"])
