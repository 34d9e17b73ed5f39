"""The resident engine: load once, call many times, continuous batching, weight swap, no orphans.

Every test here starts real rank processes (TP 2 over the shared-memory collectives) on tiny random
checkpoints; one engine per model is shared by the tests of the module where they do not change it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import save_word_tokenizer

from shardwise.engine import Engine, EngineBusy, EngineClosed, EngineOptions
from shardwise.errors import ShardwiseError
from shardwise.generation import Sampling

pytestmark = pytest.mark.slow
PROMPTS = [[5, 17, 33, 2 + 40, 7], [9, 9, 12], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70], [88]]


def _with_tokenizer(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    vocab = json.loads((dst / "config.json").read_text())["vocab_size"]
    save_word_tokenizer(dst, vocab)
    return dst


def _perturbed(src: Path, dst: Path, scale: float) -> Path:
    """A 'fine-tune' of ``src``: same config, shapes and files, every weight changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    generator = torch.Generator().manual_seed(int(scale * 1000))
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        save_file({n: t + scale * torch.randn(t.shape, generator=generator) for n, t in tensors.items()}, f,
                  metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-models")
    out = {name: _with_tokenizer(tiny_models[name], root / name) for name in ("gqa9_tied", "mistral_window",
                                                                              "llama3_rope")}
    out["tuned"] = _perturbed(out["gqa9_tied"], root / "tuned", 0.5)
    return out


@pytest.fixture(scope="module")
def engine(models):
    with Engine(EngineOptions(model_path=str(models["gqa9_tied"]), tp_degree=2, seq_len=64, max_batch_size=6,
                              max_queue=4)) as eng:
        yield eng


def _hf_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_generate_matches_transformers_and_is_batch_invariant(engine, models):
    solo = [engine.generate([p], max_new_tokens=12)[0] for p in PROMPTS]
    together = engine.generate(PROMPTS, max_new_tokens=12)
    assert [c.token_ids for c in together] == [c.token_ids for c in solo]
    for p, c in zip(PROMPTS, solo):
        expected = _hf_greedy(models["gqa9_tied"], p, 12)
        cut = next((i + 1 for i, t in enumerate(expected) if t in engine.eos_token_ids), len(expected))
        assert c.token_ids == expected[:cut]
        assert c.finish_reason == ("stop" if cut < len(expected) or expected[-1] in engine.eos_token_ids
                                   else "length")
        assert c.prompt_tokens == len(p) and 0 < c.first_token_seconds <= c.seconds


def test_sliding_window_model_matches_transformers(models):
    long_prompt = list(range(3, 23))  # 20 tokens, window 6
    with Engine(model_path=str(models["mistral_window"]), tp_degree=2, seq_len=48, max_batch_size=3) as eng:
        got = eng.generate([long_prompt, [4, 5]], max_new_tokens=10)
        alone = eng.generate([long_prompt], max_new_tokens=10)[0]
    assert got[0].token_ids == alone.token_ids == _hf_greedy(models["mistral_window"], long_prompt, 10)
    assert got[1].token_ids == _hf_greedy(models["mistral_window"], [4, 5], 10)


def test_request_joining_a_running_batch_gets_its_solo_tokens(engine):
    long, late = PROMPTS[2], PROMPTS[0]
    alone = engine.generate([late], max_new_tokens=8)[0].token_ids
    order: list[tuple[str, int | None, str | None]] = []
    done = threading.Event()

    def record(name):
        def on_event(event):
            order.append((name, event.token, event.finish_reason))
            if name == "late" and event.finish_reason:
                done.set()
        return on_event

    engine.submit(long, Sampling(), 40, record("long"))
    while sum(1 for o in order if o[0] == "long") < 3:
        time.sleep(0.001)
    engine.submit(late, Sampling(), 8, record("late"))
    assert done.wait(60)
    late_tokens = [t for name, t, _ in order if name == "late" and t is not None]
    assert late_tokens == alone
    first_late = next(i for i, o in enumerate(order) if o[0] == "late")
    # It joined while the long request was still decoding, not after it.
    assert any(o[0] == "long" for o in order[first_late:])
    while not any(o[0] == "long" and o[2] for o in order):
        time.sleep(0.005)


def test_sampling_is_seeded_and_batch_invariant(engine):
    sampling = Sampling(top_k=0, top_p=0.9, temperature=1.3, seed=7)
    a = engine.generate([PROMPTS[0]], sampling, max_new_tokens=10)[0].token_ids
    b = engine.generate([PROMPTS[0], PROMPTS[1]], sampling, max_new_tokens=10)[0].token_ids
    c = engine.generate([PROMPTS[0]], Sampling(top_k=0, temperature=1.3, seed=8), max_new_tokens=10)[0].token_ids
    assert a == b
    assert a != c or len(a) < 3


def test_stream_yields_the_generate_tokens_and_cancel_frees_the_row(engine):
    expected = engine.generate([PROMPTS[1]], max_new_tokens=10)[0].token_ids
    assert list(engine.stream(PROMPTS[1], max_tokens=10)) == expected
    events = []
    finished = threading.Event()

    def on_event(event):
        events.append(event)
        if event.finish_reason:
            finished.set()

    handle = engine.submit(PROMPTS[2], Sampling(), 50, on_event)
    while len(events) < 2:
        time.sleep(0.001)
    handle.cancel()
    assert finished.wait(30)
    assert events[-1].finish_reason == "cancelled" and len(events) < 50
    assert engine.generate([PROMPTS[1]], max_new_tokens=10)[0].token_ids == expected


def test_bad_requests_are_refused_in_one_line(engine):
    with pytest.raises(ShardwiseError, match="context is 64 tokens"):
        engine.submit(list(range(3, 60)), Sampling(), 10)
    with pytest.raises(ShardwiseError, match="max_tokens must be a positive integer"):
        engine.submit([5], Sampling(), 0)
    with pytest.raises(ShardwiseError, match=r"integers in \[0, 101\)"):
        engine.submit([5, 101], Sampling(), 4)
    with pytest.raises(ShardwiseError, match="empty"):
        engine.submit([], Sampling(), 4)
    with pytest.raises(ShardwiseError, match="top_p"):
        engine.submit([5], Sampling(top_k=0, top_p=0.0), 4)
    assert engine.generate([[5]], max_new_tokens=3)[0].token_ids  # still serving


def test_queue_is_bounded(engine):
    handles, events = [], []
    try:
        with pytest.raises(EngineBusy, match="try again later"):
            for _ in range(engine.options.max_batch_size + engine.options.max_queue + 1):
                handles.append(engine.submit(PROMPTS[2], Sampling(), 40, events.append))
        assert len(handles) == engine.options.max_batch_size + engine.options.max_queue
    finally:
        for h in handles:
            h.cancel()
    deadline = time.monotonic() + 30
    while sum(1 for e in events if e.finish_reason) < len(handles) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(1 for e in events if e.finish_reason) == len(handles)


def test_swap_weights_equals_a_fresh_load_and_refuses_other_layouts(engine, models):
    before = [c.token_ids for c in engine.generate(PROMPTS, max_new_tokens=10)]
    report = engine.swap_weights(models["tuned"])
    after = [c.token_ids for c in engine.generate(PROMPTS, max_new_tokens=10)]
    with Engine(model_path=str(models["tuned"]), tp_degree=2, seq_len=64, max_batch_size=6) as fresh:
        assert [c.token_ids for c in fresh.generate(PROMPTS, max_new_tokens=10)] == after
    assert after != before and report.seconds > 0 and report.bytes_read > 0
    with pytest.raises(ShardwiseError, match="config field"):
        engine.swap_weights(models["llama3_rope"])
    # Same config, a tensor of another shape: refused by the ranks, with the tensor named.
    broken = models["tuned"].parent / "broken"
    if not broken.exists():
        from safetensors.torch import load_file, save_file

        shutil.copytree(models["tuned"], broken)
        f = next(f for f in sorted(broken.glob("*.safetensors")) if "model.norm.weight" in load_file(f))
        tensors = load_file(f)
        tensors["model.norm.weight"] = torch.ones(71)
        save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ShardwiseError, match="model.norm.weight"):
        engine.swap_weights(broken)
    assert [c.token_ids for c in engine.generate(PROMPTS, max_new_tokens=10)] == after  # the tuned weights stayed
    engine.swap_weights(models["gqa9_tied"])
    assert [c.token_ids for c in engine.generate(PROMPTS, max_new_tokens=10)] == before


