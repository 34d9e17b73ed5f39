"""Model configuration read straight from an HF ``config.json``: the fields every family shares.

We parse the JSON ourselves instead of importing ``transformers.AutoConfig`` because every rank reads
it at start-up and importing transformers costs seconds per process. Which family a config belongs to
is the registry's answer (``families``); the family reads its own fields with the checked readers
below, since a config is untrusted input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ShardwiseError
from .untrusted import read_json


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What the layout, the loader, the capacity estimate and generation read of any family's config.

    A family subclasses it with the fields its model code needs (rope, biases, norms...). Head counts
    are what the layout splits by: a family without grouped-query attention sets ``num_kv_heads`` to
    ``num_heads``.
    """

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def tied_sources(self) -> dict[str, str]:
        """Parameters that have no tensor of their own in the checkpoint, and the tensor they reuse."""
        from .families import family

        return family(self.family).tied_sources(self)


def int_field(raw: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer field, checked: configs are untrusted input, and a wrong type or a zero here would
    otherwise surface much later as a TypeError or a division by zero inside a rank."""
    value = default if raw.get(key) is None else raw[key]
    if value is None:
        raise KeyError(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ShardwiseError(f"{key} must be an integer of at least {minimum}, got {value!r}")
    return value


def float_field(raw: dict[str, Any], key: str, default: float) -> float:
    value = default if raw.get(key) is None else raw[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ShardwiseError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def token_id(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ShardwiseError(f"{key} must be a non-negative integer token id, got {value!r}")
    return value


def eos_ids(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    return tuple(i for i in (token_id(v, "eos_token_id") for v in values) if i is not None)


def common_fields(raw: dict[str, Any], architecture: str, family: str) -> dict[str, Any]:
    """The shared fields, read and checked, for a family's config constructor."""
    hidden = int_field(raw, "hidden_size")
    heads = int_field(raw, "num_attention_heads")
    kv_heads = int_field(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ShardwiseError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    head_dim = int_field(raw, "head_dim") if raw.get("head_dim") else hidden // heads
    if head_dim < 1:
        raise ShardwiseError(f"hidden_size {hidden} is smaller than num_attention_heads {heads}: no head_dim")
    return dict(
        architecture=architecture, family=family, vocab_size=int_field(raw, "vocab_size"), hidden_size=hidden,
        intermediate_size=int_field(raw, "intermediate_size"), num_layers=int_field(raw, "num_hidden_layers"),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=int_field(raw, "max_position_embeddings", 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        bos_token_id=token_id(raw.get("bos_token_id"), "bos_token_id"), eos_token_ids=eos_ids(raw.get("eos_token_id")),
        pad_token_id=token_id(raw.get("pad_token_id"), "pad_token_id"), raw=raw,
    )


def config_from_dict(raw: Any) -> ModelConfig:
    """The config of whichever registered family reads this ``config.json``; ``ShardwiseError`` (or
    ``KeyError`` for a missing required field) for anything malformed, before any of it reaches a rank."""
    from .families import family_of

    if not isinstance(raw, dict):
        raise ShardwiseError(f"a model config is a JSON object, got {type(raw).__name__}")
    fam, architecture = family_of(raw)
    return fam.read_config(raw, architecture)


def load_config(model_path: str | Path) -> ModelConfig:
    """Read ``config.json`` from a checkpoint directory (or a path to the JSON file itself)."""
    path = Path(model_path)
    cfg_file = path if path.is_file() else path / "config.json"
    if not path.exists():
        raise ShardwiseError(f"model path {str(path)!r} does not exist")
    if not cfg_file.is_file():
        raise ShardwiseError(f"{str(path)!r} is not a Hugging Face checkpoint: no config.json in it")
    raw = read_json(cfg_file, "config.json", object)
    try:
        return config_from_dict(raw)
    except KeyError as exc:
        raise ShardwiseError(f"{cfg_file} lacks the field {exc.args[0]!r}") from None
    except ShardwiseError as exc:
        raise ShardwiseError(f"{cfg_file}: {exc}") from None
