"""Compare shardwise's output with HF transformers on one process (NxD's --check-accuracy-mode)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("shardwise")

# Logits may differ by summation order (partial sums are reduced across ranks); the bound is
# atol + rtol * max|reference logit| per position. Half precision rounds every layer, hence wider bounds:
# teacher-forced SmolLM2-135M at TP 2 differs from HF by at most 9e-5 in float32 but by up to 1.25 (4.5%
# of max|logit| 27.75, ten bf16 steps at that scale) in bfloat16. A wrongly placed shard differs by the
# logits' whole scale (tens), far outside either bound.
LOGIT_TOLERANCE = {torch.float32: (1e-3, 1e-4), torch.bfloat16: (0.5, 0.05), torch.float16: (0.1, 0.01)}


@dataclass
class AccuracyReport:
    mode: str
    passed: bool
    detail: str
    warnings: list[str] = field(default_factory=list)  # near-tie divergences (token-matching), any (logit-matching)


def hf_reference(model_path: str, batches: list[list[list[int]]], max_new_tokens: int, pad_token_id: int,
                 eos_token_ids: tuple[int, ...], dtype: torch.dtype):
    """Greedy tokens and per-step logits from ``transformers`` for every batch, left-padded like ours."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    results = []
    for batch in batches:
        longest = max(len(p) for p in batch)
        ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=list(eos_token_ids) or None, pad_token_id=pad_token_id,
                                 output_logits=True, return_dict_in_generate=True)
        tokens = []
        for row in out.sequences[:, longest:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_token_ids), len(row))
            tokens.append(row[:cut])
        results.append((tokens, [step.float() for step in out.logits]))
    return results


