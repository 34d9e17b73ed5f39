"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2 and Phi-3 decoders, which share one architecture.

Phi-3 checkpoints store q/k/v stacked in one ``qkv_proj`` and gate/up in one ``gate_up_proj``; the layout
lays each part out as the separate projection it is (``fused_parts``), so they load into the same model
and the same per-rank slices (``--fused-qkv`` / ``--mlp-kernel-enabled`` fuse them back per rank).

Torch-free on purpose (the model is imported only when one is built): the capacity estimate and config reading
use this module on machines that only look at a ``config.json``.
"""

from __future__ import annotations

from .. import Family
from .config import LlamaConfig, read_config

# Fused checkpoint tensor (suffix) -> the parameters it stacks by rows, in order.
_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def _stores_fused(config: LlamaConfig) -> bool:
    return config.architecture == "Phi3ForCausalLM"


def fused_parts(config: LlamaConfig, names: list[str]) -> dict[str, list[tuple[str, int]]]:
    """Phi-3's stacked tensors in ``names``, each with its parts and their rows (q, k, v; gate, up)."""
    q, kv, inter = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    rows = {"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": kv, "self_attn.v_proj.weight": kv,
            "mlp.gate_proj.weight": inter, "mlp.up_proj.weight": inter}
    out = {}
    for name in names:
        for fused, parts in _FUSED.items():
            if name.endswith(fused):
                stem = name[: -len(fused)]
                out[name] = [(stem + p, rows[p]) for p in parts]
    return out


def state_dict_shapes(config: LlamaConfig, dtype: str = "BF16") -> dict[str, tuple[tuple[int, ...], str]]:
    """The checkpoint tensors (HF names) and shapes a config implies, no file needed.

    With tied embeddings there is no ``lm_head.weight`` (the layout adds it as a view of the embedding).
    """
    h, hd, inter = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if config.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        if config.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                           p + "mlp.down_proj.bias": (h,)})
    shapes["model.norm.weight"] = (h,)
    if _stores_fused(config):  # Phi-3 (no biases): each layer's stacked tensors replace their parts
        for i in range(config.num_layers):
            for fused, parts in _FUSED.items():
                stem = f"model.layers.{i}."
                shapes[stem + fused] = (sum(shapes.pop(stem + part)[0] for part in parts), h)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return {name: (shape, dtype) for name, shape in shapes.items()}


FAMILY = Family(
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"),
    model_types={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "phi3": "Phi3ForCausalLM"},
    read_config=read_config,
    state_dict_shapes=state_dict_shapes,
    fused_parts=fused_parts,
    model="shardwise.families.llama.model:LlamaForCausalLM",
    tied={"lm_head.weight": "model.embed_tokens.weight"},
    roles={"layer": "model.layers.*", "q": "model.layers.*.self_attn.q_proj.weight",
           "k": "model.layers.*.self_attn.k_proj.weight", "v": "model.layers.*.self_attn.v_proj.weight",
           "mlp_in": "model.layers.*.mlp.gate_proj.weight", "embedding": "model.embed_tokens",
           "output": "lm_head.weight"},
)
