"""Speculative decoding benchmark: prompt lookup on SmolLM2 and the real Qwen2.5-Coder 0.5B/1.5B pair.

One command, one run, every figure from this machine at the same time::

    python bench/speculative.py                 # ~15 minutes on 2 cores (fetches the Qwen pair once)
    python bench/speculative.py --skip-qwen     # SmolLM2 only, ~2 minutes

Measures (greedy, batch 1, TP 2 through ``shardwise.run``, the same code as ``shardwise run``):

* **Prompt lookup** (``--speculation-type ngram``) on SmolLM2-135M-Instruct, on copy-heavy work
  (repeat a given passage) and on free writing: decode tokens/s with and without it, measured in the
  same ranks, and whether the output is identical.
* **The Qwen2.5-Coder pair** in bfloat16: the 1.5B target alone, the 0.5B draft alone, speculation
  with the draft sharded and replicated; HF transformers' ``generate`` of the target alone and with
  ``assistant_model`` (its assisted generation) on one process with all cores. Identical output is
  checked, and the speed-up the pair allows on this machine is worked out from measured costs: a
  round yields the measured tokens per target forward and costs K draft steps (the draft's own
  decode step, measured alone) plus one verify forward of K+1 positions.

Writes the section ``## Speculative decoding (bench/speculative.py)`` of ``docs/benchmarks.md`` and
the raw figures to ``bench/results/speculative.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from decode import _cores, memory_bandwidth, write_section  # noqa: E402

SECTION = "## Speculative decoding (bench/speculative.py)"
PASSAGE = ("The committee met on Tuesday to review the budget. After a long discussion, the members agreed "
           "to move the library renovation to next spring, to hire two more teachers for the autumn term, "
           "and to repair the roof of the sports hall before the winter storms arrive.")
COPY_PROMPT = f"Repeat the following text exactly, word for word:\n\n{PASSAGE}"
FREE_PROMPT = "Write a long, detailed essay about the history of the Roman Empire."
CODE_PROMPT = "Write a Python function that checks whether a string is a palindrome, with a docstring and tests."
TARGET, DRAFT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"


def shardwise_run(model: Path, prompt: str, tokens: int, **options) -> dict:
    """One ``shardwise.run`` with ``--benchmark`` (1 timed iteration): tokens, decode tokens/s and the
    speculation figures (whose ``speedup`` compares against plain decoding in the same ranks)."""
    from shardwise.runner import RunOptions, run

    with_tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"shardwise-bench-spec-{os.getpid()}"
    opts = RunOptions(model_path=str(model), tp_degree=2, max_new_tokens=tokens, prompts=[prompt], benchmark=True,
                      benchmark_iterations=1, output_dir=str(with_tmp), **options)
    start = time.perf_counter()
    result = run(opts)
    return {"tokens": result.tokens[0], "decode": result.decode_tokens_per_second,
            "speculation": result.speculation, "wall_s": time.perf_counter() - start}


def hf_runs(target: Path, draft: Path, prompt_ids: list[int], tokens: int, threads: int) -> dict:
    """HF transformers on one process: the target alone and with ``assistant_model``, greedy."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    big = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.bfloat16).eval()
    small = AutoModelForCausalLM.from_pretrained(str(draft), dtype=torch.bfloat16).eval()
    x = torch.tensor([prompt_ids])
    mask = torch.ones_like(x)

    def gen(n: int, assistant=None) -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = big.generate(x, attention_mask=mask, max_new_tokens=n, do_sample=False, assistant_model=assistant,
                               pad_token_id=big.generation_config.eos_token_id)
        return time.perf_counter() - t, out[0, x.shape[1]:].tolist()

    gen(2)
    prefill, _ = gen(1)
    alone_s, alone = gen(tokens)
    gen(2, small)
    assisted_s, assisted = gen(tokens, small)
    return {"alone": {"tokens": alone, "decode": (len(alone) - 1) / max(1e-9, alone_s - prefill)},
            "assisted": {"tokens": assisted, "decode": (len(assisted) - 1) / max(1e-9, assisted_s - prefill)},
            "threads": threads}


def measure(args: argparse.Namespace) -> dict:
    from shardwise.convert import bundled_model_dir

    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:],
                 "machine": {"cores": _cores(), "bandwidth": memory_bandwidth(), "torch": torch.__version__}}
    smol = bundled_model_dir()
    lookup = []
    for label, prompt in (("copy a given passage", COPY_PROMPT), ("free writing", FREE_PROMPT)):
        plain = shardwise_run(smol, prompt, args.tokens)
        spec = shardwise_run(smol, prompt, args.tokens, speculation_type="ngram", speculation_length=args.ngram_k)
        lookup.append({"work": label, "identical": plain["tokens"] == spec["tokens"], "plain": plain, "ngram": spec})
    res["lookup"] = lookup
    if args.skip_qwen:
        return res
    from shardwise.fetch import fetch_model
    from shardwise.prompts import encode_prompts, load_tokenizer

    target, draft = fetch_model(TARGET), fetch_model(DRAFT)
    qwen: dict = {"k": args.k}
    qwen["target"] = shardwise_run(target, CODE_PROMPT, args.qwen_tokens)
    qwen["draft"] = shardwise_run(draft, CODE_PROMPT, args.qwen_tokens)
    qwen["sharded"] = shardwise_run(target, CODE_PROMPT, args.qwen_tokens, draft_model_path=str(draft),
                                    speculation_length=args.k)
    qwen["replicated"] = shardwise_run(target, CODE_PROMPT, args.qwen_tokens, draft_model_path=str(draft),
                                       speculation_length=args.k, draft_model_tp_degree=1)
    ids = encode_prompts(load_tokenizer(target), [CODE_PROMPT], True)[0]
    qwen["hf"] = hf_runs(target, draft, ids, args.qwen_tokens, _cores())
    res["qwen"] = qwen
    return res


