"""The `kv_cache` stage: how the KV cache is quantized at run time (recorded with the model)."""

from __future__ import annotations

from dataclasses import dataclass

from compresslm.errors import CompressLMError
from compresslm.kv.cache import KVQuantConfig
from compresslm.recipe.fields import RecipeError, stage_dict
from compresslm.recipe.registry import register_stage


@dataclass
class KVCacheStage:
    """Quantize the KV cache at run time (see `compresslm.kv.cache`); recorded with the model, used in evaluation.

    It changes no weight: a container carries it, and perplexity, KL and the sweep evaluate through
    the quantized cache (chunked prefill of `chunk` tokens).
    """

    bits: int = 4
    group_size: int = 128
    value_group: int = 64
    window: int = 0
    outliers: float = 0.0
    pre_rope: bool = False
    rotate: bool = False
    key_axis: str = "channel"
    sink: int = 0
    chunk: int = 128
    type: str = "kv_cache"

    def validate(self, where: str) -> None:
        try:
            _ = self.config
        except CompressLMError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        if self.chunk < 1:
            raise RecipeError(f"{where}: chunk={self.chunk} is not allowed; use a positive token count")

    def to_dict(self) -> dict:
        return stage_dict(self)

    @property
    def config(self) -> KVQuantConfig:
        return KVQuantConfig(
            self.bits, self.group_size, self.value_group, self.window, self.outliers, pre_rope=self.pre_rope,
            rotate=self.rotate, key_axis=self.key_axis, sink=self.sink,
        )  # fmt: skip


register_stage("kv_cache", KVCacheStage, "kv_cache")
