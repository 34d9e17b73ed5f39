"""Weights stored split over storage axes (fsdp), all-gathered along the fsdp group when used.

On a mesh such as ``fsdp x tensor`` the model is built and parallelized from the *tensor-parallel
layout* — the plan with its storage axes removed — so every module has exactly the shapes it has under
tensor parallelism alone. A weight the full layout also splits over a storage axis keeps only this
rank's piece; a parametrization all-gathers the pieces of the rank's storage group (the ranks sharing
its ``tensor`` coordinate) each time the weight is used and puts every source row where the
tensor-parallel shard has it. Forward passes therefore compute with the same weights, in the same
order, as tensor parallelism alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..layout import Layout, ShardSlice, TensorLayout
from ..mesh import Mesh
from ..plan import TENSOR_AXIS, spec_axes
from .comm import Collectives


def storage_axes(mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes other than ``tensor`` that have more than one rank."""
    return tuple(a for a, n in zip(mesh.axis_names, mesh.axis_sizes) if a != TENSOR_AXIS and n > 1)


def stored_split(t: TensorLayout) -> bool:
    return any(a != TENSOR_AXIS for e in t.spec for a in spec_axes(e))


@dataclass
class AxisGroups:
    tensor: Collectives  # ranks sharing every coordinate but `tensor`: the parallel layers' group
    storage: Collectives  # ranks sharing the `tensor` coordinate: where stored pieces are gathered
    storage_ranks: tuple[int, ...]


def axis_groups(mesh: Mesh, rank: int, comm: Collectives) -> AxisGroups:
    """Create the tensor and storage groups (every rank must call this, in the same order)."""
    others = [a for a in mesh.axis_names if a != TENSOR_AXIS]

    def partition(key) -> list[list[int]]:
        groups: dict[tuple, list[int]] = {}
        for r in range(mesh.world_size):
            groups.setdefault(key(r), []).append(r)
        return [groups[k] for k in sorted(groups)]

    tensor_key = lambda r: tuple(mesh.coordinate(r, a) for a in others)  # noqa: E731
    storage_key = (lambda r: (mesh.coordinate(r, TENSOR_AXIS),)) if TENSOR_AXIS in mesh.axis_names else (lambda r: ())
    storage = partition(storage_key)
    return AxisGroups(comm.subgroup(partition(tensor_key)), comm.subgroup(storage),
                      tuple(next(ranks for ranks in storage if rank in ranks)))


def _placement(piece: ShardSlice, target: ShardSlice) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per dimension, the positions in ``piece`` whose source rows ``target`` holds, and where it holds them."""
    local_idx, target_idx = [], []
    for p_segs, t_segs in zip(piece.dims, target.dims):
        where: dict[int, int] = {}
        pos = 0
        for seg in t_segs:
            if seg.start is not None:
                where.update({seg.start + i: pos + i for i in range(seg.length)})
            pos += seg.length
        li, ti, pos = [], [], 0
        for seg in p_segs:
            if seg.start is not None:
                for i in range(seg.length):
                    if seg.start + i in where:
                        li.append(pos + i)
                        ti.append(where[seg.start + i])
            pos += seg.length
        local_idx.append(torch.tensor(li, dtype=torch.long))
        target_idx.append(torch.tensor(ti, dtype=torch.long))
    return local_idx, target_idx


class StorageGather(nn.Module):
    """Parametrization: this rank's stored piece -> its tensor-parallel shard, by an all-gather."""

    def __init__(self, comm: Collectives, pieces: list[ShardSlice], target: ShardSlice):
        super().__init__()
        self.comm = comm
        self.target_shape = target.local_shape
        self.maps = [_placement(p, target) for p in pieces]

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # the collectives reuse buffers made in inference mode (generation)
            parts = self.comm.all_gather(local[None], dim=0).unbind(0)
        out = local.new_zeros(self.target_shape)
        for piece, (li, ti) in zip(parts, self.maps):
            if any(len(i) == 0 for i in li):
                continue
            sel = piece
            for d, idx in enumerate(li):
                sel = sel.index_select(d, idx.to(local.device))
            out[torch.meshgrid(*[i.to(local.device) for i in ti], indexing="ij")] = sel
        return out


def assign_stored(model: nn.Module, state: dict[str, torch.Tensor], layout: Layout, tp_layout: Layout, rank: int,
                  groups: AxisGroups) -> None:
    """Adopt loaded tensors: plain ones as parameters, stored-split ones behind a StorageGather."""
    stored = {n for n, t in layout.tensors.items() if stored_split(t)}
    model.load_state_dict({n: v for n, v in state.items() if n not in stored}, strict=False, assign=True)
    params: dict[str, nn.Parameter] = {}
    for name, t in layout.tensors.items():
        if name not in stored:
            continue
        module_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if t.source not in params:
            params[t.source] = nn.Parameter(state[t.source], requires_grad=False)
        module._parameters[attr] = params[t.source]  # tied parameters share one stored piece
        pieces = [t.shards[r] for r in groups.storage_ranks]
        parametrize.register_parametrization(
            module, attr, StorageGather(groups.storage, pieces, tp_layout.tensors[name].shards[rank]), unsafe=True)
    tied_plain = [n for n, t in layout.tensors.items() if t.source != n and n not in stored]
    if tied_plain and hasattr(model, "tie_weights"):
        model.tie_weights()
    unset = [n for n, p in model.named_parameters() if p.is_meta]
    if unset:
        from ..errors import ShardwiseError

        raise ShardwiseError(f"the checkpoint lacks {len(unset)} parameters, e.g. {unset[0]}")
