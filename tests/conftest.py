"""Shared fixtures: a tiny Llama config (pure tests) and a tiny random HF checkpoint (load tests)."""

from __future__ import annotations

import json

import pytest

TINY = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=101, hidden_size=72, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, head_dim=8, tie_word_embeddings=True,
    rms_norm_eps=1e-6, max_position_embeddings=256, torch_dtype="float32", bos_token_id=1, eos_token_id=2,
)


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
    from shardwise.planner import state_dict_shapes

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
