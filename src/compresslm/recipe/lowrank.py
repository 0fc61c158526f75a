"""The `lowrank_compensation` stage: a rank-r float16 correction L·R of what the stages before left.

After a quantize (or prune) stage, W ≈ Q + L·R with the factors fitted to the layer's output on the
calibration inputs (`lowrank.compensation`); `whiten: false` fits the weights instead and needs no
calibration. The factors are stored beside the record (two float16 blobs) and count in its bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from compresslm.compressed import CompressedWeight
from compresslm.errors import CompressLMError
from compresslm.lowrank.compensation import fit_lowrank
from compresslm.recipe.fields import RecipeError, Targeted, check_solver, stage_dict
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
