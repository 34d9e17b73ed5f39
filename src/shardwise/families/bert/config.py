"""The BERT family's config: the shared fields plus what an encoder and its task heads read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import ModelConfig, common_fields, float_field, int_field
from ...errors import ShardwiseError

# Architecture -> (task head, state-dict prefix of the encoder). HF nests the encoder as `bert.` under a head.
HEADS = {"BertModel": ("base", ""), "BertForSequenceClassification": ("sequence-classification", "bert."),
         "BertForMaskedLM": ("masked-lm", "bert.")}


@dataclass(frozen=True, kw_only=True)
class BertConfig(ModelConfig):
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    type_vocab_size: int = 2
    head: str = "base"  # base (hidden states, pooler), sequence-classification or masked-lm
    prefix: str = ""  # where the encoder's tensors live in the checkpoint: "" or "bert."
    num_labels: int = 2
    labels: tuple[str, ...] = ()  # id2label, in label order

    @property
    def has_pooler(self) -> bool:
        return self.head != "masked-lm"


def read_config(raw: dict[str, Any], architecture: str) -> BertConfig:
    head, prefix = HEADS[architecture]
    act = str(raw.get("hidden_act", "gelu"))
    if act not in ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh"):
        raise ShardwiseError(f"activation {act!r} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu are)")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ShardwiseError(f"position_embedding_type {raw['position_embedding_type']!r} is not supported "
                             "(absolute is)")
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        raise ShardwiseError("BERT as a decoder (is_decoder, add_cross_attention) is not supported: encoders only")
    id2label = raw.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise ShardwiseError(f"id2label must be a JSON object, got {type(id2label).__name__}")
    num_labels = int_field(raw, "num_labels", len(id2label) or 2)
    try:
        labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels))
    except (TypeError, ValueError):
        raise ShardwiseError("id2label keys must be label indices") from None
    if id2label and len(id2label) != num_labels:
        raise ShardwiseError(f"id2label has {len(id2label)} labels but num_labels is {num_labels}")
    fields = common_fields(raw, architecture, "bert")
    fields["tie_word_embeddings"] = head == "masked-lm" and bool(raw.get("tie_word_embeddings", True))
    if head == "masked-lm" and not fields["tie_word_embeddings"]:
        raise ShardwiseError("BertForMaskedLM with untied word embeddings is not supported")
    return BertConfig(**fields, layer_norm_eps=float_field(raw, "layer_norm_eps", 1e-12), hidden_act=act,
                      type_vocab_size=int_field(raw, "type_vocab_size", 2), head=head, prefix=prefix,
                      num_labels=num_labels, labels=labels)
