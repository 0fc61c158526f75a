"""`CompressedWeight`: the one record every algorithm returns and every consumer reads.

Quantizers, pruners and factorizers produce it; runtime modules, the container, exports and the
dial consume it. It holds integer codes on a group-wise grid along the input dimension, the
scales and integer zero points of each group, or, for a weight that is pruned but not quantized,
its float16 values; plus a sparsity mask (with its N:M pattern when it has one), low-rank factors
and an importance order.

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


@dataclass(frozen=True)
class DialMeta:
    """What a dial record says about its widths and sparsity (`meta["dial"]`), typed.

    * `widths`: every dense width the record serves (its chain and its separately stored widths);
    * `chain`: the widths that are prefixes of this record's own codes (None: all of `widths`);
    * `active`: the width this record is set to;
    * `priorities`: per chain width, the weights its joint rounding gave them;
    * `sparse`, `levels`, `order_block`: a nested-sparse plane, tuned for `levels`, whose keep order
      runs within blocks of `order_block` columns;
    * `sparsity`: the ratio a separately pruned alternate serves.
    """

    widths: tuple[int, ...] = ()
    active: int | None = None
    chain: tuple[int, ...] | None = None
    priorities: tuple[float, ...] | None = None
    sparse: bool = False
    levels: tuple[float, ...] | None = None
    order_block: int | None = None
    sparsity: float | None = None

    @classmethod
    def of(cls, meta: dict) -> DialMeta | None:
        """The typed view of `meta["dial"]` (None for a record made without a dial)."""
        raw = meta.get("dial")
        if raw is None:
            return None
        if not isinstance(raw, dict) or set(raw) - _DIAL_KEYS:
            raise InvalidCompressedWeight(f"dial metadata {raw!r} names unknown fields")
        tuples = {k: tuple(v) for k, v in raw.items() if k in ("widths", "chain", "priorities", "levels")}
        return cls(**{**raw, **tuples})

    @property
    def chain_widths(self) -> tuple[int, ...]:
        return self.widths if self.chain is None else self.chain

    def to_dict(self) -> dict:
        """The JSON form stored in a record's meta: the fields that are set."""
        data: dict = {"widths": list(self.widths)}
        for name in ("priorities", "active", "chain", "sparse", "levels", "order_block", "sparsity"):
            value = getattr(self, name)
            if value is not None and value is not False:
                data[name] = list(value) if isinstance(value, tuple) else value
        return data

    def with_meta(self, meta: dict) -> dict:
        """`meta` with this record as its `dial` entry."""
        return {**meta, "dial": self.to_dict()}


_DIAL_KEYS = {f for f in DialMeta.__dataclass_fields__}
_ZERO_DTYPES = (torch.uint8, torch.float16, torch.float32)


