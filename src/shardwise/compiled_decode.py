"""The decode step of a decoder, compiled once per token-generation bucket (``--compile-decode``).

A decode step is one token per row through every layer: a few hundred small kernels, each cheap, so
on a CPU the Python and dispatcher cost between them is a large part of the step, and on a GPU the
launches are. ``torch.compile`` turns the step into one graph per shape: on a CPU, inductor fuses the
elementwise work between the matmuls (norms, rotary embedding, SiLU, residuals) into a few generated
kernels, linears of a row or a few become fused reductions that stream the weights faster than the
BLAS library's matrix-vector product (``matvec.py``), and one-query attention becomes arithmetic fused
with the projections around it (``decode_attention.py``); on CUDA, ``mode="reduce-overhead"`` also
captures the graph in a CUDA graph and replays it.

Compiled code needs static shapes, so this runs on top of bucketing (``decode_buckets.py``): within a
token-generation bucket every step has the same shapes, and the slot being written is a tensor
(``KVCache.update`` writes with ``index_copy_``), so one compilation serves the whole bucket. The
collectives inside are opaque custom ops (``parallel/comm.py``), so the graph does not break at
them. The steps compute what eager steps compute; generated kernels may sum in another order, so
logits can differ in the last bits (tokens are checked against the eager run in
``tests/test_compiled_decode.py``).
"""

from __future__ import annotations

import logging
import time

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from .decode_attention import AttentionAsReduction
from .kv_cache import KVCache
from .matvec import MatvecAsReduction
from .parallel import devices
from .parallel.devices import torch_device
from .protocol import Model
from .settings import attention_reduction, matvec_reduction

log = logging.getLogger("shardwise")


# Guard kinds that compare a module attribute's value (a flag such as lm_head.gather_output, a head count):
# these stay, so a graph is never replayed for a model in another state.
_VALUE_GUARDS = frozenset({"CONSTANT_MATCH", "EQUALS_MATCH", "ID_MATCH"})


def _keep_guard(entries) -> list[bool]:
    """Which of dynamo's guards a compiled decode step checks before each call.

    By default dynamo re-checks, on every step, the model's structure: each module's type, that no hooks
    were added, each parameter's dtype, shape and strides, and that absent biases are still absent; for
    SmolLM2 that is about 4,000 checks and 1 ms of a 15 ms step. A loaded model's structure is fixed (the
    parameters are read anew at every call; their shapes never change), so those guards are dropped. Kept:
    every guard on the step's inputs (tokens, positions, mask, the KV cache and its bucket) and every
    guard on a module attribute's value, so a changed flag still compiles a new graph.
    """
    return [not entry.orig_guard.source.is_unspecialized_nn_module()
            or (entry.guard_type in _VALUE_GUARDS and entry.has_value and entry.value is not None)
            for entry in entries]


class CompiledDecode:
    """Calls ``model``'s forward for decode steps through ``torch.compile``; counts what it compiled."""

    def __init__(self, model: Model, device: torch.device | str = "cpu"):
        self.device = torch_device(device)  # a simulated GPU's is the CPU
        # Under SHARDWISE_CHECK_DEVICES=1 without a GPU, "cuda" ranks are simulated by a CPU tensor subclass
        # (parallel/devices.py) that torch.compile cannot trace: those steps run eagerly, and say so.
        self.simulated = devices.simulating(str(device))
        # CUDA graphs need fixed addresses: the KV cache is marked static (see _mark_static) and every other
        # input is copied into the graph's own buffers on replay, which reduce-overhead does.
        # On a CPU, few-row linears become fused reductions (matvec.py): the library's gemv streams the
        # weights at about half the speed.
        cpu = self.device.type == "cpu"
        self.matvec = MatvecAsReduction() if cpu and matvec_reduction() else None
        # One-query attention as arithmetic inductor fuses (decode_attention.py): the library's CPU kernel
        # spends about 100 us a layer on setup for a few kilobytes of work.
        self.attention = AttentionAsReduction() if cpu and attention_reduction() else None
        passes = [p for p in (self.attention, self.matvec) if p is not None]
        if self.simulated:
            self._compiled = model
        elif self.device.type == "cuda":
            self._compiled = torch.compile(model, dynamic=False, mode="reduce-overhead")
        else:
            options = {"guard_filter_fn": _keep_guard}
            if passes:
                options["pre_grad_custom_pass"] = passes[0] if len(passes) == 1 else PassChain(passes)
            self._compiled = torch.compile(model, dynamic=False, options=options)
        self.shapes: set[tuple[int, ...]] = set()  # (batch, KV slots): one compilation each
        self.cached = 0  # of those, how many inductor found in its on-disk cache (dynamo still traces them)
        self.compile_seconds = 0.0
        self._marked: set[int] = set()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: KVCache,
                 slot: int) -> torch.Tensor:
        """Logits of one decode step writing KV slot ``slot``; ``cache.attend_to`` must be the step's bucket."""
        if cache.attend_to is None or slot >= cache.attend_to or slot > cache.length:
            raise ValueError("a compiled decode step needs a bucket (attend_to) holding the slot it writes")
        if self.simulated:  # the eager step, as bucketed decoding runs it
            return self._compiled(tokens, positions, mask, cache, slot)
        if self.device.type == "cuda":
            self._mark_static(cache)
        shape = (tokens.shape[0], cache.attend_to)
        first = shape not in self.shapes
        t0 = time.perf_counter()
        hits = _cache_hits() if first else 0
        logits = self._compiled(tokens, positions, mask, cache, torch.tensor([slot], device=tokens.device))
        if first:
            self.shapes.add(shape)
            self.compile_seconds += time.perf_counter() - t0
            self.cached += _cache_hits() > hits
            log.debug("Compiled the decode step for batch %d, %d KV slots", *shape)
        cache.length = slot + 1
        return logits

    def _mark_static(self, cache: KVCache) -> None:
        """Tell CUDA graphs the cache tensors keep their addresses (they are written in place every step)."""
        for t in cache.k + cache.v:
            if t is not None and id(t) not in self._marked:
                torch._dynamo.mark_static_address(t)
                self._marked.add(id(t))


class PassChain(CustomGraphPass):
    """Several graph passes where inductor takes one (``pre_grad_custom_pass``), run in order."""

    def __init__(self, passes: list[CustomGraphPass]):
        self.passes = passes

    def __call__(self, graph: torch.fx.Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> bytes:
        """Inductor's compile cache key: the passes' own, in order."""
        return b"".join(graph_pass.uuid() for graph_pass in self.passes)


def _cache_hits() -> int:
    """Graphs inductor has loaded from its on-disk cache in this process so far."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"]
