"""Shared-memory collectives: equal to gloo, identical on every rank, and no hang when a rank dies.

Every test spawns real ranks (``torch.multiprocessing``, spawn, gloo on a free port). Each rank
writes its outcome to a file; the parent joins with a deadline and kills (by PID) any rank still
running, so no test leaves processes behind.
"""

from __future__ import annotations

import glob
import os
import signal
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardwise.settings import free_port

pytestmark = pytest.mark.slow

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SLOT = 64 << 10  # small slots, so large tensors go through in several chunks


def _entry(rank: int, world: int, port: int, out_dir: str, body, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("SHARDWISE_FAST_COLLECTIVES", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = body(rank, world, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException as exc:  # noqa: B036 - report everything to the parent
        torch.save({"ok": False, "type": type(exc).__name__, "message": str(exc),
                    "trace": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        os._exit(0)  # skip destroy_process_group: peers may be gone already


def _spawn(body, world: int, tmp_path, args: tuple = (), deadline: float = 240.0) -> list[dict | None]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, str(tmp_path), body, args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline
    try:
        for p in procs:
            p.join(max(0.1, end - time.monotonic()))
    finally:
        stray = [p for p in procs if p.is_alive()]
        for p in stray:
            os.kill(p.pid, signal.SIGKILL)
            p.join(5)
    assert not stray, f"ranks {[procs.index(p) for p in stray]} still running after {deadline} s"
    out = []
    for r in range(world):
        path = tmp_path / f"rank{r}.pt"
        out.append(torch.load(path) if path.exists() else None)
    return out


def _ints(gen: torch.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Integer values small enough that any summation order is exact in every tested dtype."""
    return torch.randint(-16, 17, (n,), generator=gen).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _body_equivalence(rank: int, world: int, calls: int) -> dict:
    from shardwise.parallel.comm import Collectives

    comm = Collectives(fast=True, slot_bytes=SLOT)
    assert comm.fast
    if rank == 0:
        assert not glob.glob(f"/dev/shm/shardwise-{os.getpid()}-*"), "segment file left behind"
    plan = torch.Generator().manual_seed(1234)  # same on every rank: sizes and dtypes of each call
    data = torch.Generator().manual_seed(100 + rank)
    sizes = (1, 3, 576, 577, 2304, 4099, 20000, 50001)  # 20000 fp32 and up: several 64 KiB chunks
    weights = torch.tensor([5, 5, 30, 10, 10, 5, 3, 2], dtype=torch.float)
    checked = 0
    block = 40
    for start in range(0, calls, block):
        specs = []
        for _ in range(min(block, calls - start)):
            n = sizes[int(torch.multinomial(weights, 1, generator=plan))]
            dtype = DTYPES[int(torch.randint(0, len(DTYPES), (1,), generator=plan))]
            op = int(torch.randint(0, 10, (1,), generator=plan))  # 0-6 all_reduce, 7-8 all_gather, 9 broadcast
            specs.append((n, dtype, op))
        inputs = [_ints(data, n, dtype) for n, dtype, _ in specs]
        if rank == world - 1 and start % (4 * block) == 0:
            time.sleep(0.002)  # skew the ranks now and then
        fast, originals = [], [x.clone() for x in inputs]
        for (_n, _dtype, op), x in zip(specs, inputs):  # a block of fast calls back to back, no other sync
            if op <= 2:  # the compiled graphs' op: the sum in a new tensor, its input untouched
                fast.append(torch.ops.shardwise.all_reduce(x, comm.handle))
            elif op <= 6:
                fast.append(comm.all_reduce(x.clone()))
            elif op <= 8:
                fast.append(comm.all_gather(x.view(1, -1).clone(), dim=-1 if op == 7 else 0))
            else:
                fast.append(comm.broadcast(x.clone(), src=(start // block) % world))
        for (n, dtype, op), x, got, original in zip(specs, inputs, fast, originals):
            if op <= 6:
                assert op > 2 or _same(x, original), f"call {start}: the op changed its input"
                ref = x.clone()
                dist.all_reduce(ref)
            elif op <= 8:
                parts = [torch.empty_like(x) for _ in range(world)]
                dist.all_gather(parts, x)
                ref = torch.cat([p.view(1, -1) for p in parts], dim=-1 if op == 7 else 0)
            else:
                ref = x.clone()
                dist.broadcast(ref, src=(start // block) % world)
            assert _same(got, ref), f"call {start}: op {op}, {n} x {dtype} differs from gloo"
            checked += 1

    # Random floats: sums are not exact, so check every rank against the same fixed-order sum.
    identical = 0
    for i in range(calls // 2):
        dtype = (torch.float32, torch.bfloat16)[i % 2]
        n = (576, 2304, 30000)[i % 3]
        contrib = [torch.randn(n, generator=torch.Generator().manual_seed(i * 131 + r)).to(dtype)
                   for r in range(world)]
        got = comm.all_reduce(contrib[rank].clone())
        ref = contrib[0] + contrib[1]
        for c in contrib[2:]:
            ref = ref + c
        assert _same(got, ref), f"random call {i}: {dtype} differs from the fixed-order sum"
        if world == 2 and i % 10 == 0:  # two addends commute, so gloo's result must match bit for bit too
            theirs = contrib[rank].clone()
            dist.all_reduce(theirs)
            assert _same(got, theirs), f"random call {i}: {dtype} differs from gloo"
        identical += 1
    return {"checked": checked, "identical": identical, "native": comm.shm._native is not None}


@pytest.mark.parametrize("world,calls,native", [(2, 2000, "1"), (3, 1200, "1"), (4, 1000, "1"), (2, 1000, "0")])
def test_fast_path_equals_gloo(tmp_path, monkeypatch, world, calls, native):
    # native: each call's work in C (parallel/shm_native.py), float32 and bfloat16; "0": all of it in Python
    monkeypatch.setenv("SHARDWISE_NATIVE_COLLECTIVES", native)
    start = time.monotonic()
    results = _spawn(_body_equivalence, world, tmp_path, (calls,))
    for r, res in enumerate(results):
        assert res is not None, f"rank {r} wrote no result"
        assert res["ok"], f"rank {r}: {res.get('trace')}"
        assert res["result"] == {"checked": calls, "identical": calls // 2, "native": native == "1"}
    assert time.monotonic() - start < 240


def _body_switch(rank: int, world: int) -> dict:
    from shardwise.parallel.comm import Collectives

    os.environ["SHARDWISE_FAST_COLLECTIVES"] = "0"
    off = Collectives()
    os.environ["SHARDWISE_FAST_COLLECTIVES"] = "1"
    on = Collectives()
    x = torch.full((5,), float(rank + 1))
    y = torch.full((5,), float(rank + 1))
    off.all_reduce(x)
    on.all_reduce(y)
    ids = on.all_gather(torch.tensor([rank]), dim=0)  # int64 goes through shared memory as bytes
    unusable = Collectives(fast=True, path_dir="/nonexistent-shardwise-dir")  # every rank falls back to gloo
    z = unusable.all_reduce(torch.ones(3))
    left = glob.glob(f"/dev/shm/shardwise-{os.getpid()}-*")
    return {"off": off.fast, "on": on.fast, "x": x.tolist(), "y": y.tolist(), "ids": ids.tolist(), "left": left,
            "unusable": unusable.fast, "z": z.tolist()}


def test_env_switch_and_no_leftover_segment(tmp_path):
    results = _spawn(_body_switch, 2, tmp_path)
    for res in results:
        assert res is not None and res["ok"], res and res.get("trace")
        out = res["result"]
        assert out["off"] is False and out["on"] is True
        assert out["x"] == out["y"] == [3.0] * 5
        assert out["ids"] == [0, 1]
        assert out["left"] == []
        assert out["unusable"] is False and out["z"] == [2.0] * 3


def _body_dies(rank: int, world: int, how: str) -> dict:
    from shardwise.errors import ShardwiseError
    from shardwise.parallel.comm import Collectives

    comm = Collectives(fast=True, timeout=60 if how != "stall" else 1.5)
    x = torch.ones(576)
    victim = world - 1
    for i in range(100000):
        if rank == victim and i == 300:
            if how == "exit":
                os._exit(3)
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(4)  # "stall": alive but never arrives (until the others have given up)
            os._exit(0)
        t0 = time.monotonic()
        try:
            comm.all_reduce(x)
        except ShardwiseError as exc:
            return {"call": i, "error": str(exc), "waited": time.monotonic() - t0}
        x.fill_(1.0)
    return {"call": None}


@pytest.mark.parametrize("how", ["exit", "sigkill", "stall"])
def test_dead_rank_fails_the_others(tmp_path, how):
    world = 3
    results = _spawn(_body_dies, world, tmp_path, (how,), deadline=60 if how != "stall" else 20)
    for r in range(world - 1):
        res = results[r]
        assert res is not None and res["ok"], res and res.get("trace")
        out = res["result"]
        assert out["call"] == 300, out
        assert out["waited"] < 15, out
        assert f"rank {world - 1}" in out["error"], out
        assert "\n" not in out["error"]
        if how == "stall":
            assert "did not reach" in out["error"], out
        else:
            assert "exited" in out["error"], out
    assert results[world - 1] is None  # the victim never reported


# -- decode through the fast path ---------------------------------------------------------------

PROMPTS = [[5, 9, 17, 33, 65, 2, 7, 11, 13], [100, 101], [200, 3, 4, 5, 6]]  # left-padded batch


def _tiny_llama(path, window: int | None) -> None:
    import json

    from safetensors.torch import save_file

    h, inter, layers, heads, kv, vocab = 64, 96, 2, 4, 2, 256
    hd = h // heads
    gen = torch.Generator().manual_seed(7)
    state = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=gen) * 0.5,
             "model.norm.weight": torch.ones(h), "lm_head.weight": torch.randn(vocab, h, generator=gen) * 0.2}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (heads * hd, h)), ("self_attn.k_proj", (kv * hd, h)),
                            ("self_attn.v_proj", (kv * hd, h)), ("self_attn.o_proj", (h, heads * hd)),
                            ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)), ("mlp.down_proj", (h, inter))):
            state[p + name + ".weight"] = torch.randn(*shape, generator=gen) * 0.2
        state[p + "input_layernorm.weight"] = torch.ones(h)
        state[p + "post_attention_layernorm.weight"] = torch.ones(h)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 256, "tie_word_embeddings": False, "hidden_act": "silu",
              "torch_dtype": "float32", "eos_token_id": 2}
    if window:
        config["sliding_window"] = window
    (path / "config.json").write_text(json.dumps(config))


def _generate(path, comm, sampling=None):
    from shardwise import Sampling, generate, load_sharded

    model = load_sharded(str(path), "float32", comm=comm)
    g = generate(model.module, PROMPTS, 12, 0, (), sampling or Sampling(), comm, keep_logits=True)
    return g.tokens, torch.stack(g.step_logits)


def _body_decode(rank: int, world: int, path: str) -> dict:
    from pathlib import Path

    from shardwise import Sampling
    from shardwise.parallel.comm import Collectives

    out = {}
    for fast in (True, False):
        comm = Collectives(fast=fast)
        assert comm.fast is fast
        out[fast] = _generate(Path(path), comm)
        out[(fast, "sampled")] = _generate(Path(path), comm, Sampling(top_k=20, top_p=0.9, temperature=0.8, seed=1))[0]
    return out


@pytest.mark.parametrize("window", [None, 4])
def test_decode_fast_path_token_identical(tmp_path, window):
    """TP 2 decode over shared memory gives bit-identical logits to gloo; TP 1 agrees within rounding."""
    import shardwise.generation as generation
    from shardwise.parallel.comm import Collectives

    ckpt = tmp_path / "tiny"
    _tiny_llama(ckpt, window)
    results = _spawn(_body_decode, 2, tmp_path, (str(ckpt),), deadline=180)
    for res in results:
        assert res is not None and res["ok"], res and res.get("trace")
    fast_tokens, fast_logits = results[0]["result"][True]
    gloo_tokens, gloo_logits = results[0]["result"][False]
    assert fast_tokens == gloo_tokens and _same(fast_logits, gloo_logits)
    assert results[0]["result"][(True, "sampled")] == results[0]["result"][(False, "sampled")]
    assert results[1]["result"][True][0] == fast_tokens
    one_tokens, one_logits = _generate(ckpt, Collectives())
    torch.testing.assert_close(one_logits, fast_logits, atol=1e-4, rtol=1e-4)
    # Sliding-window masks: the precomputed table and the per-step fallback are the same masks.
    limit = generation.MASK_TABLE_LIMIT
    generation.MASK_TABLE_LIMIT = 0
    try:
        step_tokens, step_logits = _generate(ckpt, Collectives())
    finally:
        generation.MASK_TABLE_LIMIT = limit
    assert step_tokens == one_tokens and _same(step_logits, one_logits)


def _body_reduce_scatter(rank: int, world: int) -> dict:
    """Each rank's rows of a reduce-scatter are bit for bit its rows of the all-reduce, in several chunks."""
    from shardwise.parallel.comm import Collectives

    comm = Collectives(fast=True, slot_bytes=SLOT)
    gen = torch.Generator().manual_seed(7 + rank)
    checked = 0
    for batch, length, hidden in ((2, 5, 72), (1, 1, 40), (3, 7, 4099)):  # uneven rows; the last spans chunks
        x = torch.randn(batch, length, hidden, generator=gen)
        chunk = -(-length // world)
        start = min(rank * chunk, length)
        end = min(start + chunk, length)
        mine = comm.reduce_scatter(x.clone(), 1, start, end)
        whole = comm.all_reduce(x.clone())
        assert _same(mine, whole[:, start:end].contiguous()), (batch, length, hidden)
        checked += 1
    assert comm.sent["reduce-scatter"] * 2 == pytest.approx(comm.sent["all-reduce"])  # half the bytes
    return {"checked": checked}


@pytest.mark.slow
def test_reduce_scatter_is_the_all_reduce_rows(tmp_path):
    results = _spawn(_body_reduce_scatter, 3, tmp_path)
    assert all(r and r["ok"] and r["result"]["checked"] == 3 for r in results), results
