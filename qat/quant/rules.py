"""Per-layer precision: an ordered list of rules over the layers' qualified names.

A rule is a glob over qualified module names (`fnmatch`: `*` also crosses dots, so
`layers.*.mlp.down` is every FC2 and `*` is every quantizable layer) with the quantizer
fields it changes, or `exclude: true` to keep the layer a plain nn.Linear:

    quant.rules='[{match: "layers.*.mlp.down", activation: {bits: 8}}, {match: "layers.0.*", exclude: true}]'

Resolution, per layer: start from the preset's `quant.weight` / `quant.activation`, then
apply every matching rule in list order, each overriding only the fields it names, so where
two matching rules set the same field the later one wins. Whether the layer is quantized is
decided by the last matching rule too (`exclude: true` -> plain, any other rule -> quantized).
A rule that matches no layer is an error naming its pattern: a typo would otherwise silently
leave the model uniform. The patterns only see the layers `quantize_model` would swap
(every block linear; never `lm_head` or embeddings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from qat.quant.config import QuantizerConfig

RULE_KEYS = ("match", "weight", "activation", "exclude")
SIDES = ("weight", "activation")
QUANTIZER_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizerConfig))


@dataclass(frozen=True)
class LayerRule:
    """One rule: `match` glob, the weight / activation fields it sets, or exclusion."""

    match: str
    weight: Mapping[str, Any] = field(default_factory=dict)
    activation: Mapping[str, Any] = field(default_factory=dict)
    exclude: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The rule as written in a config (only the keys it sets)."""
        out: dict[str, Any] = {"match": self.match}
        out.update({side: dict(getattr(self, side)) for side in SIDES if getattr(self, side)})
        if self.exclude:
            out["exclude"] = True
        return out


@dataclass(frozen=True)
class LayerQuant:
    """A layer's resolved quantizer configs."""

    weight: QuantizerConfig
    activation: QuantizerConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"weight": self.weight.to_dict(), "activation": self.activation.to_dict()}


def _parse_rule(i: int, raw: Any) -> LayerRule:
    where = f"quant.rules[{i}]"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}={raw!r} must be a mapping with keys {', '.join(RULE_KEYS)}")
    unknown = sorted(set(raw) - set(RULE_KEYS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]} is not a rule key; allowed: {', '.join(RULE_KEYS)}")
    match = raw.get("match")
    if not isinstance(match, str) or not match:
        raise ValueError(f"{where}.match={match!r} must be a non-empty glob over layer names, e.g. 'layers.*.mlp.down'")
    where = f"{where} (match={match!r})"
    sides = {}
    for side in SIDES:
        values = raw.get(side) or {}
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}.{side}={values!r} must be a mapping of quantizer fields, e.g. {{bits: 8}}")
        bad = sorted(set(values) - set(QUANTIZER_FIELDS))
        if bad:
            raise ValueError(f"{where}.{side}.{bad[0]} is not a quantizer field; allowed: {', '.join(QUANTIZER_FIELDS)}")
        sides[side] = dict(values)
    exclude = raw.get("exclude", False)
    if not isinstance(exclude, bool):
        raise ValueError(f"{where}.exclude={exclude!r} must be true or false")
    if exclude and (sides["weight"] or sides["activation"]):
        raise ValueError(f"{where}: exclude=true keeps the layer a plain nn.Linear, so its weight/activation fields would be ignored; drop one of them")
    if not exclude and "exclude" not in raw and not (sides["weight"] or sides["activation"]):
        raise ValueError(f"{where} changes nothing; give weight and/or activation fields, or exclude: true/false")
    return LayerRule(match, sides["weight"], sides["activation"], exclude)


def parse_rules(raw: Sequence[Any] | None) -> tuple[LayerRule, ...]:
    """`quant.rules` (a list of mappings, or None) as typed rules; one-line ValueError otherwise."""
    if raw is None:
        return ()
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
        raise ValueError(f"quant.rules={raw!r} must be a list of rules, e.g. [{{match: 'layers.*.mlp.down', activation: {{bits: 8}}}}]")
    return tuple(_parse_rule(i, r) for i, r in enumerate(raw))


def _config(values: Mapping[str, Any], where: str) -> QuantizerConfig:
    try:
        return QuantizerConfig.from_mapping(values)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def resolve_layers(
    names: Sequence[str], weight: QuantizerConfig, activation: QuantizerConfig, rules: Sequence[LayerRule]
) -> dict[str, LayerQuant | None]:
    """Each layer's resolved configs (None: excluded, stays plain), in `names` order."""
    matched = [[n for n in names if fnmatchcase(n, r.match)] for r in rules]
    for i, (rule, hits) in enumerate(zip(rules, matched)):
        if not hits:
            examples = ", ".join(names[:3]) + (f", ... ({len(names)} layers)" if len(names) > 3 else "")
            raise ValueError(f"quant.rules[{i}] match={rule.match!r} matches no quantizable layer; the layers are {examples or 'none'}")
    base = {"weight": weight.to_dict(), "activation": activation.to_dict()}
    out: dict[str, LayerQuant | None] = {}
    for name in names:
        fields = {side: dict(base[side]) for side in SIDES}
        excluded, applied = False, []
        for i, rule in enumerate(rules):
            if fnmatchcase(name, rule.match):
                applied.append(i)
                excluded = rule.exclude  # the last matching rule decides
                for side in SIDES:
                    fields[side].update(getattr(rule, side))
        where = f"layer {name} (quant.rules {applied})"
        out[name] = None if excluded else LayerQuant(*(_config(fields[s], f"{where} {s}") for s in SIDES))
    return out


def format_rules(rules: Sequence[LayerRule]) -> str:
    """The rules as one line of flow-style YAML, which is also a Hydra override value:
    `python train.py quant.rules="$(cat rules.yaml)"` takes it as is."""
    def value(v: Any) -> str:
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{k}: {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(v)  # strings double-quoted (globs hold `*`), true/false/null, numbers

    return "[" + ", ".join(value(r.to_dict()) for r in rules) + "]"


def rules_dirname(override_dirname: str, rules: Sequence[Any] | None) -> str:
    """Hydra's override_dirname plus `rules=<digest>` when quant.rules is non-empty.

    The rules themselves are too long for a directory name (a few rules pass the 255-byte
    limit), so the run directory holds a digest of them: a different rule list is a
    different run, the same one resumes. Uniform runs keep their directory unchanged."""
    if not rules:
        return override_dirname
    digest = hashlib.sha1(json.dumps(list(rules), sort_keys=True, default=str).encode()).hexdigest()[:10]
    return ",".join(p for p in (override_dirname, f"rules={digest}") if p)
