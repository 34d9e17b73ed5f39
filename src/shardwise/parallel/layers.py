"""Tensor-parallel layers, in the vocabulary of Megatron/NxD.

Each holds only its rank's piece of the weight. Built from global sizes they split evenly (padding
the last rank when the size does not divide); the module swap passes the exact local sizes the
layout computed (e.g. whole attention heads, with padding heads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comm import Collectives, default_collectives


def _even_local(size: int, world: int) -> int:
    return -(-size // world)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split by output rows: each rank computes its slice of ``y``.

    ``gather_output=True`` concatenates the slices so every rank gets the full ``y`` (padding rows
    removed); otherwise the output stays split, ready for a ``RowParallelLinear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        gather_output: bool = False,
        comm: Collectives | None = None,
        local_out_features: int | None = None,
        gather_index: list[int] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        local_index: list[int] | None = None,
    ):
        super().__init__()
        self.comm = comm or default_collectives()
        self.in_features, self.out_features = in_features, out_features
        local = local_out_features or _even_local(out_features, self.comm.world_size)
        if local_index is None:  # even split, padding at the end
            start = self.comm.rank * local
            local_index = [i if i < out_features else -1 for i in range(start, start + local)]
        # The source row (output feature) of each local row, -1 for padding: what on-device sampling
        # needs to name the tokens of this rank's vocabulary shard.
        self.local_index = torch.tensor(local_index, dtype=torch.long)
        self.weight = nn.Parameter(torch.empty(local, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(local, dtype=dtype, device=device)) if bias else None
        self.gather_output = gather_output
        # A plain attribute, not a buffer: the module is often built on the meta device.
        self.gather_index = torch.tensor(gather_index) if gather_index is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.gather_output:
            return y
        y = self.comm.all_gather(y, dim=-1)
        if self.gather_index is not None:
            return y.index_select(-1, self.gather_index.to(y.device))
        return y[..., : self.out_features]


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split by input columns: partial products are summed across ranks.

    With ``input_is_parallel=True`` (the usual case, after a ``ColumnParallelLinear``) ``x`` is
    already this rank's slice; otherwise the full ``x`` is split here. The bias is added once, after
    the sum.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        comm: Collectives | None = None,
        local_in_features: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.comm = comm or default_collectives()
        self.in_features, self.out_features = in_features, out_features
        self.local_in = local_in_features or _even_local(in_features, self.comm.world_size)
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.input_is_parallel = input_is_parallel
        self.sequence = None  # sequence parallelism: a SequenceSplit that reduce-scatters the sum by sequence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            start = self.comm.rank * self.local_in
            x = F.pad(x[..., start : start + self.local_in], (0, max(0, start + self.local_in - x.shape[-1])))
        y = F.linear(x, self.weight)
        y = self.sequence.reduce_scatter(y) if self.sequence is not None else self.comm.all_reduce(y)
        return y + self.bias if self.bias is not None else y


class ParallelEmbedding(nn.Module):
    """Embedding table split over ranks, by vocabulary rows (``shard_dim=0``) or by hidden size (1).

    Vocabulary split: each rank looks up the ids in its row range, zeros the rest, and the sum over
    ranks is the full embedding. Hidden split: each rank looks up its columns and they are gathered.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        comm: Collectives | None = None,
        shard_dim: int = 0,
        local_rows: tuple[int, int] | None = None,
        local_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.comm = comm or default_collectives()
        self.num_embeddings, self.embedding_dim, self.shard_dim = num_embeddings, embedding_dim, shard_dim
        world = self.comm.world_size
        if shard_dim == 0:
            local = local_size or _even_local(num_embeddings, world)
            start = self.comm.rank * local
            default_rows = (min(start, num_embeddings), min(start + local, num_embeddings))
            self.row_start, self.row_end = local_rows or default_rows
            shape = (local, embedding_dim)
        else:
            local = local_size or _even_local(embedding_dim, world)
            shape = (num_embeddings, local)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        self.sequence = None  # sequence parallelism (vocabulary split): reduce-scatter the sum by sequence

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shard_dim == 1:
            return self.comm.all_gather(F.embedding(ids, self.weight), dim=-1)[..., : self.embedding_dim]
        outside = (ids < self.row_start) | (ids >= self.row_end)
        local_ids = (ids - self.row_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.sequence.reduce_scatter(out) if self.sequence is not None else self.comm.all_reduce(out)
