"""Autobucketing (NxD's ``bucket_config``): a few static input shapes, and a kernel that pads into them.

Each bucket is one static shape (batch x sequence), so a compiled forward (``compile=True``) is built
once per bucket and reused, and inputs of any length up to the largest bucket run without the caller
padding them. The default *bucket kernel* right-pads every ``[batch, seq, ...]`` tensor input with
zeros along the sequence (an ``attention_mask`` therefore gains zeros: the padding is masked out) and
fills extra batch rows with copies of the last real row (every row stays a valid input, and no fully
masked row can produce NaNs); when no attention mask is given (by name, or as HF's second positional
argument) it adds one of ones first, so the padding is masked. Outputs are cut back to the real batch
and, for outputs of three or more dimensions, the real sequence length.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ShardwiseError

Kernel = Callable[[tuple, dict, int, int], tuple[tuple, dict]]


def _sizes(values: Sequence[int] | None, what: str) -> tuple[int, ...] | None:
    if values is None:
        return None
    try:
        sizes = tuple(sorted({int(v) for v in values}))
    except (TypeError, ValueError):
        raise ShardwiseError(f"{what} buckets must be positive integers, got {values!r}") from None
    if not sizes or sizes[0] < 1 or any(isinstance(v, bool) or int(v) != v for v in values):
        raise ShardwiseError(f"{what} buckets must be positive integers, got {values!r}")
    return sizes


def _pad_dim(x: torch.Tensor, dim: int, size: int, repeat_last: bool) -> torch.Tensor:
    extra = size - x.shape[dim]
    if extra <= 0:
        return x
    if repeat_last:
        fill = x.narrow(dim, x.shape[dim] - 1, 1).expand(*[extra if d == dim else -1 for d in range(x.dim())])
    else:
        shape = list(x.shape)
        shape[dim] = extra
        fill = x.new_zeros(shape)
    return torch.cat([x, fill], dim=dim)


def default_kernel(args: tuple, kwargs: dict, batch: int, seq: int) -> tuple[tuple, dict]:
    """Right-pad ``[batch, seq, ...]`` tensors with zeros to ``seq``; add rows (copies of the last) up to ``batch``."""
    first = next(x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.dim() >= 2)
    real_batch, real_seq = first.shape[:2]
    if "attention_mask" not in kwargs and len(args) < 2:
        kwargs = {**kwargs, "attention_mask": torch.ones(real_batch, real_seq, dtype=torch.long)}

    def pad(x):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != real_batch:
            return x
        if x.dim() >= 2 and x.shape[1] == real_seq:
            x = _pad_dim(x, 1, seq, repeat_last=False)
        return _pad_dim(x, 0, batch, repeat_last=True)

    return tuple(pad(a) for a in args), {k: pad(v) for k, v in kwargs.items()}


def _unpad(out, batch: int, seq: int, bucket_batch: int, bucket_seq: int):
    if isinstance(out, torch.Tensor):
        if out.dim() >= 1 and out.shape[0] == bucket_batch:
            out = out[:batch]
            if out.dim() >= 3 and out.shape[1] == bucket_seq:
                out = out[:, :seq]
        return out
    if isinstance(out, dict):  # HF ModelOutput is a dict too: rebuild the same type
        items = {k: _unpad(v, batch, seq, bucket_batch, bucket_seq) for k, v in out.items()}
        try:
            return type(out)(**items)
        except TypeError:
            return type(out)(items)
    if isinstance(out, (tuple, list)):
        return type(out)(_unpad(v, batch, seq, bucket_batch, bucket_seq) for v in out)
    return out


@dataclass(frozen=True)
class Buckets:
    """Bucket sizes on the sequence dimension (``seq``) and optionally the batch (``batch``).

    ``kernel(args, kwargs, batch, seq) -> (args, kwargs)`` pads one call's inputs into a bucket
    (default: ``default_kernel``). Without batch buckets the batch is left as it comes.
    """

    seq: tuple[int, ...]
    batch: tuple[int, ...] | None = None
    kernel: Kernel | None = None

    def __init__(self, seq: Sequence[int], batch: Sequence[int] | None = None, kernel: Kernel | None = None):
        object.__setattr__(self, "seq", _sizes(seq, "sequence"))
        object.__setattr__(self, "batch", _sizes(batch, "batch"))
        if kernel is not None and not callable(kernel):
            raise ShardwiseError("a bucket kernel must be a function (args, kwargs, batch, seq) -> (args, kwargs)")
        object.__setattr__(self, "kernel", kernel)

    def pick(self, batch: int, seq: int) -> tuple[int, int]:
        """The smallest bucket that holds a ``batch x seq`` input; one line if none does."""
        i = bisect.bisect_left(self.seq, seq)
        if i == len(self.seq):
            raise ShardwiseError(f"an input of sequence length {seq} exceeds the largest bucket ({self.seq[-1]})")
        if self.batch is None:
            return batch, self.seq[i]
        j = bisect.bisect_left(self.batch, batch)
        if j == len(self.batch):
            raise ShardwiseError(f"a batch of {batch} exceeds the largest batch bucket ({self.batch[-1]})")
        return self.batch[j], self.seq[i]

    def pad(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, Callable]:
        """Inputs padded into their bucket, and the function that cuts an output back to the real shape."""
        first = next((x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.dim() >= 2), None)
        if first is None:
            raise ShardwiseError("bucketing needs a [batch, sequence] tensor input (e.g. input_ids)")
        batch, seq = first.shape[:2]
        bucket_batch, bucket_seq = self.pick(batch, seq)
        new_args, new_kwargs = (self.kernel or default_kernel)(tuple(args), dict(kwargs), bucket_batch, bucket_seq)
        return tuple(new_args), dict(new_kwargs), lambda out: _unpad(out, batch, seq, bucket_batch, bucket_seq)

    def to_json(self) -> dict:
        return {"seq": list(self.seq), "batch": list(self.batch) if self.batch else None}
