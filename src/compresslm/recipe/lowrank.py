"""Low-rank stages: `lowrank` replaces a weight by float16 factors; `lowrank_compensation` corrects one.

`lowrank` (SVD, ASVD or SVD-LLM's whitened truncation, `lowrank.factorize`) stores W ≈ A·B with a
rank given directly or by the share of the layer's parameters to remove (`ratio`, the same share
for every targeted layer). It stands alone on its layers: quantizing or pruning the factors is not
supported, so a layer it targets takes no quantize or prune stage.

`lowrank_compensation`: after a quantize (or prune) stage, W ≈ Q + L·R with the factors fitted to
the layer's output on the calibration inputs (`lowrank.compensation`); `whiten: false` fits the
weights instead and needs no calibration. The factors are stored beside the record (two float16
blobs) and count in its bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from compresslm.compressed import CompressedWeight
from compresslm.errors import CompressLMError
from compresslm.lowrank.compensation import fit_lowrank
from compresslm.lowrank.factorize import METHODS, factorize, rank_for_ratio
from compresslm.recipe.fields import RecipeError, Targeted, check_solver, choice, stage_dict
from compresslm.recipe.registry import register_stage


@dataclass
class LowRankCompensationStage(Targeted):
    rank: int = 16
    whiten: bool = True
    damp: float = 0.01
    targets: list[str] = field(default_factory=lambda: ["all"])
    ignore: list[str] = field(default_factory=list)
    type: str = "lowrank_compensation"

    def validate(self, where: str) -> None:
        if self.rank < 1:
            raise RecipeError(f"{where}: rank={self.rank} is not allowed; use a positive rank")
        check_solver(where, self.damp, 1)
        self.check_targets(where)

    def check_layer(self, name: str, shape: tuple[int, int]) -> None:
        """Refuse, before any compute, a rank the layer cannot hold."""
        if self.rank > min(shape):
            raise RecipeError(
                f"{self.type}: rank={self.rank} is more than {name} [{shape[0]}, {shape[1]}] can hold "
                f"(at most {min(shape)}); lower the rank or leave the layer out with `ignore`"
            )

    @property
    def needs_calibration(self) -> bool:
        return self.whiten

    def to_dict(self) -> dict:
        return stage_dict(self)

    def describe(self) -> str:
        return f"+ rank {self.rank} float16 ({'whitened' if self.whiten else 'weights'})"


def compensate(
    stage: LowRankCompensationStage, weight: torch.Tensor, record: CompressedWeight | None, hessian: torch.Tensor | None
) -> CompressedWeight:
    if record is None:
        raise CompressLMError("lowrank_compensation corrects a compressed weight: put a quantize or prune stage first")
    if record.lowrank is not None:
        raise CompressLMError("this weight has low-rank factors already; give one lowrank_compensation stage")
    if record.dial is not None:
        raise CompressLMError("a dial weight serves many widths; one low-rank correction cannot fit them all")
    fit = fit_lowrank(weight.float() - record.dequantize(), stage.rank, hessian if stage.whiten else None, stage.damp)
    kept = fit.kept_loss / fit.total_loss if fit.total_loss else 0.0  # the share of the error the factors leave
    facts = {"rank": stage.rank, "whitened": stage.whiten, "damp_used": fit.damp_used, "error_left": kept}
    meta = {**record.meta, "lowrank": facts}
    return dataclasses.replace(record, lowrank=(fit.left.half(), fit.right.half()), meta=meta)


register_stage("lowrank_compensation", LowRankCompensationStage, "linear", compensate)


@dataclass
class LowRankStage(Targeted):
    method: str = "whitened"
    ratio: float | None = 0.2
    rank: int | None = None
    alpha: float = 0.5
    damp: float = 0.01
    targets: list[str] = field(default_factory=lambda: ["all"])
    ignore: list[str] = field(default_factory=list)
    type: str = "lowrank"

    def validate(self, where: str) -> None:
        choice(where, "method", self.method, METHODS)
        if (self.ratio is None) == (self.rank is None):
            raise RecipeError(f"{where}: give either ratio (the share of parameters to remove) or rank, not "
                              f"{'both' if self.rank is not None else 'neither'}")  # fmt: skip
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise RecipeError(f"{where}: ratio={self.ratio} is not allowed; use a share between 0 and 1, e.g. 0.2")
        if self.rank is not None and self.rank < 1:
            raise RecipeError(f"{where}: rank={self.rank} is not allowed; use a positive rank")
        if not 0 < self.alpha <= 2:
            raise RecipeError(f"{where}: alpha={self.alpha} is not allowed; use a power in (0, 2], e.g. 0.5")
        check_solver(where, self.damp, 1)
        self.check_targets(where)

    def rank_for(self, shape: tuple[int, int]) -> int:
        return self.rank if self.rank is not None else rank_for_ratio(shape, self.ratio)

    def check_layer(self, name: str, shape: tuple[int, int]) -> None:
        """Refuse, before any compute, a layer whose factors would not be smaller than the layer itself."""
        out_f, in_f = shape
        rank = self.rank_for(shape)
        if rank < 1:
            raise RecipeError(f"{self.type}: ratio={self.ratio} leaves {name} [{out_f}, {in_f}] no rank at all; "
                              "lower the ratio or leave the layer out with `ignore`")  # fmt: skip
        if rank * (out_f + in_f) >= out_f * in_f:
            raise RecipeError(
                f"{self.type}: rank {rank} factors of {name} [{out_f}, {in_f}] hold {rank * (out_f + in_f):,} "
                f"parameters, not fewer than the layer's {out_f * in_f:,}; use a rank below "
                f"{out_f * in_f // (out_f + in_f) + 1} or leave the layer out with `ignore`"
            )

    @property
    def needs_calibration(self) -> bool:
        return self.method != "svd"

    def to_dict(self) -> dict:
        return stage_dict(self)

    def describe(self) -> str:
        size = f"rank {self.rank}" if self.rank is not None else f"-{100 * self.ratio:g}% parameters"
        return f"{size} float16 factors"


def factorize_weight(
    stage: LowRankStage, weight: torch.Tensor, record: CompressedWeight | None, hessian: torch.Tensor | None
) -> CompressedWeight:
    if record is not None:
        raise CompressLMError(
            "a lowrank stage replaces the weight by its factors; quantizing or pruning the same layer is not "
            "supported (give the layer to one or the other with `targets`/`ignore`)"
        )
    return factorize(weight, stage.rank_for(tuple(weight.shape)), stage.method, hessian, stage.alpha, stage.damp)


register_stage("lowrank", LowRankStage, "linear", factorize_weight)
