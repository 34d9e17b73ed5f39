"""Inside every rank: one engine step over the running requests, and weight swaps.

Every rank holds the same bookkeeping (which cache row runs which request, its last token, its
position) and executes the same plan each step, so the ranks stay in lockstep with nothing but the
plan sent to them; the tokens they choose agree because the logits they see are bit-identical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ShardwiseError
from ..fusion import fused_state
from ..generation import Sampling, _mask, sample
from ..parallel.devices import put, state_to_device, to_host, torch_device
from ..plan import Plan
from ..redistribute import redistribution
from ..sharded_model import ShardedModel
from .slots import SlotCache


def batch_invariant_rows(model: torch.nn.Module, max_rows: int) -> int:
    """The fewest rows a decode batch must have for each row's logits not to depend on the batch size.

    Matmul kernels may reduce differently for different row counts: on x86 CPUs, float32 GEMMs give
    other last bits for one row (a GEMV) or two or three than for four and more, while bfloat16 ones
    agree for every count. Probed here on the model's own weight shapes and dtypes (a few
    milliseconds): the smallest ``m`` from which every count up to ``max_rows`` gives row-for-row the
    same bits. Decode batches are padded up to it, so a request's tokens are exactly those it gets alone.
    """
    floor = 1
    seen = set()
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for weight in model.parameters():
            if weight.dim() != 2 or (tuple(weight.shape), weight.dtype) in seen:
                continue
            seen.add((tuple(weight.shape), weight.dtype))
            x = torch.randn(max_rows, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
            full = F.linear(x, weight)
            for rows in range(max_rows - 1, 0, -1):
                if not torch.equal(F.linear(x[:rows], weight), full[:rows]):
                    floor = max(floor, rows + 1)
                    break
    return floor


@dataclass(frozen=True)
class Join:
    """A request taking cache row ``slot``: its prompt is prefilled this step."""

    request_id: int
    slot: int
    prompt: list[int]
    sampling: Sampling


@dataclass(frozen=True)
class StepPlan:
    """What every rank does in one step: free ``leaves`` rows, prefill ``joins``, decode the rest."""

    joins: list[Join] = field(default_factory=list)
    leaves: list[int] = field(default_factory=list)


@dataclass
class _Row:
    request_id: int
    token: int  # the last token chosen: the input of the next decode step
    position: int  # where that token's keys and values will be written
    sampling: Sampling
    generator: torch.Generator | None


class StepRunner:
    """The model, its slot cache and the running rows of one rank."""

    def __init__(self, sharded: ShardedModel, plan: Plan, rows: int, max_len: int, device: str = "cpu",
                 batch_invariant: bool = True):
        self.sharded, self.plan, self.device = sharded, plan, device
        self.model, self.comm = sharded.module, sharded.comm
        # Every rank must run the same batch shape: the largest floor any rank found.
        floor = batch_invariant_rows(self.model, max(rows, 4)) if batch_invariant else 1
        self.min_rows = int(self.comm.max_over_ranks([float(floor)])[0])
        self.cache = SlotCache(sharded.config.num_layers, rows, max_len, sharded.config.sliding_window)
        self.model.prepare(max_len, torch_device(device))
        self.rows: dict[int, _Row] = {}

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> list[tuple[int, int]]:
        """Run one step; returns (request id, new token) for every running row, joined rows included."""
        for slot in plan.leaves:
            self.rows.pop(slot, None)
        out: list[tuple[int, int]] = []
        decoding = sorted(self.rows)
        if decoding:
            out += self._decode(decoding)
        for join in plan.joins:
            if join.slot in self.rows:
                raise ShardwiseError(f"engine plan joins request {join.request_id} into busy row {join.slot}")
            out.append(self._prefill(join))
        return out

    def _prefill(self, join: Join) -> tuple[int, int]:
        n = len(join.prompt)
        ids = torch.tensor([join.prompt], dtype=torch.long)
        positions = torch.arange(n)[None]
        mask = _mask(torch.ones(1, n, dtype=torch.bool), positions, torch.arange(n), positions, self.cache.window)
        logits = to_host(self.model(put(ids, self.device), put(positions, self.device), put(mask, self.device),
                                    self.cache.row(join.slot), 0)[:, -1].float())
        generator = None if join.sampling.greedy else torch.Generator().manual_seed(join.sampling.seed)
        row = _Row(join.request_id, 0, n, join.sampling, generator)
        row.token = self._choose(logits, [row])[0]
        self.rows[join.slot] = row
        return join.request_id, row.token

    def _decode(self, slots: list[int]) -> list[tuple[int, int]]:
        rows = [self.rows[s] for s in slots]
        batch = max(len(rows), self.min_rows)
        ids = torch.zeros(batch, 1, dtype=torch.long)
        positions = torch.zeros(batch, 1, dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, 0], positions[j, 0] = row.token, row.position
        view = self.cache.decode(slots, [r.position for r in rows], batch)
        logits = to_host(self.model(put(ids, self.device), put(positions, self.device), None, view, 0)[:, -1].float())
        tokens = self._choose(logits[:len(rows)], rows)
        for row, token in zip(rows, tokens):
            row.token, row.position = token, row.position + 1
        return [(row.request_id, row.token) for row in rows]

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        tokens = logits.argmax(-1)
        sampled = False
        for j, row in enumerate(rows):
            if not row.sampling.greedy:
                tokens[j] = sample(logits[j:j + 1], row.sampling, row.generator)[0]
                sampled = True
        if sampled:  # ranks hold identical logits and generators; one draw from rank 0 makes agreement certain
            self.comm.host_broadcast(tokens)  # chosen on the host (per-request generators): the CPU backend
        return tokens.tolist()

    def swap(self, model_path: str) -> tuple[float, int]:
        """Load ``model_path``'s slices for this rank and copy them into the live parameters.

        Every rank first reads its whole new state; only when all ranks have it (agreed over the
        group) does any rank copy, so a failed read leaves the old weights in place everywhere.
        Returns (seconds, bytes read by this rank).
        """
        from ..checkpoint import CheckpointSource
        from ..conformance import model_layout
        from ..loader import load_rank_state

        t0 = time.perf_counter()
        sharded = self.sharded
        error = ""
        state: dict[str, torch.Tensor] = {}
        bytes_read = 0
        try:
            source = CheckpointSource(model_path)
            layout = model_layout(model_path, plan=self.plan, config=sharded.config, source=source,
                                  mesh=sharded.layout.mesh)
            layout = redistribution(layout, sharded.config, self.plan).storage  # what the ranks hold
            difference = layout_difference(sharded.layout, layout)
            if difference:
                raise ShardwiseError(f"{model_path}: {difference}")
            state, stats = load_rank_state(source, layout, sharded.rank, sharded.dtype)
            bytes_read = stats.bytes_read
        except (ShardwiseError, OSError) as exc:
            error = f"rank {sharded.rank}: {exc}"
        errors = _gather_errors(self.comm, error)
        if errors:
            raise ShardwiseError(errors[0])
        # A weight gathered on use (redistribute.py) lives as its stored piece behind a parametrization.
        names = set(self.model.state_dict())
        state = fused_state({_stored_name(n, names): t for n, t in state.items()}, names)
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(
                state_to_device(state, self.device), strict=False)
        if unexpected:
            raise ShardwiseError(f"swap: {len(unexpected)} tensors have no parameter, e.g. {unexpected[0]}")
        return time.perf_counter() - t0, bytes_read


def _gather_errors(comm, error: str) -> list[str]:
    """Every rank's error (empty string: none), so all ranks decide the same."""
    if comm.world_size == 1:
        return [error] if error else []
    return [e for e in comm.all_gather_object(error) if e]


def layout_difference(old, new) -> str:
    """The first way ``new`` (a layout) differs from ``old`` in what a rank holds, or "" if none."""
    for name in sorted(set(old.tensors) | set(new.tensors)):
        a, b = old.tensors.get(name), new.tensors.get(name)
        if a is None:
            return f"tensor {name} is not in the running model"
        if b is None:
            return f"tensor {name} of the running model is missing"
        if tuple(a.shape) != tuple(b.shape):
            return f"tensor {name} has shape {list(b.shape)}, the running model {list(a.shape)}"
        if [s.local_shape for s in a.shards] != [s.local_shape for s in b.shards]:
            return f"tensor {name} is split differently from the running model"
    return ""


def _stored_name(name: str, names: set[str]) -> str:
    """``x.weight`` or, when a parametrization holds it, ``x.parametrizations.weight.original``."""
    module, _, attr = name.rpartition(".")
    stored = f"{module}.parametrizations.{attr}.original"
    return stored if name not in names and stored in names else name
