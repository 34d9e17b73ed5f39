"""Task types (NxD's ``--task-type``): what a run does with a checkpoint, and which checkpoints can do it.

Decoders generate (``causal-lm``); encoders produce sentence embeddings (``embedding``: mean pooling
over the real tokens, then L2-normalised, as sentence-transformers computes them), class labels and
scores (``sequence-classification``) or the likeliest tokens at each ``[MASK]`` (``masked-lm``). The
default follows the checkpoint's architecture.
"""

from __future__ import annotations

from .config import ModelConfig
from .errors import ShardwiseError

CAUSAL_LM, EMBEDDING, CLASSIFICATION, MASKED_LM = "causal-lm", "embedding", "sequence-classification", "masked-lm"
TASK_TYPES = (CAUSAL_LM, EMBEDDING, CLASSIFICATION, MASKED_LM)


def supported_tasks(config: ModelConfig) -> tuple[str, ...]:
    """What this checkpoint can do, its default first."""
    if config.family != "bert":
        return (CAUSAL_LM,)
    head = getattr(config, "head", "base")
    return {"base": (EMBEDDING,), CLASSIFICATION: (CLASSIFICATION, EMBEDDING),
            MASKED_LM: (MASKED_LM, EMBEDDING)}[head]


def resolve_task(config: ModelConfig, task_type: str | None, model_type: str | None = None) -> str:
    """The task a run performs: ``task_type`` if the checkpoint supports it, else its default; and
    ``model_type`` (NxD's ``--model-type``), when given, must name the checkpoint's kind."""
    if model_type is not None:
        known = {config.family, str(config.raw.get("model_type", "")).lower()}
        if model_type.lower() not in known:
            raise ShardwiseError(f"--model-type {model_type} does not match the checkpoint, a {config.architecture} "
                                 f"(model type {' or '.join(sorted(k for k in known if k))})")
    tasks = supported_tasks(config)
    if task_type is None:
        return tasks[0]
    if task_type not in TASK_TYPES:
        raise ShardwiseError(f"unknown --task-type {task_type!r}; known: {', '.join(TASK_TYPES)}")
    if task_type not in tasks:
        raise ShardwiseError(f"--task-type {task_type}: the checkpoint ({config.architecture}) supports "
                             f"{', '.join(tasks)}")
    return task_type
