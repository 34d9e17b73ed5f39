"""Turn prompt strings into token ids with the checkpoint's own tokenizer (and chat template)."""

from __future__ import annotations

from pathlib import Path

from .errors import ShardwiseError


def load_tokenizer(model_path: str | Path):
    from transformers import AutoTokenizer  # imported here: seconds of start-up the ranks never pay

    try:
        return AutoTokenizer.from_pretrained(str(model_path))
    except Exception as exc:  # noqa: BLE001 - tokenizer files are untrusted input; their parsers raise many types
        raise ShardwiseError(f"cannot load a tokenizer from {str(model_path)!r}: {str(exc).splitlines()[0]}") from None


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool = True) -> list[list[int]]:
    """Token ids per prompt; with a chat template, each prompt is one user turn awaiting the reply."""
    use_chat = chat_template and getattr(tokenizer, "chat_template", None)
    encoded = []
    for text in prompts:
        if use_chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        encoded.append([int(i) for i in ids])
    return encoded
