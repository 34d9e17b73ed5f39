"""The model protocol the runtime is typed against: what generation, loading and the capacity estimate may assume.

Every family's single-device model follows it, so strategies (plain decoding, speculative decoding,
bucketed or compiled shapes) and encoders plug in without branches on the family:

* ``forward(input_ids, position_ids, mask, cache, start)`` runs ``[batch, new]`` tokens written at KV
  slots ``start..start+new-1`` (one token when decoding, a prompt, or a draft of several), attending
  under ``mask`` (``[batch, 1, new, start+new]``, True = may attend);
* the cache is a ``KVCache`` (or the engine's ``SlotCache`` row and batch views): attention goes through
  ``cache.attend(layer, q, k, v, mask, start)``, which writes the new keys and values and attends over
  them; several new tokens a step, ``rollback`` to any earlier slot;
* ``output_kind`` says what ``forward`` returns: ``"logits"`` (``[batch, new or 1, vocab]``) or
  ``"hidden_states"`` (encoders);
* ``prepare(max_len, device)`` builds whatever position tables a generation of ``max_len`` needs.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .config import ModelConfig
from .kv_cache import KVCache


@runtime_checkable
class Model(Protocol):
    config: ModelConfig
    output_kind: str

    def prepare(self, max_len: int, device: torch.device | str = "cpu") -> None: ...

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: KVCache,
                 start: int, last_only: bool = True) -> torch.Tensor: ...
