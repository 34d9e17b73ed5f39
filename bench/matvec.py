"""Few-row linears on a CPU: the BLAS library's matrix product against matvec.py's fused reduction.

One command (about a minute on 2 cores)::

    python bench/matvec.py

Compiles one TP 2 rank's share of SmolLM2-135M's linears (30 layers of q/k/v/o/gate/up/down and half of
the output layer, random weights of the real shapes) twice with ``torch.compile``: as is (inductor calls
the library) and with ``matvec.MatvecAsReduction`` (a generated reduction), for 1, 2, 4 and 8 input
rows, in float32 and bfloat16, on one thread as a TP 2 rank runs. The two alternate, and the median of
many passes is kept. The figures behind ``matvec.MAX_ROWS``; writes the section
``## Matrix-vector products (bench/matvec.py)`` of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from decode import _cores, write_section  # noqa: E402

import shardwise.matvec as matvec  # noqa: E402

SECTION = "## Matrix-vector products (bench/matvec.py)"
# SmolLM2-135M at TP 2, one rank: hidden 576, 9 heads and 3 KV heads of 64 (5 and 2 after padding), MLP 1536.
HIDDEN, Q, KV, MLP, LAYERS, VOCAB = 576, 320, 128, 768, 30, 24576


class RankLinears(nn.Module):
    """Every linear of one rank's decoder layers, fed as a decode step feeds them (no attention)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({
            "q": nn.Linear(HIDDEN, Q, bias=False), "k": nn.Linear(HIDDEN, KV, bias=False),
            "v": nn.Linear(HIDDEN, KV, bias=False), "o": nn.Linear(Q, HIDDEN, bias=False),
            "gate": nn.Linear(HIDDEN, MLP, bias=False), "up": nn.Linear(HIDDEN, MLP, bias=False),
            "down": nn.Linear(MLP, HIDDEN, bias=False)}) for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            # Stands in for attention: uses q, k and v so that none is dropped as dead code.
            attn = layer["q"](x) * (layer["k"](x).mean(-1, keepdim=True) + layer["v"](x).mean(-1, keepdim=True))
            x = x + layer["o"](attn)
            x = x + layer["down"](nn.functional.silu(layer["gate"](x)) * layer["up"](x))
        return self.head(x)


def measure(dtype: torch.dtype, rows: int, passes: int) -> dict:
    torch.manual_seed(0)
    model = RankLinears(dtype)
    x = torch.randn(rows, 1, HIDDEN, dtype=dtype)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch._dynamo.reset()
    default_rows = matvec.max_rows(dtype)
    library = torch.compile(model, dynamic=False)
    # Rewritten at every row count (the threshold is what this measures); no compile cache, whose key
    # (the pass's file) does not see the changed threshold.
    saved = dict(matvec.MAX_ROWS)
    matvec.MAX_ROWS[dtype] = rows
    reduction = torch.compile(model, dynamic=False, options={"pre_grad_custom_pass": matvec.MatvecAsReduction(),
                                                              "fx_graph_cache": False})
    times: dict[str, list[float]] = {"library": [], "reduction": []}
    with torch.no_grad():
        try:
            outs = {name: fn(x) for name, fn in (("library", library), ("reduction", reduction))}  # compiles
        finally:
            matvec.MAX_ROWS.clear()
            matvec.MAX_ROWS.update(saved)
        for _ in range(passes):  # alternating, so load from other processes hits both alike
            for name, fn in (("library", library), ("reduction", reduction)):
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = (outs["library"].float() - outs["reduction"].float()).abs().max().item()
    return {"dtype": str(dtype).removeprefix("torch."), "rows": rows, "mb": nbytes / 1e6,
            "library_gbps": nbytes / med["library"] / 1e9, "reduction_gbps": nbytes / med["reduction"] / 1e9,
            "ratio": med["library"] / med["reduction"], "rewritten": rows <= default_rows, "max_diff": diff}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passes", type=int, default=30, help="timed passes per variant (median kept)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown file to update")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 2, 4, 8):
            rows.append(measure(dtype, n, args.passes))
            print(rows[-1], flush=True)
    lines = [SECTION, "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python bench/matvec.py` on "
             f"{_cores()} cores, one thread (as one of 2 TP ranks runs), torch {torch.__version__}: one TP 2 rank's "
             f"SmolLM2-135M linears ({rows[0]['mb']:.0f} MB in float32), compiled as is (inductor calls the BLAS "
             "library) and with `matvec.MatvecAsReduction`; median of alternating passes. Weight GB/s = weight "
             "bytes / time. The reduction is forced at every row count here; `matvec.py` rewrites by default "
             "where the last column says so. max |diff|: the largest output difference (random weights: "
             "outputs grow large).", "",
             "| dtype | input rows | library GB/s | reduction GB/s | reduction vs library | max |diff| "
             "| rewritten by default |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['rows']} | {r['library_gbps']:.1f} | {r['reduction_gbps']:.1f} | "
                     f"{r['ratio']:.2f}x | {r['max_diff']:.1e} | {'yes' if r['rewritten'] else 'no'} |")
    write_section(Path(args.doc), "\n".join(lines) + "\n", SECTION)
    print(f"written to {args.doc}")


if __name__ == "__main__":
    main()
