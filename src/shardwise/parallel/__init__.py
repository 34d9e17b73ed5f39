"""Ranks, process groups, collectives and the tensor-parallel layers."""

from .comm import Collectives
from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

__all__ = ["Collectives", "ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding"]
