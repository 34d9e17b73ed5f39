"""Data parallelism: a batch the plan splits over non-tensor axes is divided among the replicas.

A plan whose activation rules split the batch dimension of module outputs (``model.layers.*: [fsdp,
null, null]``, ``[[data], null, tensor]``, torchprime's ``lm_head: [fsdp, null, null]``) says, in
GSPMD terms, that each group of ranks along those axes holds only its rows. Rather than slicing every
output and gathering it back (what ``parallel/activations.py`` does for other placements), each
*replica* (the ranks sharing a coordinate on those axes: a tensor-parallel group, or several fsdp
partners) generates its own contiguous share of the rows, and the rows come back together, in the
original order, when generation ends. Weights are batch-independent, so nothing else changes.

The trigger (``batch_axes``) is a consistent batch split: every activation rule that splits the batch
over a mesh axis of size > 1 splits it over the same axes, none of them ``tensor`` (whose ranks compute
one forward together), and no rule splits another dimension over them. Anything else keeps the
boundary placement (results are unchanged either way).

Replicas must step together: weights stored split over fsdp are all-gathered on every forward, a
collective all ranks join. So every replica gets the same number of rows (``ceil(batch / replicas)``,
short shares filled with placeholder rows that are finished from the start), pads its prompts to the
whole batch's longest (the shapes one process would use), and stops only when every replica is done
(one host all-gather of a flag per step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..layout import Layout, _group_index
from ..mesh import Mesh
from ..plan import TENSOR_AXIS, spec_axes
from .comm import Collectives

if TYPE_CHECKING:
    from ..compiled_decode import CompiledDecode
    from ..decode_buckets import DecodeBuckets
    from ..generation import Generated, Sampling
    from ..protocol import Model


def batch_axes(layout: Layout) -> tuple[str, ...]:
    """The axes the plan divides the batch over (outer first), or ``()`` when it does not.

    Pure (the planner and the ranks decide alike): see the module docstring for the rule.
    """
    mesh = layout.mesh
    specs = [spec for spec in layout.activations.values() if spec]
    splits = {tuple(a for a in spec_axes(spec[0]) if mesh.size(a) > 1) for spec in specs} - {()}
    if len(splits) != 1:
        return ()
    axes = next(iter(splits))
    if TENSOR_AXIS in axes:
        return ()
    if any(a in axes for spec in specs for e in spec[1:] for a in spec_axes(e)):
        return ()
    return axes


def replicas(mesh: Mesh, axes: tuple[str, ...]) -> int:
    """How many replicas divide the batch."""
    return _group_index(mesh, 0, axes)[0] if axes else 1


def local_batch(batch: int, parts: int) -> int:
    """Rows each replica's forwards carry (placeholders included): the per-rank batch."""
    return -(-batch // max(1, parts))


def share(batch: int, parts: int, index: int) -> range:
    """The contiguous rows of a batch replica ``index`` of ``parts`` generates (possibly none)."""
    chunk = local_batch(batch, parts)
    start = min(index * chunk, batch)
    return range(start, min(start + chunk, batch))


@dataclass(frozen=True)
class BatchSplit:
    """This rank's place in the data-parallel division of a batch."""

    axes: tuple[str, ...]
    parts: int  # replicas
    index: int  # this rank's replica
    leader: bool  # the replica's first rank: the one whose results are assembled
    compute: Collectives  # the ranks computing one forward together (the tensor group): sampling's group
    world: Collectives  # every rank: stepping together, assembling the rows

    @classmethod
    def of(cls, layout: Layout, rank: int, world: Collectives, compute: Collectives) -> BatchSplit | None:
        axes = batch_axes(layout)
        if not axes:
            return None
        mesh = layout.mesh
        parts, index = _group_index(mesh, rank, axes)
        leader = all(mesh.coordinate(rank, a) == 0 for a in mesh.axis_names if a not in axes)
        return cls(axes, parts, index, leader, compute, world)


def generate_split(split: BatchSplit, model: Model, prompts: list[list[int]], max_new_tokens: int,
                   pad_token_id: int, eos_token_ids: tuple[int, ...], sampling: Sampling | None = None,
                   keep_logits: bool = False, device: torch.device | str = "cpu", buckets: DecodeBuckets | None = None,
                   on_device_sampling: bool = False, compiled: CompiledDecode | None = None) -> Generated:
    """``generation.generate`` with the batch divided among the replicas; every rank gets the whole result.

    Collective over every rank. Greedy rows are what one process generates for the whole batch (same
    padding, same positions); sampled rows draw from each replica's own seeded generator. The result's
    ``rows_per_rank`` says how many real rows each rank generated; ``cache_bytes`` is this rank's.
    """
    from ..generation import Sampling, generate

    rows = share(len(prompts), split.parts, split.index)
    placeholders = local_batch(len(prompts), split.parts) - len(rows)
    mine = [prompts[i] for i in rows] + [[pad_token_id]] * placeholders
    g = generate(model, mine, max_new_tokens, pad_token_id, eos_token_ids, sampling or Sampling(), split.compute,
                 keep_logits, device, buckets=buckets, on_device_sampling=on_device_sampling, compiled=compiled,
                 lockstep=split.world, placeholders=placeholders, pad_to=max(len(p) for p in prompts))
    real = len(rows)
    mine_out = (split.index, g.tokens[:real], [s[:real] for s in g.step_logits]) if split.leader else None
    everyone = split.world.all_gather_object((mine_out, real, g.prefill_seconds, g.decode_seconds))
    by_replica = {out[0]: out for out, *_ in everyone if out is not None}
    tokens: list[list[int]] = []
    for i in range(split.parts):
        tokens += by_replica[i][1]
    steps = len(g.step_logits)
    logits = [torch.cat([by_replica[i][2][s] for i in range(split.parts)]) for s in range(steps)]
    return replace(g, tokens=tokens, step_logits=logits, prompt_tokens=sum(len(p) for p in prompts),
                   prefill_seconds=max(e[2] for e in everyone), decode_seconds=max(e[3] for e in everyone),
                   rows_per_rank=[e[1] for e in everyone])
