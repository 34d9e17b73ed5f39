"""The KV cache every family's attention writes into: preallocated, several tokens a step, rolled back.

Decoding writes one token per step, prefill a whole prompt, and speculative decoding a draft of K
tokens at once, some of which the target then rejects; so ``update`` takes any number of new positions
at an explicit slot, and ``rollback`` forgets every position from a given slot on (the next ``update``
overwrites them). Nothing is ever reallocated after the first write of a layer.

Attention itself goes through the cache (``attend``), as vLLM's attention backends own their KV
storage: a cache whose rows belong to different requests (``engine.slots.SlotCache``) attends each row
over its own keys, so a request's output does not depend on what it is batched with, while model code
stays one line and free of any such concern.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ShardwiseError


class KVCache:
    """Keys and values of every layer, ``[batch, kv_heads, max_len, head_dim]`` each, allocated on first use."""

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        # Bucketed decode (decode_buckets.py): attend over this many slots even when fewer are written, so
        # every step of a bucket has one static KV length; the caller masks the slots not written yet.
        self.attend_to: int | None = None
        self.length = 0  # slots 0..length-1 hold keys and values that later queries may attend to
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               start: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (``[batch, heads, new, head_dim]``) at slots ``start..``; the keys and values of
        slots ``0..start+new-1`` to attend over.

        ``start`` may be a one-element tensor (a compiled decode step, ``compiled_decode.py``): a Python int
        would be baked into the graph, one compilation per slot. Then the write is an ``index_copy_``, the
        view is the bucket (``attend_to``), and the caller checks the slot and advances ``length``.
        """
        if isinstance(start, torch.Tensor):
            slots = start + torch.arange(k.shape[2], device=start.device)
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return self.k[layer][:, :, :self.attend_to], self.v[layer][:, :, :self.attend_to]
        if start > self.length:
            raise ShardwiseError(f"KV cache write at slot {start} leaves a gap after slot {self.length - 1}")
        if self.k[layer] is None:
            b, h, _, d = k.shape
            self.k[layer] = k.new_zeros(b, h, self.max_len, d)
            self.v[layer] = v.new_zeros(b, h, self.max_len, d)
        end = start + k.shape[2]
        if end > self.max_len:
            raise ShardwiseError(f"sequence length {end} exceeds the KV cache of {self.max_len} positions")
        ck, cv = self.k[layer], self.v[layer]
        ck[:, :, start:end] = k
        cv[:, :, start:end] = v
        if layer == len(self.k) - 1:  # the last layer has written: these slots are now whole
            self.length = end
        view = max(end, min(self.attend_to or 0, self.max_len))
        return ck[:, :, :view], cv[:, :, :view]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               start: int | torch.Tensor) -> torch.Tensor:
        """Write ``k``/``v`` at slots ``start..`` and attend ``q`` (``[batch, heads, new, head_dim]``) over
        every slot up to them under ``mask``; query and KV heads are paired by position (GQA)."""
        k, v = self.update(layer, k, v, start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def rollback(self, length: int) -> None:
        """Forget slots ``length..``: e.g. the draft tokens a speculative step did not accept."""
        if not 0 <= length <= self.length:
            raise ShardwiseError(f"cannot roll the KV cache back to {length}: it holds {self.length} positions")
        self.length = length

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
