"""The `prune` stage: unstructured or N:M sparsity by magnitude, Wanda or SparseGPT, with OWL's
per-block ratios; before a quantize stage its mask is held through quantization."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from compresslm.quant.gptq import GPTQOptions
from compresslm.recipe.fields import RecipeError, Targeted, check_solver, choice, stage_dict
from compresslm.recipe.quantize import GRID_FITS
from compresslm.recipe.registry import register_stage
from compresslm.sparse.masks import SparsityError, SparsityPattern

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")


@dataclass
class PruneStage(Targeted):
    """Prune the weights of the targeted linear layers (unstructured or N:M).

    `sparsity` is a ratio ("50%", 0.5) or an N:M pattern ("2:4"). `allocation: owl` keeps the
    global ratio but gives blocks with more activation outliers a lower ratio (OWL, Yin et al.,
    2023): block ratios span target ± `owl_lambda`, ranked by the share of Wanda scores above
    `owl_threshold` × their mean. Stage order matters: a prune stage before a quantize stage
    chooses the mask on float weights and quantizes the kept ones with the mask held fixed
    (SparseGPT followed by GPTQ runs as one joint sweep); after a quantize stage it chooses the
    mask on the quantized weights, which keep their codes. `grid_fit` says where that joint sweep
    fits each group's grid: `current` (on the kept weights when the sweep reaches the group),
    `final` (where an unquantized SparseGPT pass leaves them) or `both` (the union of the ranges);
    see `sparse.prune.sparsegpt`. `after` runs no joint sweep: SparseGPT in float first, then the
    quantize stage on the kept weights with the mask fixed (the better of the two at high sparsity
    and 8 bits: `benchmarks/results/sparse_then_round_70_w8.md`).
    """

    method: str = "wanda"
    sparsity: str | float = "50%"
    scope: str = "row"
    allocation: str = "uniform"
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    damp: float = 0.01
    block_size: int = 128
    grid_fit: str = "current"
    targets: list[str] = field(default_factory=lambda: ["all"])
    ignore: list[str] = field(default_factory=list)
    type: str = "prune"

    def validate(self, where: str) -> None:
        choice(where, "method", self.method, PRUNE_METHODS)
        choice(where, "scope", self.scope, ("row", "layer"))
        choice(where, "grid_fit", self.grid_fit, GRID_FITS)
        if self.grid_fit != "current" and self.method != "sparsegpt":
            raise RecipeError(f"{where}: grid_fit belongs to SparseGPT's joint quantization, not to {self.method}")
        choice(where, "allocation", self.allocation, ALLOCATIONS)
        try:
            pattern = self.pattern
        except SparsityError as exc:
            raise RecipeError(f"{where}: sparsity={self.sparsity!r} is not allowed: {exc}") from None
        if not pattern.is_nm and pattern.ratio == 0.0:
            raise RecipeError(
                f"{where}: sparsity={self.sparsity!r} prunes nothing (it would only add a mask); "
                "remove the prune stage or give a ratio above 0"
            )
        if self.allocation == "owl":
            if pattern.is_nm:
                raise RecipeError(f"{where}: allocation='owl' needs an unstructured ratio, not {pattern.describe()}")
            if not 0.0 <= self.owl_lambda < 1.0:
                raise RecipeError(f"{where}: owl_lambda={self.owl_lambda} is not allowed; choose 0 to 1")
            if pattern.ratio + self.owl_lambda >= 1.0 or pattern.ratio - self.owl_lambda < 0.0:
                raise RecipeError(
                    f"{where}: owl_lambda={self.owl_lambda} around sparsity {pattern.ratio} leaves [0, 1); "
                    "choose a smaller owl_lambda"
                )
            if self.owl_threshold <= 0:
                raise RecipeError(f"{where}: owl_threshold={self.owl_threshold} is not allowed; use a positive factor")
        check_solver(where, self.damp, self.block_size)
        self.check_targets(where)

    @property
    def pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.sparsity, scope=self.scope)

    @property
    def gptq_options(self) -> GPTQOptions:
        return GPTQOptions(self.block_size, self.damp)

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.allocation == "owl"

    rescales_inputs = False
    act_bits = 0
    LATER_FIELDS: ClassVar[dict] = {"grid_fit": "current"}  # see QuantizeStage.LATER_FIELDS

    def to_dict(self) -> dict:
        return stage_dict(self)


register_stage("prune", PruneStage, "linear")