def test_fused_projections_give_the_same_tokens_and_take_swapped_weights(engine, models):
    """--fused-qkv / --mlp-kernel-enabled in the engine: the unfused engine's tokens, and a weight swap
    loads the new q/k/v and gate/up slices into the fused weights (the swap would refuse their names)."""
    plain = [c.token_ids for c in engine.generate(PROMPTS, max_new_tokens=10)]
    engine.swap_weights(models["tuned"])
    plain_tuned = [c.token_ids for c in engine.generate(PROMPTS, max_new_tokens=10)]
    engine.swap_weights(models["gqa9_tied"])
    with Engine(model_path=str(models["gqa9_tied"]), tp_degree=2, seq_len=64, max_batch_size=6, fused_qkv=True,
                fused_gate_up=True) as fused:
        assert [c.token_ids for c in fused.generate(PROMPTS, max_new_tokens=10)] == plain
        fused.swap_weights(models["tuned"])
        assert [c.token_ids for c in fused.generate(PROMPTS, max_new_tokens=10)] == plain_tuned
    assert plain != plain_tuned


def test_engine_refuses_bad_options_before_starting_ranks(models, tmp_path):
    with pytest.raises(ShardwiseError, match="max_batch_size"):
        Engine(model_path=str(models["gqa9_tied"]), max_batch_size=0)
    with pytest.raises(ShardwiseError):
        Engine(model_path=str(tmp_path / "missing"))


