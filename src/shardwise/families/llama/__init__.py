"""The Llama family: Llama 2/3/3.1, Mistral and Qwen2 decoders, which share one architecture.

Torch-free on purpose (the model is imported only when one is built): the capacity estimate and config reading
use this module on machines that only look at a ``config.json``.
"""

from __future__ import annotations

from .. import Family
from .config import LlamaConfig, read_config


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
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return {name: (shape, dtype) for name, shape in shapes.items()}


FAMILY = Family(
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    model_types={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"},
    read_config=read_config,
    state_dict_shapes=state_dict_shapes,
    model="shardwise.families.llama.model:LlamaForCausalLM",
    tied={"lm_head.weight": "model.embed_tokens.weight"},
    roles={"layer": "model.layers.*", "q": "model.layers.*.self_attn.q_proj.weight",
           "k": "model.layers.*.self_attn.k_proj.weight", "v": "model.layers.*.self_attn.v_proj.weight",
           "mlp_in": "model.layers.*.mlp.gate_proj.weight", "embedding": "model.embed_tokens",
           "output": "lm_head.weight"},
)
