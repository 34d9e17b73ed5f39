"""Accuracy checks that work in bf16 (issue 10, point 5): teacher-forced logit matching, near-ties in
token matching reported with both sides' margins and downgraded to warnings within the dtype's tolerance."""

from __future__ import annotations

import torch

from shardwise.accuracy import LOGIT_TOLERANCE, compare


def _step(values: dict[int, float], vocab: int = 6) -> torch.Tensor:
    row = torch.zeros(vocab)
    for token, value in values.items():
        row[token] = value
    return row[None]  # [batch 1, vocab]


def _run(ours_tokens, ours_logits, ref_tokens, ref_logits, dtype, mode="token-matching", forced=None):
    return compare(mode, [([ours_tokens], ours_logits)], [([ref_tokens], ref_logits)], dtype, forced)


def test_near_tie_is_a_warning_in_bf16_and_a_failure_in_fp32():
    # Step 1: HF prefers token 2 over 4 by 0.05, we prefer 4 over 2 by 0.05: a near-tie.
    ref = [_step({1: 9.0}), _step({2: 10.0, 4: 9.95}), _step({3: 9.0})]
    ours = [_step({1: 9.0}), _step({4: 10.0, 2: 9.95}), _step({5: 9.0})]
    report = _run([1, 4, 5], ours, [1, 2, 3], ref, torch.bfloat16)
    assert report.passed and "near-tie" in report.detail and "step 1" in report.detail
    assert "top-2 margin" in report.warnings[0]
    strict = _run([1, 4, 5], ours, [1, 2, 3], ref, torch.float32)  # tolerance 1e-3 + 1e-4 * 10 < 0.05
    assert not strict.passed and "not a near-tie" in strict.detail


def test_clear_divergence_fails_in_bf16():
    ref = [_step({1: 9.0}), _step({2: 10.0, 4: 5.0})]
    ours = [_step({1: 9.0}), _step({4: 10.0, 2: 5.0})]
    report = _run([1, 4], ours, [1, 2], ref, torch.bfloat16)
    assert not report.passed and "tokens differ from step 1" in report.detail and "not a near-tie" in report.detail


def test_logit_matching_is_teacher_forced():
    """Free-running logits diverge after a near-tie (different sequences); the teacher-forced ones,
    computed on HF's tokens, are what is compared, and they match."""
    ref = [_step({1: 9.0}), _step({2: 10.0, 4: 9.95}), _step({3: 9.0})]
    free = [_step({1: 9.0}), _step({4: 10.0, 2: 9.95}), _step({5: 30.0})]  # after the flip: another sequence
    forced = [[torch.cat([_step({1: 9.01}), _step({2: 9.98, 4: 9.97}), _step({3: 9.02})])]]
    report = _run([1, 4, 5], free, [1, 2, 3], ref, torch.bfloat16, "logit-matching", forced)
    assert report.passed and "teacher-forced" in report.detail
    assert not _run([1, 4, 5], free, [1, 2, 3], ref, torch.bfloat16, "logit-matching").passed  # free-running


def test_help_states_the_rule_and_the_tolerances():
    from shardwise.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    text = " ".join(run.format_help().split())
    assert "near-tie" in text and "teacher-forced" in text
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        atol, rtol = LOGIT_TOLERANCE[dtype]
        assert f"{name} {atol:g} + {rtol:g}" in text


def test_smollm2_bf16_tp2_logit_matching_teacher_forced(smollm2):
    from shardwise.runner import RunOptions, run

    result = run(RunOptions(model_path=str(smollm2), tp_degree=2, torch_dtype="bfloat16", max_new_tokens=12,
                            prompts=["Write a haiku about the sea.", "List three prime numbers."], batch_size=2,
                            check_accuracy_mode="logit-matching"))
    assert result.accuracy.startswith("worst logit difference") and "teacher-forced" in result.accuracy