def _run_script(code: str, timeout: float = 120) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                            env=env)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_ranks_die_with_a_killed_parent(models):
    proc = _run_script(f"""
        from shardwise.engine import Engine
        if __name__ == "__main__":
            eng = Engine(model_path={str(models["gqa9_tied"])!r}, tp_degree=2, seq_len=32)
            print(" ".join(map(str, eng.rank_pids)), flush=True)
            import time; time.sleep(600)
    """)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "ranks outlived their engine"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)


def test_a_dead_rank_ends_requests_with_an_error(models):
    eng = Engine(model_path=str(models["gqa9_tied"]), tp_degree=2, seq_len=64)
    try:
        events = []
        eng.submit(PROMPTS[2], Sampling(), 50, events.append)
        os.kill(eng.rank_pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (events and events[-1].finish_reason) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events[-1].finish_reason == "error" and "rank" in events[-1].error
        with pytest.raises(EngineClosed, match="not running"):
            eng.submit([5], Sampling(), 3)
    finally:
        eng.close()
    assert not any(_alive(p) for p in eng.rank_pids)


def test_engine_joins_ranks_started_by_torchrun(models, torchrun, tmp_path):
    exe, env, port = torchrun
    out = tmp_path / "out.json"
    script = tmp_path / "drive.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from shardwise.engine import Engine
        eng = Engine(model_path={str(models["gqa9_tied"])!r}, tp_degree=2, seq_len=64)
        if eng.is_driver:
            result = [c.token_ids for c in eng.generate({PROMPTS!r}, max_new_tokens=10)]
            eng.close()
            open({str(out)!r}, "w").write(json.dumps(result))
    """))
    env = {**env, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([exe, "--nproc-per-node", "2", "--master-port", str(port), str(script)], env=env,
                          timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with Engine(model_path=str(models["gqa9_tied"]), tp_degree=2, seq_len=64) as eng:
        expected = [c.token_ids for c in eng.generate(PROMPTS, max_new_tokens=10)]
    assert json.loads(out.read_text()) == expected
