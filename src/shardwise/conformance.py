"""Does a checkpoint hold what its ``config.json`` says? Checked from headers alone, before any rank starts.

A config whose sizes disagree with the weights would otherwise surface inside a rank, as a
``load_state_dict`` size mismatch that names neither the file nor the numbers, or worse as a layout
computed from the wrong head count. Here every tensor the model needs is looked up with the shape the
config implies, and tensors the model does not use are named (and left out of the layout) instead of
being loaded and silently dropped.

Torch-free on purpose: the planner calls it for bare ``config.json`` files on machines without weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .config import ModelConfig
from .errors import ShardwiseError

log = logging.getLogger("shardwise")
Shapes = Mapping[str, tuple[tuple[int, ...], str]]


def state_dict_shapes(config: ModelConfig, dtype: str = "BF16") -> dict[str, tuple[tuple[int, ...], str]]:
    """The Llama-family checkpoint tensors (HF names) and shapes implied by a config, no file needed.

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


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def conform(found: Shapes, config: ModelConfig, where: str = "the checkpoint",
            files: Mapping[str, str] | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """The checkpoint tensors the model uses, after checking each against the shape the config implies.

    ``found`` maps checkpoint tensor names to (shape, dtype); ``files`` optionally names the file each
    tensor is in, for the message. Raises ``ShardwiseError`` naming the first tensor that is missing or
    whose shape disagrees (with both shapes); logs the tensors the model does not use and leaves them out.
    A tied checkpoint that stores ``lm_head.weight`` anyway keeps it, if its shape is right.
    """
    expected = {n: s for n, (s, _) in state_dict_shapes(config).items()}
    for param, src in config.tied_sources.items():
        if param in found:  # stored although tied: harmless when it has the right shape
            expected[param] = expected[src]
    wrong = [n for n in expected if n in found and tuple(found[n][0]) != expected[n]]
    if wrong:
        name = wrong[0]
        in_file = f" in {files[name]}" if files and name in files else ""
        more = f" ({len(wrong) - 1} more tensor(s) disagree too)" if len(wrong) > 1 else ""
        raise ShardwiseError(
            f"{name}: config.json implies shape {_fmt(expected[name])} ({_why(name, config)}) but {where} holds "
            f"{_fmt(tuple(found[name][0]))}{in_file}{more}")
    missing = [n for n in expected if n not in found]
    if missing:
        raise ShardwiseError(f"{where} lacks {len(missing)} tensor(s) that config.json implies "
                             f"({config.architecture}, {config.num_layers} layers), e.g. {missing[0]} "
                             f"of shape {_fmt(expected[missing[0]])}")
    unused = sorted(n for n in found if n not in expected)
    if unused:
        log.warning("%d tensor(s) in %s are not used by %s and are not loaded: %s", len(unused), where,
                    config.architecture, ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else ""))
    return {n: (tuple(found[n][0]), found[n][1]) for n in found if n in expected}


def _why(name: str, config: ModelConfig) -> str:
    """The config fields a tensor's shape comes from, so the user knows which number to check."""
    if "q_proj" in name or "o_proj" in name:
        return (f"num_attention_heads {config.num_heads} x head_dim {config.head_dim}, "
                f"hidden_size {config.hidden_size}")
    if "k_proj" in name or "v_proj" in name:
        return (f"num_key_value_heads {config.num_kv_heads} x head_dim {config.head_dim}, "
                f"hidden_size {config.hidden_size}")
    if "mlp" in name:
        return f"intermediate_size {config.intermediate_size}, hidden_size {config.hidden_size}"
    if "embed_tokens" in name or "lm_head" in name:
        return f"vocab_size {config.vocab_size}, hidden_size {config.hidden_size}"
    return f"hidden_size {config.hidden_size}"
