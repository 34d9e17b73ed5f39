"""The real SmolLM2-135M-Instruct (9 heads, 3 KV heads, tied embeddings) at TP 2 equals HF transformers."""

from __future__ import annotations

import json

import pytest

from shardwise import RunOptions, run


@pytest.mark.slow
def test_smollm2_tp2_token_matching(smollm2, tmp_path):
    result = run(RunOptions(model_path=str(smollm2), tp_degree=2, max_new_tokens=24,
                            prompts=["What is the capital of France?", "Name three primary colors."],
                            batch_size=2, check_accuracy_mode="token-matching", benchmark=True,
                            benchmark_iterations=1, output_dir=str(tmp_path)))
    assert "Paris" in result.texts[0]
    assert result.accuracy == "greedy tokens identical to HF transformers"
    report = json.loads((tmp_path / "benchmark_report.json").read_text())
    for key in ("load_seconds", "prefill_tokens_per_second", "decode_tokens_per_second"):
        assert report[key] > 0
    assert report["tp_degree"] == 2


@pytest.mark.slow
def test_smollm2_tp4_logit_matching(smollm2):
    result = run(RunOptions(model_path=str(smollm2), tp_degree=4, max_new_tokens=6,
                            check_accuracy_mode="logit-matching"))
    assert result.accuracy.startswith("worst logit difference")
