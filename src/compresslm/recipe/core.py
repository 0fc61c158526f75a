"""Recipes: what to do to a model, as data that is validated before any compute.

A recipe is an ordered list of registered stages (`recipe.registry`) plus calibration settings,
readable from YAML/JSON, a Python dict, or a preset name (`recipe.presets`). Every field is checked
up front: an unknown field or an impossible value raises :class:`RecipeError` naming the stage, the
field, the value and what is allowed, so a typo never costs a calibration run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresslm.recipe.fields import RecipeError, build_options, check_keys, choice
from compresslm.recipe.presets import preset_dict
from compresslm.recipe.registry import STAGES

if TYPE_CHECKING:
    from compresslm.recipe.kv_cache import KVCacheStage

DENSE_DTYPES = ("float16", "bfloat16", "float32")


PROPAGATE = ("compressed", "original")


@dataclass
class CalibrationSettings:
    source: str = "c4"
    samples: int = 128
    length: int = 512
    seed: int = 0
    batch_size: int = 8
    # "compressed": block i calibrates on the outputs of the already-compressed blocks before it (sequential);
    # "original": every block calibrates on the uncompressed model's activations, so the statistics depend
    # on the model and the windows alone and can be computed once and reused by every recipe.
    propagate: str = "compressed"

    def validate(self) -> None:
        for name in ("samples", "length", "batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise RecipeError(f"calibration: {name}={value} is not allowed; use a positive number")
        choice("calibration", "propagate", self.propagate, PROPAGATE)


@dataclass
class Recipe:
    """An ordered list of stages, calibration settings and how dense tensors are stored."""

    stages: list[Any]
    name: str = "custom"
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    dense_dtype: str = "float16"

    def validate(self) -> Recipe:
        if not self.stages:
            raise RecipeError("recipe has no stages")
        for index, stage in enumerate(self.stages, start=1):
            stage.validate(f"stage {index} ({stage.type})")
        prunes = any(stage.type == "prune" for stage in self.stages)
        if prunes and any(getattr(stage, "keep_zeros", False) for stage in self.stages):
            raise RecipeError(
                "keep_zeros holds a checkpoint's own zeros; with a prune stage its mask is held "
                "already: drop one of the two"
            )
        offsets = [s.kquant for s in self.stages if s.type == "quantize" and s.kquant in ("q4_k", "q5_k", "q2_k")]
        if offsets and (prunes or any(getattr(stage, "keep_zeros", False) for stage in self.stages)):
            raise RecipeError(
                f"{offsets[0]} subtracts an offset from every sub-block, so no code is exactly zero: it cannot hold "
                "pruned weights; use q6_k, q3_k or a legacy _0 type with pruning"
            )
        self.calibration.validate()
        choice("recipe", "dense_dtype", self.dense_dtype, DENSE_DTYPES)
        return self

    @property
    def needs_calibration(self) -> bool:
        return any(getattr(s, "needs_calibration", False) for s in self.stages)

    @property
    def kv_cache(self) -> KVCacheStage | None:
        return next((s for s in self.stages if s.type == "kv_cache"), None)

    def key(self) -> dict:
        """The recipe's identity as sweeps key it: every field that differs from its default (the stage
        type and the name always). Adding a field with a default never changes an existing key."""
        calibration = {k: v for k, v in dataclasses.asdict(self.calibration).items()
                       if v != getattr(_DEFAULT_CALIBRATION, k)}  # fmt: skip
        key: dict = {"name": self.name, "stages": [stage_key(stage) for stage in self.stages]}
        if calibration:
            key["calibration"] = calibration
        if self.dense_dtype != "float16":
            key["dense_dtype"] = self.dense_dtype
        return key

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "stages": [s.to_dict() for s in self.stages],
            "calibration": dataclasses.asdict(self.calibration),
            "dense_dtype": self.dense_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}")
        check_keys("recipe", data, ("name", "stages", "calibration", "dense_dtype"))
        raw_stages = data.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise RecipeError("recipe: 'stages' must be a non-empty list")
        stages = []
        for index, raw in enumerate(raw_stages, start=1):
            if not isinstance(raw, dict):
                raise RecipeError(f"stage {index}: must be a mapping, got {type(raw).__name__}")
            kind = raw.get("type", "quantize")
            if kind not in STAGES:
                raise RecipeError(f"stage {index}: type='{kind}' is not allowed; choose one of {', '.join(STAGES)}")
            stages.append(build_options(STAGES[kind].options, raw, f"stage {index} ({kind})"))
        calibration = build_options(CalibrationSettings, data.get("calibration") or {}, "calibration")
        recipe = cls(
            stages=stages,
            name=str(data.get("name", "custom")),
            calibration=calibration,
            dense_dtype=data.get("dense_dtype", "float16"),
        )
        return recipe.validate()


_DEFAULT_CALIBRATION = CalibrationSettings()


def stage_key(stage: Any) -> dict:
    """A stage's fields that differ from their defaults (a field without a default always), and its type."""
    data = {}
    for f in dataclasses.fields(stage):
        value = getattr(stage, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            data[f.name] = value
            continue
        if value != default:
            data[f.name] = value
    return {"type": stage.type, **data}


def load_recipe(spec: str | dict | Recipe) -> Recipe:
    """A Recipe from a preset name, a YAML/JSON file path, a dict, or a Recipe (validated)."""
    if isinstance(spec, Recipe):
        return spec.validate()
    if isinstance(spec, dict):
        return Recipe.from_dict(spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {spec}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # yaml.YAMLError or json.JSONDecodeError
            raise RecipeError(f"{path}: cannot parse recipe: {str(exc).splitlines()[0]}") from exc
        recipe = Recipe.from_dict(data)
        if recipe.name == "custom":
            recipe.name = path.stem
        return recipe
    return preset(spec)


def preset(name: str) -> Recipe:
    """The validated recipe for a preset name (see `recipe.presets`)."""
    return Recipe.from_dict(preset_dict(name))
