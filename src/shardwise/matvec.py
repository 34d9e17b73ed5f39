"""Small-batch linears in a compiled CPU decode step, computed as one fused multiply-and-sum reduction.

A decode step multiplies one row (or a few) by every weight matrix: a matrix-vector product, bound by how fast
the weights stream from memory. On a CPU, ``F.linear`` with one row goes to the BLAS library's gemm/gemv,
which streams weights at about half of what the same core reaches in a plain reduction (measured here, one
thread: over a decoder's weights, MKL's fp32 gemv streams 13-15 GB/s and the generated reduction 20-24 GB/s,
1.7-2.3x faster for one row; bf16 1.6-1.7x; ``bench/matvec.py`` measures both per dtype and row count,
``bench/decode.py`` the whole compiled step both ways; docs/benchmarks.md). Inductor rewrites ``mm`` as
multiply-and-sum only on GPUs (with coordinate-descent tuning), so on a CPU it keeps calling the library.

This pass, handed to inductor as its ``pre_grad_custom_pass``, rewrites each linear whose input has few rows
(``max_rows``: up to 4 in float32, 1 in half precision) into ``(x.unsqueeze(-2) * w).sum(-1) (+ b)``. Inductor
fuses that into one vectorised reduction over each weight row: the product is never materialised and the
weight is read once. Products are accumulated in float32 (inductor upcasts bf16 on a CPU), in another order
than the library's, so logits can differ from the eager step in the last bits, as any compiled step's can.
Wider inputs (prefill, big batches) are matrix products the library does well, and are left alone: the
reduction reads the weight once per row, so its lead shrinks with rows (``bench/matvec.py``, float32: 1.8x
at 1 row, 1.35x at 4, 0.9x at 8). In bf16, where oneDNN multiplies natively, it is 2.2x at 1 row, 1.5x at 2
and 0.9x at 4; an earlier hand microbenchmark (before the input was stored once) gave 0.86x at 2 rows, so
half precision stays at one row until 2 rows are measured end to end.

No library offers this as a switch (inductor's own decomposition is gated to non-CPU devices), hence the
twenty lines here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

# Input rows up to which the reduction beat the library (microbenchmark above); other dtypes: one row.
MAX_ROWS = {torch.float32: 4}
_LINEARS = (torch._C._nn.linear, F.linear)


def max_rows(dtype: torch.dtype) -> int:
    """Input rows up to which a linear in ``dtype`` is rewritten."""
    return MAX_ROWS.get(dtype, 1)


def _rewritable(node: torch.fx.Node) -> bool:
    """Whether a traced linear runs on a CPU with few enough input rows (every dimension but the last)."""
    value = node.args[0].meta.get("example_value") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.device.type != "cpu" or value.dim() == 0:
        return False
    return math.prod(value.shape[:-1]) <= max_rows(value.dtype)


def _stored(graph: torch.fx.Graph, x: torch.fx.Node) -> torch.fx.Node:
    """``x`` computed once into a buffer before the reduction reads it.

    Inductor inlines an elementwise producer (a norm, a residual add) into the reduction that consumes
    it, which recomputes it for every weight row: a linear whose input has one consumer (a fused
    gate/up projection after the MLP's norm) ran 0.7x slower in bf16. Asking for the input's own strides
    (inductor's ``force_stride_order``) makes inductor store it first; when it is stored already this
    changes nothing.
    """
    value = x.meta.get("example_value")
    if not isinstance(value, torch.Tensor):
        return x
    return graph.call_function(torch.ops.prims.inductor_force_stride_order.default, (x, list(value.stride())))


class MatvecAsReduction(CustomGraphPass):
    """Rewrites CPU linears of few input rows (``max_rows``) into a multiply-and-sum inductor fuses."""

    def __init__(self):
        self.rewritten = 0  # linears rewritten, over every graph this pass has seen (tests read it)

    def __call__(self, graph: torch.fx.Graph) -> None:
        # Choose first, rewrite after: whether a linear qualifies is read from the traced graph as it was.
        chosen = [node for node in graph.nodes if node.op == "call_function" and node.target in _LINEARS
                  and _rewritable(node)]
        for node in chosen:
            x, weight = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            with graph.inserting_before(node):
                x = _stored(graph, x)
                out = graph.call_function(torch.sum, (graph.call_function(
                    torch.mul, (graph.call_function(torch.unsqueeze, (x, -2)), weight)), -1))
                if bias is not None:
                    out = graph.call_function(torch.add, (out, bias))
            out.meta["example_value"] = node.meta.get("example_value")  # a linear reading this one stores it too
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        self.rewritten += len(chosen)

    def uuid(self) -> bytes:
        """Inductor's compile cache keys on this: a change to this file is a different pass."""
        return get_hash_for_files((__file__,))
