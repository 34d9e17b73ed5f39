"""Sequence parallelism (NxD's ``--sequence-parallel-enabled``) applied from the layout, with hooks.

When the plan splits the residual stream by sequence over ``tensor`` (see ``SequenceParallel`` in
``plan.py``), each tensor-parallel rank keeps tokens ``[r*c, (r+1)*c)`` of the residual stream, with
``c = ceil(seq / N)`` (the last ranks may hold fewer, or none, e.g. in a one-token decode step):

* the residual modules (embedding, row-parallel o_proj and down_proj) reduce-scatter their partial
  sums by sequence (Partial -> Shard): each rank sums only its own tokens, in the same order as the
  all-reduce would, so the rows are bit-identical (shared memory and NCCL; over gloo, which has no
  reduce-scatter, an all-reduce and a slice);
* norms work on their tokens; a norm whose output the plan keeps whole gathers it;
* a projection whose input module's output is split gathers its input first (Shard -> Replicate); when
  rank 0 holds every token (a one-token decode step) that gather is a broadcast.

A reduce-scatter and an all-gather together move the bytes of one all-reduce, so sequence parallelism
no longer adds traffic per generated token. The model code is untouched: the layers reduce-scatter
instead of all-reducing, and hooks reshape activations at module boundaries only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layout import Layout
from .comm import Collectives
from .layers import ParallelEmbedding, RowParallelLinear


class SequenceSplit:
    """Shared by the hooks of one model: the full sequence length of the current forward pass."""

    def __init__(self, comm: Collectives, dim: int):
        self.comm, self.dim, self.length = comm, dim, 0

    def bounds(self) -> tuple[int, int]:
        chunk = -(-self.length // self.comm.world_size)
        start = min(self.comm.rank * chunk, self.length)
        return start, min(start + chunk, self.length)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        start, end = self.bounds()
        return x.narrow(self.dim, start, end - start).contiguous()

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of the sum over ranks of ``x`` (partial sums of a row-parallel layer)."""
        start, end = self.bounds()
        return self.comm.reduce_scatter(x, self.dim, start, end)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        chunk = -(-self.length // self.comm.world_size)
        if self.length <= chunk:  # rank 0 holds every token (one-token decode): a broadcast
            shape = list(x.shape)
            shape[self.dim] = self.length
            whole = x if self.comm.rank == 0 else x.new_empty(shape)
            return self.comm.broadcast(whole.contiguous(), 0)
        missing = chunk - x.shape[self.dim]
        if missing:
            pad = list(x.shape)
            pad[self.dim] = missing
            x = torch.cat([x, x.new_zeros(pad)], dim=self.dim)
        return self.comm.all_gather(x, dim=self.dim).narrow(self.dim, 0, self.length)


def apply_sequence_parallel(model: nn.Module, layout: Layout, comm: Collectives) -> None:
    """Register the hooks on ``model`` (already parallelized) if the layout turns sequence parallelism on."""
    if layout.sequence is None:
        return
    split = SequenceSplit(comm, layout.sequence.dim)

    def remember_length(_module, args):
        split.length = args[0].shape[split.dim]

    model.register_forward_pre_hook(remember_length)  # the model's first input is [batch, seq] token ids
    scatter, gather_out, gather_in = layout.sequence_boundaries()
    for name in scatter:
        module = model.get_submodule(name)
        if isinstance(module, RowParallelLinear) or (isinstance(module, ParallelEmbedding) and module.shard_dim == 0):
            module.sequence = split  # its sum becomes a reduce-scatter
        else:  # computed whole on every rank (replicated, or gathered): keep this rank's tokens
            module.register_forward_hook(lambda _m, _a, out: split.scatter(out))
    for name in gather_out:
        model.get_submodule(name).register_forward_hook(lambda _m, _a, out: split.gather(out))
    for name in gather_in:
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args: (split.gather(args[0]), *args[1:]))
