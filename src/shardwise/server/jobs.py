"""A validated request body turned into what the engine takes: prompt ids, ``Sampling``, a token limit.

Everything a client can get wrong is refused here, as a 400 naming the field, before anything reaches
the engine: OpenAI features we do not implement (``n > 1``, logprobs, penalties, tools) are refused
rather than silently ignored, since a client relying on them would get different output without
knowing. Tokenization happens here too; callers run this in a worker thread, as a long prompt takes
milliseconds of CPU that the event loop (streaming other requests) should not wait for.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from ..errors import ShardwiseError
from ..generation import Sampling
from ..untrusted import one_line
from .errors import APIError
from .schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOP_STRINGS = 4  # OpenAI's limit


@dataclass(frozen=True)
class Job:
    """One generation request, ready to submit."""

    prompt_ids: list[int]
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False


def check_model(requested: str | None, names: tuple[str, ...]) -> None:
    """Refuse a model this server does not serve (404, as OpenAI answers)."""
    if requested is not None and requested not in names:
        raise APIError(404, f"The model {requested!r} does not exist; this server serves {names[0]!r}",
                       param="model", code="model_not_found")


def completion_job(req: CompletionRequest, engine: Any) -> Job:
    _refuse_unsupported(req)
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if req.best_of not in (None, 1):
        raise APIError(400, "only best_of=1 is supported", param="best_of")
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.logprobs is not None:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    ids = _prompt_ids(req.prompt, engine)
    max_tokens = DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens
    return _job(req, engine, ids, max_tokens, "max_tokens", "prompt")


def chat_job(req: ChatCompletionRequest, engine: Any) -> Job:
    _refuse_unsupported(req)
    if req.logprobs or req.top_logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if req.tools:
        raise APIError(400, "tools are not supported", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
    ids = _chat_ids(req, engine)
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:  # OpenAI's chat default: as much as the context has room for
        max_tokens = max(1, engine.seq_len - len(ids))
    return _job(req, engine, ids, max_tokens, limit_param, "messages")


def _refuse_unsupported(req: GenerationRequest) -> None:
    if req.n not in (None, 1):
        raise APIError(400, f"only n=1 is supported, got n={req.n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported (use 0)", param=name)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")


def _job(req: GenerationRequest, engine: Any, ids: list[int], max_tokens: int, limit_param: str,
         prompt_param: str) -> Job:
    if not ids:
        raise APIError(400, f"{prompt_param} is empty: it must have at least one token", param=prompt_param)
    if max_tokens < 1:
        raise APIError(400, f"{limit_param} must be at least 1, got {max_tokens}", param=limit_param)
    if len(ids) + max_tokens > engine.seq_len:
        where = "messages" if prompt_param == "messages" else "prompt"
        raise APIError(400, f"This model's maximum context length is {engine.seq_len} tokens. However, you "
                            f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the {where}, {max_tokens} "
                            f"in the completion). Please reduce the length of the {where} or completion.",
                       param=prompt_param, code="context_length_exceeded")
    try:
        engine.check_request(ids, max_tokens)
    except ShardwiseError as exc:
        raise APIError(400, one_line(exc), param=prompt_param) from None
    stream = bool(req.stream)
    return Job(ids, sampling(req), max_tokens, _stop_strings(req.stop), stream,
               bool(stream and req.stream_options and req.stream_options.include_usage), bool(req.ignore_eos))


def sampling(req: GenerationRequest) -> Sampling:
    """OpenAI's knobs as ``Sampling``. ``top_k=0`` means no top-k filter: ``sample()`` filters only when
    ``top_k > 1`` and is greedy only when ``top_k == 1`` (or ``temperature == 0``), so 0 is handled."""
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    if not 0.0 <= temperature <= 2.0:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", param="temperature")
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, f"top_p must be above 0 and at most 1, got {top_p}", param="top_p")
    if top_k < 0:
        raise APIError(400, f"top_k must be -1 or 0 (no top-k), or at least 1, got {top_k}", param="top_k")
    # Any int64 (or larger) is a valid OpenAI seed; fold it into the generator's range. No seed: a fresh one.
    seed = secrets.randbits(63) if req.seed is None else req.seed % (1 << 63)
    if temperature == 0 or top_k == 1:
        return Sampling(top_k=1, seed=seed)  # greedy: the canonical form, whatever top_p said
    return Sampling(top_k=top_k, top_p=top_p, temperature=temperature, seed=seed)


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if len(strings) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(strings)}",
                       param="stop")
    return tuple(s for s in strings if s)


def _prompt_ids(prompt: Any, engine: Any) -> list[int]:
    """A string, a list of one string, a list of token ids, or a list of one such list."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return [int(i) for i in engine.tokenizer(prompt)["input_ids"]]
    if isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        vocab = len(engine.tokenizer)
        bad = next((i for i in prompt if not 0 <= i < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, f"only one prompt per request is supported, got {len(prompt)}", param="prompt")
    if prompt is None:
        raise APIError(400, "missing required field 'prompt'", param="prompt")
    raise APIError(400, "prompt must be a string, a list of one string, or a list of token ids", param="prompt")


def _chat_ids(req: ChatCompletionRequest, engine: Any) -> list[int]:
    tokenizer = engine.tokenizer
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    messages = []
    for i, message in enumerate(req.messages):
        turn = message.model_dump(exclude_none=True)
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}]: only text content parts are supported, got {part.type!r}",
                                   param="messages")
                texts.append(part.text)
            content = "\n".join(texts)
        turn["content"] = content or ""
        messages.append(turn)
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # noqa: BLE001 - templates are jinja code from the checkpoint; they raise anything
        raise APIError(400, f"messages: the chat template refused them ({one_line(exc)})", param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(i) for i in ids]
