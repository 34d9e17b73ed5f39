"""Bucketing for decoders (NxD Inference's ``--enable-bucketing``, ``--context-encoding-buckets``,
``--token-generation-buckets``): prefill and decode run on a few static shapes.

A prompt batch is left-padded to the smallest *context-encoding* bucket that holds its longest prompt
(the padding is masked, as for any shorter prompt in a batch), and each decode step attends over the
smallest *token-generation* bucket of KV-cache slots that holds every token so far (slots past the
current one are masked). So each phase sees one of a few shapes, which compiled or graph-captured
kernels need, and the tokens are the same as without bucketing. Default buckets, as NxD's: powers of
two from 128 up to ``--max-context-length`` (prefill) and ``--seq-len`` (decode), the limit included.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ShardwiseError


def default_buckets(limit: int, start: int = 128) -> tuple[int, ...]:
    sizes, n = [], start
    while n < limit:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (limit,)


def _checked(values: Sequence[int], flag: str) -> tuple[int, ...]:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ShardwiseError(f"{flag} takes positive token counts, got {list(values)!r}")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class DecodeBuckets:
    context: tuple[int, ...]  # prompt lengths (prefill)
    kv: tuple[int, ...]  # KV-cache lengths (decode)

    @classmethod
    def resolve(cls, context: Sequence[int] | None, kv: Sequence[int] | None, max_context_length: int,
                seq_len: int) -> DecodeBuckets:
        ctx = _checked(context, "--context-encoding-buckets") if context else default_buckets(max_context_length)
        tg = _checked(kv, "--token-generation-buckets") if kv else default_buckets(seq_len)
        return cls(ctx, tg)

    def context_length(self, longest: int) -> int:
        """The prefill length for a batch whose longest prompt is ``longest``: its context-encoding bucket,
        or the prompt's own length when that bucket would fill the largest token-generation bucket (as
        NxD's own tutorial configures, 2048 and 2048 with --seq-len 2048: padding there would leave
        nothing to generate, so that bucket is not used)."""
        i = bisect.bisect_left(self.context, longest)
        if i == len(self.context):
            raise ShardwiseError(f"a prompt of {longest} tokens exceeds the largest context-encoding bucket "
                                 f"({self.context[-1]})")
        return self.context[i] if self.context[i] < self.kv[-1] else longest

    def kv_length(self, slots: int) -> int:
        i = bisect.bisect_left(self.kv, slots)
        if i == len(self.kv):
            raise ShardwiseError(f"{slots} tokens exceed the largest token-generation bucket ({self.kv[-1]})")
        return self.kv[i]

    def room(self, longest: int) -> int:
        """How many tokens can be generated after a batch whose longest prompt is ``longest``."""
        return self.kv[-1] - self.context_length(longest)
