"""Context parallelism: a prompt the plan splits by sequence over ``context`` is prefilled in chunks.

A plan whose activation rules split the sequence dimension of module outputs over non-tensor axes
(``model.layers.*: [null, context, null]``) says each context rank holds a chunk of the tokens. In a
prefill (a forward of several new tokens that keeps only the last position's logits) each context rank
runs the model on its own contiguous chunk: queries, MLP and the tensor-parallel sums cover its tokens
only, and each layer all-gathers the chunks' keys and values over the context group, so the KV cache
ends whole on every context rank and the chunk attends over every earlier key under its rows of the
causal mask. The last chunk holds the last position: its logits are broadcast over the group. Decode
steps (one token) and forwards that keep every position run whole on every rank, as before.

Chunks are equal (``ceil(n / ranks)`` tokens): the first chunk is padded at the front with copies of
the first token, whose keys and values are dropped after the gather, so the last position is always
the last chunk's last. The trigger (``sequence_axes``) mirrors the batch's (``data.batch_axes``): every
rule splitting the sequence over axes of size > 1 names the same axes, none of them ``tensor``
(sequence parallelism's), and no rule splits another dimension over them. Model code is untouched:
hooks on the model swap in the chunk's inputs and a cache whose ``attend`` gathers first.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kv_cache import KVCache
from ..layout import Layout, _group_index
from ..plan import TENSOR_AXIS, spec_axes
from .comm import Collectives

SEQUENCE_DIM = 1  # module outputs are [batch, sequence, features]


def sequence_axes(layout: Layout) -> tuple[str, ...]:
    """The axes the plan splits the prompt's sequence over (outer first), or ``()``. Pure."""
    mesh = layout.mesh
    specs = [spec for spec in layout.activations.values() if len(spec) > SEQUENCE_DIM]
    splits = {tuple(a for a in spec_axes(spec[SEQUENCE_DIM]) if mesh.size(a) > 1) for spec in specs} - {()}
    if len(splits) != 1:
        return ()
    axes = next(iter(splits))
    if TENSOR_AXIS in axes:
        return ()
    others = [e for spec in layout.activations.values() for d, e in enumerate(spec) if d != SEQUENCE_DIM]
    if any(a in axes for e in others for a in spec_axes(e)):
        return ()
    return axes


def chunk_of(n: int, parts: int) -> tuple[int, int]:
    """(tokens per chunk, front padding) of a prefill of ``n`` tokens over ``parts`` context ranks."""
    chunk = -(-n // parts)
    return chunk, chunk * parts - n


class ContextParallel:
    """The hooks of one model: chunked prefill over ``comm`` (this rank's context group)."""

    def __init__(self, comm: Collectives, parts: int, index: int, order: list[int]):
        self.comm, self.parts, self.index = comm, parts, index
        self.order = order  # the chunk each group member holds, in group rank order
        self.last = order.index(parts - 1)  # the group rank holding the last position
        self.active = False
        self.prefills = 0  # chunked forwards run (a test's evidence)

    def pre(self, _module, args, kwargs):
        self.active = False
        if len(args) < 5:
            return None
        ids, positions, mask, cache, start = args[:5]
        last_only = args[5] if len(args) > 5 else kwargs.get("last_only", True)
        n = ids.shape[1]
        if n < 2 or not last_only or type(cache) is not KVCache or not isinstance(mask, torch.Tensor) \
                or mask.shape[2] != n:
            return None
        chunk, pad = chunk_of(n, self.parts)
        first = self.index * chunk
        rows = (torch.arange(first, first + chunk) - pad).clamp(min=0).to(ids.device)
        self.active, self.n, self.chunk, self.pad = True, n, chunk, pad
        self.prefills += 1
        return (ids[:, rows], positions[:, rows], mask[:, :, rows], _ChunkCache(cache, self), start, *args[5:]), kwargs

    def post(self, _module, _args, out):
        if not self.active:
            return out
        self.active = False
        return self.comm.broadcast(out.contiguous(), self.last)

    def gather(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every chunk's keys and values (``[batch, heads, chunk, head_dim]`` each), whole and in order."""
        both = self.comm.all_gather(torch.stack([k, v]).contiguous(), dim=3).split(self.chunk, dim=3)
        by_part = [None] * self.parts
        for member, part in zip(self.order, both):
            by_part[member] = part
        whole = torch.cat(by_part, dim=3).narrow(3, self.pad, self.n)
        return whole[0], whole[1]


class _ChunkCache:
    """The generation's cache, as one prefill chunk sees it: keys and values gathered, then written whole."""

    def __init__(self, cache: KVCache, cp: ContextParallel):
        self._cache, self._cp = cache, cp

    def attend(self, layer, q, k, v, mask, start):
        k, v = self._cp.gather(k, v)
        return self._cache.attend(layer, q, k, v, mask, start)

    def __getattr__(self, name):
        return getattr(self._cache, name)


def apply_context_parallel(model: nn.Module, layout: Layout, rank: int, comm: Collectives) -> ContextParallel | None:
    """Hook chunked prefill onto ``model`` when the plan splits the sequence over non-tensor axes.

    Collective: every rank calls it alike (the context groups are created here).
    """
    from .activations import axis_group_partition

    axes = sequence_axes(layout)
    if not axes:
        return None
    mesh = layout.mesh
    partition = axis_group_partition(mesh, axes)
    members = next(p for p in partition if rank in p)
    group = comm if len(partition) == 1 else comm.subgroup(partition)
    parts, index = _group_index(mesh, rank, axes)
    cp = ContextParallel(group, parts, index, [_group_index(mesh, m, axes)[1] for m in members])
    model.register_forward_pre_hook(cp.pre, with_kwargs=True)
    model.register_forward_hook(cp.post)
    return cp
