"""Sharding plans: YAML rules from state-dict name patterns to partition specs over mesh axes.

Semantics follow torchprime's sharding configs: ``*`` matches any integer index; a spec has one entry
per tensor dimension, each a mesh axis name, a list of axis names (the dimension split over several
axes, outer first), or ``null`` (not split). A rule naming a module instead of a tensor shards that
module's output (``name[i]`` for element ``i`` of a tuple output). An optional ``mesh`` section names
the axes and, optionally, their sizes (``mesh: {axes: [fsdp, tensor], sizes: [2, 2]}``).

Stricter than torchprime: a rule that matches nothing is an error that names the closest real
names, and specs are checked against the mesh and the tensors (see ``layout.py``).

Besides the rules, a built-in family plan carries *family knowledge* that user plans inherit:
``units`` (the indivisible slot of a dimension, e.g. whole attention heads), ``tp_splits``
(which dimensions the model code can consume split over the ``tensor`` axis, and whether an uneven
split may be padded exactly), ``groups`` (tensors that must be split over ``tensor`` together),
``output`` (the module whose output generation reads whole) and ``sequence_parallel`` (how
sequence parallelism maps onto the model, and the rules ``--sequence-parallel-enabled`` adds).
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import ShardwiseError
from .mesh import Mesh
from .untrusted import parse_yaml, read_text

AxisEntry = str | tuple[str, ...] | None
Spec = tuple[AxisEntry, ...]


TENSOR_AXIS = "tensor"  # the axis the model code consumes split (parallel layers); --tp-degree sizes it
SPLIT_KINDS = ("pad", "even")  # tp_splits entries: uneven splits padded exactly, or only equal parts


@dataclass(frozen=True)
class Rule:
    pattern: str
    spec: Spec
    required: bool = True  # built-in family rules may name tensors a model lacks (e.g. biases)

    @property
    def regex(self) -> re.Pattern[str]:
        return _compile(self.pattern)

    @property
    def module(self) -> str:
        """The pattern without a tuple index: ``model.layers.*[0]`` -> ``model.layers.*``."""
        return _TUPLE_INDEX.sub("", self.pattern)

    @property
    def output_index(self) -> int | None:
        """``i`` for a rule on element ``i`` of a module's tuple output, else None."""
        m = _TUPLE_INDEX.search(self.pattern)
        return int(m.group(1)) if m else None


_TUPLE_INDEX = re.compile(r"\[(\d+)\]\Z")


@dataclass(frozen=True)
class SequenceParallel:
    """Family knowledge for sequence parallelism (NxD's ``--sequence-parallel-enabled``) as a plan.

    With activation rules splitting the ``dim`` (sequence) of the ``residual`` modules' outputs over
    ``tensor``, the residual stream between them is split by sequence: those outputs are reduce-
    scattered, each ``norms`` module works on its slice (and gathers its output unless its own rule
    keeps it split), and each module of ``inputs`` gathers its input when the module it reads from
    (``inputs[module]``) has a split output. ``rules`` are the activation rules that turn it on.
    """

    dim: int
    residual: tuple[str, ...]
    norms: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...]
    rules: tuple[str, ...]


@functools.lru_cache(maxsize=4096)  # layouts match every rule against every tensor name
def _compile(pattern: str) -> re.Pattern[str]:
    parts = [re.escape(p) for p in pattern.split("*")]
    return re.compile(r"\d+".join(parts) + r"\Z")


def parse_spec(value: object, where: str) -> Spec:
    if not isinstance(value, list):
        raise ShardwiseError(f"{where}: a partition spec is a list with one entry per dimension, got {value!r}")
    spec: list[AxisEntry] = []
    for entry in value:
        if entry is None or isinstance(entry, str):
            spec.append(entry)
        elif isinstance(entry, list) and entry and all(isinstance(a, str) for a in entry):
            spec.append(tuple(entry))
        else:
            raise ShardwiseError(f"{where}: spec entries are an axis name, a list of axis names or null, got {entry!r}")
    used = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
    dup = {a for a in used if used.count(a) > 1}
    if dup:
        raise ShardwiseError(f"{where}: axis {sorted(dup)[0]!r} is used for more than one dimension")
    return tuple(spec)