@dataclass(eq=False)
class CompressedWeight:
    """A linear layer's weight [out_features, in_features] in compressed form.

    * `codes`: uint8 [out, in], each in [0, 2**bits - 1].
    * `scales`: float16 [out, groups] (or [1, 1] for a per-tensor grid); float32 for K-quant grids, whose
      scales d · sc (a float16 d times a small integer) need more significant bits than float16 has.
    * `zeros`: uint8, same shape as `scales`; the code that represents 0.0. A symmetric grid has
      the fixed zero point 2**(bits-1), stored all the same. Or float16: a float zero point, for
      grids whose zero falls between codes (the nested mid-rise grids of `quant.nested`); or
      float32, for K-quant grids whose offsets (a second float16 lattice) are not float16 multiples
      of their scales (`quant.grid`).
    * `group_size`: columns per group along the input dimension; equal to in_features for a
      per-channel grid. The last group is shorter when it does not divide in_features.
    * `values`: float16 [out, in] instead of codes/scales/zeros for a weight that is not quantized
      (pruned only); `bits` is then 16. Use `CompressedWeight.unquantized(...)`.
    * `mask`: optional bool [out, in], True where the weight is kept (sparsity).
    * `nm`: (N, M) when the mask keeps exactly N weights in every M consecutive inputs of a row.
    * `lowrank`: optional float16 (A [out, r], B [r, in]) factors added to the dequantized weight;
      or, for a weight factorized outright (`CompressedWeight.factored`), the whole weight A·B, with
      no codes and no values (`bits` 16, no mask).
    * `importance`: optional float16 [in_features], each input channel's calibration norm ‖x_j‖:
      with the weights it orders them for the dial's nested sparsity (Wanda's score |W_ij|·‖x_j‖).
    * `order`: optional uint8 [out, in], each weight's position in its row's keep order within
      blocks of `dial.order_block` columns (0 = kept longest): a nested-sparse dial
      record (`sparse.nested`), from which every sparsity ratio is a prefix.
    * `alternates`: a dial weight's further planes, each a quantized record of the same shape:
      widths stored as their own codes rather than as prefixes of `codes` (`dial.widths`
      names them; see `quant.nested.slice_record`), a nested-sparse plane (with `order`) and
      ratios pruned on their own (with `mask`; `dial.sparsity` names the ratio).
    * `meta`: free-form JSON-able facts about how it was made (algorithm, error, damping); its
      `dial` entry is read through the typed `dial` property (`DialMeta`).
    """

    shape: tuple[int, int]
    bits: int
    group_size: int
    symmetric: bool
    codes: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    mask: torch.Tensor | None = None
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None
    importance: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    values: torch.Tensor | None = None
    nm: tuple[int, int] | None = None
    order: torch.Tensor | None = None
    alternates: tuple[CompressedWeight, ...] = ()

    @classmethod
    def unquantized(
        cls, values: torch.Tensor, mask: torch.Tensor | None = None, nm: tuple[int, int] | None = None,
        meta: dict | None = None,
    ) -> CompressedWeight:  # fmt: skip
        """A weight kept in float16 (pruned only): pruned entries are stored as exact zeros."""
        values = values.detach().to(torch.float16)
        if mask is not None:
            values = values.masked_fill(~mask, 0.0)
        return cls(
            shape=tuple(values.shape), bits=16, group_size=values.shape[1], symmetric=True,
            codes=None, scales=None, zeros=None, mask=mask, nm=nm, values=values, meta=meta or {},
        )  # fmt: skip

    @classmethod
    def factored(cls, left: torch.Tensor, right: torch.Tensor, meta: dict | None = None) -> CompressedWeight:
        """A weight replaced by float16 factors: W = A·B, with A [out, r] and B [r, in].

        The factors are made contiguous, as they are when read back from a container: a matmul's last bits
        depend on its operands' memory layout, and the model must compute the same before and after saving.
        """
        left, right = left.detach().to(torch.float16).contiguous(), right.detach().to(torch.float16).contiguous()
        return cls(
            shape=(left.shape[0], right.shape[1]), bits=16, group_size=right.shape[1], symmetric=True,
            codes=None, scales=None, zeros=None, lowrank=(left, right), meta=meta or {},
        )  # fmt: skip

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def is_factored(self) -> bool:
        """Whether the weight is its low-rank factors alone (no codes, no values)."""
        return self.codes is None and self.values is None

    @property
    def dial(self) -> DialMeta | None:
        """The record's dial metadata, typed (None for a record made without a dial)."""
        return DialMeta.of(self.meta)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self._check_sparsity()
        if self.order is not None and (self.order.dtype != torch.uint8 or tuple(self.order.shape) != self.shape):
            raise InvalidCompressedWeight(f"order must be uint8 of shape {self.shape}")
        self.alternates = tuple(self.alternates)
        for alt in self.alternates:
            if alt.shape != self.shape or not alt.quantized or alt.alternates or alt.dial is None:
                raise InvalidCompressedWeight(
                    f"an alternate width must be a quantized {self.shape} record naming its dial widths"
                )
        self._check_lowrank()
        if self.importance is not None and (
            self.importance.dtype != torch.float16 or tuple(self.importance.shape) != (self.shape[1],)
        ):
            raise InvalidCompressedWeight(f"importance must be float16 of shape ({self.shape[1]},)")
        if self.values is not None:
            self._check_unquantized()
            return
        if self.codes is None and self.scales is None and self.zeros is None and self.lowrank is not None:
            self._check_factored()
            return
        out_f, in_f = self.shape
        if not 1 <= self.bits <= 8:
            raise InvalidCompressedWeight(f"bits must be in 1..8, got {self.bits}")
        if self.codes is None or self.scales is None or self.zeros is None:
            raise InvalidCompressedWeight("a quantized weight needs codes, scales and zeros (or values instead)")
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
        if tuple(self.scales.shape) not in allowed or self.scales.dtype not in (torch.float16, torch.float32):
            raise InvalidCompressedWeight(
                f"scales must be float16 (or float32) of shape {(out_f, groups)} (or (1, 1)), "
                f"got {self.scales.dtype} {tuple(self.scales.shape)}"
            )
        if tuple(self.zeros.shape) != tuple(self.scales.shape) or self.zeros.dtype not in _ZERO_DTYPES:
            raise InvalidCompressedWeight("zeros must be uint8 (or float16 or float32) with the shape of scales")
        if self.zeros.is_floating_point():
            if self.symmetric or not torch.isfinite(self.zeros).all():
                raise InvalidCompressedWeight("float zero points must be finite and belong to an asymmetric grid")
        elif int(self.zeros.max()) >= 1 << self.bits:
            raise InvalidCompressedWeight(f"zero points exceed {self.bits} bits")
        if not torch.isfinite(self.scales).all():
            raise InvalidCompressedWeight("scales contain NaN or infinity")

    def _check_unquantized(self) -> None:
        if self.bits != 16 or self.codes is not None or self.scales is not None or self.zeros is not None:
            raise InvalidCompressedWeight("an unquantized weight has bits 16 and values instead of codes/scales/zeros")
        if self.values.dtype != torch.float16 or tuple(self.values.shape) != self.shape:
            raise InvalidCompressedWeight(f"values must be float16 of shape {self.shape}")
        if not torch.isfinite(self.values).all():
            raise InvalidCompressedWeight("values contain NaN or infinity")

    def _check_factored(self) -> None:
        if self.bits != 16 or self.mask is not None or self.alternates or self.order is not None:
            raise InvalidCompressedWeight("a factored weight has bits 16 and no mask, order or alternates")

    def _check_lowrank(self) -> None:
        if self.lowrank is None:
            return
        a, b = self.lowrank = tuple(self.lowrank)
        out_f, in_f = self.shape
        rank = a.shape[1] if a.dim() == 2 else 0
        if a.dtype != torch.float16 or b.dtype != torch.float16 or a.dim() != 2 or b.dim() != 2:
            raise InvalidCompressedWeight("low-rank factors must be two float16 matrices")
        if not 1 <= rank <= min(out_f, in_f) or tuple(a.shape) != (out_f, rank) or tuple(b.shape) != (rank, in_f):
            raise InvalidCompressedWeight(
                f"low-rank factors must be [{out_f}, r] and [r, {in_f}] with 1 <= r <= {min(out_f, in_f)}, "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InvalidCompressedWeight("low-rank factors contain NaN or infinity")

    def _check_sparsity(self) -> None:
        if self.mask is None:
            if self.nm is not None:
                raise InvalidCompressedWeight("an N:M pattern needs a mask")
            return
        if self.mask.dtype != torch.bool or tuple(self.mask.shape) != self.shape:
            raise InvalidCompressedWeight(f"mask must be bool of shape {self.shape}")
        if self.nm is not None:
            n, m = self.nm = (int(self.nm[0]), int(self.nm[1]))
            if not 0 < n < m or self.shape[1] % m:
                raise InvalidCompressedWeight(f"N:M pattern {n}:{m} does not fit {self.shape[1]} input columns")
            kept = self.mask.reshape(self.shape[0], -1, m).sum(dim=-1)
            if not bool((kept == n).all()):
                raise InvalidCompressedWeight(f"mask does not keep exactly {n} of every {m} weights")

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned (0.0 without a mask)."""
        if self.mask is None:
            return 0.0
        return 1.0 - float(self.mask.sum()) / self.mask.numel()

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def per_tensor(self) -> bool:
        return self.scales is not None and tuple(self.scales.shape) == (1, 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense [out, in] tensor: (codes - zero) * scale (or the values), then mask and low-rank."""
        if self.is_factored:
            a, b = self.lowrank
            return (a.float() @ b.float()).to(dtype)
        if self.values is not None:
            weight = self.values.float()
            if self.lowrank is not None:
                a, b = self.lowrank
                weight = weight + a.float() @ b.float()
            return weight.to(dtype)
        scales = self.scales.float()
        zeros = self.zeros.float()
        if not self.per_tensor and self.in_features % self.group_size == 0:
            # equal groups: broadcast per group instead of expanding scales and zeros (3-4x faster on CPU,
            # the same operations per element, so the same bits)
            out_f, groups = scales.shape
            codes = self.codes.reshape(out_f, groups, self.group_size).float()
            weight = ((codes - zeros[..., None]) * scales[..., None]).view(out_f, self.in_features)
        else:
            if not self.per_tensor:
                scales = expand_groups(scales, self.in_features, self.group_size)
                zeros = expand_groups(zeros, self.in_features, self.group_size)
            weight = (self.codes.float() - zeros) * scales
        if self.mask is not None:  # a product, not masked_fill: ~9x faster on CPU, and the codes are finite
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
            **({"sparsity": self.sparsity} if self.mask is not None else {}),
            **({"nm": list(self.nm)} if self.nm else {}),
            **({"meta": self.meta} if self.meta else {}),
        }
