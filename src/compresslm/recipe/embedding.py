"""The `quantize_embedding` stage: the token embedding (and a tied lm_head) or lm_head, by RTN or, for the
output head, by GPTQ on the final hidden states."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from compresslm.quant.grid import Grid
from compresslm.recipe.fields import RecipeError, check_bits, check_group, choice, stage_dict
from compresslm.recipe.registry import register_stage


@dataclass
class QuantizeEmbeddingStage:
    """Quantization of the token embedding (a tied lm_head follows it) or lm_head.

    In small models the embedding is a large share of the bytes (a fifth of SmolLM2-135M's
    parameters), so it matters for bits per parameter. Rows are tokens; groups run along the hidden
    dimension, exactly as for a linear layer's input dimension. `method: gptq` quantizes the output
    head (an untied lm_head, or a tied embedding, which then serves both roles with the same codes) by
    GPTQ on the final norm's outputs after the last block (`engine.head`); an untied embedding is a
    lookup table with no inputs to calibrate on and is rounded to nearest.

    `min_share`: the stage applies only to a model whose embedding and untied head hold at least that
    share of its parameters and leaves them dense otherwise (the result says which): in a small model
    they are a large share of the bytes, in a large one a small share, so one recipe serves both.
    """

    method: str = "rtn"
    bits: int = 8
    granularity: str = "group"
    group_size: int = 64
    symmetric: bool = False
    signed_scale: bool = False  # symmetric: the largest |w| on the lowest code (llama.cpp's Q4_0, Q5_0)
    targets: list[str] = field(default_factory=lambda: ["embedding"])
    min_share: float = 0.0
    type: str = "quantize_embedding"

    # see QuantizeStage.LATER_FIELDS
    LATER_FIELDS: ClassVar[dict] = {"signed_scale": False, "method": "rtn", "min_share": 0.0}

    def validate(self, where: str) -> None:
        choice(where, "method", self.method, ("rtn", "gptq"))
        check_bits(where, self.bits)
        check_group(where, self.granularity, self.group_size)
        for target in self.targets:
            choice(where, "targets", target, ("embedding", "lm_head"))
        if self.signed_scale and not self.symmetric:
            raise RecipeError(f"{where}: signed_scale applies to symmetric grids; set symmetric=true or drop it")
        if not self.targets:
            raise RecipeError(f"{where}: targets is empty; choose embedding and/or lm_head")
        if not 0.0 <= self.min_share < 1.0:
            raise RecipeError(f"{where}: min_share={self.min_share} is not allowed; use a share in [0, 1)")

    def applies(self, share: float) -> bool:
        """Whether the stage quantizes a model whose embedding and untied head hold `share` of its parameters."""
        return share >= self.min_share

    def to_dict(self) -> dict:
        return stage_dict(self)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.granularity, self.group_size, self.symmetric, signed_scale=self.signed_scale)


register_stage("quantize_embedding", QuantizeEmbeddingStage, "embedding")
