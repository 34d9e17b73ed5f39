"""Speculative decoding on the sharded model: a draft proposes K tokens, the target checks them in one forward.

Two sources of proposals: a smaller **draft model** sharing the target's vocabulary (sharded over the
same ranks, or replicated on each), or **prompt lookup** (``ngram``): the tokens that followed the
longest earlier occurrence of the sequence's last few tokens, in the prompt or the output so far —
free to produce and right surprisingly often on copy-heavy work (editing, summarising, code).

Each round the target runs ``[last token, d1..dK]`` in one forward, which gives its distribution at
all K+1 positions. Greedy keeps the longest prefix of the draft the target's argmax agrees with plus
the target's own next token, so the output is the target's greedy output token for token. Sampling
uses the standard rule (Leviathan et al. 2023; Chen et al. 2023): accept ``d_j`` with probability
``min(1, p(d_j) / q(d_j))``, otherwise draw from ``max(0, p - q)`` normalised and stop; when all K are
accepted draw one more from ``p``. Every output token is then distributed exactly as the target's
(``p`` and ``q`` are the temperature/top-k/top-p-filtered distributions of target and draft).

Rows of a batch accept different numbers of tokens (NxD Inference speculates at batch 1 only). The
caches are not compacted per row: a row's rejected positions are marked invalid in its attention mask
(``key_valid``) and its position ids count only accepted tokens, so every row computes exactly what it
would alone, while all rows keep writing the same cache slots each forward. The next round starts
after the row that accepted most; a batch of one never leaves a hole (it is a plain rollback).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .errors import ShardwiseError
from .generation import Generated, Sampling, distribution
from .kv_cache import KVCache
from .parallel import devices as dev
from .parallel.comm import Collectives
from .protocol import Model

DRAFT, NGRAM = "draft", "ngram"
KINDS = (DRAFT, NGRAM)


@dataclass(frozen=True)
class Speculation:
    """How to speculate: ``kind`` is ``"draft"`` (needs a draft model) or ``"ngram"`` (prompt lookup);
    ``length`` is K, the tokens proposed per round; ``ngram_max`` the longest suffix prompt lookup matches."""

    kind: str = DRAFT
    length: int = 4
    ngram_max: int = 3
    ngram_min: int = 2  # a single recurring token predicts little in free text
    adaptive: bool = True  # per row: propose 2 more after a round that kept every proposal, 1 fewer otherwise

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ShardwiseError(f"unknown speculation type {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not 1 <= self.length <= 64:
            raise ShardwiseError(f"--speculation-length must be between 1 and 64, not {self.length}")
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise ShardwiseError(f"n-gram sizes must satisfy 1 <= min <= max <= 16, not "
                                 f"{self.ngram_min}..{self.ngram_max}")


@dataclass
class SpeculationStats:
    """Counts over one generation: ``accepted / proposed`` is the acceptance rate, and
    ``emitted / row_rounds`` the tokens a row gains per target forward (1.0 without speculation)."""

    rounds: int = 0
    proposed: int = 0  # draft tokens put to the target, active rows only
    accepted: int = 0
    emitted: int = 0  # tokens produced by the rounds (accepted + one from the target per row and round)
    row_rounds: int = 0  # rounds summed over the rows active in them
    target_forwards: int = 0  # decode forwards of the target (prefill not counted)
    draft_forwards: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.emitted / self.row_rounds if self.row_rounds else 0.0

    def add(self, other: SpeculationStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class _Stream:
    """One model's KV cache plus, per row and slot, whether the slot holds a token of the row's sequence
    (``valid``) and that token's position; slots are written left to right, ``next_slot`` is the next."""

    def __init__(self, model: Model, batch: int, capacity: int, device):
        self.model, self.device = model, device
        self.cache = KVCache(model.config.num_layers, capacity)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool)
        self.pos = torch.zeros(batch, capacity, dtype=torch.long)
        self.next_slot = 0
        self.window = model.config.sliding_window

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Run ``tokens`` ``[batch, n]`` at the next ``n`` slots; float logits ``[batch, n or 1, vocab]``."""
        start, n = self.next_slot, tokens.shape[1]
        end = start + n
        if end > self.cache.max_len:
            raise ShardwiseError(f"speculation ran past its cache of {self.cache.max_len} slots")
        self.cache.rollback(min(start, self.cache.length))
        self.valid[:, start:end] = valid
        self.pos[:, start:end] = pos
        slots = torch.arange(end)
        q_slots = torch.arange(start, end)
        allowed = (slots[None, None, :] <= q_slots[None, :, None]) & self.valid[:, None, :end]
        if self.window is not None:
            allowed &= (pos[:, :, None] - self.pos[:, None, :end]) < self.window
        allowed |= slots[None, None, :] == q_slots[None, :, None]  # a padding query sees itself: no NaN row
        d = self.device
        logits = self.model(dev.put(tokens, d), dev.put(pos, d), dev.put(allowed.unsqueeze(1), d), self.cache, start,
                            last_only=last_only)
        self.next_slot = end
        # Acceptance is a few comparisons per row: decided on the host, where every rank has the same logits.
        return dev.to_host(logits.float())

    def invalidate(self, row: int, first: int, end: int) -> None:
        self.valid[row, first:end] = False


def propose_ngram(sequence: list[int], k: int, ngram_max: int, ngram_min: int = 1) -> list[int]:
    """Prompt lookup: up to ``k`` tokens that followed an earlier occurrence of the longest suffix
    (``ngram_max`` tokens down to ``ngram_min``) of ``sequence`` that recurs; none when nothing does.

    Of the occurrences, the earliest with ``k`` tokens after it wins (the copied passage, or one whole
    period of a loop), else the one with the most.
    """
    if len(sequence) < 2:
        return []
    last = sequence[-1]
    # Where the last token occurred before (one pass at C speed), then the longer suffixes among those.
    ends = [i for i, t in enumerate(sequence[:-1]) if t == last]
    for n in range(min(ngram_max, len(sequence) - 1), ngram_min - 1, -1):
        suffix = sequence[-n:]
        best: list[int] = []
        for end in ends:
            if end + 1 >= n and sequence[end + 1 - n:end + 1] == suffix:
                follow = sequence[end + 1:end + 1 + k]
                if len(follow) > len(best):
                    best = follow
                    if len(best) == k:
                        break
        if best:
            return best
    return []


def _accept(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int], sampling: Sampling,
            gen: torch.Generator) -> tuple[int, int]:
    """For one row: how many of ``drafts`` are kept, and the token that follows them.

    ``p`` ``[len(drafts)+1, vocab]`` are the target's distributions at each draft position and one past;
    ``q`` ``[len(drafts), vocab]`` the draft's (None: deterministic proposals, as prompt lookup's, whose
    distribution is a point mass on the proposed token).
    """
    if sampling.greedy:
        choice = p.argmax(-1).tolist()
        kept = 0
        while kept < len(drafts) and choice[kept] == drafts[kept]:
            kept += 1
        return kept, choice[kept]
    for j, d in enumerate(drafts):
        q_d = 1.0 if q is None else float(q[j, d])
        p_d = float(p[j, d])
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if q_d > 0 and u < min(1.0, p_d / q_d):
            continue
        residual = p[j].double().clone()
        if q is None:
            residual[d] = 0.0
        else:
            residual = (residual - q[j].double()).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q exactly: any rejection is measure-zero; draw from p
            residual = p[j].double()
        return j, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    return len(drafts), int(torch.multinomial(p[len(drafts)].double(), 1, generator=gen))


@torch.inference_mode()
def speculative_generate(
    model: Model,
    prompts: list[list[int]],
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_ids: tuple[int, ...],
    speculation: Speculation,
    sampling: Sampling | None = None,
    comm: Collectives | None = None,
    draft: Model | None = None,
    device: torch.device | str = "cpu",
    draft_device: torch.device | str | None = None,
) -> tuple[Generated, SpeculationStats]:
    """``generation.generate`` with speculation: same arguments and output, plus acceptance counts.

    Runs on every rank together (``comm`` is the target's collectives; a sharded ``draft`` runs its
    own collectives on the same ranks). Greedy output equals ``generate``'s; sampled output has the
    target's distribution, drawn from a generator seeded with ``sampling.seed`` on every rank, and the
    tokens of each round are broadcast from rank 0 so every rank continues alike.
    """
    comm = comm or Collectives()
    sampling = sampling or Sampling()
    if speculation.kind == DRAFT and draft is None:
        raise ShardwiseError("speculative decoding with a draft model needs --draft-model-path")
    if draft is not None and draft.config.vocab_size != model.config.vocab_size:
        raise ShardwiseError(f"the draft's vocabulary ({draft.config.vocab_size}) is not the target's "
                             f"({model.config.vocab_size}); they must share one tokenizer")
    k = speculation.length
    batch, longest = len(prompts), max(len(p) for p in prompts)
    # Slots used: the prompt, then per round one past the row that accepted most. Each round moves some
    # row forward by that many tokens, so no more slots than tokens all rows produce (plus one round).
    capacity = longest + min(max_new_tokens * (k + 1), batch * (max_new_tokens + k + 1)) + 2 * (k + 2)
    max_pos = longest + max_new_tokens + k + 2
    target = _Stream(model, batch, capacity, device)
    model.prepare(max_pos, dev.torch_device(device))
    drafter = None
    if speculation.kind == DRAFT:
        drafter = _Stream(draft, batch, capacity + max_new_tokens + 1, draft_device or device)
        draft.prepare(max_pos, dev.torch_device(draft_device or device))
    gen = torch.Generator().manual_seed(sampling.seed)
    eos = set(eos_token_ids)
    stats = SpeculationStats()

    ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    valid = torch.zeros(batch, longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        valid[i, longest - len(p):] = True
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    sequences = [list(p) for p in prompts]  # every row's tokens so far, prompt included

    t0 = time.perf_counter()
    logits = target.forward(ids, valid, pos, last_only=True)[:, -1]
    first = _sample_rows(logits, sampling, gen)
    first = comm.host_broadcast(first) if not sampling.greedy else first
    if drafter is not None:
        drafter.forward(ids, valid, pos, last_only=True)
    t1 = time.perf_counter()

    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch

    def emit(row: int, tokens: list[int]) -> None:
        for t in tokens:
            if done[row]:
                return
            out[row].append(t)
            sequences[row].append(t)
            done[row] = t in eos or len(out[row]) >= max_new_tokens

    for i, t in enumerate(first.tolist()):
        emit(i, [t])
    # Tokens each model has not run yet, per row: the target always one (the last emitted), the draft
    # one or two (two when it proposed K tokens that were all accepted: it never ran the last of them).
    draft_pending = [[s[-1]] for s in sequences]
    budget = [k] * batch  # proposals per row this round
    while not all(done):
        active = [i for i in range(batch) if not done[i]]
        # 1. Proposals.
        q_rows: list[torch.Tensor | None] = [None] * batch
        if drafter is None:
            # A row whose lookups keep failing (budget 0) proposes again only on a full-length match.
            proposals = [propose_ngram(sequences[i], max(1, budget[i]), speculation.ngram_max,
                                       speculation.ngram_min if budget[i] else speculation.ngram_max)
                         if not done[i] else []
                         for i in range(batch)]
        else:
            steps = max(budget[i] for i in active)
            proposals, q_all = _draft_round(drafter, draft_pending, sequences, steps, sampling, gen, comm, stats)
            proposals = [row[:budget[i]] for i, row in enumerate(proposals)]
            q_rows = [q_all[i] if q_all is not None else None for i in range(batch)]
        width = max(len(proposals[i]) for i in active)
        # 2. The target scores the last token and every proposal in one forward.
        tokens = torch.zeros(batch, width + 1, dtype=torch.long)  # unused slots: any real id
        tvalid = torch.zeros(batch, width + 1, dtype=torch.bool)
        tpos = torch.zeros(batch, width + 1, dtype=torch.long)
        for i in range(batch):
            row = [sequences[i][-1]] + proposals[i]
            tokens[i, :len(row)] = torch.tensor(row)
            tvalid[i, :len(row)] = not done[i]
            tpos[i] = len(sequences[i]) - 1 + torch.arange(width + 1)
        start = target.next_slot
        logits = target.forward(tokens, tvalid, tpos, last_only=False)
        stats.target_forwards += 1
        stats.rounds += 1
        # 3. Acceptance, decided on every rank alike and made certain by rank 0's broadcast.
        decided = torch.zeros(batch, 2, dtype=torch.long)  # kept, next token
        for i in active:
            n = len(proposals[i])
            p = logits[i, :n + 1] if sampling.greedy else distribution(logits[i, :n + 1], sampling)
            q = q_rows[i][:n] if q_rows[i] is not None else None
            decided[i, 0], decided[i, 1] = _accept(p, q, proposals[i], sampling, gen)
        if not sampling.greedy:
            decided = comm.host_broadcast(decided)
        most = 0
        for i in active:
            kept, nxt = decided[i].tolist()
            n = len(proposals[i])
            stats.proposed += n
            stats.accepted += kept
            stats.emitted += kept + 1
            stats.row_rounds += 1
            most = max(most, kept)
            if speculation.adaptive and n:  # as HF's assisted generation schedules its draft length
                floor = 1 if drafter is not None else 0  # a draft model proposes at least one token
                budget[i] = min(k, budget[i] + 2) if kept == n else max(floor, budget[i] - 1)
            target.invalidate(i, start + 1 + kept, start + width + 1)
            if drafter is not None:
                drafter.invalidate(i, drafter.round_start + 2 + kept, drafter.next_slot)
                draft_pending[i] = ([proposals[i][-1]] if kept == n == steps else []) + [nxt]
            emit(i, proposals[i][:kept] + [nxt])
        target.next_slot = start + 1 + most
        if drafter is not None:
            drafter.next_slot = drafter.round_start + 2 + min(most, steps - 1)
    t2 = time.perf_counter()
    generated = Generated(out, t1 - t0, t2 - t1, sum(len(p) for p in prompts), stats.target_forwards, [],
                          target.cache.nbytes + (drafter.cache.nbytes if drafter else 0))
    return generated, stats


def _draft_round(drafter: _Stream, pending: list[list[int]], sequences: list[list[int]], k: int,
                 sampling: Sampling, gen: torch.Generator, comm: Collectives,
                 stats: SpeculationStats) -> tuple[list[list[int]], torch.Tensor | None]:
    """The draft's K proposals per row and its distributions ``[batch, K, vocab]`` over them.

    The first forward runs two slots per row: the tokens the draft has not seen (one or two; a row
    with one leaves the first slot empty), so every row writes the same slots.
    """
    batch = len(sequences)
    drafter.round_start = drafter.next_slot
    tokens = torch.zeros(batch, 2, dtype=torch.long)
    valid = torch.zeros(batch, 2, dtype=torch.bool)
    pos = torch.zeros(batch, 2, dtype=torch.long)
    for i, todo in enumerate(pending):
        n = len(sequences[i])
        tokens[i, 2 - len(todo):] = torch.tensor(todo)
        valid[i, 2 - len(todo):] = True
        pos[i] = torch.tensor([n - 2, n - 1]).clamp(min=0)
    proposals: list[list[int]] = [[] for _ in range(batch)]
    dists = []
    logits = drafter.forward(tokens, valid, pos, last_only=True)[:, -1]
    for j in range(k):
        stats.draft_forwards += 1
        q = None if sampling.greedy else distribution(logits, sampling)
        if q is not None:
            dists.append(q)
        chosen = _sample_rows(logits, sampling, gen, q)
        if not sampling.greedy:
            chosen = comm.host_broadcast(chosen)
        for i, t in enumerate(chosen.tolist()):
            proposals[i].append(t)
        if j == k - 1:
            break
        step_pos = torch.tensor([[len(s) + j] for s in sequences])
        logits = drafter.forward(chosen[:, None], torch.ones(batch, 1, dtype=torch.bool), step_pos,
                                 last_only=True)[:, -1]
    return proposals, torch.stack(dists, 1) if dists else None


def _sample_rows(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator,
                 probs: torch.Tensor | None = None) -> torch.Tensor:
    if sampling.greedy:
        return logits.argmax(-1)
    probs = distribution(logits, sampling) if probs is None else probs
    return torch.multinomial(probs.double(), 1, generator=gen).squeeze(-1)
