"""The stage registry: each kind of recipe stage is one options dataclass registered under its `type`.

A recipe is a list of registered options. Validation lives with each options class (`validate(where)`,
using `recipe.fields`); the engine reaches a method only through its registration, by role:

* `linear`: applied to each targeted linear weight, block by block, in the calibration pass.
  `quantize` and `prune` are built in: `engine.linear_stages` combines them (one joint SparseGPT +
  GPTQ sweep, masks held through quantization). Every other linear stage has an
  `apply(options, weight, record, hessian) -> CompressedWeight`, called after the built-in ones in
  recipe order: `weight` is the float [out, in] weight, `record` what the stages before it made (None
  when it is the first), `hessian` the layer's input XᵀX (None without calibration).
* `model`: transforms the whole model before calibration (`apply(options, lm) -> dict` of facts for
  the report), e.g. a rotation folded into the weights or structured pruning; optionally
  `check_model(lm)`, called for every model stage before the first one runs, refuses a model early.
* `embedding`: quantizes the token embedding (built in).
* `kv_cache`: how the KV cache is quantized at run time (built in; recorded with the model).

An options class is a dataclass with a `type` field whose default is its registered name, a
`validate(where)` method and, for linear stages, `targets`/`ignore` fields with `applies_to(role,
name)` (mix in `recipe.fields.Targeted`) and a `needs_calibration` attribute; optionally
`check_layer(name, (out, in))`, which the engine calls for every targeted layer before any compute. How to add a method,
step by step: docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

ROLES = ("linear", "model", "embedding", "kv_cache")
BUILT_IN = ("quantize", "prune", "quantize_embedding", "kv_cache")


@dataclass(frozen=True)
class StageKind:
    name: str
    options: type
    role: str
    apply: Callable | None = None


STAGES: dict[str, StageKind] = {}


def register_stage(name: str, options: type, role: str, apply: Callable | None = None) -> StageKind:
    """Register `options` as the recipe stage `type: name`; returns its entry. Registering the same
    options class again is a no-op; another class under a taken name is refused."""
    if role not in ROLES:
        raise ValueError(f"stage {name!r}: role {role!r} is not one of {', '.join(ROLES)}")
    if not dataclasses.is_dataclass(options) or not callable(getattr(options, "validate", None)):
        raise ValueError(f"stage {name!r}: options must be a dataclass with a validate(where) method")
    type_field = {f.name: f for f in dataclasses.fields(options)}.get("type")
    if type_field is None or type_field.default != name:
        raise ValueError(f"stage {name!r}: its options need a field `type: str = {name!r}`")
    if role in ("linear", "model") and apply is None and name not in BUILT_IN:
        raise ValueError(f"stage {name!r}: a {role} stage needs an apply function")
    if role == "linear" and not callable(getattr(options, "applies_to", None)):
        raise ValueError(f"stage {name!r}: a linear stage needs applies_to(role, name) (mix in recipe.fields.Targeted)")
    kind = StageKind(name, options, role, apply)
    existing = STAGES.get(name)
    if existing is not None and existing.options is not options:
        raise ValueError(f"stage type {name!r} is registered already (by {existing.options.__qualname__})")
    STAGES[name] = kind
    return kind


def kind_of(stage: object) -> StageKind:
    """The registration of a stage's options."""
    return STAGES[stage.type]
