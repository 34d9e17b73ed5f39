"""One-query attention in a compiled CPU decode step, computed as reductions inductor fuses.

A decode step attends one query per row over the KV cache: for SmolLM2 at TP 2 that is 5 query heads over
2 KV heads of 64 dimensions and 128 slots, a few kilobytes of work. On a CPU, ``scaled_dot_product_attention``
goes to the library's flash-attention kernel, built for blocks of queries: for one query it spends about
100 us per layer on setup (buffers, scheduling), 3 ms of a 45 ms SmolLM2 step (torch profiler with
inductor's kernel profiling, measured here). It is also a call inductor cannot fuse, so the normed, rotated
query and the attention output each make a round trip through memory between generated kernels.

This pass, a ``pre_grad_custom_pass`` like ``matvec.py``'s, rewrites each ``scaled_dot_product_attention``
whose query has one position into the arithmetic it stands for: scores as a multiply-and-sum over the head
dimension, the mask, a softmax, and the weighted sum of values as another multiply-and-sum. Inductor fuses
all of it, with the q/k/v projection before and the output projection after, into one kernel per layer. The
arithmetic is done in float32 whatever the model's dtype, as the library's CPU kernel accumulates; the sums
run in another order, so logits can differ from the eager step's in the last bits, as any compiled step's can
(``tests/test_decode_attention.py`` compares both, ``tests/test_compiled_decode.py`` the tokens).

Only one query position is rewritten: that is the shape compiled decode runs, and the one measured. Prefill
and speculative verification (many queries) keep the library's kernel, which is what it is built for. No
library offers this rewrite for a CPU (inductor's attention pattern matchers go the other way, towards the
fused kernel), hence the code here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

_SDPA = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
# scaled_dot_product_attention's parameters in order, to read a call whichever way its arguments were passed.
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def attention_by_reduction(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention(query, key, value, attn_mask, scale=scale, enable_gqa=True)`` as plain
    arithmetic, for ``query`` of ``[batch, heads, queries, head_dim]`` and key/value of ``[batch, kv_heads,
    slots, head_dim]`` (query head ``i`` reads KV head ``i // (heads // kv_heads)``). A boolean mask marks
    the slots a query may see; any other mask is added to the scores."""
    b, h, n, d = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    groups = h // kv_heads
    scale = d ** -0.5 if scale is None else scale
    q = query.float().reshape(b, kv_heads, groups, n, 1, d) * scale
    k = key.float().reshape(b, kv_heads, 1, 1, slots, d)
    scores = (q * k).sum(-1)  # [b, kv_heads, groups, n, slots]
    if attn_mask is not None:
        mask = attn_mask.expand(b, h, n, slots).reshape(b, kv_heads, groups, n, slots)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    weights = scores.softmax(-1).unsqueeze(-1)  # [b, kv_heads, groups, n, slots, 1]
    out = (weights * value.float().reshape(b, kv_heads, 1, 1, slots, d)).sum(-2)
    return out.reshape(b, h, n, d).to(query.dtype)


def _call_args(node: torch.fx.Node) -> dict:
    """The arguments of a traced ``scaled_dot_product_attention`` call, by name, defaults filled in."""
    bound = dict(_DEFAULTS)
    bound.update(zip(_PARAMS, node.args))
    bound.update(node.kwargs)
    return bound


def _rewritable(args: dict) -> bool:
    """A CPU attention of one query position, without dropout or a causal flag, whose heads pair up."""
    q, k = (a.meta.get("example_value") if isinstance(a, torch.fx.Node) else None
            for a in (args["query"], args["key"]))
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
        return False
    if q.device.type != "cpu" or q.shape[2] != 1 or args["dropout_p"] != 0.0 or args["is_causal"]:
        return False
    if isinstance(args["scale"], torch.fx.Node) or set(args) - set(_PARAMS):
        return False
    heads, kv_heads = q.shape[1], k.shape[1]
    return heads == kv_heads or (bool(args["enable_gqa"]) and kv_heads > 0 and heads % kv_heads == 0)


class AttentionAsReduction(CustomGraphPass):
    """Rewrites CPU ``scaled_dot_product_attention`` calls of one query into arithmetic inductor fuses."""

    def __init__(self):
        self.rewritten = 0  # calls rewritten, over every graph this pass has seen (tests read it)

    def __call__(self, graph: torch.fx.Graph) -> None:
        chosen = [(node, args) for node in graph.nodes if node.op == "call_function" and node.target in _SDPA
                  for args in (_call_args(node),) if _rewritable(args)]
        for node, args in chosen:
            with graph.inserting_before(node):
                out = graph.call_function(attention_by_reduction, (args["query"], args["key"], args["value"]),
                                          {"attn_mask": args["attn_mask"], "scale": args["scale"]})
            out.meta["example_value"] = node.meta.get("example_value")  # matvec.py reads the shapes it feeds
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        self.rewritten += len(chosen)

    def uuid(self) -> bytes:
        """Inductor's compile cache keys on this: a change to this file is a different pass."""
        return get_hash_for_files((__file__,))
