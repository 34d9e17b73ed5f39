"""KV-cache rows for requests that come and go: the storage of continuous batching.

The engine holds ``rows`` cache rows per rank, each owned by at most one request. A request's prompt
is prefilled into its row alone (``row``); then every step decodes one token for each running request
(``decode``), each at its own position. Rows of different lengths are attended one at a time, each
over exactly its own keys: masked attention over a common, longer key range gives results that differ
in the last bits with the range's length (the CPU kernels' reductions depend on it), so a request's
tokens would depend on what it happens to be batched with. Per-row attention makes them exactly the
tokens it gets alone, at the price of one attention call per row and layer (small next to the
matmuls, which do run batched).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ShardwiseError


class SlotCache:
    """``rows`` x ``max_len`` positions of keys and values for every layer, allocated on first write."""

    def __init__(self, num_layers: int, rows: int, max_len: int, window: int | None = None):
        self.rows, self.max_len, self.window = rows, max_len, window
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def _storage(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            _, heads, _, dim = like.shape
            self.k[layer] = like.new_zeros(self.rows, heads, self.max_len, dim)
            self.v[layer] = like.new_zeros(self.rows, heads, self.max_len, dim)
        return self.k[layer], self.v[layer]

    def row(self, slot: int) -> _RowView:
        """The cache of one request's prefill: a batch of one, written from position 0."""
        return _RowView(self, slot)

    def decode(self, slots: list[int], positions: list[int], batch: int) -> _DecodeView:
        """The cache of one decode step: row ``j < len(slots)`` of the batch is request row ``slots[j]``
        writing its token at ``positions[j]``; rows past them are padding (their output is zero)."""
        if any(p >= self.max_len for p in positions):
            raise ShardwiseError(f"a request reached the end of its KV-cache row ({self.max_len} positions)")
        return _DecodeView(self, slots, positions, batch)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class _RowView:
    def __init__(self, cache: SlotCache, slot: int):
        self.cache, self.slot = cache, slot

    def attend(self, layer, q, k, v, mask, start: int) -> torch.Tensor:
        ck, cv = self.cache._storage(layer, k)
        end = start + k.shape[2]
        if end > self.cache.max_len:
            raise ShardwiseError(f"sequence length {end} exceeds the KV cache of {self.cache.max_len} positions")
        row_k, row_v = ck[self.slot:self.slot + 1], cv[self.slot:self.slot + 1]
        row_k[:, :, start:end] = k
        row_v[:, :, start:end] = v
        return F.scaled_dot_product_attention(q, row_k[:, :, :end], row_v[:, :, :end], attn_mask=mask,
                                              enable_gqa=q.shape[1] != k.shape[1])


class _DecodeView:
    def __init__(self, cache: SlotCache, slots: list[int], positions: list[int], batch: int):
        self.cache, self.slots, self.positions, self.batch = cache, slots, positions, batch
        self._slot_index = torch.tensor(slots, dtype=torch.long)
        self._pos_index = torch.tensor(positions, dtype=torch.long)

    def attend(self, layer, q, k, v, mask, start) -> torch.Tensor:
        ck, cv = self.cache._storage(layer, k)
        real = len(self.slots)
        index = (self._slot_index.to(k.device), slice(None), self._pos_index.to(k.device))
        ck[index] = k[:real, :, 0]
        cv[index] = v[:real, :, 0]
        out = q.new_zeros(q.shape)
        window = self.cache.window
        gqa = q.shape[1] != k.shape[1]
        for j, (slot, pos) in enumerate(zip(self.slots, self.positions)):
            first = 0 if window is None else max(0, pos - window + 1)
            out[j:j + 1] = F.scaled_dot_product_attention(
                q[j:j + 1], ck[slot:slot + 1, :, first:pos + 1], cv[slot:slot + 1, :, first:pos + 1], enable_gqa=gqa)
        return out