@torch.inference_mode()
def forced_logits(model, prompts: list[list[int]], continuations: list[list[int]], pad_token_id: int,
                  device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Teacher forcing: logits (``[len(continuation), vocab]`` per row, float32) at every step of
    ``continuations`` after ``prompts``, feeding the continuation's own tokens in one forward.

    Runs on every rank of a tensor-parallel model at once. Row ``i``'s step ``j`` is the prediction
    made after ``prompt + continuation[:j]``, which is what HF's greedy generate returned as its step
    ``j`` logits for its own tokens: both sides see the same tokens at every position.
    """
    from .generation import _mask
    from .kv_cache import KVCache
    from .parallel.devices import put, to_host, torch_device

    rows = [p + c[:-1] for p, c in zip(prompts, continuations)]  # the last token predicts nothing compared
    steps = max(len(c) for c in continuations)
    longest = max(len(p) for p in prompts)
    width = longest + steps - 1
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        # Left-pad the prompt as generation does; continuations start at the same slot in every row.
        ids[i, longest - len(p):longest - len(p) + len(row)] = torch.tensor(row)
        valid[i, longest - len(p):longest - len(p) + len(row)] = True
    valid[:, longest:] = True  # padding after a short continuation: later positions, never attended by earlier
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    mask = _mask(valid, positions, torch.arange(width), positions, model.config.sliding_window)
    cache = KVCache(model.config.num_layers, width)
    model.prepare(width, torch_device(device))
    logits = to_host(model(put(ids, device), put(positions, device), put(mask, device), cache, 0,
                           last_only=False).float())
    return [logits[i, longest - 1:longest - 1 + len(c)] for i, c in enumerate(continuations)]


def _tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    atol, rtol = LOGIT_TOLERANCE.get(dtype, LOGIT_TOLERANCE[torch.float32])
    return atol + rtol * reference.abs().max().item()


def _margin(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float(), 2).values
    return (top[0] - top[1]).item()


def _divergence(b: int, row: int, ours: list[int], ref: list[int], our_logits, ref_logits,
                dtype: torch.dtype) -> tuple[str, bool] | None:
    """The first step where the greedy tokens differ, described; True if it is a near-tie (a warning)."""
    step = next((i for i, (x, y) in enumerate(zip(ours, ref)) if x != y), None)
    if step is None:
        if len(ours) == len(ref):
            return None
        return f"batch {b} row {row}: {len(ours)} tokens against HF's {len(ref)}", False
    a, r = ours[step], ref[step]
    if step >= len(our_logits) or step >= len(ref_logits):
        return f"batch {b} row {row}: tokens differ from step {step} (ours {a}, HF {r})", False
    mine, theirs = our_logits[step][row].float(), ref_logits[step][row].float()
    tol = _tolerance(dtype, theirs)
    # Both sides saw the same tokens up to here. A near-tie: each side prefers its token over the other's
    # by no more than the dtype's logit tolerance, so summation order alone can flip it.
    ours_gap, ref_gap = (mine[a] - mine[r]).item(), (theirs[r] - theirs[a]).item()
    near_tie = ours_gap <= tol and ref_gap <= tol
    text = (f"batch {b} row {row}: tokens differ from step {step}: ours {a} (top-2 margin {_margin(mine):.3g}, "
            f"{ours_gap:.3g} over HF's token), HF {r} (top-2 margin {_margin(theirs):.3g}, {ref_gap:.3g} over ours); "
            f"tolerance {tol:.3g}: {'a near-tie' if near_tie else 'not a near-tie'}")
    return text, near_tie


def compare(mode: str, ours: list[tuple[list[list[int]], list[torch.Tensor]]], reference,
            dtype: torch.dtype, forced: list[list[torch.Tensor]] | None = None) -> AccuracyReport:
    """Check our greedy run against HF's (``hf_reference``).

    ``token-matching``: tokens must be identical; at the first divergence both sides' top-2 margins are
    reported, and a divergence whose two tokens are within the dtype's logit tolerance on both sides
    (a near-tie that summation order alone flips) is a warning, not a failure.
    ``logit-matching`` is teacher-forced, as NxD Inference's: ``forced`` holds our logits with HF's
    tokens fed at every position (``forced_logits``), compared position by position within
    ``atol + rtol * max|HF logit|`` (``LOGIT_TOLERANCE``, per dtype); token divergences are reported only.
    """
    atol, rtol = LOGIT_TOLERANCE.get(dtype, LOGIT_TOLERANCE[torch.float32])
    worst, failures, warnings = 0.0, [], []
    for b, ((our_tokens, our_logits), (ref_tokens, ref_logits)) in enumerate(zip(ours, reference)):
        for row, (a, r) in enumerate(zip(our_tokens, ref_tokens)):
            found = _divergence(b, row, a, r, our_logits, ref_logits, dtype)
            if found is not None:
                text, near_tie = found
                (warnings if near_tie or mode == "logit-matching" else failures).append(text)
            if mode != "logit-matching":
                continue
            mine = forced[b][row] if forced is not None else None
            for step in range(len(r)):
                got = mine[step] if mine is not None else (our_logits[step][row] if step < len(our_logits) else None)
                if got is None or step >= len(ref_logits):
                    break
                ref = ref_logits[step][row].float()
                diff = (got.float() - ref).abs().max().item()
                bound = atol + rtol * ref.abs().max().item()
                worst = max(worst, diff / bound)
                if diff > bound:
                    failures.append(f"batch {b} row {row} step {step}: max logit difference {diff:.3g} > {bound:.3g}"
                                    f"{' (teacher-forced)' if mine is not None else ''}")
                    break
    for w in warnings:
        log.warning("accuracy (%s): %s", mode, w)
    if failures:
        return AccuracyReport(mode, False, "; ".join(failures[:3]), warnings)
    if mode == "logit-matching":
        detail = (f"worst logit difference is {worst:.2f} of the tolerance (atol {atol}, rtol {rtol}"
                  f"{', teacher-forced' if forced is not None else ''})")
    elif warnings:
        detail = (f"greedy tokens identical to HF transformers up to {len(warnings)} near-tie(s): "
                  + "; ".join(warnings[:3]))
    else:
        detail = "greedy tokens identical to HF transformers"
    return AccuracyReport(mode, True, detail, warnings)