def spec_axes(entry: AxisEntry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


@dataclass(frozen=True)
class Plan:
    """An ordered list of parameter rules, activation rules and per-family split units."""

    rules: tuple[Rule, ...]
    units: tuple[tuple[str, tuple[str | None, ...]], ...] = ()
    mesh_axes: tuple[str, ...] = (TENSOR_AXIS,)
    source: str = "<inline>"
    mesh_sizes: tuple[int, ...] | None = None  # None: --tp-degree (or the partition) sizes the `tensor` axis
    tp_splits: tuple[tuple[str, tuple[str | None, ...]], ...] = ()  # family: consumable split dims
    groups: tuple[tuple[str, ...], ...] = ()  # family: tensors split over `tensor` together or not at all
    output: str | None = None  # family: module whose output generation needs whole (lm_head)
    activation_rank: int = 3  # family: dimensions of a module output ([batch, seq, features])
    sequence: SequenceParallel | None = None  # family: how sequence parallelism maps onto the model

    def spec_for(self, name: str) -> Spec | None:
        """The spec of the last rule that matches ``name`` (later rules, e.g. overrides, win)."""
        for rule in reversed(self.rules):
            if rule.regex.match(name):
                return rule.spec
        return None

    def covers(self, name: str) -> bool:
        return any(rule.regex.match(name) for rule in self.rules)

    def units_for(self, name: str) -> tuple[str | None, ...] | None:
        return _lookup(self.units, name)

    def splits_for(self, name: str) -> tuple[str | None, ...]:
        """Per dimension, how the model consumes ``name`` split over ``tensor``: pad, even or None (not)."""
        return _lookup(self.tp_splits, name) or ()

    def with_family(self, family: Plan) -> Plan:
        """This plan's rules and mesh with ``family``'s units, consumable splits, groups and output."""
        return replace(family, rules=self.rules, mesh_axes=self.mesh_axes, mesh_sizes=self.mesh_sizes,
                       source=self.source)

    def with_mesh(self, mesh: Mesh | str | None) -> Plan:
        """This plan on ``mesh`` (``--mesh``): replaces the file's ``mesh`` section, or gives a flat torchprime
        file the mesh its trainer config would (``ici_mesh.fsdp=4``)."""
        if mesh is None:
            return self
        if isinstance(mesh, str):
            mesh = Mesh.parse(mesh)
        return replace(self, mesh_axes=mesh.axis_names, mesh_sizes=mesh.axis_sizes, source=f"{self.source} (--mesh)")

    def without_axes(self, axes: tuple[str, ...]) -> Plan:
        """This plan with ``axes`` removed from every spec: e.g. the tensor-parallel part of an FSDP x TP plan."""
        def strip(entry: AxisEntry) -> AxisEntry:
            kept = tuple(a for a in spec_axes(entry) if a not in axes)
            return None if not kept else kept[0] if len(kept) == 1 else kept

        return replace(self, rules=tuple(replace(r, spec=tuple(strip(e) for e in r.spec)) for r in self.rules))

    def mesh(self, tp_degree: int | None = None, world_size: int | None = None) -> Mesh:
        """The mesh this plan runs on.

        With ``sizes`` in the plan they are the mesh (``tp_degree``/``world_size``, if given, must agree).
        Without, the ``tensor`` axis takes ``tp_degree`` (or the whole ``world_size``, e.g. the devices of
        a partition config) and any other axis must be given a size in the plan.
        """
        axes = self.mesh_axes
        if self.mesh_sizes is not None:
            mesh = Mesh(axes, self.mesh_sizes)
            if tp_degree is not None and TENSOR_AXIS in axes and mesh.size(TENSOR_AXIS) != tp_degree:
                raise ShardwiseError(f"{self.source}: the mesh gives axis 'tensor' size {mesh.size(TENSOR_AXIS)} "
                                     f"but --tp-degree is {tp_degree}; drop one of them")
        else:
            if TENSOR_AXIS not in axes:
                raise ShardwiseError(f"{self.source}: mesh axes {list(axes)} need `sizes` or --mesh (only the 'tensor' "
                                     "axis is sized by --tp-degree)")
            if len(axes) > 1:
                others = [a for a in axes if a != TENSOR_AXIS]
                raise ShardwiseError(f"{self.source}: give `sizes` for mesh axes {list(axes)} (or --mesh); --tp-degree "
                                     f"sizes only 'tensor', not {others}")
            size = tp_degree if tp_degree is not None else world_size
            if size is None:
                raise ShardwiseError(f"{self.source}: the mesh has no sizes; give --tp-degree or --mesh")
            mesh = Mesh(axes, (int(size),))
        if world_size is not None and mesh.world_size != world_size:
            raise ShardwiseError(f"{self.source}: the mesh {mesh.describe()} has {mesh.world_size} ranks but "
                                 f"{world_size} devices were given")
        return mesh

    def with_overrides(self, overrides: list[str]) -> Plan:
        """Apply ``name=[spec]`` strings from the command line; each replaces or adds one rule."""
        rules = list(self.rules)
        for text in overrides:
            if "=" not in text:
                raise ShardwiseError(f"--set {text!r}: expected NAME=[spec], e.g. 'lm_head.weight=[tensor,null]'")
            name, value = text.split("=", 1)
            parsed = parse_yaml(value, f"--set {text!r}", "the spec")
            name = name.strip()
            if not name:
                raise ShardwiseError(f"--set {text!r}: the name before '=' is empty")
            spec = parse_spec(parsed, f"--set {name}")
            rules = [r for r in rules if r.pattern != name] + [Rule(name, spec)]
        return replace(self, rules=tuple(rules))

    def check_against(self, names: list[str]) -> None:
        """Refuse rules that match no tensor and no module: a typo must not silently replicate."""
        modules = module_names(names)
        for rule in self.rules:
            if not rule.required:
                continue
            if rule.output_index is None and any(rule.regex.match(n) for n in names):
                continue
            rx = _compile(rule.module)
            if any(rx.match(m) for m in modules):
                continue
            candidates = sorted({generic_name(n) for n in names} | {generic_name(m) for m in modules})
            close = difflib.get_close_matches(generic_name(rule.module), candidates, 3, 0.6)
            hint = f"; nearest real names: {', '.join(close)}" if close else ""
            what = "module" if rule.output_index is not None else "tensor or module"
            raise ShardwiseError(f"{self.source}: rule {rule.pattern!r} matches no {what}{hint}")


def module_names(names: list[str]) -> list[str]:
    """Every module path implied by parameter names: all dotted prefixes (``model.layers.0``, ...)."""
    out: set[str] = set()
    for n in names:
        parts = n.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(out)


def _lookup(table: tuple[tuple[str, tuple[str | None, ...]], ...], name: str) -> tuple[str | None, ...] | None:
    for pattern, value in table:
        if _compile(pattern).match(name):
            return value
    return None


def generic_name(name: str) -> str:
    """A tensor or module name with its integer parts as ``*``: ``model.layers.3.mlp`` -> ``model.layers.*.mlp``,
    the form plan rules are written in."""
    return re.sub(r"\.\d+(?=\.|\Z)", ".*", name)


FAMILY_KEYS = ("units", "tp_splits", "groups", "output", "activation_rank", "sequence_parallel")


def _parse(data: object, source: str, required: bool = True) -> Plan:
    if not isinstance(data, dict):
        raise ShardwiseError(f"{source}: a sharding plan is a YAML mapping")
    if "sharding" in data:
        body = data["sharding"]
        unknown = sorted(set(data) - {"sharding", "mesh", *FAMILY_KEYS})
        if unknown:
            raise ShardwiseError(f"{source}: unknown top-level key {unknown[0]!r}; expected sharding, mesh")
    else:  # torchprime's flat form: the whole file is the rule mapping (plus an optional mesh)
        body = {k: v for k, v in data.items() if k not in ("mesh", *FAMILY_KEYS)}
    if not isinstance(body, dict):
        raise ShardwiseError(f"{source}: `sharding` must map names to partition specs")
    rules = tuple(Rule(str(name), parse_spec(spec, f"{source}: {name}"), required) for name, spec in body.items())
    axes, sizes = _parse_mesh(data.get("mesh"), source)
    units = _table(data.get("units"), source, "units", ("heads", "kv_heads"))
    tp = _table(data.get("tp_splits"), source, "tp_splits", SPLIT_KINDS)
    groups = data.get("groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, list) and all(isinstance(n, str) for n in g)
                                               for g in groups):
        raise ShardwiseError(f"{source}: `groups` is a list of lists of tensor names")
    output = data.get("output")
    if output is not None and not isinstance(output, str):
        raise ShardwiseError(f"{source}: `output` is a module name, got {output!r}")
    return Plan(rules, units, axes, source, sizes, tp, tuple(tuple(g) for g in groups), output,
                _count(data.get("activation_rank", 3), source, "activation_rank"),
                _parse_sequence(data.get("sequence_parallel"), source))


def _count(value: object, source: str, key: str) -> int:
    """A small non-negative integer field (YAML also yields floats, infinities, lists... for these)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise ShardwiseError(f"{source}: `{key}` must be an integer from 0 to 64, got {value!r}")
    return value


def _names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError
    return tuple(value)


def _parse_sequence(value: object, source: str) -> SequenceParallel | None:
    if value is None:
        return None
    try:
        return SequenceParallel(_count(value["dim"], source, "sequence_parallel.dim"), _names(value["residual"]),
                                _names(value["norms"]), tuple((str(k), str(v)) for k, v in value["inputs"].items()),
                                _names(value["rules"]))
    except (KeyError, TypeError, AttributeError, ValueError):
        raise ShardwiseError(f"{source}: `sequence_parallel` needs dim, residual, norms, inputs and rules") from None


def _parse_mesh(mesh: object, source: str) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    if mesh is None:
        return (TENSOR_AXIS,), None
    if not isinstance(mesh, dict) or set(mesh) - {"axes", "sizes"}:
        raise ShardwiseError(f"{source}: `mesh` is a mapping with `axes` (names) and optional `sizes`")
    axes = mesh.get("axes", [TENSOR_AXIS])
    if not isinstance(axes, list) or not axes or not all(isinstance(a, str) and a for a in axes):
        raise ShardwiseError(f"{source}: mesh `axes` must be a non-empty list of axis names, got {axes!r}")
    if len(set(axes)) != len(axes):
        raise ShardwiseError(f"{source}: mesh axes repeat: {axes}")
    sizes = mesh.get("sizes")
    if sizes is None:
        return tuple(axes), None
    if (not isinstance(sizes, list) or len(sizes) != len(axes)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes)):
        raise ShardwiseError(f"{source}: mesh `sizes` must be one positive integer per axis {axes}, got {sizes!r}")
    return tuple(axes), tuple(sizes)


def _table(value: object, source: str, key: str, allowed: tuple[str, ...]):
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ShardwiseError(f"{source}: `{key}` must map tensor names to per-dimension lists")
    out = []
    for name, dims in value.items():
        if not isinstance(dims, list) or any(d is not None and d not in allowed for d in dims):
            raise ShardwiseError(
                f"{source}: {key}.{name} entries are one of {', '.join(allowed)} or null, got {dims!r}")
        out.append((str(name), tuple(dims)))
    return tuple(out)


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if path.is_dir():
        raise ShardwiseError(f"sharding config {str(path)!r} is a directory, not a YAML file")
    return _parse(parse_yaml(read_text(path, "sharding config"), str(path), "the sharding config"), str(path))


def builtin_plan(family: str) -> Plan:
    """The plan shipped with a model family (``families/<family>/plan.yaml``)."""
    from .families import family as family_named  # the registry imports nothing of ours but errors

    text = family_named(family).builtin_plan_text()
    return _parse(parse_yaml(text, f"built-in plan {family}.yaml", "the plan"), f"built-in plan {family}.yaml",
                  required=False)


def resolve_plan(family: str, sharding_config: str | Path | None = None, overrides: list[str] | None = None,
                 sequence_parallel: bool = False, mesh: Mesh | str | None = None) -> Plan:
    """The user's plan (or the family's), with the family's knowledge and any overrides applied.

    ``sequence_parallel`` (NxD's ``--sequence-parallel-enabled``) adds the family's sequence-parallel
    activation rules, as if given with ``--set`` before ``overrides``. ``mesh`` (``--mesh fsdp=2,tensor=2``)
    replaces the plan's mesh.
    """
    plan = builtin_plan(family)
    if sharding_config is not None:
        plan = load_plan(sharding_config).with_family(plan)
    extra: list[str] = []
    if sequence_parallel:
        if plan.sequence is None:
            raise ShardwiseError(f"the {family} family has no sequence-parallel rules")
        extra = list(plan.sequence.rules)
    return plan.with_overrides(extra + list(overrides or [])).with_mesh(mesh)
