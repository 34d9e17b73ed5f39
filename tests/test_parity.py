"""Tensor-parallel output equals HF transformers on one process, at TP 1 to 4.

Ranks are real processes (gloo). Each TP degree spawns its ranks once and checks every tiny
checkpoint, so the matrix costs a few process start-ups, not one per case.
"""

from __future__ import annotations

import pytest
import torch

from shardwise.parallel.launch import launch

# Two prompts of different lengths in one batch (left padding), longer than the Mistral window.
PROMPTS = [[3, 17, 5, 9, 11, 2, 8, 40, 41, 12], [7, 1, 4, 22]]
NEW_TOKENS = 12


def hf_reference(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early, compare every step
    longest = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, longest:].tolist(), [s.float() for s in out.logits]


def _worker(rank, world, paths, result_file):
    from shardwise import generate, load_sharded

    results = {}
    for name, path in paths.items():
        model = load_sharded(path, "float32")
        out = generate(model.module, PROMPTS, NEW_TOKENS, 0, (), comm=model.comm, keep_logits=True)
        results[name] = (out.tokens, out.step_logits, model.stats.bytes_read)
    if rank == 0:
        torch.save(results, result_file)


@pytest.fixture(scope="module")
def references(tiny_models):
    return {name: hf_reference(path) for name, path in tiny_models.items()}


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_matches_hf_transformers(tp, tiny_models, references, tmp_path):
    result_file = tmp_path / "result.pt"
    launch(_worker, tp, ({k: str(v) for k, v in tiny_models.items()}, str(result_file)))
    results = torch.load(result_file)
    for name, (ref_tokens, ref_logits) in references.items():
        tokens, logits, _ = results[name]
        assert tokens == ref_tokens, f"{name} at TP {tp}: greedy tokens differ"
        for step, (ours, ref) in enumerate(zip(logits, ref_logits)):
            torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4, msg=f"{name} TP {tp} step {step}")
