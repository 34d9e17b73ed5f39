"""Does a checkpoint hold what its ``config.json`` says? And its layout on a mesh, from headers alone.

A config whose sizes disagree with the weights would otherwise surface inside a rank, as a
``load_state_dict`` size mismatch that names neither the file nor the numbers, or worse as a layout
computed from the wrong head count. Here every tensor the model needs is looked up with the shape the
config implies, and tensors the model does not use are named (and left out of the layout) instead of
being loaded and silently dropped.

``conform`` is torch-free on purpose: the capacity estimate calls it for bare ``config.json`` files on machines
without weights. ``model_layout`` is the one way a checkpoint directory becomes a layout (parent, ranks,
pre-sharding and benchmarks alike), so every path checks the config against the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ModelConfig, load_config
from .errors import ShardwiseError
from .families import family
from .layout import Layout, check_mesh, compute_layout
from .mesh import Mesh
from .plan import Plan, resolve_plan

if TYPE_CHECKING:
    from .checkpoint import CheckpointSource

log = logging.getLogger("shardwise")
Shapes = Mapping[str, tuple[tuple[int, ...], str]]


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def conform(found: Shapes, config: ModelConfig, where: str = "the checkpoint",
            files: Mapping[str, str] | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """The checkpoint tensors the model uses, after checking each against the shape the config implies.

    ``found`` maps checkpoint tensor names to (shape, dtype); ``files`` optionally names the file each
    tensor is in, for the message. Raises ``ShardwiseError`` naming the first tensor that is missing or
    whose shape disagrees (with both shapes); logs the tensors the model does not use and leaves them out.
    A tied checkpoint that stores ``lm_head.weight`` anyway keeps it, if its shape is right.
    """
    expected = {n: s for n, (s, _) in family(config.family).state_dict_shapes(config, "F32").items()}
    for param, src in config.tied_sources.items():
        if param in found:  # stored although tied: harmless when it has the right shape
            expected[param] = expected[src]
    wrong = [n for n in expected if n in found and tuple(found[n][0]) != expected[n]]
    if wrong:
        name = wrong[0]
        in_file = f" in {files[name]}" if files and name in files else ""
        more = f" ({len(wrong) - 1} more tensor(s) disagree too)" if len(wrong) > 1 else ""
        raise ShardwiseError(
            f"{name}: config.json implies shape {_fmt(expected[name])} ({_why(name, config)}) but {where} holds "
            f"{_fmt(tuple(found[name][0]))}{in_file}{more}")
    missing = [n for n in expected if n not in found]
    if missing:
        raise ShardwiseError(f"{where} lacks {len(missing)} tensor(s) that config.json implies "
                             f"({config.architecture}, {config.num_layers} layers), e.g. {missing[0]} "
                             f"of shape {_fmt(expected[missing[0]])}")
    unused = sorted(n for n in found if n not in expected)
    if unused:
        log.warning("%d tensor(s) in %s are not used by %s and are not loaded: %s", len(unused), where,
                    config.architecture, ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else ""))
    return {n: (tuple(found[n][0]), found[n][1]) for n in found if n in expected}


def _why(name: str, config: ModelConfig) -> str:
    """The config fields a tensor's shape comes from, so the user knows which number to check."""
    if "q_proj" in name or "o_proj" in name:
        return (f"num_attention_heads {config.num_heads} x head_dim {config.head_dim}, "
                f"hidden_size {config.hidden_size}")
    if "k_proj" in name or "v_proj" in name:
        return (f"num_key_value_heads {config.num_kv_heads} x head_dim {config.head_dim}, "
                f"hidden_size {config.hidden_size}")
    if "mlp" in name:
        return f"intermediate_size {config.intermediate_size}, hidden_size {config.hidden_size}"
    if "embed_tokens" in name or "lm_head" in name:
        return f"vocab_size {config.vocab_size}, hidden_size {config.hidden_size}"
    return f"hidden_size {config.hidden_size}"


def model_layout(model_path: str | Path, tp_degree: int | None = None, plan: Plan | None = None,
                 config: ModelConfig | None = None, source: CheckpointSource | None = None,
                 mesh: Mesh | None = None) -> Layout:
    """The layout for a checkpoint on a mesh: headers and config only, no weights read.

    The mesh is ``mesh`` if given, else the plan's (``tp_degree`` sizing its ``tensor`` axis). Tensors
    the model does not use are left out (and named once); a config that disagrees with the weights is
    refused here.
    """
    from .checkpoint import CheckpointSource  # imports torch: only when there are headers to read

    config = config or load_config(model_path)
    source = source or CheckpointSource(model_path)
    plan = plan or resolve_plan(config.family)
    mesh = mesh or plan.mesh(tp_degree)
    check_mesh(config, mesh)
    files = {n: t.file.name for n, t in source.tensors.items()}
    return compute_layout(conform(source.shapes(), config, str(source.path), files), config, plan, mesh)
