"""Speculative decoding: greedy output is the target's token for token (batch 1 and batches whose rows
accept different numbers of tokens), sampled output has the target's distribution, and the run flags."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_word_tokenizer

from shardwise.errors import ShardwiseError
from shardwise.generation import Sampling, generate
from shardwise.kv_cache import KVCache
from shardwise.sharded_model import load_sharded
from shardwise.speculative import Speculation, propose_ngram, speculative_generate

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]]


def _random_decoder(path: Path, vocab: int, layers: int, seed: int, hidden: int = 32, scale: float = 4.0,
                    cls: str = "LlamaConfig", **extra) -> Path:
    import transformers

    config = getattr(transformers, cls)(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    model.save_pretrained(path)
    return path


def _truncated_draft(target: Path, out: Path) -> Path:
    """The target's first layer alone (embeddings and head kept): a draft that agrees with the target
    on some tokens and not others, as a real draft does."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(target)
    config = model.config
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    draft = transformers.AutoModelForCausalLM.from_config(config).eval()
    draft.load_state_dict({k: v for k, v in model.state_dict().items() if ".layers.1." not in k}, strict=False)
    draft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    names = ("gqa9_tied", "qwen2_bias", "mistral_window")
    return {name: (tiny_models[name], _truncated_draft(tiny_models[name], root / f"draft-{name}")) for name in names}


def _load(path):
    return load_sharded(path, "float32").module


@pytest.mark.parametrize("name", ["gqa9_tied", "qwen2_bias", "mistral_window"])
def test_greedy_output_is_the_targets(models, name):
    """Every K, a draft that is often wrong (rows of a batch accept different numbers), the target as
    its own draft (every token accepted) and prompt lookup: token for token what plain decoding gives,
    in a batch and one prompt at a time. mistral_window's sliding window is shorter than the output."""
    target_path, draft_path = models[name]
    target, draft = _load(target_path), _load(draft_path)
    alone = [generate(target, [p], 24, 0, ()).tokens[0] for p in PROMPTS]
    assert generate(target, PROMPTS, 24, 0, ()).tokens == alone
    acceptance = []
    for kind, proposer in (("draft", draft), ("draft", target), ("ngram", None)):
        for k in (1, 3, 6):
            out, stats = speculative_generate(target, PROMPTS, 24, 0, (), Speculation(kind, k), draft=proposer)
            assert out.tokens == alone, (kind, k)
            one, _ = speculative_generate(target, PROMPTS[1:2], 24, 0, (), Speculation(kind, k), draft=proposer)
            assert one.tokens == alone[1:2], (kind, k)
            acceptance.append(stats.acceptance_rate)
            if proposer is target:
                assert stats.acceptance_rate == 1.0 and stats.tokens_per_target_forward > k
    assert 0 < min(acceptance) < 1  # the random draft is rejected often: the rollback path ran


def test_eos_and_max_new_tokens_stop_each_row(models):
    target_path, draft_path = models["gqa9_tied"]
    target, draft = _load(target_path), _load(draft_path)
    plain = generate(target, PROMPTS, 17, 0, ())
    eos = plain.tokens[0][5]  # a token row 0 produces: that row stops there, as plain decoding stops
    want = generate(target, PROMPTS, 17, 0, (eos,)).tokens
    got, _ = speculative_generate(target, PROMPTS, 17, 0, (eos,), Speculation("draft", 5), draft=draft)
    assert got.tokens == want
    assert all(len(row) <= 17 for row in got.tokens)


def _exact_marginals(model, prompt: list[int], vocab: int, new: int, sampling: Sampling) -> list[torch.Tensor]:
    """The target's exact distribution of each of the next ``new`` tokens, by enumerating every prefix."""
    from shardwise.generation import distribution

    seqs, probs = [list(prompt)], torch.ones(1, dtype=torch.float64)
    marginals = []
    for _ in range(new):
        ids = torch.tensor(seqs)
        n = ids.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(len(seqs), 1, n, n)
        cache = KVCache(model.config.num_layers, n)
        model.prepare(n + 1)
        logits = model(ids, torch.arange(n).expand(len(seqs), n), mask, cache, 0)[:, -1].float()
        p = distribution(logits, sampling).double()  # [prefixes, vocab]
        joint = probs[:, None] * p
        marginals.append(joint.sum(0))
        seqs = [s + [t] for s in seqs for t in range(vocab)]
        probs = joint.reshape(-1)
    return marginals


