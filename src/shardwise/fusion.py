"""Fused projections (NxD's --fused-qkv and --mlp-kernel-enabled): several column-parallel linears that
read the same input become one weight, one matmul, split after.

Each rank concatenates its own local slices (q, k, v; or gate, up) at load, so the fused weight is exactly
this rank's rows of each projection one after another: nothing about the layout changes, and the split
output is the same values the separate matmuls give (each output element is the same dot product).
Decode is memory-bound: one larger matmul reads the input once and issues one kernel instead of three.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("shardwise")

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


class FusedLinear(nn.Module):
    """``y = x W^T + b`` for row-stacked weights, returned split back into the parts' output sizes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, splits: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.splits = splits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Contiguous parts: elementwise kernels (silu) take a different vector/scalar split on strided
        # views, which changes the last bit; the copy is of activations only (a few KB a decode step).
        return tuple(p.contiguous() for p in F.linear(x, self.weight, self.bias).split(self.splits, dim=-1))


def _fusable(module: nn.Module) -> bool:
    """A plain linear, or a column-parallel one that keeps its output split (F.linear on local rows)."""
    if type(module) is nn.Linear:
        return True
    from .parallel.layers import ColumnParallelLinear

    # Exactly that class: a subclass may compute otherwise (parallel/swapped.py's InputSplitLinear slices its input).
    return type(module) is ColumnParallelLinear and not module.gather_output


def fuse(parent: nn.Module, names: tuple[str, ...], fused_name: str) -> bool:
    """Replace ``parent``'s linears ``names`` by one ``FusedLinear`` ``fused_name``; False if they cannot be."""
    parts = [getattr(parent, n, None) for n in names]
    if not all(p is not None and _fusable(p) for p in parts):
        return False
    biases = [p.bias for p in parts]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return False
    with torch.no_grad():
        weight = torch.cat([p.weight for p in parts])
        bias = torch.cat(biases) if biases[0] is not None else None
    setattr(parent, fused_name, FusedLinear(weight, bias, tuple(p.weight.shape[0] for p in parts)))
    for n in names:
        delattr(parent, n)
    return True


def fused_state(state: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """``state`` (a rank's slices, in the checkpoint's names) in the names of a model whose projections
    ``fuse_projections`` fused (``names``: its state-dict names): each group's parts concatenated in the
    order ``fuse`` used, so new weights (the engine's swap) load into the fused parameters."""
    out = dict(state)
    for name in names:
        for fused_name, parts in (("qkv_proj", QKV), ("gate_up_proj", GATE_UP)):
            for kind in ("weight", "bias"):
                if name.endswith(f".{fused_name}.{kind}"):
                    prefix = name[: -len(f"{fused_name}.{kind}")]
                    keys = [f"{prefix}{p}.{kind}" for p in parts]
                    if all(k in out for k in keys):
                        out[name] = torch.cat([out.pop(k) for k in keys])
    return out


def fuse_projections(model: nn.Module, qkv: bool = False, gate_up: bool = False) -> int:
    """Fuse every module's q/k/v (into ``qkv_proj``) and gate/up (into ``gate_up_proj``) projections, as
    asked; returns how many groups were fused. Model code calls ``qkv_proj`` when it exists."""
    count = 0
    for module in list(model.modules()):
        if qkv and all(hasattr(module, n) for n in QKV):
            count += fuse(module, QKV, "qkv_proj")
        if gate_up and all(hasattr(module, n) for n in GATE_UP):
            count += fuse(module, GATE_UP, "gate_up_proj")
    return count
