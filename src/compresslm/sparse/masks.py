"""Sparsity patterns and mask selection: unstructured (per row or per layer) and N:M.

A mask is a bool tensor shaped like the weight, True where a weight is *kept*. A pattern says how
many weights go and how the choice is constrained:

* unstructured, `ratio` in [0, 1): the lowest-scoring `ratio` of each row (scope "row", Wanda's
  comparison group) or of the whole layer (scope "layer", magnitude pruning's usual choice);
* N:M: exactly N kept in every M consecutive inputs of a row (2:4 is what sparse tensor cores run).

`select_mask(scores, pattern)` keeps the highest scores; every pruning method is a scoring rule
plus this one selection, so they all obey the same pattern the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from compresslm.errors import CompressLMError


class SparsityError(CompressLMError):
    """A sparsity pattern that is impossible or does not fit a weight."""


@dataclass(frozen=True)
class SparsityPattern:
    """Either an unstructured `ratio` (with a `scope`) or an N:M pattern (`n`, `m`)."""

    ratio: float | None = None
    n: int | None = None
    m: int | None = None
    scope: str = "row"

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.n is None):
            raise SparsityError("a sparsity pattern is either a ratio (e.g. 0.5) or N:M (e.g. 2:4), not both")
        if self.ratio is not None:
            if not 0.0 <= self.ratio < 1.0 or math.isnan(self.ratio):
                raise SparsityError(f"sparsity ratio must be in [0, 1), got {self.ratio}")
            if self.scope not in ("row", "layer"):
                raise SparsityError(f"sparsity scope must be 'row' or 'layer', got '{self.scope}'")
        else:
            if self.m is None or not (isinstance(self.n, int) and isinstance(self.m, int)):
                raise SparsityError(f"N:M needs two integers, got {self.n}:{self.m}")
            if not 0 < self.n < self.m:
                raise SparsityError(f"N:M needs 0 < N < M (N kept of every M), got {self.n}:{self.m}")

    @classmethod
    def parse(cls, text: str | float, scope: str = "row") -> SparsityPattern:
        """'50%', '0.5' or 0.5 -> unstructured; '2:4' -> N:M."""
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            return cls(ratio=float(text), scope=scope)
        value = str(text).strip()
        if match := re.fullmatch(r"(\d+):(\d+)", value):
            return cls(n=int(match[1]), m=int(match[2]))
        if match := re.fullmatch(r"(\d+(?:\.\d+)?)%", value):
            return cls(ratio=float(match[1]) / 100, scope=scope)
        try:
            return cls(ratio=float(value), scope=scope)
        except ValueError:
            raise SparsityError(
                f"cannot read sparsity '{text}': expected a ratio like 0.5 or 50% or a pattern like 2:4"
            ) from None

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def nm(self) -> tuple[int, int] | None:
        return (self.n, self.m) if self.is_nm else None

    def with_ratio(self, ratio: float) -> SparsityPattern:
        """The same unstructured pattern at another ratio (layer-wise allocation)."""
        if self.is_nm:
            raise SparsityError("N:M patterns have a fixed ratio; layer-wise allocation needs an unstructured ratio")
        return SparsityPattern(ratio=ratio, scope=self.scope)

    def check(self, shape: tuple[int, int]) -> None:
        if self.is_nm and shape[1] % self.m:
            raise SparsityError(
                f"{self.n}:{self.m} sparsity needs the input width to be a multiple of {self.m}; got {shape[1]} columns"
            )

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{100 * self.ratio:g}% ({self.scope})"


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask keeping the `keep` largest entries along the last dimension."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(-1, torch.topk(scores, keep, dim=-1, sorted=False).indices, True)
    return mask


def select_mask(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Keep the highest `scores` [out, in] under `pattern`; ties are broken by position, deterministically."""
    pattern.check(tuple(scores.shape))
    scores = scores.float()
    if not torch.isfinite(scores).all():
        raise SparsityError("pruning scores contain NaN or infinity (check the weights and calibration inputs)")
    out_f, in_f = scores.shape
    if pattern.is_nm:
        groups = scores.reshape(out_f, in_f // pattern.m, pattern.m)
        return _keep_top(groups, pattern.n).reshape(out_f, in_f)
    if pattern.scope == "row":
        return _keep_top(scores, in_f - round(pattern.ratio * in_f))
    keep = scores.numel() - round(pattern.ratio * scores.numel())
    return _keep_top(scores.reshape(1, -1), keep).reshape(out_f, in_f)


def mask_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of the weights pruned by `a` that `b` also prunes (1.0 for identical masks).

    Intersection over union of the pruned sets; 1.0 when neither prunes anything.
    """
    if a.shape != b.shape:
        raise SparsityError(f"cannot compare masks of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    pruned_a, pruned_b = ~a, ~b
    union = int((pruned_a | pruned_b).sum())
    return float((pruned_a & pruned_b).sum()) / union if union else 1.0


def held_zeros(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
    """The mask that holds a weight's exact zeros (an already pruned checkpoint), for quantizing it
    to `bits` without filling them: a 2:4 mask, stored as N:M, when every 4 consecutive inputs of a
    row hold at most 2 non-zeros (a group with fewer keeps some zeros as kept weights, so the pattern
    stays 2:4); otherwise the unstructured mask of non-zeros where at least 1 in `bits` entries is
    zero (a bitmask costs a bit per weight and saves `bits` per zero); else (None, None): dense."""
    nonzero = weight != 0
    out_f, in_f = weight.shape
    if bool(nonzero.all()):
        return None, None
    if in_f % 4 == 0 and bool((nonzero.reshape(out_f, -1, 4).sum(dim=-1) <= 2).all()):
        return select_mask(weight.abs(), SparsityPattern(n=2, m=4)), (2, 4)
    if float((~nonzero).float().mean()) * bits < 1:
        return None, None
    return nonzero, None
