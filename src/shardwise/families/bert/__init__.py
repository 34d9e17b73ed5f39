"""The BERT family: encoders (BertModel) and their sequence-classification and masked-LM heads.

An encoder has no KV cache and no generation: its models return hidden states (or task logits) for a
whole padded batch at once, and ``shardwise run --task-type embedding | sequence-classification |
masked-lm`` prints what the task produces. Tensor parallelism is the decoder's: query/key/value split
by whole heads (padded with zero heads when the head count does not divide the TP degree), the
attention output and the MLM's second dense row-parallel, the word embeddings split by vocabulary.

Torch-free on purpose, like the Llama family's module.
"""

from __future__ import annotations

from importlib import resources

from .. import Family
from .config import HEADS, BertConfig, read_config


def state_dict_shapes(config: BertConfig, dtype: str = "F32") -> dict[str, tuple[tuple[int, ...], str]]:
    """The checkpoint tensors (HF names) and shapes a config implies, no file needed."""
    h, inter, p = config.hidden_size, config.intermediate_size, config.prefix
    attn = config.num_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        p + "embeddings.word_embeddings.weight": (config.vocab_size, h),
        p + "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        p + "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        p + "embeddings.LayerNorm.weight": (h,), p + "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(config.num_layers):
        q = f"{p}encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            shapes[f"{q}attention.self.{proj}.weight"] = (attn, h)
            shapes[f"{q}attention.self.{proj}.bias"] = (attn,)
        shapes.update({
            q + "attention.output.dense.weight": (h, attn), q + "attention.output.dense.bias": (h,),
            q + "attention.output.LayerNorm.weight": (h,), q + "attention.output.LayerNorm.bias": (h,),
            q + "intermediate.dense.weight": (inter, h), q + "intermediate.dense.bias": (inter,),
            q + "output.dense.weight": (h, inter), q + "output.dense.bias": (h,),
            q + "output.LayerNorm.weight": (h,), q + "output.LayerNorm.bias": (h,),
        })
    if config.has_pooler:
        shapes.update({p + "pooler.dense.weight": (h, h), p + "pooler.dense.bias": (h,)})
    if config.head == "sequence-classification":
        shapes.update({"classifier.weight": (config.num_labels, h), "classifier.bias": (config.num_labels,)})
    if config.head == "masked-lm":
        shapes.update({"cls.predictions.transform.dense.weight": (h, h), "cls.predictions.transform.dense.bias": (h,),
                       "cls.predictions.transform.LayerNorm.weight": (h,),
                       "cls.predictions.transform.LayerNorm.bias": (h,), "cls.predictions.bias": (config.vocab_size,)})
    return {name: (shape, dtype) for name, shape in shapes.items()}


def plan_text() -> str:
    """The built-in plan: plan.yaml's rules for a bare encoder, repeated under ``bert.`` for task checkpoints.

    HF stores a BertModel's tensors at the top level and a task model's encoder under ``bert.``; a
    built-in rule that matches no tensor is ignored, so one plan carries both spellings.
    """
    import yaml

    doc = yaml.safe_load(resources.files(__name__).joinpath("plan.yaml").read_text())

    def both(name: str) -> list[str]:
        return [name] if name.startswith(("cls.", "classifier")) else [name, "bert." + name]

    for section in ("sharding", "units", "tp_splits"):
        doc[section] = {n: spec for name, spec in doc[section].items() for n in both(name)}
    doc["groups"] = [[n for name in group for n in both(name) if n.startswith(prefix)]
                     for group in doc["groups"] for prefix in ("encoder", "bert.")]
    return yaml.safe_dump(doc, sort_keys=False)


FAMILY = Family(
    name="bert",
    architectures=tuple(HEADS),
    model_types={"bert": "BertModel"},
    read_config=read_config,
    state_dict_shapes=state_dict_shapes,
    model="shardwise.families.bert.model:build",
    tied={"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"},
    output_kind="hidden_states",
    plan_text=plan_text,
    roles={"layer": "encoder.layer.*", "q": "encoder.layer.*.attention.self.query.weight",
           "k": "encoder.layer.*.attention.self.key.weight", "v": "encoder.layer.*.attention.self.value.weight",
           "mlp_in": "encoder.layer.*.intermediate.dense.weight", "embedding": "embeddings.word_embeddings",
           "output": "embeddings.word_embeddings.weight"},
)
