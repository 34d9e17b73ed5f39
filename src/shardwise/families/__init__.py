"""Model families: one folder each, found through one registry.

A family folder (``families/<name>/``) holds everything shardwise knows about one kind of model:

* ``__init__.py`` defines ``FAMILY``: the HF architectures and ``model_type`` names it reads, how its
  ``config.json`` becomes a ``ModelConfig``, and the checkpoint tensors (HF names, shapes) a config
  implies;
* ``model.py``: the single-device model, HF parameter names, no parallelism (it follows the runtime's
  model protocol, ``shardwise.protocol``);
* ``plan.yaml``: the built-in sharding plan and the family knowledge the layout needs (head units,
  which splits the model can consume, groups, the output module).

The layout, the loader, the capacity estimate and generation ask the family and never name a model, so adding
a family is a new folder plus its name in ``BUILT_IN`` (or ``register`` for one defined elsewhere).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..errors import ShardwiseError

# The registry: folder names under families/, each exporting FAMILY.
BUILT_IN = ("llama", "bert")

Shapes = dict[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class Family:
    """One model family, as data and a few functions (see the module docstring)."""

    name: str
    architectures: tuple[str, ...]  # HF `architectures` entries this family reads
    read_config: Callable[[dict[str, Any], str], Any]  # (raw config.json, architecture) -> ModelConfig
    state_dict_shapes: Callable[[Any, str], Shapes]  # (config, safetensors dtype) -> checkpoint tensors
    model: str  # "module:Class" of the single-device model, imported only when a model is built
    model_types: Mapping[str, str] = field(default_factory=dict)  # `model_type` -> architecture, for configs
    # without `architectures` (e.g. converted from GGUF)
    tied: Mapping[str, str] = field(default_factory=dict)  # parameter -> tensor it reuses when embeddings are tied
    output_kind: str = "logits"  # what the model's forward returns: logits, or hidden states (encoders)
    plan_text: Callable[[], str] | None = None  # the built-in plan; default: plan.yaml beside the family
    # Where the capacity estimate finds what it sizes (`*` = a layer index): layer, q, k, v, mlp_in
    # (a column-parallel MLP weight), embedding (module), output (the logits weight).
    roles: Mapping[str, str] = field(default_factory=dict)
    # (config, checkpoint tensor names) -> {fused tensor: [(parameter, rows), ...]}: checkpoints that stack
    # several parameters in one tensor (Phi-3's qkv_proj, gate_up_proj); each part is laid out as itself.
    fused_parts: Callable[[Any, list[str]], dict[str, list[tuple[str, int]]]] | None = None

    def tied_sources(self, config: Any) -> dict[str, str]:
        """Parameters with no tensor of their own in the checkpoint, and the tensor each reuses."""
        return dict(self.tied) if config.tie_word_embeddings else {}

    def build(self, config: Any):
        """The single-device model for ``config`` (on the current default device; the caller picks meta)."""
        module, _, cls = self.model.partition(":")
        return getattr(importlib.import_module(module), cls)(config)

    def role(self, role: str, layer: int = 0) -> str:
        """The tensor or module name that plays ``role`` (in layer ``layer``), e.g. ``q`` -> a q projection."""
        if role not in self.roles:
            raise ShardwiseError(f"the {self.name} family names no {role!r} tensor")
        return self.roles[role].replace("*", str(layer))

    def builtin_plan_text(self) -> str:
        if self.plan_text is not None:
            return self.plan_text()
        return resources.files(f"{__name__}.{self.name}").joinpath("plan.yaml").read_text()


_REGISTERED: dict[str, Family] = {}


def register(fam: Family) -> Family:
    """Make a family known (built-in families register on first use; others call this)."""
    _REGISTERED[fam.name] = fam
    return fam


def _all() -> dict[str, Family]:
    for name in BUILT_IN:
        if name not in _REGISTERED:
            register(importlib.import_module(f"{__name__}.{name}").FAMILY)
    return _REGISTERED


def family(name: str) -> Family:
    """The family called ``name``."""
    families = _all()
    if name not in families:
        raise ShardwiseError(f"unknown model family {name!r}; known: {', '.join(sorted(families))}")
    return families[name]


def state_dict_shapes(config: Any, dtype: str = "BF16") -> Shapes:
    """The checkpoint tensors (HF names) and shapes ``config`` implies, as its family knows them."""
    return family(config.family).state_dict_shapes(config, dtype)


def family_of(raw: dict[str, Any]) -> tuple[Family, str]:
    """The family that reads this ``config.json``, and the architecture it reads it as."""
    families = _all().values()
    archs = raw.get("architectures")
    if not archs:
        model_type = raw.get("model_type")
        archs = [next((f.model_types[model_type] for f in families if model_type in f.model_types), "")] \
            if isinstance(model_type, str) else [""]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ShardwiseError(f"architectures must be a list of names, got {archs!r}")
    for arch in archs:
        for fam in families:
            if arch in fam.architectures:
                return fam, arch
    supported = sorted(a for f in families for a in f.architectures)
    name = archs[0] if archs and archs[0] else raw.get("model_type", "unknown")
    raise ShardwiseError(f"unsupported architecture {name!r}; supported: {', '.join(supported)}")
