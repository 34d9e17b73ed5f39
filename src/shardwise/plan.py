"""Sharding plans: YAML rules from state-dict name patterns to partition specs over mesh axes.

Semantics follow torchprime's sharding configs: ``*`` matches any integer index; a spec has one entry
per tensor dimension, each a mesh axis name, a list of axis names (the dimension split over several
axes, outer first), or ``null`` (not split). A rule naming a module instead of a tensor shards that
module's output (``name[i]`` for element ``i`` of a tuple output). Stricter than torchprime: a rule
that matches nothing is an error that names the closest real names.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .errors import ShardwiseError

AxisEntry = str | tuple[str, ...] | None
Spec = tuple[AxisEntry, ...]


@dataclass(frozen=True)
class Rule:
    pattern: str
    spec: Spec
    required: bool = True  # built-in family rules may name tensors a model lacks (e.g. biases)

    @property
    def regex(self) -> re.Pattern[str]:
        return _compile(self.pattern)


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
    mesh_axes: tuple[str, ...] = ("tensor",)
    source: str = "<inline>"
    _unit_regex: dict = field(default_factory=dict, compare=False, repr=False)

    def spec_for(self, name: str) -> Spec | None:
        """The spec of the last rule that matches ``name`` (later rules, e.g. overrides, win)."""
        for rule in reversed(self.rules):
            if rule.regex.match(name):
                return rule.spec
        return None

    def units_for(self, name: str) -> tuple[str | None, ...] | None:
        for pattern, units in self.units:
            if _compile(pattern).match(name):
                return units
        return None

    def with_overrides(self, overrides: list[str]) -> Plan:
        """Apply ``name=[spec]`` strings from the command line; each replaces or adds one rule."""
        rules = list(self.rules)
        for text in overrides:
            if "=" not in text:
                raise ShardwiseError(f"--set {text!r}: expected NAME=[spec], e.g. 'lm_head.weight=[tensor,null]'")
            name, value = text.split("=", 1)
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ShardwiseError(f"--set {text!r}: the spec is not valid YAML ({exc.problem})") from None
            spec = parse_spec(parsed, f"--set {name.strip()}")
            rules = [r for r in rules if r.pattern != name.strip()] + [Rule(name.strip(), spec)]
        return Plan(tuple(rules), self.units, self.mesh_axes, self.source)

    def check_against(self, names: list[str]) -> None:
        """Refuse rules that match no tensor and no module: a typo must not silently replicate."""
        modules = sorted({n.rsplit(".", 1)[0] for n in names})
        for rule in self.rules:
            if not rule.required:
                continue
            base = re.sub(r"\[\d+\]\Z", "", rule.pattern)
            rx = _compile(base)
            if any(rx.match(n) for n in names) or any(rx.match(m) for m in modules):
                continue
            close = difflib.get_close_matches(_generic(base), sorted({_generic(n) for n in names + modules}), 3, 0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ShardwiseError(f"{self.source}: rule {rule.pattern!r} matches no tensor or module{hint}")


def _generic(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def _parse(data: object, source: str, required: bool = True) -> Plan:
    if not isinstance(data, dict):
        raise ShardwiseError(f"{source}: a sharding plan is a YAML mapping")
    body = data.get("sharding", data if "sharding" not in data and "units" not in data else {})
    mesh = data.get("mesh", {}) or {}
    if not isinstance(body, dict):
        raise ShardwiseError(f"{source}: `sharding` must map names to partition specs")
    rules = tuple(
        Rule(str(name), parse_spec(spec, f"{source}: {name}"), required)
        for name, spec in body.items() if name != "mesh"
    )
    units = tuple((str(k), tuple(v)) for k, v in (data.get("units") or {}).items())
    axes = tuple(mesh.get("axes", ("tensor",))) if isinstance(mesh, dict) else ("tensor",)
    return Plan(rules, units, axes, source)


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise ShardwiseError(f"sharding config {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ShardwiseError(f"{path}: not valid YAML ({exc})") from None
    return _parse(data, str(path))


def builtin_plan(family: str) -> Plan:
    """The plan shipped for a model family (``plans/<family>.yaml`` inside the package)."""
    text = resources.files("shardwise.plans").joinpath(f"{family}.yaml").read_text()
    return _parse(yaml.safe_load(text), f"built-in plan {family}.yaml", required=False)


def resolve_plan(family: str, sharding_config: str | Path | None = None, overrides: list[str] | None = None) -> Plan:
    """The user's plan (or the family's), with the family's split units and any overrides applied."""
    family_plan = builtin_plan(family)
    plan = family_plan
    if sharding_config is not None:
        user = load_plan(sharding_config)
        plan = Plan(user.rules, family_plan.units, user.mesh_axes, user.source)
    return plan.with_overrides(overrides or [])