def _chi2_p_value(counts: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Pearson's chi-square test, cells with small expectations pooled (scipy is not a dependency)."""
    n = counts.sum().item()
    order = torch.argsort(expected_p, descending=True)
    cells, pooled_c, pooled_e = [], 0.0, 0.0
    for i in order.tolist():
        pooled_c += counts[i].item()
        pooled_e += expected_p[i].item() * n
        if pooled_e >= 5:
            cells.append((pooled_c, pooled_e))
            pooled_c = pooled_e = 0.0
    if pooled_e > 0 and cells:
        c, e = cells.pop()
        cells.append((c + pooled_c, e + pooled_e))
    stat = sum((c - e) ** 2 / e for c, e in cells)
    dof = len(cells) - 1
    # Wilson-Hilferty: the chi-square tail through a normal one; accurate enough for a 1e-3 threshold.
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampling_keeps_the_targets_distribution(tmp_path):
    """The speculative sampling rule on a 6-token vocabulary: each of the first four new tokens is
    distributed as the target's exact marginal (chi-square), with a draft whose distribution differs;
    the same test rejects the draft's own samples, so it has the power to see a wrong rule."""
    vocab, new, rows = 6, 4, 3000
    target = _load(_random_decoder(tmp_path / "t", vocab, 2, 1, hidden=16, scale=3.0))
    draft = _load(_random_decoder(tmp_path / "d", vocab, 1, 2, hidden=16, scale=3.0))
    prompt = [1, 2, 3]
    sampling = Sampling(top_k=0, temperature=1.0, seed=7)
    exact = _exact_marginals(target, prompt, vocab, new, sampling)
    out, stats = speculative_generate(target, [prompt] * rows, new, -1, (), Speculation("draft", 3), sampling,
                                      draft=draft)
    assert 0.2 < stats.acceptance_rate < 0.95  # both accept and reject paths ran often
    draft_only = generate(draft, [prompt] * rows, new, 0, (), sampling).tokens
    for j in range(new):
        got = torch.bincount(torch.tensor([row[j] for row in out.tokens]), minlength=vocab).double()
        assert _chi2_p_value(got, exact[j]) > 1e-3, (j, got / rows, exact[j])
    rejected = [_chi2_p_value(torch.bincount(torch.tensor([r[j] for r in draft_only]), minlength=vocab).double(),
                              exact[j]) for j in range(new)]
    assert min(rejected) < 1e-6
    # Prompt lookup's proposals are a point mass: the same rule keeps the target's distribution.
    looked, _ = speculative_generate(target, [prompt + prompt] * rows, new, -1, (), Speculation("ngram", 3),
                                     sampling)
    exact2 = _exact_marginals(target, prompt + prompt, vocab, new, sampling)
    for j in range(new):
        got = torch.bincount(torch.tensor([row[j] for row in looked.tokens]), minlength=vocab).double()
        assert _chi2_p_value(got, exact2[j]) > 1e-3, j


def test_prompt_lookup_proposals():
    assert propose_ngram([1, 2, 3, 4, 5, 9, 2, 3], 3, 3) == [4, 5, 9]  # "2 3" recurs: what followed it
    assert propose_ngram([1, 2, 3, 4, 5, 9, 2, 3], 10, 3) == [4, 5, 9, 2, 3]  # up to the end
    assert propose_ngram([7, 8, 9], 3, 3) == []  # nothing recurs
    assert propose_ngram([4, 4, 4, 4], 2, 2) == [4, 4]
    # The longest matching suffix wins over a shorter one that recurs more recently.
    assert propose_ngram([1, 2, 3, 8, 5, 3, 9, 1, 2, 3], 2, 3) == [8, 5]


def test_bad_speculation_options():
    with pytest.raises(ShardwiseError, match="speculation type"):
        Speculation("medusa", 4)
    with pytest.raises(ShardwiseError, match="between 1 and 64"):
        Speculation("ngram", 0)


def _run(args: list[str], cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardwise", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_run_flags_at_tp2(models, tmp_path):
    """`shardwise run` at TP 2, real ranks: the draft sharded (default) and replicated both print the
    plain run's text; the benchmark report carries the speculation figures. (Prompt lookup at TP 2:
    the SmolLM2 test below.)"""
    target_path, draft_path = models["gqa9_tied"]
    for path in (target_path, draft_path):
        save_word_tokenizer(path, 101)
    base = ["run", "--model-path", str(target_path), "--tp-degree", "2", "--no-chat-template", "--batch-size", "2",
            "--max-new-tokens", "16", "--prompt", "w5 w6 w7 w8 w9 w5 w6", "--prompt", "w11 w12"]
    plain = _run(base)
    assert plain.returncode == 0, plain.stderr
    outputs = [line for line in plain.stdout.splitlines() if line.startswith("Output")]
    for extra in (["--draft-model-path", str(draft_path), "--speculation-length", "3"],
                  ["--draft_model_path", str(draft_path), "--draft-model-tp-degree", "1", "--benchmark",
                   "--benchmark-iterations", "1", "--output-dir", str(tmp_path)]):
        res = _run(base + extra)
        assert res.returncode == 0, res.stderr
        assert [line for line in res.stdout.splitlines() if line.startswith("Output")] == outputs, extra
        assert "Speculation (" in res.stderr
    report = json.loads((tmp_path / "benchmark_report.json").read_text())["speculation"]
    assert report["type"] == "draft" and report["draft_tp_degree"] == 1
    assert 0 <= report["acceptance_rate"] <= 1 and report["tokens_per_target_forward"] >= 1
    assert report["speedup"] > 0 and report["decode_tokens_per_second_without"] > 0


def test_run_refuses_bad_drafts(models, tmp_path, capsys):
    target_path, _ = models["gqa9_tied"]
    save_word_tokenizer(target_path, 101)
    other = _random_decoder(tmp_path / "other", 90, 1, 3)
    save_word_tokenizer(other, 90)
    base = ["run", "--model-path", str(target_path), "--no-chat-template", "--prompt", "w5 w6"]
    cases = [
        (["--draft-model-path", str(other)], "vocabulary has 90 tokens"),
        (["--speculation-type", "ngram", "--draft-model-path", str(other)], "uses no draft model"),
        (["--speculation-length", "3"], "need --draft-model-path"),
        (["--speculation-type", "draft"], "needs --draft-model-path"),
        (["--speculation-type", "ngram", "--speculation-length", "99"], "between 1 and 64"),
        (["--draft-model-path", str(tmp_path / "missing")], "missing"),
        (["--draft-model-path", str(target_path), "--draft-model-tp-degree", "3"], "must be 1"),
        (["--speculation-type", "ngram", "--check-accuracy-mode", "logit-matching"], "token-matching"),
    ]
    from shardwise.cli import main

    for extra, message in cases:  # in this process: every case fails before a rank starts
        code = main(base + extra)
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert message in err and "Traceback" not in err, (extra, err)
        assert len([line for line in err.splitlines() if "error" in line]) == 1, err


def test_prompt_lookup_on_smollm2_at_tp2(smollm2):
    """The real model on copy-heavy work (repeat a given text): prompt lookup's output is the plain
    run's, and most proposals are accepted."""
    text = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
            "How vexingly quick daft zebras jump.")
    base = ["run", "--model-path", str(smollm2), "--tp-degree", "2", "--max-new-tokens", "32",
            "--prompt", f"Repeat this text exactly: {text}"]
    plain, looked = _run(base), _run(base + ["--speculation-type", "ngram", "--speculation-length", "6"])
    assert plain.returncode == 0 and looked.returncode == 0, (plain.stderr, looked.stderr)
    grab = [line for line in plain.stdout.splitlines() if line.startswith("Output")]
    assert grab and [line for line in looked.stdout.splitlines() if line.startswith("Output")] == grab
    line = next(line for line in looked.stderr.splitlines() if "Speculation (" in line)
    assert float(line.split("acceptance ")[1].split("%")[0]) > 50, line


def _speculate_on_simulated_gpus(rank, world, target, draft, result_file):
    from shardwise.parallel import devices as dev

    device = dev.bound_device()
    t = load_sharded(target, "float32", device=device)
    d = load_sharded(draft, "float32", comm=t.comm, device=device)
    out = {}
    for name, sampling in (("greedy", Sampling()), ("sampled", Sampling(top_k=8, temperature=0.9, seed=3))):
        g, _ = speculative_generate(t.module, PROMPTS, 10, 0, (), Speculation("draft", 3), sampling, t.comm,
                                    draft=d.module, device=device)
        out[name] = g.tokens
    g, _ = speculative_generate(t.module, PROMPTS, 10, 0, (), Speculation("ngram", 3), Sampling(), t.comm,
                                device=device)
    out["ngram"] = g.tokens
    out["checks"] = dev.checked_count()
    if rank == 0:
        torch.save(out, result_file)


def test_speculation_passes_the_device_checks(models, tmp_path, monkeypatch):
    """At TP 2 on simulated GPUs (SHARDWISE_CHECK_DEVICES=1): every collective of speculation, greedy and
    sampled, gets tensors on the rank's device or goes through the host helpers; greedy output is the
    plain CPU output."""
    from shardwise.parallel.launch import default_backend, launch

    target_path, draft_path = models["gqa9_tied"]
    monkeypatch.setenv("SHARDWISE_CHECK_DEVICES", "1")
    result = tmp_path / "r.pt"
    launch(_speculate_on_simulated_gpus, 2, (str(target_path), str(draft_path), str(result)),
           default_backend("cuda"), device="cuda")
    out = torch.load(result)
    checked, violations = out["checks"]
    assert violations == 0 and checked > 0
    want = generate(_load(target_path), PROMPTS, 10, 0, ()).tokens
    assert out["greedy"] == want and out["ngram"] == want
    assert all(1 <= len(row) <= 10 for row in out["sampled"])
