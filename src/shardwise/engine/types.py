"""What goes in and out of a resident engine: its options, per-token events, finished completions.

These are the engine's whole public vocabulary, kept apart from the machinery so a server (or any
other front end) can be written against them alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ShardwiseError


class EngineBusy(ShardwiseError):
    """The request queue is full: try again later (HTTP 429)."""


class EngineClosed(ShardwiseError):
    """The engine was closed, or its ranks died; the message says which."""


@dataclass
class EngineOptions:
    """How to load and run the model: the model and sharding options of ``RunOptions``, plus batching limits.

    ``model_path`` None means the bundled SmolLM2-135M-Instruct. ``max_batch_size`` is how many
    requests decode together (KV-cache rows per rank); ``max_queue`` how many more may wait for a row
    before ``submit`` raises ``EngineBusy``; ``seq_len`` the longest prompt + completion.
    ``batch_invariant`` pads decode batches to the row count from which the matmul kernels give each
    row the same bits whatever the batch (``steps.batch_invariant_rows``): greedy outputs are then
    identical to each request run alone. It costs a lone float32 request on CPU about 1.5x per token;
    turn it off for speed when last-bit agreement does not matter.
    """

    model_path: str | None = None
    tp_degree: int | None = None
    torch_dtype: str = "auto"
    seq_len: int = 2048
    max_batch_size: int = 16
    max_queue: int = 256
    device: str = "cpu"
    sharding_config: str | None = None
    overrides: list[str] = field(default_factory=list)
    sequence_parallel: bool = False
    mesh: str | None = None  # --mesh fsdp=2,tensor=2 (see RunOptions)
    partition_config: str | None = None
    partition: str | None = None
    compiled_model_path: str | None = None
    skip_sharding: bool = False
    verify: str = "auto"
    progress: bool = False
    pad_token_id: int | None = None
    batch_invariant: bool = True  # pad decode batches so each request's tokens are exactly those it gets alone
    fused_qkv: bool = False  # NxD's --fused-qkv: each rank's q/k/v slices one weight, one matmul (fusion.py)
    fused_gate_up: bool = False  # NxD's --mlp-kernel-enabled: each rank's gate/up slices one weight


@dataclass(frozen=True)
class TokenEvent:
    """One step of one request, as the engine reports it (from its reader thread).

    ``token`` is the new token id, or None on an event that only ends the request. ``finish_reason``
    is set on the request's last event: ``"stop"`` (an end-of-sequence token, included as ``token``),
    ``"length"`` (``max_tokens`` or the context is used up), ``"cancelled"``, or ``"error"`` (then
    ``error`` says why).
    """

    request_id: int
    token: int | None
    finish_reason: str | None = None
    error: str | None = None
    rank_seconds: float | None = None  # on the last event: the request's time inside rank 0, submit to finish


@dataclass
class Completion:
    """A finished request: its new tokens (EOS included when it stopped on one) and their text."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    first_token_seconds: float  # from submit to the first token
    seconds: float  # from submit to the last
    rank_seconds: float | None = None  # the same, measured inside rank 0: the rest is the cost of calling


@dataclass
class SwapReport:
    """A finished weight swap: where the weights came from and how long each part took."""

    model_path: str
    seconds: float
    bytes_read: int
