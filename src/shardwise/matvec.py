"""Small-batch linears in a compiled CPU decode step, computed as one fused multiply-and-sum reduction.

A decode step multiplies one row (or a few) by every weight matrix: a matrix-vector product, bound by
how fast the weights stream from memory. On a CPU, ``F.linear`` with one row goes to the BLAS library's
gemm/gemv, which streams weights at about half of what the same core reaches in a plain reduction
(measured on 2 cores, one thread per rank: MKL 13-15 GB/s, an inductor-generated reduction 20-24 GB/s,
fp32 and bf16 alike; docs/benchmarks.md). Inductor rewrites ``mm`` as multiply-and-sum only on GPUs
(with coordinate-descent tuning), so on a CPU it keeps calling the library.

This pass, handed to inductor as its ``pre_grad_custom_pass``, rewrites each linear whose input has at
most ``MAX_ROWS`` rows into ``(x.unsqueeze(-2) * w).sum(-1) (+ b)``. Inductor fuses that into one
vectorised reduction over each weight row: the product is never materialised and the weight is read
once. Products are accumulated in float32 (inductor upcasts bf16 on a CPU), in another order than the
library's, so logits can differ from the eager step in the last bits, as any compiled step's can.
Wider inputs (prefill, big batches) are matrix products the library does well, and are left alone.

No library offers this as a switch (inductor's own decomposition is gated to non-CPU devices), hence
the twenty lines here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

MAX_ROWS = 4  # rows up to which the reduction beat MKL in a float32 and bfloat16 microbenchmark (1, 2, 4)
_LINEARS = (torch._C._nn.linear, F.linear)


def _rows(node: torch.fx.Node) -> int | None:
    """Rows of a linear's input in the traced graph (every dimension but the last), if known and on a CPU."""
    value = node.args[0].meta.get("example_value") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.device.type != "cpu" or value.dim() == 0:
        return None
    return math.prod(value.shape[:-1])


class MatvecAsReduction(CustomGraphPass):
    """Rewrites CPU linears of at most ``MAX_ROWS`` input rows into a multiply-and-sum inductor fuses."""

    def __init__(self, max_rows: int = MAX_ROWS):
        self.max_rows = max_rows
        self.rewritten = 0  # linears rewritten, over every graph this pass has seen (tests read it)

    def __call__(self, graph: torch.fx.Graph) -> None:
        # Choose first, rewrite after: a rewritten node has no traced shape, and the next linear may read it.
        chosen = [node for node in graph.nodes if node.op == "call_function" and node.target in _LINEARS
                  and (rows := _rows(node)) is not None and rows <= self.max_rows]
        for node in chosen:
            x, weight = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            with graph.inserting_before(node):
                out = graph.call_function(torch.sum, (graph.call_function(
                    torch.mul, (graph.call_function(torch.unsqueeze, (x, -2)), weight)), -1))
                if bias is not None:
                    out = graph.call_function(torch.add, (out, bias))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        self.rewritten += len(chosen)

    def uuid(self) -> bytes:
        """Inductor's compile cache keys on this: a change to this file is a different pass."""
        return get_hash_for_files((__file__,)) + str(self.max_rows).encode()
