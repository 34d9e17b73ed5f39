"""Single-device Llama-family model (Llama 2/3/3.1, Mistral, Qwen2) with HF parameter names.

No parallelism lives here: tensor parallelism comes from swapping the ``nn.Linear`` and
``nn.Embedding`` modules per the sharding plan (see ``parallelize.py``). It follows the runtime's model
protocol (``shardwise.protocol``). The code is written so the
swap needs nothing else: attention infers its local head count from the projection's output size,
and the cache's ``attend`` pairs query and KV heads by position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ShardwiseError
from ...kv_cache import KVCache
from .config import LlamaConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies for rotary embeddings, including the rope scaling types we support."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ShardwiseError(f"rope scaling type {kind!r} is not supported (default, linear, llama3 are)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
        self.layer_idx = layer_idx
        self.head_dim = hd
        self.q_proj = nn.Linear(config.hidden_size, h * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(h * hd, config.hidden_size, bias=config.o_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache, start: int) -> torch.Tensor:
        b, t, _ = x.shape
        if "qkv_proj" in self._modules:  # fused at load (shardwise.fusion): one matmul, split after
            q, k, v = self.qkv_proj(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = cache.attend(self.layer_idx, q, k, v, mask, start)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ShardwiseError(f"activation {config.hidden_act!r} is not supported (silu is)")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "gate_up_proj" in self._modules:  # fused at load (shardwise.fusion)
            gate, up = self.gate_up_proj(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    output_kind = "logits"

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def prepare(self, max_len: int, device: torch.device | str = "cpu") -> None:
        """Cos/sin tables for positions ``0..max_len-1``, float32 (cast per use, as HF does).

        Built for the lengths a generation needs, not ``max_position_embeddings`` (128K positions of
        a 405B model's head size would be a 134 MB table per rank).
        """
        if self.rope_cos is not None and self.rope_cos.shape[0] >= max_len:
            return
        inv_freq = rope_inv_freq(self.config).to(device)
        freqs = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache,
        start: int,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Logits for ``input_ids`` written at cache slots ``start..``; only the last position's if asked."""
        x = self.model.embed_tokens(input_ids)
        cos = self.rope_cos[position_ids].unsqueeze(1).to(x.dtype)
        sin = self.rope_sin[position_ids].unsqueeze(1).to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, start)
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)