def render(res: dict) -> str:
    m = res["machine"]
    lines = [SECTION, "",
             f"Measured {res['date']} by `python bench/speculative.py {' '.join(res['argv'])}` in one run: "
             f"{m['cores']} cores, memory bandwidth {m['bandwidth']['copy_gbps']:.1f} GB/s (copy), torch "
             f"{m['torch']}. Greedy, batch 1, shardwise at TP 2 (one thread per rank). Each speed-up compares "
             "decode tokens/s with and without speculation measured in the same ranks, one after the other. "
             "Other processes may share the machine: read the ratios.", "",
             "### Prompt lookup (`--speculation-type ngram`), SmolLM2-135M-Instruct float32", "",
             "| work | K | plain tok/s | ngram tok/s | speed-up | acceptance | tokens per target forward | "
             "identical output |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in res["lookup"]:
        s = row["ngram"]["speculation"]
        lines.append(f"| {row['work']} | {s['length']} | {s['decode_tokens_per_second_without']:.1f} | "
                     f"{row['ngram']['decode']:.1f} | **{s['speedup']:.2f}x** | {100 * s['acceptance_rate']:.0f}% | "
                     f"{s['tokens_per_target_forward']:.2f} | {'yes' if row['identical'] else 'NO'} |")
    q = res.get("qwen")
    if q:
        t, d = q["target"], q["draft"]
        lines += ["", f"### Qwen2.5-Coder-1.5B-Instruct (target) with 0.5B (draft), bfloat16, K={q['k']}, "
                  f"{len(t['tokens'])} new tokens", "",
                  "| system | decode tok/s | vs shardwise target alone | acceptance | tokens per target forward | "
                  "identical to target alone |", "|---|---:|---:|---:|---:|---|"]
        base = t["decode"]
        rows = [("shardwise TP 2, target alone", t, None), ("shardwise TP 2, draft alone", d, None),
                ("shardwise TP 2, speculation, draft sharded", q["sharded"], q["sharded"]["speculation"]),
                ("shardwise TP 2, speculation, draft replicated", q["replicated"], q["replicated"]["speculation"]),
                ("HF transformers, target alone", q["hf"]["alone"], None),
                ("HF transformers, assisted generation", q["hf"]["assisted"], None)]
        for label, r, s in rows:
            same = "-" if r is d else ("yes" if r["tokens"] == t["tokens"] else "NO")
            accept = "-" if s is None else f"{100 * s['acceptance_rate']:.0f}%"
            per_forward = "-" if s is None else f"{s['tokens_per_target_forward']:.2f}"
            lines.append(f"| {label} | {r['decode']:.2f} | {r['decode'] / base:.2f}x | {accept} | {per_forward} | "
                         f"{same} |")
        best = max((q["sharded"], q["replicated"]), key=lambda r: r["decode"])
        s = best["speculation"]
        k, tpf = q["k"], s["tokens_per_target_forward"]
        draft_ratio = base / d["decode"]  # one draft step, in target steps (each measured alone)
        round_cost = tpf * base / best["decode"]  # one measured round, in target steps
        steps = s["draft_forwards"] / max(1, s["rounds"])  # draft steps per round (K adapts per row)
        verify_ratio = max(0.0, round_cost - steps * draft_ratio)
        allowed = tpf / (steps * draft_ratio + 1)  # if verifying the proposals cost one decode step
        hf = q["hf"]
        lines += ["",
                  f"- What the pair allows here: a draft step costs **{draft_ratio:.2f}** target steps (each "
                  f"measured alone) and {100 * s['acceptance_rate']:.0f}% of proposals are accepted, so a round "
                  f"yields {tpf:.2f} tokens for {steps:.1f} draft steps (K={k} at most) and one verify forward. If "
                  "the verify "
                  f"cost one decode step (decode is memory-bound), that is at most **{allowed:.2f}x**; reached "
                  f"**{best['decode'] / base:.2f}x**, i.e. a round measured {round_cost:.2f} target steps, so the "
                  f"verify (with the speculation bookkeeping) cost about {verify_ratio:.2f} target steps.",
                  f"- Against HF transformers in the same run: shardwise speculation "
                  f"{best['decode'] / hf['alone']['decode']:.2f}x HF's target alone and "
                  f"{best['decode'] / hf['assisted']['decode']:.2f}x HF's assisted generation "
                  f"({hf['assisted']['decode'] / hf['alone']['decode']:.2f}x its own target alone); HF output "
                  f"identical to shardwise's: alone {'yes' if hf['alone']['tokens'] == t['tokens'] else 'NO'}, "
                  f"assisted {'yes' if hf['assisted']['tokens'] == t['tokens'] else 'NO'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64, help="new tokens, SmolLM2 runs")
    p.add_argument("--qwen-tokens", type=int, default=48, help="new tokens, Qwen runs")
    p.add_argument("--k", type=int, default=4, help="speculation length with the draft model")
    p.add_argument("--ngram-k", type=int, default=8, help="speculation length with prompt lookup")
    p.add_argument("--skip-qwen", action="store_true", help="prompt lookup on SmolLM2 only")
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown file to update")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "speculative.json"), help="raw figures")
    args = p.parse_args(argv)
    res = measure(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    text = render(res)
    write_section(Path(args.doc), text, SECTION)
    print(text)


if __name__ == "__main__":
    main()
