"""Serving benchmark: the resident engine and `shardwise serve` on SmolLM2-135M-Instruct at TP 2.

One command, one run, every figure from this machine at the same time::

    python bench/serve.py              # ~5 minutes on 2 cores
    python bench/serve.py --requests-per-client 2 --tokens 24   # quicker

Measures:

* **Server throughput** at concurrency 1, 4 and 16 against one `shardwise serve` (the `openai` client,
  streaming completions, greedy): requests/s, generated tokens/s, time to first token and inter-token
  latency percentiles. Each level runs ``concurrency x --requests-per-client`` requests from that many
  client threads, each sending its next request as soon as the last one ends.
* The same against a server with ``--no-batch-invariant`` (decode batches not padded), concurrency 1.
* **Peers in the same run**: HF transformers ``generate`` on one process with all cores, one request
  at a time and a static batch of 16 (left-padded), the same prompts and token counts.
* **Engine call overhead**: ``Engine.generate`` wall time in the calling process minus the time the
  same request spent inside rank 0 (median of many calls, 1 and 16 new tokens).
* **Weight swap vs fresh start**: ``Engine.swap_weights`` of a copy of the checkpoint against building
  a new ``Engine`` on it (process start, load, ready).

Writes the section ``## Serving (bench/serve.py)`` of ``docs/benchmarks.md`` and the raw figures to
``bench/results/serve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from decode import _cores, memory_bandwidth, write_section  # noqa: E402

SECTION = "## Serving (bench/serve.py)"
PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a bicycle stays upright.",
    "List five facts about the Moon.",
    "Describe the water cycle to a child.",
    "What makes a good cup of tea?",
    "Give advice to someone learning to program.",
    "Summarise the plot of a heist film you invent.",
    "Why do leaves change colour in autumn?",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------------------------------
# the server


class Server:
    """A `shardwise serve` subprocess on a free port, stopped by its process id."""

    def __init__(self, model: Path, extra: list[str]):
        from shardwise.settings import free_port

        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardwise", "serve", "--model-path", str(model), "--tp-degree", "2",
             "--port", str(self.port), "--max-batch-size", "16", "--seq-len", "1024", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.monotonic() + 300
        for line in self.proc.stdout:
            if "serving" in line and "http://" in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
        else:
            raise RuntimeError(f"server exited with {self.proc.wait()}")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        from openai import OpenAI

        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0,
                             timeout=600)
        self.model = self.client.models.list().data[0].id

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def one_request(server: Server, prompt: str, tokens: int) -> dict:
    start = time.perf_counter()
    stamps = []
    text = []
    stream = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=tokens,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True},
                                              stream_options={"include_usage": True})
    generated = 0
    for chunk in stream:
        if chunk.usage is not None:
            generated = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
            text.append(chunk.choices[0].text)
    end = time.perf_counter()
    return {"ttft": (stamps[0] - start) if stamps else end - start,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "seconds": end - start, "chunks": len(stamps),
            "text": "".join(text), "tokens": generated}


def load_level(server: Server, concurrency: int, per_client: int, tokens: int) -> dict:
    jobs = [PROMPTS[(c + i) % len(PROMPTS)] for c in range(concurrency) for i in range(per_client)]
    one_request(server, PROMPTS[0], 4)  # warm-up
    start = time.perf_counter()

    def client(c: int) -> list[dict]:
        return [one_request(server, PROMPTS[(c + i) % len(PROMPTS)], tokens) for i in range(per_client)]

    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(client, range(concurrency)) for r in rs]
    wall = time.perf_counter() - start
    generated = sum(r["tokens"] for r in results)  # the server's usage: exactly max_tokens each (ignore_eos)
    itl = [x for r in results for x in r["itl"]]
    return {"concurrency": concurrency, "requests": len(jobs), "seconds": wall, "requests_per_s": len(jobs) / wall,
            "tokens": generated, "tokens_per_s": generated / wall,
            "ttft_ms": {q: 1000 * percentile([r["ttft"] for r in results], q) for q in (50, 90, 99)},
            "itl_ms": {q: 1000 * percentile(itl, q) for q in (50, 90, 99)}}


# ---------------------------------------------------------------------------------------------------
# peers: HF transformers on one process


def hf_peer(model: Path, tokens: int, batch: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        hf.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
        start = time.perf_counter()
        out = hf.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id)
        wall = time.perf_counter() - start
    generated = (out.shape[1] - enc["input_ids"].shape[1]) * batch
    return {"batch": batch, "seconds": wall, "tokens": generated, "tokens_per_s": generated / wall,
            "requests_per_s": batch / wall}


# ---------------------------------------------------------------------------------------------------
# the engine in this process


def engine_figures(model: Path, calls: int) -> dict:
    from shardwise.engine import Engine

    copy = Path(tempfile.mkdtemp(prefix="shardwise-swap-"))
    try:
        for f in model.iterdir():
            if f.is_file():
                shutil.copy2(f, copy / f.name)
        t0 = time.perf_counter()
        engine = Engine(model_path=str(model), tp_degree=2, seq_len=512, max_batch_size=4)
        start_s = time.perf_counter() - t0
        try:
            ids = engine.tokenizer("Once upon a time")["input_ids"]
            overhead = {}
            for n in (1, 16):
                engine.generate([ids], max_new_tokens=n)
                samples = []
                for _ in range(calls):
                    c = engine.generate([ids], max_new_tokens=n)[0]
                    samples.append(c.seconds - c.rank_seconds)
                overhead[n] = {"median_ms": 1000 * statistics.median(samples),
                               "p90_ms": 1000 * percentile(samples, 90)}
            swaps = []
            for path in (copy, model, copy):
                swaps.append(engine.swap_weights(path).seconds)
            swap_s = statistics.median(swaps)
        finally:
            engine.close()
        t0 = time.perf_counter()
        with Engine(model_path=str(copy), tp_degree=2, seq_len=512, max_batch_size=4):
            fresh_s = min(start_s, time.perf_counter() - t0)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return {"overhead": overhead, "swap_seconds": swap_s, "fresh_start_seconds": fresh_s,
            "fresh_over_swap": fresh_s / swap_s, "calls": calls}


# ---------------------------------------------------------------------------------------------------
# report


def render(res: dict) -> str:
    m = res["machine"]
    lines = [SECTION, "",
             f"Measured {res['date']} by `python bench/serve.py {' '.join(res['argv'])}` in one run: {m['cores']} "
             f"cores, memory bandwidth {m['bandwidth']['copy_gbps']:.1f} GB/s (copy), torch {m['torch']}. "
             f"SmolLM2-135M-Instruct, float32, TP 2, greedy, {res['tokens']} new tokens per request "
             "(streamed completions through the `openai` client with vLLM's `ignore_eos` extension, so every "
             "request generates exactly that many tokens). HF transformers runs on one process with all cores, in the "
             "same run. Other processes may share the machine: read the ratios.", "",
             "| system | concurrency | requests | req/s | tokens/s | vs concurrency 1 | TTFT p50 / p90 / p99 ms | "
             "inter-token p50 / p90 / p99 ms |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    base = res["server"][0]["tokens_per_s"]
    for r in res["server"]:
        lines.append(f"| shardwise serve | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | "
                     + " / ".join(f"{r['ttft_ms'][q]:.0f}" for q in (50, 90, 99)) + " | "
                     + " / ".join(f"{r['itl_ms'][q]:.1f}" for q in (50, 90, 99)) + " |")
    for r in res.get("server_variant", []):
        lines.append(f"| shardwise serve --no-batch-invariant | {r['concurrency']} | {r['requests']} | "
                     f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | "
                     + " / ".join(f"{r['ttft_ms'][q]:.0f}" for q in (50, 90, 99)) + " | "
                     + " / ".join(f"{r['itl_ms'][q]:.1f}" for q in (50, 90, 99)) + " |")
    for r in res["hf"]:
        kind = "one request at a time" if r["batch"] == 1 else f"static batch of {r['batch']}"
        lines.append(f"| HF transformers generate, 1 process ({kind}) | {r['batch']} | {r['batch']} | "
                     f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | - | - |")
    e = res["engine"]
    top = res["server"][-1]
    lines += ["",
              f"- Throughput at concurrency {top['concurrency']} / concurrency 1: "
              f"**{top['tokens_per_s'] / base:.2f}x** tokens/s (target >= 4x: "
              f"{'met' if top['tokens_per_s'] / base >= 4 else 'NOT met'}).",
              f"- Against HF transformers on one process, same run: concurrency 1 "
              f"{base / res['hf'][0]['tokens_per_s']:.2f}x its one-at-a-time tokens/s; concurrency "
              f"{top['concurrency']} {top['tokens_per_s'] / res['hf'][-1]['tokens_per_s']:.2f}x its static batch "
              f"of {res['hf'][-1]['batch']}.",
              f"- Engine call overhead (wall time of `Engine.generate` in the caller minus the time inside rank 0, "
              f"median of {e['calls']} calls): " + "; ".join(
                  f"{n} new token{'s' if int(n) > 1 else ''}: {v['median_ms']:.2f} ms (p90 {v['p90_ms']:.2f})"
                  for n, v in e["overhead"].items()) + " (target < 2 ms).",
              f"- Weight swap (`Engine.swap_weights`, a copy of the checkpoint, median of 3): "
              f"{e['swap_seconds']:.2f} s; a fresh `Engine` on it: {e['fresh_start_seconds']:.2f} s: the swap is "
              f"**{e['fresh_over_swap']:.1f}x** faster than a restart."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    p.add_argument("--requests-per-client", type=int, default=3, help="requests each client thread sends")
    p.add_argument("--concurrency", default="1,4,16", help="client threads per level")
    p.add_argument("--calls", type=int, default=30, help="Engine.generate calls timed for the overhead")
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown file to update")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "serve.json"), help="raw figures")
    args = p.parse_args(argv)
    from shardwise.convert import bundled_model_dir

    model = bundled_model_dir()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:] if argv is None else argv,
           "tokens": args.tokens,
           "machine": {"cores": _cores(), "torch": torch.__version__, "bandwidth": memory_bandwidth(512, 4)}}
    levels = [int(c) for c in args.concurrency.split(",")]
    server = Server(model, [])
    try:
        res["server"] = [load_level(server, c, args.requests_per_client, args.tokens) for c in levels]
    finally:
        server.stop()
    server = Server(model, ["--no-batch-invariant"])
    try:
        res["server_variant"] = [load_level(server, 1, args.requests_per_client, args.tokens)]
    finally:
        server.stop()
    res["hf"] = [hf_peer(model, args.tokens, 1, _cores()), hf_peer(model, args.tokens, max(levels), _cores())]
    res["engine"] = engine_figures(model, args.calls)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    text = render(res)
    write_section(Path(args.doc), text, SECTION)
    print(text)


if __name__ == "__main__":
    main()
