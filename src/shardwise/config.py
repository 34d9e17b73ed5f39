"""Model configuration read straight from an HF ``config.json``.

We parse the JSON ourselves instead of importing ``transformers.AutoConfig`` because every rank reads
it at start-up and importing transformers costs seconds per process; the defaults below are the ones
transformers applies for the Llama family (Llama 2/3/3.1, Mistral, Qwen2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ShardwiseError
from .untrusted import read_json

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
}

# Configs written without `architectures` (e.g. from GGUF) still name their model_type.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the layout, the model code and the generator need to know about a model."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    hidden_act: str
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def tied_sources(self) -> dict[str, str]:
        """Parameters that have no tensor of their own in the checkpoint, and the tensor they reuse."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.tie_word_embeddings else {}


def _int(raw: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer field, checked: configs are untrusted input, and a wrong type or a zero here would
    otherwise surface much later as a TypeError or a division by zero inside a rank."""
    value = default if raw.get(key) is None else raw[key]
    if value is None:
        raise KeyError(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ShardwiseError(f"{key} must be an integer of at least {minimum}, got {value!r}")
    return value


def _float(raw: dict[str, Any], key: str, default: float) -> float:
    value = default if raw.get(key) is None else raw[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ShardwiseError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def _token_id(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ShardwiseError(f"{key} must be a non-negative integer token id, got {value!r}")
    return value


def _eos_ids(value: Any) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    return tuple(i for i in (_token_id(v, "eos_token_id") for v in values) if i is not None)


def config_from_dict(raw: Any) -> ModelConfig:
    """A ``ModelConfig`` from the parsed ``config.json``; ``ShardwiseError`` (or ``KeyError`` for a missing
    required field) for anything malformed, before any of it reaches a rank."""
    if not isinstance(raw, dict):
        raise ShardwiseError(f"a model config is a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures") or [MODEL_TYPES.get(str(raw.get("model_type", "")), "")]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ShardwiseError(f"architectures must be a list of names, got {archs!r}")
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        name = archs[0] if archs else raw.get("model_type", "unknown")
        raise ShardwiseError(
            f"unsupported architecture {name!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    hidden = _int(raw, "hidden_size")
    heads = _int(raw, "num_attention_heads")
    kv_heads = _int(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ShardwiseError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    head_dim = _int(raw, "head_dim") if raw.get("head_dim") else hidden // heads
    if head_dim < 1:
        raise ShardwiseError(f"hidden_size {hidden} is smaller than num_attention_heads {heads}: no head_dim")
    # transformers 5 moved rope_theta/rope_scaling into one `rope_parameters` dict; accept both forms.
    rope_params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {k: v for k, v in dict(rope_params).items() if k != "rope_theta"}
    if not isinstance(rope_params, dict) or not isinstance(scaling, dict):
        raise ShardwiseError("rope_parameters and rope_scaling must be JSON objects")
    rope_theta = _float({**raw, **rope_params}, "rope_theta", 10000.0)
    if scaling:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    is_qwen2 = arch == "Qwen2ForCausalLM"
    sliding = _int(raw, "sliding_window") if raw.get("sliding_window") else None
    if is_qwen2 and not raw.get("use_sliding_window", False):
        sliding = None
    return ModelConfig(
        architecture=arch,
        family=SUPPORTED_ARCHITECTURES[arch],
        vocab_size=_int(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size"),
        num_layers=_int(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=scaling or None,
        max_position_embeddings=_int(raw, "max_position_embeddings", 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=True if is_qwen2 else bool(raw.get("attention_bias", False)),
        o_bias=False if is_qwen2 else bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        sliding_window=sliding,
        hidden_act=str(raw.get("hidden_act", "silu")),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        bos_token_id=_token_id(raw.get("bos_token_id"), "bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        pad_token_id=_token_id(raw.get("pad_token_id"), "pad_token_id"),
        raw=raw,
    )


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
