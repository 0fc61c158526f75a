"""Recipes: stages as registered options dataclasses, calibration settings, presets and parsing.

`core` holds the Recipe and its parsing, `registry` the stage kinds, one module per built-in stage
(`quantize`, `prune`, `embedding`, `kv_cache`, `lowrank`, `rotation`, `structured`), `presets` the
names. Importing this package registers the built-in stages.
"""

from compresslm.recipe.core import DENSE_DTYPES, PROPAGATE, CalibrationSettings, Recipe, load_recipe, preset
from compresslm.recipe.embedding import QuantizeEmbeddingStage
from compresslm.recipe.fields import RecipeError
from compresslm.recipe.kv_cache import KVCacheStage
from compresslm.recipe.lowrank import LowRankCompensationStage, LowRankStage
from compresslm.recipe.prune import PruneStage
from compresslm.recipe.quantize import QuantizeStage
from compresslm.recipe.registry import STAGES, StageKind, kind_of, register_stage
from compresslm.recipe.rotation import RotateStage
from compresslm.recipe.structured import PruneDepthStage, PruneWidthStage

__all__ = [
    "DENSE_DTYPES", "PROPAGATE", "STAGES", "CalibrationSettings", "KVCacheStage", "LowRankCompensationStage",
    "LowRankStage", "PruneDepthStage", "PruneStage", "PruneWidthStage", "QuantizeEmbeddingStage", "QuantizeStage",
    "Recipe", "RecipeError", "RotateStage",
    "StageKind", "kind_of", "load_recipe", "preset", "register_stage",
]  # fmt: skip
