"""Compare shardwise's output with HF transformers on one process (NxD's --check-accuracy-mode)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Logits may differ by summation order (partial sums are reduced across ranks); the bound is
# atol + rtol * max|reference logit| per step. Half precision rounds every layer, hence wider bounds.
LOGIT_TOLERANCE = {torch.float32: (1e-3, 1e-4), torch.bfloat16: (0.25, 0.02), torch.float16: (0.1, 0.01)}


@dataclass
class AccuracyReport:
    mode: str
    passed: bool
    detail: str


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


def compare(mode: str, ours: list[tuple[list[list[int]], list[torch.Tensor]]], reference,
            dtype: torch.dtype) -> AccuracyReport:
    atol, rtol = LOGIT_TOLERANCE.get(dtype, LOGIT_TOLERANCE[torch.float32])
    worst, mismatches = 0.0, []
    for b, ((our_tokens, our_logits), (ref_tokens, ref_logits)) in enumerate(zip(ours, reference)):
        for row, (a, r) in enumerate(zip(our_tokens, ref_tokens)):
            if a != r:
                first = next((i for i, (x, y) in enumerate(zip(a, r)) if x != y), min(len(a), len(r)))
                mismatches.append(f"batch {b} row {row}: tokens differ from step {first}")
            if mode != "logit-matching":
                continue
            for step in range(min(len(a), len(r), len(our_logits), len(ref_logits))):
                ref = ref_logits[step][row]
                diff = (our_logits[step][row] - ref).abs().max().item()
                bound = atol + rtol * ref.abs().max().item()
                worst = max(worst, diff / bound)
                if diff > bound:
                    mismatches.append(f"batch {b} row {row} step {step}: max logit difference {diff:.3g} > {bound:.3g}")
                    break
    if mode == "logit-matching":
        detail = f"worst logit difference is {worst:.2f} of the tolerance (atol {atol}, rtol {rtol})"
    else:
        detail = "greedy tokens identical to HF transformers"
    if mismatches:
        return AccuracyReport(mode, False, "; ".join(mismatches[:3]))
    return AccuracyReport(mode, True, detail)
