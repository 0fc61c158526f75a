"""`CompressedWeight`: the one record every algorithm returns and every consumer reads.

Quantizers, pruners and factorizers produce it; runtime modules, the container, exports and the
dial consume it. It holds integer codes on a group-wise grid along the input dimension, the
scales and integer zero points of each group, and room for what later stages add (a sparsity
mask or N:M pattern, low-rank factors, an importance order).

`dequantize()` is exact and deterministic: float32 arithmetic on stored values only, so the same
record always gives the same bits, whether it was just computed or read back from disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from compresslm.errors import CompressLMError


class InvalidCompressedWeight(CompressLMError):
    """A CompressedWeight whose fields contradict each other."""


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along the input dimension; the last one is shorter when `group_size` does not divide it."""
    return math.ceil(in_features / group_size)


def expand_groups(values: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Repeat per-group values [rows, groups] to per-column [rows, in_features] (shorter last group)."""
    return values.repeat_interleave(group_size, dim=1)[:, :in_features]


@dataclass(eq=False)
class CompressedWeight:
    """A linear layer's weight [out_features, in_features] in compressed form.

    * `codes`: uint8 [out, in], each in [0, 2**bits - 1].
    * `scales`: float16 [out, groups] (or [1, 1] for a per-tensor grid).
    * `zeros`: uint8, same shape as `scales`; the code that represents 0.0. A symmetric grid has
      the fixed zero point 2**(bits-1), stored all the same.
    * `group_size`: columns per group along the input dimension; equal to in_features for a
      per-channel grid. The last group is shorter when it does not divide in_features.
    * `mask`: optional bool [out, in], True where the weight is kept (sparsity, later stages).
    * `lowrank`: optional (A [out, r], B [r, in]) factors added to the dequantized weight.
    * `importance`: optional order of weights for nested sparsity (the dial).
    * `meta`: free-form JSON-able facts about how it was made (algorithm, error, damping).
    """

    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    mask: torch.Tensor | None = None
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None
    importance: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        out_f, in_f = self.shape
        if not 1 <= self.bits <= 8:
            raise InvalidCompressedWeight(f"bits must be in 1..8, got {self.bits}")
        if not 1 <= self.group_size <= in_f:
            raise InvalidCompressedWeight(f"group_size must be in 1..{in_f}, got {self.group_size}")
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != self.shape:
            raise InvalidCompressedWeight(
                f"codes must be uint8 of shape {self.shape}, got {self.codes.dtype} {tuple(self.codes.shape)}"
            )
        if int(self.codes.max()) >= 1 << self.bits:
            raise InvalidCompressedWeight(f"codes exceed {self.bits} bits (max {int(self.codes.max())})")
        groups = num_groups(in_f, self.group_size)
        allowed = {(out_f, groups), (1, 1)}
        if tuple(self.scales.shape) not in allowed or self.scales.dtype != torch.float16:
            raise InvalidCompressedWeight(
                f"scales must be float16 of shape {(out_f, groups)} (or (1, 1)), "
                f"got {self.scales.dtype} {tuple(self.scales.shape)}"
            )
        if tuple(self.zeros.shape) != tuple(self.scales.shape) or self.zeros.dtype != torch.uint8:
            raise InvalidCompressedWeight("zeros must be uint8 with the shape of scales")
        if int(self.zeros.max()) >= 1 << self.bits:
            raise InvalidCompressedWeight(f"zero points exceed {self.bits} bits")
        if not torch.isfinite(self.scales).all():
            raise InvalidCompressedWeight("scales contain NaN or infinity")
        if self.mask is not None and (self.mask.dtype != torch.bool or tuple(self.mask.shape) != self.shape):
            raise InvalidCompressedWeight(f"mask must be bool of shape {self.shape}")

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def per_tensor(self) -> bool:
        return tuple(self.scales.shape) == (1, 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense [out, in] tensor: (codes - zero) * scale, then mask and low-rank."""
        scales = self.scales.float()
        zeros = self.zeros.float()
        if not self.per_tensor:
            scales = expand_groups(scales, self.in_features, self.group_size)
            zeros = expand_groups(zeros, self.in_features, self.group_size)
        weight = (self.codes.float() - zeros) * scales
        if self.mask is not None:
            weight = weight * self.mask
        if self.lowrank is not None:
            a, b = self.lowrank
            weight = weight + a.float() @ b.float()
        return weight.to(dtype)

    def describe(self) -> dict:
        return {
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "per_tensor": self.per_tensor,
            **({"meta": self.meta} if self.meta else {}),
        }
