"""Batched generation with a preallocated KV cache: greedy, top-k, top-p and temperature.

Prompts of different lengths are left-padded so every row writes the same cache slot each step;
padded keys are masked and positions count only real tokens, which is what HF transformers does, so
outputs match it token for token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import sampler
from .compiled_decode import CompiledDecode
from .decode_buckets import DecodeBuckets
from .kv_cache import KVCache
from .parallel.comm import Collectives
from .parallel.devices import put, synchronize, to_host, torch_device
from .protocol import Model


@dataclass(frozen=True)
class Sampling:
    """``top_k == 1`` or ``temperature == 0`` means greedy (NxD's convention)."""

    top_k: int = 1
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0


@dataclass
class Generated:
    tokens: list[list[int]]  # new tokens per prompt, up to and including the first EOS
    prefill_seconds: float
    decode_seconds: float  # with --compile-decode: without the steps that compiled a graph (compiled_decode.py)
    prompt_tokens: int
    decode_steps: int  # timed steps (the same exclusion)
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [batch, vocab] per step, if kept
    cache_bytes: int = 0
    sampling_bytes_per_step: int = 0  # bytes of logits or candidates gathered to choose one step's tokens
    rows_per_rank: list[int] | None = None  # a batch divided among replicas (parallel/data.py): real rows per rank


def distribution(logits: torch.Tensor, cfg: Sampling) -> torch.Tensor:
    """The probabilities ``sample`` draws from (last dimension), over the whole vocabulary: the same
    canonical candidates and weights (``sampler.py``), normalised; a one-hot on the argmax when greedy.
    Speculative sampling needs them explicitly (p and q)."""
    if cfg.greedy:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits.float()
    ids = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
    values, ids = sampler.canonical_top_k(logits, ids, cfg.top_k, ids_ascending=True)
    weights = sampler.candidate_probs(values, cfg.top_p, cfg.temperature)
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.zeros_like(logits).scatter_(-1, ids, weights)


def sample(logits: torch.Tensor, cfg: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``[batch, vocab]`` logits: greedy, or top-k/top-p/temperature (``distribution``)
    from a seeded draw over canonical candidates (``sampler.py``), so on-device sampling picks the same tokens."""
    return sampler.sample(logits, cfg.top_k, cfg.top_p, cfg.temperature, gen)


def _mask(key_valid: torch.Tensor, key_pos: torch.Tensor, q_slots: torch.Tensor, q_pos: torch.Tensor,
          window: int | None) -> torch.Tensor:
    """Boolean attention mask [batch, 1, queries, keys]: causal, padding-aware, optional sliding window."""
    slots = torch.arange(key_valid.shape[1])
    allowed = (slots[None, None, :] <= q_slots[None, :, None]) & key_valid[:, None, :]
    if window is not None:
        allowed &= (q_pos[:, :, None] - key_pos[:, None, :]) < window
    # A padding query would otherwise see no key at all (NaN rows); let it see itself.
    allowed |= slots[None, None, :] == q_slots[None, :, None]
    return allowed.unsqueeze(1)


MASK_TABLE_LIMIT = 1 << 28  # bytes: above this, sliding-window decode masks are built per step instead


@torch.inference_mode()
def generate(
    model: Model,
    prompts: list[list[int]],
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_ids: tuple[int, ...],
    sampling: Sampling = Sampling(),
    comm: Collectives | None = None,
    keep_logits: bool = False,
    device: torch.device | str = "cpu",
    buckets: DecodeBuckets | None = None,
    on_device_sampling: bool = False,
    compiled: CompiledDecode | None = None,
    lockstep: Collectives | None = None,
    placeholders: int = 0,
    pad_to: int = 0,
) -> Generated:
    """Generate up to ``max_new_tokens`` tokens after each prompt (token ids), all rows in one batch.

    Runs on every rank of a tensor-parallel model at once (each rank calls it with the same prompts;
    ``comm`` is the model's collectives, so sampled tokens agree), or on one process for a whole model.
    Rows stop at their first token in ``eos_token_ids`` (kept in the output); ``sampling`` picks greedy
    or top-k/top-p/temperature sampling, seeded. Returns the new tokens with prefill and decode timings;
    ``keep_logits`` also keeps each step's logits (for accuracy checks). Greedy output is token for token
    what HF transformers generates on one process. With ``buckets`` (``decode_buckets.py``) prefill runs
    on the prompt batch left-padded to its context-encoding bucket and each decode step attends over a
    token-generation bucket of KV slots; the tokens are the same. ``on_device_sampling`` (NxD's flag) has
    each rank reduce its own vocabulary shard to candidates before anything is gathered: the same tokens
    (greedy, and sampled with the same seed), a fraction of the bytes. ``compiled`` (``compiled_decode.py``,
    which needs ``buckets``) runs the decode steps through ``torch.compile``, one graph per bucket.

    On a GPU, ids, masks, positions and sampling stay on the device: the prompt's tensors are moved
    once, each step's tokens are chosen (and, when sampled, broadcast) on the device and fed back as
    the next input; the host sees one small copy of the tokens per step, for EOS bookkeeping.

    Data parallelism (``parallel/data.py``) runs one share of a batch per replica: ``lockstep`` (every
    rank) keeps stepping until every replica's rows are done, as forwards that gather weights over
    replicas must run on all of them alike; the last ``placeholders`` rows only fill a short share (done
    from the start, no tokens); ``pad_to`` left-pads the prompts to at least that length (the whole
    batch's longest, as one process pads them).
    """
    comm = comm or Collectives()
    if compiled is not None and buckets is None:
        raise ValueError("a compiled decode step runs on token-generation buckets: pass buckets too")
    step_model = compiled if compiled is not None else model
    batch, longest = len(prompts), max(pad_to, *(len(p) for p in prompts))
    if buckets is not None:
        longest = buckets.context_length(longest)
    total = longest + max_new_tokens
    slots_total = buckets.kv_length(total) if buckets is not None else total  # KV slots allocated
    ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    # Everything the decode steps need is built here, once: every new token is a real key, and its
    # position is one past the previous one, so validity and positions of all slots are known up front.
    key_valid = torch.zeros(batch, slots_total, dtype=torch.bool)
    key_valid[:, longest:total] = True
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        key_valid[i, longest - len(p):longest] = True
    key_pos = torch.zeros(batch, slots_total, dtype=torch.long)
    key_pos[:, :longest] = (key_valid[:, :longest].cumsum(1) - 1).clamp(min=0)
    key_pos[:, longest:] = key_pos[:, longest - 1:longest] + torch.arange(1, slots_total - longest + 1)
    window = model.config.sliding_window
    cache = KVCache(model.config.num_layers, slots_total)
    model.prepare(slots_total, torch_device(device))
    slot_index = put(torch.arange(slots_total), device)
    gen = torch.Generator(torch_device(device)).manual_seed(sampling.seed)  # sampling on the device

    chooser = _Chooser(model, sampling, gen, comm, on_device_sampling, keep_logits)
    try:  # the output layer gathers again afterwards, however generation ends
        t0 = time.perf_counter()
        positions = key_pos[:, :longest]
        mask = _mask(key_valid[:, :longest], positions, torch.arange(longest), positions, window)
        logits = model(put(ids, device), put(positions, device), put(mask, device), cache, 0)[:, -1]
        tokens, kept_logits = chooser(logits)
        synchronize(device)
        t1 = time.perf_counter()
        graphs_before = len(compiled.shapes) if compiled is not None else 0
        compiling_before = compiled.compile_seconds if compiled is not None else 0.0

        # Decode masks: the query at slot s sees slots 0..s that are valid (and, with a sliding window,
        # within the window of its position); step s uses a slice of a tensor built once, never a new one.
        dev_pos = put(key_pos, device)
        if window is None:
            step_masks = put(key_valid, device)[:, None, None, :]  # [batch, 1, 1, total]; step s: [..., :s + 1]
        elif batch * max_new_tokens * total <= MASK_TABLE_LIMIT:
            q_pos = key_pos[:, longest:, None]  # [batch, steps, 1]
            table = key_valid[:, None, :] & ((q_pos - key_pos[:, None, :]) < window)
            step_masks = put(table, device)[:, None, :, None, :]  # [batch, 1, steps, 1, total]
        else:
            step_masks = None
        eos = set(eos_token_ids)
        out: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * (batch - placeholders) + [True] * placeholders
        kept = [kept_logits] if kept_logits is not None else []
        steps = 0
        for step in range(max_new_tokens):
            for i, t in enumerate(tokens.tolist()):
                if not done[i]:
                    out[i].append(t)
                    done[i] = t in eos
            if step == max_new_tokens - 1 or _finished(all(done), lockstep):
                break
            slot = longest + step
            keys = buckets.kv_length(slot + 1) if buckets is not None else slot + 1
            if window is None:
                mask = step_masks[..., :keys]
            elif step_masks is not None:
                mask = step_masks[:, :, step, :, :keys]
            else:
                mask = put(_mask(key_valid[:, : slot + 1], key_pos[:, : slot + 1], torch.tensor([slot]),
                                 key_pos[:, slot:slot + 1], window), device)
                mask = torch.nn.functional.pad(mask, (0, keys - slot - 1), value=False)
            if buckets is not None:  # the bucket's slots after this one are not written yet
                mask = mask & (slot_index[:keys] <= slot)
                cache.attend_to = keys
            logits = step_model(tokens[:, None], dev_pos[:, slot:slot + 1], mask, cache, slot)  # tokens: on device
            tokens, kept_logits = chooser(logits[:, -1])
            if kept_logits is not None:
                kept.append(kept_logits)
            steps += 1
        synchronize(device)
        t2 = time.perf_counter()
        prompt_tokens = sum(len(p) for p in prompts[:batch - placeholders])
        # Decode timing leaves out the steps that compiled a graph (their seconds are compile_seconds).
        compiled_steps = len(compiled.shapes) - graphs_before if compiled is not None else 0
        compiling = compiled.compile_seconds - compiling_before if compiled is not None else 0.0
        return Generated(out, t1 - t0, t2 - t1 - compiling, prompt_tokens, steps - compiled_steps, kept,
                         cache.nbytes, chooser.step_bytes)
    finally:
        chooser.close()


def _finished(done: bool, lockstep: Collectives | None) -> bool:
    """Whether generation stops: this rank's rows are done and, stepping together, every rank's are."""
    if lockstep is None or lockstep.world_size == 1:
        return done
    return bool(lockstep.host_all_gather(torch.tensor([int(done)], dtype=torch.int32), dim=0).all())


class _Chooser:
    """Picks each step's tokens from the model's last-position output, gathered or on-device.

    On-device: the output layer (``lm_head``, column-parallel) is told not to gather, each rank reduces
    its shard (``sampler.sample_sharded``), and the layer is restored afterwards. A model whose output
    layer is not split by vocabulary rows has nothing to reduce: the gathered path runs, same tokens.
    Tokens stay on the logits' device (fed back as the next input); kept logits go to the host.
    """

    def __init__(self, model: Model, sampling: Sampling, gen: torch.Generator, comm: Collectives,
                 on_device: bool, keep_logits: bool):
        self.sampling, self.gen, self.comm, self.keep_logits = sampling, gen, comm, keep_logits
        self.step_bytes = 0
        self.vocab_size = model.config.vocab_size
        head = getattr(model, "lm_head", None)
        gathering = getattr(head, "gather_output", False)
        # What the gathered path moves per row: every rank's rows of the output layer, padding included.
        # (local_index, not weight.shape: a weight stored split is all-gathered each time it is read)
        self.gathered_width = len(head.local_index) * comm.world_size if gathering else self.vocab_size
        self.head = head if on_device and gathering else None
        if self.head is not None:
            self.head.gather_output = False
            self.local_ids = self.head.local_index  # moved to the logits' device at first use
            self.ascending = sampler.ids_ascending(self.head.local_index)

    def close(self) -> None:
        if self.head is not None:
            self.head.gather_output = True

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.sampling
        if self.head is None:
            self.step_bytes = (logits.shape[0] * self.gathered_width * logits.element_size()
                               if self.comm.world_size > 1 else 0)
            logits = logits.float()
            tokens = sample(logits, s, self.gen)
            kept = to_host(logits) if self.keep_logits else None
        else:
            self.local_ids = self.local_ids.to(logits.device)
            tokens, self.step_bytes = sampler.sample_sharded(logits, self.local_ids, self.vocab_size, s.top_k, s.top_p,
                                                             s.temperature, self.gen, self.comm, self.ascending)
            kept = None
            if self.keep_logits:  # accuracy checks compare whole logits: gather them as the layer would have
                full = self.comm.all_gather(logits, dim=-1)
                index = self.head.gather_index
                full = (full.index_select(-1, index.to(full.device)) if index is not None
                        else full[..., :self.vocab_size])
                kept = to_host(full.float())
        if not s.greedy:
            # Ranks hold identical candidates, but one draw broadcast from rank 0 makes agreement certain. The
            # tokens are on the logits' device: a device collective, never a host tensor on NCCL.
            self.comm.broadcast(tokens)
        return tokens, kept
