"""On-device sampling against the gathered path, per decode step, on a 128k-vocabulary shape.

Both paths run in the same ranks, interleaved, on the same logits: each rank holds its shard of a
``[batch, vocab]`` bf16 logits row (Llama-3's 128,256 tokens by default), as ``lm_head`` leaves it.
The gathered path all-gathers the shards (what ``ColumnParallelLinear(gather_output=True)`` does), cuts
the padding and samples; on-device sampling reduces each shard to its top k first and gathers only those
(``sampler.sample_sharded``). Prints bytes per step, microseconds per step (median) and the ratio, and
checks both pick the same tokens::

    python bench/sampling.py --tp 2 --batch 1 --top-k 1      # greedy
    python bench/sampling.py --tp 2 --batch 4 --top-k 50 --top-p 0.9 --temperature 0.8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def _body(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    from shardwise.generation import Sampling, sample
    from shardwise.parallel.comm import Collectives
    from shardwise.sampler import sample_sharded

    comm = Collectives()
    vocab, local = args.vocab, -(-args.vocab // world)
    ids = torch.arange(rank * local, (rank + 1) * local)
    ids = torch.where(ids < vocab, ids, torch.full_like(ids, -1))
    cfg = Sampling(args.top_k, args.top_p, args.temperature, 0)
    times = {"gathered": [], "on_device": []}
    nbytes, same = {}, True
    for step in range(args.steps):
        logits = torch.randn(args.batch, local, generator=torch.Generator().manual_seed(step * 97 + rank))
        logits = (logits * 3).to(torch.bfloat16)
        tokens = {}
        for path in ("gathered", "on_device") if step % 2 else ("on_device", "gathered"):
            gen = torch.Generator().manual_seed(step)
            t0 = time.perf_counter()
            if path == "gathered":
                full = comm.all_gather(logits, dim=-1)[..., :vocab]
                nbytes[path] = args.batch * local * world * logits.element_size()
                tokens[path] = sample(full.float(), cfg, gen)
            else:
                tokens[path], nbytes[path] = sample_sharded(logits, ids, vocab, cfg.top_k, cfg.top_p, cfg.temperature,
                                                            gen, comm)
            times[path].append(time.perf_counter() - t0)
        same &= torch.equal(tokens["gathered"], tokens["on_device"])
    if rank == 0:
        Path(out).write_text(json.dumps({
            "tp": world, "vocab": vocab, "batch": args.batch, "top_k": args.top_k,
            "bytes_per_step": nbytes, "same_tokens": bool(same),
            "us_per_step": {p: 1e6 * statistics.median(t[args.steps // 5:]) for p, t in times.items()},
        }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    from shardwise.parallel.launch import launch

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        launch(_body, args.tp, (args, out))
        result = json.loads(Path(out).read_text())
    us = result["us_per_step"]
    result["speedup"] = us["gathered"] / max(1e-9, us["on_device"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
