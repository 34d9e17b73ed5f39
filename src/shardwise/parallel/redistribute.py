"""Carry out a ``redistribute.Redistribution`` inside a rank: adopt the loaded pieces as parameters.

A parameter whose stored piece is its compute shard (or was read as one: ``slice``) is assigned as
is, with no copy. A ``gather`` parameter keeps only its stored piece; a ``StorageGather``
parametrization all-gathers the pieces of its group (the storage group, or every rank) each time the
weight is used and places every source element where the compute shard has it, so the parallel
layers see exactly the tensor-parallel weights. A swapped linear (``Move.layer``) computes with its
stored piece as is, or gathered over the storage group into the piece its split needs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ShardwiseError
from ..redistribute import GATHER, STORAGE_GROUP, Redistribution, storage_group
from .comm import Collectives
from .fsdp import StorageGather


def assign_redistributed(model: nn.Module, state: dict[str, torch.Tensor], red: Redistribution, rank: int,
                         world: Collectives, storage: Collectives | None) -> None:
    """Adopt this rank's loaded tensors under ``red``; ``storage`` is the rank's storage-group collectives
    (None when the mesh has no storage axis: every gather then runs over ``world``)."""
    gathered = {n for n, m in red.moves.items() if m.kind == GATHER}
    # Tied parameters share one stored piece: assigned here, not tied by the model, when either side is
    # gathered or computes with a swapped layer (the model's tie would hand one the other's gathered view).
    shared = {n for n, t in red.storage.tensors.items() if t.source != n and t.source in red.moves
              and (n in gathered or t.source in gathered or red.moves[n].layer or red.moves[t.source].layer)}
    manual = gathered | shared | {red.storage.tensors[n].source for n in shared}
    model.load_state_dict({n: v for n, v in state.items() if n not in manual}, strict=False, assign=True)
    params: dict[str, nn.Parameter] = {}
    for name in sorted(manual):
        move, t = red.moves[name], red.storage.tensors[name]
        module_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if t.source not in params:
            params[t.source] = nn.Parameter(state[t.source], requires_grad=False)
        module._parameters[attr] = params[t.source]  # tied parameters share one stored piece
        if move.kind != GATHER:
            continue
        if move.group == STORAGE_GROUP and storage is not None:
            comm, ranks = storage, storage_group(red.storage, rank)
        else:
            comm, ranks = world, tuple(range(red.storage.mesh.world_size))
        pieces = [t.shards[r] for r in ranks]
        parametrize.register_parametrization(
            module, attr, StorageGather(comm, pieces, red.target(name).shards[rank]), unsafe=True)
    tied_plain = [n for n, t in red.storage.tensors.items() if t.source != n and n not in manual]
    if tied_plain and hasattr(model, "tie_weights"):
        model.tie_weights()
    unset = [n for n, p in model.named_parameters() if p.is_meta]
    if unset:
        raise ShardwiseError(f"the checkpoint lacks {len(unset)} parameters, e.g. {unset[0]}")
