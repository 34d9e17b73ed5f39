"""The one dtype table: user-facing names, safetensors codes, torch dtypes and sizes.

Torch-free at import (torch is imported on the first call that returns a ``torch.dtype``): the capacity estimate
and config reading use the names and sizes on machines that only plan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ShardwiseError

if TYPE_CHECKING:
    import torch

# (name as torch spells it, other names a user may write, safetensors code, bytes per element)
_TABLE = (
    ("float64", ("fp64", "double"), "F64", 8),
    ("float32", ("fp32", "float"), "F32", 4),
    ("float16", ("fp16", "half"), "F16", 2),
    ("bfloat16", ("bf16",), "BF16", 2),
    ("int64", (), "I64", 8),
    ("int32", (), "I32", 4),
    ("int16", (), "I16", 2),
    ("int8", (), "I8", 1),
    ("uint8", (), "U8", 1),
    ("bool", (), "BOOL", 1),
)
# Dtypes weights may be loaded or pre-sharded as (`--torch-dtype`).
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")

_CANONICAL = {alias: name for name, aliases, _, _ in _TABLE for alias in (name, *aliases)}
SAFETENSORS_CODES = {code: name for name, _, code, _ in _TABLE}  # "BF16" -> "bfloat16"
_CODE_OF = {name: code for name, _, code, _ in _TABLE}
_SIZE = {name: size for name, _, _, size in _TABLE}


def canonical(name: str) -> str:
    """``"bf16"`` -> ``"bfloat16"``; a safetensors code (``"BF16"``) works too."""
    if name in SAFETENSORS_CODES:
        return SAFETENSORS_CODES[name]
    if name not in _CANONICAL:
        raise ShardwiseError(f"unknown dtype {name!r}")
    return _CANONICAL[name]


def itemsize(name: str) -> int:
    return _SIZE[canonical(name)]


def safetensors_code(dtype: str | torch.dtype) -> str:
    return _CODE_OF[name_of(dtype)]


def name_of(dtype: str | torch.dtype) -> str:
    """The canonical name of a torch dtype or of any name in the table: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return canonical(dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."))


def to_torch(name: str | torch.dtype) -> torch.dtype:
    import torch

    return name if isinstance(name, torch.dtype) else getattr(torch, canonical(name))


def weight_dtype(name: str, config) -> str:
    """The canonical name of the dtype weights load as: ``--torch-dtype`` (``auto`` = the config's)."""
    chosen = config.torch_dtype if name == "auto" else name
    if _CANONICAL.get(chosen) not in WEIGHT_DTYPES:
        allowed = [a for a, n in _CANONICAL.items() if n in WEIGHT_DTYPES]
        what = f"config.json's torch_dtype {chosen!r}" if name == "auto" else f"--torch-dtype {chosen!r}"
        raise ShardwiseError(f"{what} is not one of auto, {', '.join(allowed)}")
    return _CANONICAL[chosen]


def resolve_dtype(name: str | torch.dtype, config) -> torch.dtype:
    """The torch dtype weights load as (see ``weight_dtype``); a torch dtype passes through."""
    return name if not isinstance(name, str) else to_torch(weight_dtype(name, config))
