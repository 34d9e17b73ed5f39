"""The Llama family's config (Llama 2/3/3.1, Mistral, Qwen2, Phi-3): the shared fields plus what its model reads.

The defaults are the ones transformers applies for these architectures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import ModelConfig, common_fields, float_field, int_field
from ...errors import ShardwiseError


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"


def read_config(raw: dict[str, Any], architecture: str) -> LlamaConfig:
    # transformers 5 moved rope_theta/rope_scaling into one `rope_parameters` dict; accept both forms.
    rope_params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {k: v for k, v in dict(rope_params).items() if k != "rope_theta"}
    if not isinstance(rope_params, dict) or not isinstance(scaling, dict):
        raise ShardwiseError("rope_parameters and rope_scaling must be JSON objects")
    if scaling:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    partial = float({**raw, **rope_params}.get("partial_rotary_factor", 1.0) or 1.0)
    if partial != 1.0:
        raise ShardwiseError(f"partial_rotary_factor {partial} is not supported (rotary embeddings on every "
                             "dimension are)")
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    sliding = int_field(raw, "sliding_window") if raw.get("sliding_window") else None
    if is_qwen2 and not raw.get("use_sliding_window", False):
        sliding = None
    return LlamaConfig(
        **common_fields(raw, architecture, "llama"),
        sliding_window=sliding,
        rms_norm_eps=float_field(raw, "rms_norm_eps", 1e-6),
        rope_theta=float_field({**raw, **rope_params}, "rope_theta", 10000.0),
        rope_scaling=scaling or None,
        qkv_bias=True if is_qwen2 else bool(raw.get("attention_bias", False)),
        o_bias=False if is_qwen2 else bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        hidden_act=str(raw.get("hidden_act", "silu")),
    )
