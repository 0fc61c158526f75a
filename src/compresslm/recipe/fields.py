"""What every recipe stage shares: the error class, field checks and targeting rules.

Each stage's options class validates its own fields with these helpers, so an error names the
stage, the field, the value and what is allowed, in the same words everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compresslm.errors import CompressLMError


class RecipeError(CompressLMError):
    """A recipe field that is unknown or has an impossible value."""


def check_bits(where: str, value: int, name: str = "bits", low: int = 2, high: int = 8, off: bool = False) -> None:
    """A bit width in [low, high] (or 0 where `off` allows it); the one check of every stage's widths."""
    if not (low <= value <= high or (off and value == 0)):
        allowed = f"0 (off) or {low} to {high}" if off else f"{low} to {high}"
        raise RecipeError(f"{where}: {name}={value} is not allowed; choose {allowed}")


def check_group(where: str, granularity: str, group_size: int) -> None:
    choice(where, "granularity", granularity, ("group", "channel", "tensor"))
    if granularity == "group" and group_size < 1:
        raise RecipeError(f"{where}: group_size={group_size} is not allowed; use a positive column count")


def check_solver(where: str, damp: float, block_size: int) -> None:
    """GPTQ-style solver settings: dampening fraction and column block."""
    if not 0 < damp < 10:
        raise RecipeError(f"{where}: damp={damp} is not allowed; use a small positive fraction such as 0.01")
    if block_size < 1:
        raise RecipeError(f"{where}: block_size={block_size} is not allowed; use a positive column count")


def choice(where: str, name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise RecipeError(f"{where}: {name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def check_keys(where: str, data: dict, allowed: tuple) -> None:
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown field '{key}'; allowed fields: {', '.join(allowed)}")


def build_options(kind: type, data: dict, where: str) -> Any:
    """Instantiate dataclass `kind` from `data`, checking field names and value types."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    check_keys(where, data, tuple(fields))
    values = {}
    for key, value in data.items():
        expected = fields[key].type if isinstance(fields[key].type, str) else fields[key].type.__name__
        if expected.endswith(" | None"):
            if value is None:
                values[key] = None
                continue
            expected = expected.removesuffix(" | None")
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
            "list[int]": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
            "list[float]": isinstance(value, list)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
        }.get(expected, True)
        if not ok:
            raise RecipeError(f"{where}: {key}={value!r} is not allowed; expected {expected}")
        values[key] = float(value) if expected == "float" else value
    return kind(**values)


class Targeted:
    """Targeting rules for stages with `targets` (roles such as q, k, v, o, gate, up, down, module paths,
    or 'all') and `ignore` (roles, or parts of module paths) fields."""

    targets: list[str]
    ignore: list[str]

    def check_targets(self, where: str) -> None:
        if not self.targets:
            raise RecipeError(f"{where}: targets is empty; give roles (q, k, v, o, gate, up, down, ...) or 'all'")

    def applies_to(self, role: str, name: str) -> bool:
        """True if a linear with this role or exact module path is targeted and not ignored."""
        if role in self.ignore or any(part in name for part in self.ignore):
            return False
        return "all" in self.targets or role in self.targets or name in self.targets


def stage_dict(stage: Any) -> dict:
    """A stage's fields as recorded in containers; fields listed in the class's LATER_FIELDS are left
    out while at their default, so older records keep their exact text."""
    data = dataclasses.asdict(stage)
    for name, default in getattr(stage, "LATER_FIELDS", {}).items():
        if name in data and data[name] == default:
            del data[name]
    return data
