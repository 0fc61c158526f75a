"""Uniform integer grids: per-tensor, per-channel or group-wise along the input dimension.

A grid maps a float weight to codes in [0, 2**bits - 1] with a float16 scale and an integer zero
point per group: w ≈ (code - zero) * scale. Asymmetric grids stretch [min(w, 0), max(w, 0)] over the
codes; symmetric grids use scale = 2·max|w| / (2**bits - 1) with the fixed zero point 2**(bits-1)
(the convention of the GPTQ reference code and llm-compressor). That scale leaves the extreme on the
positive side between the last two codes; `signed_scale` instead gives the scale the sign of the
group's largest-magnitude weight and puts that weight on the lowest code exactly (scale = w_extreme /
-2**(bits-1)): a finer step and no extreme clipped. It is how llama.cpp quantizes its symmetric types
(Q4_0, Q5_0, Q3_K, Q6_K), whose stored scales are signed, so the GGUF presets use it. Scales are
rounded to float16 *before* codes are chosen, so the codes are optimal for the scale that is stored.

A group size that does not divide the row is honoured with a shorter last group; nothing falls
back silently. `offset_exact` keeps only as many significant bits in an asymmetric grid's scales as
make every `zero · scale` a float16 too: GGUF's Q4_1 and Q5_1 store that product (their offset m)
as a float16, so such a grid is written to them without loss (`formats.gguf_export`).
`clip_search` shrinks each group's range to minimise the Lp error of its
reconstruction (the MSE-style search of the GPTQ code, with p = 2.4 by default); with `clip_weighted`
the error of each column is weighted by its importance (GPTQ passes its Hessian's diagonal, the inputs'
mean squares: what llama.cpp's importance matrix holds), so the range fits the columns that matter.

`kquant` makes a grid one of llama.cpp's K-quant types (`K_QUANTS`): groups (sub-blocks of 16 or 32
columns) inside super-blocks of 256 whose scales are one float16 `d` times a small integer each, and
for Q4_K, Q5_K and Q2_K whose offsets are a second float16 `dmin` times a small integer. The scales
are chosen on exactly that lattice, so the codes that RTN, GPTQ and AWQ pick are the codes llama.cpp
decodes and the GGUF export is lossless. `d` is a float16 and every `d · sc` is exact in float32: such a
record's scales, like its zero points, are float32 (a `d` cut to the few significant bits that keep
every product a float16 made the lattice coarse enough to lose to llama.cpp's own quantizer on weights
that came from a 4-bit grid). Their clip search picks each sub-block's range before the lattice is
fitted; with `refit` it instead rounds each sub-block at a range of candidate steps and refits the step
(and an asymmetric type's offset) to the rounded codes by weighted least squares, keeping the candidate
with the least error (the search llama.cpp's own K-quant quantizer makes). Rows that
super-blocks do not divide take the type llama.cpp itself falls back to (`Grid.for_width`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from compresslm.compressed import CompressedWeight, expand_groups
from compresslm.errors import CompressLMError

_MIN_SCALE = 2.0**-24  # the smallest positive float16
SUPER_BLOCK = 256  # columns per K-quant super-block (llama.cpp's QK_K)
_CLIP_FIELDS = ("clip_search", "clip_grid", "clip_max_shrink", "clip_norm", "clip_weighted")


class GridError(CompressLMError):
    """A grid specification that cannot be applied to a weight."""


@dataclass(frozen=True)
class Grid:
    """How to quantize a weight: bit width, granularity, symmetry and optional clip search."""

    bits: int = 4
    granularity: str = "group"  # "group", "channel" or "tensor"
    group_size: int = 128
    symmetric: bool = False
    clip_search: bool = False
    clip_grid: int = 100
    clip_max_shrink: float = 0.8
    clip_norm: float = 2.4
    offset_exact: bool = False
    kquant: str = ""  # a K_QUANTS name: sub-block scales on a super-block's float16 lattice
    signed_scale: bool = False  # symmetric only: the largest |w| on the lowest code, the scale takes its sign
    clip_weighted: bool = False  # the clip search weights columns by the importance a caller gives (GPTQ)
    refit: bool = False  # K-quants: the clip search rounds at candidate steps and refits each by least squares

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise GridError(f"bits must be between 2 and 8, got {self.bits}")
        if self.granularity not in ("group", "channel", "tensor"):
            raise GridError(f"granularity must be group, channel or tensor, got '{self.granularity}'")
        if self.granularity == "group" and self.group_size < 1:
            raise GridError(f"group_size must be a positive number of columns, got {self.group_size}")
        if not 0.0 < self.clip_max_shrink < 1.0:
            raise GridError(f"clip_max_shrink must be in (0, 1), got {self.clip_max_shrink}")
        if self.signed_scale and not self.symmetric:
            raise GridError("signed_scale applies to symmetric grids; this one is asymmetric")
        if self.clip_weighted and not self.clip_search:
            raise GridError("clip_weighted weights the clip search; set clip_search too")
        if self.refit and not (self.kquant and self.clip_search):
            raise GridError("refit is a clip search of K-quant sub-blocks; set kquant and clip_search too")
        if self.kquant:
            kind = K_QUANTS.get(self.kquant)
            if kind is None:
                raise GridError(f"kquant must be one of {', '.join(K_QUANTS)}, got '{self.kquant}'")
            shape = (self.bits, self.granularity, self.group_size, self.symmetric, self.signed_scale)
            if shape != (kind.bits, "group", kind.group_size, kind.symmetric, kind.symmetric) or self.offset_exact:
                raise GridError(f"{self.kquant} is {kquant_grid(self.kquant).describe()}; got {self.describe()}")

    def for_width(self, in_features: int) -> Grid:
        """The grid a weight with `in_features` columns gets: a K-quant grid whose super-blocks do not divide
        the row gives way to the legacy type llama.cpp uses for such a row, with this grid's clip search."""
        if self.kquant and in_features % SUPER_BLOCK:
            clip = {name: getattr(self, name) for name in _CLIP_FIELDS}
            return replace(K_QUANTS[self.kquant].fallback, **clip)
        return self

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def fractional_zero(self) -> bool:
        """Zero points that fall between codes (a K-quant's offsets): float32, rounded with the codes."""
        return bool(self.kquant) and not self.symmetric

    def group_size_for(self, in_features: int) -> int:
        """Columns per group for a weight with `in_features` columns."""
        if self.granularity == "group":
            if self.group_size > in_features:
                raise GridError(
                    f"group_size {self.group_size} is larger than the row ({in_features} columns); "
                    "use granularity 'channel' for one group per row"
                )
            return self.group_size
        return in_features

    def describe(self) -> str:
        kind = {"group": f"g{self.group_size}", "channel": "per-channel", "tensor": "per-tensor"}[self.granularity]
        clip = " wclip" if self.clip_weighted else " clip" if self.clip_search else ""
        flags = clip + (" offset-exact" if self.offset_exact else "")
        flags += " signed" if self.signed_scale else ""
        flags += f" {self.kquant}" if self.kquant else ""
        flags += " refit" if self.refit else ""
        return f"W{self.bits} {kind} {'sym' if self.symmetric else 'asym'}{flags}"


def _signed_extreme(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The end of [lo, hi] farther from zero, with its sign (the negative end on a tie)."""
    return torch.where(-lo >= hi, lo, hi)


def _signed_step(extreme: torch.Tensor, bits: int) -> torch.Tensor:
    """The step that puts `extreme` on the lowest code, -2**(bits-1) steps from zero (at least the smallest
    float16 in magnitude; positive for an all-zero group)."""
    step = extreme / -(1 << (bits - 1))
    return torch.where(step < 0, step.clamp(max=-_MIN_SCALE), step.clamp(min=_MIN_SCALE))


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-exact, as float32) and integer zero point for ranges [lo, hi] (lo <= 0 <= hi)."""
    maxq = grid.maxq
    if grid.signed_scale:
        scale = _signed_step(_signed_extreme(lo, hi), grid.bits).half().float()
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    elif grid.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = (2 * amax / maxq).clamp_min(_MIN_SCALE).half().float()
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = ((hi - lo) / maxq).clamp_min(_MIN_SCALE)
        if grid.offset_exact:
            scale = _round_up_significand(scale, 11 - grid.bits)
        scale = scale.half().float()
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


@dataclass(frozen=True)
class KQuant:
    """A K-quant type: sub-blocks of `group_size` columns whose scales are d · sc with one float16 d per
    super-block. Symmetric types put codes around the zero point 2**(bits-1) with signed scales (|sc| in
    [1, 2**scale_bits - 1], the sub-block's largest |w| on the lowest code); the others have sc in
    [1, 2**scale_bits - 1] and subtract an offset dmin · m per sub-block, m in [0, 2**min_bits - 1]."""

    bits: int
    group_size: int
    scale_bits: int
    fallback: Grid  # the type llama.cpp uses for a row that super-blocks do not divide
    min_bits: int = 0  # 0: symmetric

    @property
    def symmetric(self) -> bool:
        return self.min_bits == 0

    @property
    def max_scale(self) -> int:
        return (1 << self.scale_bits) - 1

    @property
    def max_min(self) -> int:
        return (1 << self.min_bits) - 1


K_QUANTS: dict[str, KQuant] = {}  # filled below, once Grid exists


def _float16_up(x: torch.Tensor) -> torch.Tensor:
    """`x` (>= 0) rounded up to a float16 (at least its smallest step)."""
    x = _round_up_significand(x.clamp_min(_MIN_SCALE), 11)
    return (torch.ceil(x / _MIN_SCALE) * _MIN_SCALE).half().float()


def _lattice(ideal: torch.Tensor, top_value: int, low: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float16 step per row [rows, 1] and integers [rows, subs] whose products approach `ideal` [rows, subs]:
    in [low, top_value], or for signed `ideal` (low < 0) of magnitude in [1, top_value]. The row's entry
    largest in magnitude gets ±`top_value`, so that the step is read back as the largest magnitude over
    `top_value` (`formats.gguf_export`)."""
    size = ideal.abs()
    top = size.amax(dim=1, keepdim=True)
    step = _float16_up(top / top_value)
    n = torch.round(size / step).clamp(1 if low < 0 else low, top_value)
    n = torch.where(size == top, float(top_value), n)
    return step, torch.where(ideal < 0, -n, n) if low < 0 else n


def _fit_super_blocks(
    x: torch.Tensor, grid: Grid, shrink: torch.Tensor | None, searched: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [rows, sub-blocks] of super-blocks `x` [rows, 256] on their K-quant lattice.

    Each sub-block's ideal scale t (as on the plain grid: signed for symmetric types; narrowed by
    `shrink`, or the step and offset a refit search found, `searched`) becomes d · sc: d is the largest
    |t| over sc's top value, rounded up to a float16 (at least its smallest step), and d · sc is exact in
    float32. An asymmetric type's offset -min(w, 0) becomes dmin · m the same way, and the zero point is
    dmin · m / scale, a float32.
    """
    kind = K_QUANTS[grid.kquant]
    rows = x.shape[0]
    sub = x.float().view(rows, -1, kind.group_size)
    offset = None
    if searched is not None:
        ideal, offset = searched
    elif kind.symmetric:
        ideal = _signed_step(_signed_extreme(sub.amin(dim=2), sub.amax(dim=2)), grid.bits)
    else:
        lo, hi = sub.amin(dim=2).clamp(max=0), sub.amax(dim=2).clamp(min=0)
        ideal = (hi - lo) / grid.maxq
        offset = -lo
    if shrink is not None:
        ideal, offset = ideal * shrink, None if offset is None else offset * shrink
    d, sc = _lattice(ideal, kind.max_scale, -kind.max_scale if kind.symmetric else 1)
    scales = d * sc
    if kind.symmetric:
        return scales, torch.full_like(scales, float((grid.maxq + 1) // 2))
    dmin, m = _lattice(offset, kind.max_min, 0)
    return scales, (dmin * m) / scales


def _kquant_refit(weight: torch.Tensor, grid: Grid, importance: torch.Tensor | None) -> tuple:
    """Each sub-block's step [out, groups] (signed for symmetric types) and offset (asymmetric types; None
    for symmetric) by round-and-refit: for each candidate step, the codes are rounded and the step (and
    offset) that fit them best in (importance-)weighted least squares is solved in closed form; the
    candidate whose refitted reconstruction has the least weighted squared error wins. The plain step is
    among the candidates: symmetric candidates put the extreme 2**(bits-1) ± 1 steps from zero (by tenths),
    asymmetric ones stretch the range over maxq ± 1 steps (by tenths)."""
    g = grid.group_size
    x = weight.float().view(weight.shape[0], -1, g)
    if importance is None or not grid.clip_weighted:
        w = torch.ones_like(x)
    else:
        w = importance.float().clamp_min(0).view(1, -1, g).expand_as(x)
    best_err = torch.full(x.shape[:2], float("inf"), device=x.device)
    if grid.symmetric:
        half = 1 << (grid.bits - 1)
        extreme = _signed_extreme(x.amin(dim=2), x.amax(dim=2))
        best = _signed_step(extreme, grid.bits)
        for tenth in range(-10, 11):
            step = _signed_step(extreme * half / (half + tenth / 10), grid.bits)
            codes = torch.clamp(torch.round(x / step[..., None]), -half, half - 1)
            norm = (w * codes * codes).sum(dim=2)
            fitted = torch.where(norm > 0, (w * codes * x).sum(dim=2) / norm.clamp_min(1e-30), step)
            err = (w * (fitted[..., None] * codes - x).square()).sum(dim=2)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, fitted, best)
        return best, None
    lo, hi = x.amin(dim=2).clamp(max=0), x.amax(dim=2).clamp(min=0)
    span = (hi - lo).clamp_min(_MIN_SCALE)
    best, best_low = span / grid.maxq, lo
    total, weighted_x = w.sum(dim=2), (w * x).sum(dim=2)
    for tenth in range(-10, 11):
        codes = torch.clamp(torch.round((x - lo[..., None]) * ((grid.maxq + tenth / 10) / span)[..., None]), 0,
                            grid.maxq)  # fmt: skip
        s1, s2, sx = (w * codes).sum(dim=2), (w * codes * codes).sum(dim=2), (w * codes * x).sum(dim=2)
        det = total * s2 - s1 * s1
        step = (total * sx - s1 * weighted_x) / det.clamp_min(1e-30)
        low = (s2 * weighted_x - s1 * sx) / det.clamp_min(1e-30)
        above = low > 0  # the offset only subtracts: a positive low end becomes zero, the step refitted alone
        step = torch.where(above, sx / s2.clamp_min(1e-30), step)
        low = torch.where(above, torch.zeros_like(low), low)
        err = (w * (step[..., None] * codes + low[..., None] - x).square()).sum(dim=2)
        better = (det > 0) & (step > 0) & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best, best_low = torch.where(better, step, best), torch.where(better, low, best_low)
    return best, -best_low


def _round_up_significand(x: torch.Tensor, bits: int) -> torch.Tensor:
    """`x` (positive) rounded up to `bits` significant bits: times any integer below 2**(11 - bits) it
    stays within float16's 11 (subnormal products are multiples of float16's step, also exact)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.ceil(mantissa * (1 << bits)) / (1 << bits), exponent)


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, fractional: bool = False
) -> torch.Tensor:
    """Codes clamp(round(x / scale) + zero) as float (broadcasting scale/zero against x); with
    `fractional` zero points (K-quants with offsets), clamp(round(x / scale + zero))."""
    if fractional:
        return torch.clamp(torch.round(x / scale + zero), 0, maxq)
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def fit_rows(
    x: torch.Tensor, grid: Grid, shrink: torch.Tensor | None = None, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid parameters for each row of `x` (one row = one group): scale and zero, both [rows].

    `shrink` (one factor per row, in (0, 1]) narrows each row's range before fitting: clipping
    chosen by a caller, e.g. AWQ's activation-aware clip search. `importance` (broadcastable to `x`,
    >= 0) weights each entry's error in the clip search of a `clip_weighted` grid.
    """
    x = x.float()
    lo = x.min(dim=1).values.clamp(max=0)
    hi = x.max(dim=1).values.clamp(min=0)
    if shrink is not None:
        lo, hi = lo * shrink, hi * shrink
    scale, zero = _params_from_range(lo, hi, grid)
    if not grid.clip_search:
        return scale, zero
    best_err = torch.full_like(scale, float("inf"))
    for step in range(int(grid.clip_max_shrink * grid.clip_grid)):
        shrink = 1.0 - step / grid.clip_grid
        s, z = _params_from_range(lo * shrink, hi * shrink, grid)
        q = (quantize_codes(x, s[:, None], z[:, None], grid.maxq) - z[:, None]) * s[:, None]
        err = (q - x).abs().pow(grid.clip_norm)
        err = (err if importance is None or not grid.clip_weighted else err * importance).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _kquant_shrink(weight: torch.Tensor, grid: Grid, importance: torch.Tensor | None) -> torch.Tensor:
    """Each sub-block's clip factor [out, groups] for a K-quant grid: the candidate range (as in `fit_rows`)
    whose reconstruction on the super-block lattice has the least (importance-weighted) Lp error. The
    lattice ties a super-block's sub-blocks together, so each is judged with the others at the same factor."""
    out_f, in_f = weight.shape
    g, w = grid.group_size, weight.float()
    plain = Grid(grid.bits, "group", g, grid.symmetric, signed_scale=grid.signed_scale, kquant=grid.kquant)
    importance = importance if grid.clip_weighted else None
    best_err = torch.full((out_f, in_f // g), float("inf"), device=w.device)
    best = torch.ones(out_f, in_f // g, device=w.device)
    for step in range(int(grid.clip_max_shrink * grid.clip_grid)):
        factor = torch.full_like(best, 1.0 - step / grid.clip_grid)
        scales, zeros = fit_weight(w, plain, factor)
        codes = quantize_weight(w, plain, scales, zeros)
        err = ((codes - expand_groups(zeros, in_f, g)) * expand_groups(scales, in_f, g) - w).abs().pow(grid.clip_norm)
        err = (err if importance is None else err * importance).view(out_f, -1, g).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, factor, best)
    return best


def fit_weight(
    weight: torch.Tensor, grid: Grid, shrink: torch.Tensor | None = None, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales and zeros of a [out, in] weight: two float32 tensors [out, groups] (or [1, 1]).

    `shrink` [out, groups] optionally narrows each group's range; `importance` [in] weights each
    column's error in the clip search (see `fit_rows`).
    """
    out_f, in_f = weight.shape
    if grid.kquant:
        if in_f % SUPER_BLOCK:
            raise GridError(f"{grid.kquant} needs rows of a multiple of {SUPER_BLOCK} columns, got {in_f}")
        per = SUPER_BLOCK // grid.group_size
        searched = None
        if grid.refit and shrink is None:
            step, offset = _kquant_refit(weight, grid, importance)
            searched = (step.reshape(-1, per), None if offset is None else offset.reshape(-1, per))
        elif grid.clip_search and shrink is None:
            shrink = _kquant_shrink(weight, grid, importance)
        part = None if shrink is None else shrink.reshape(-1, per)
        scales, zeros = _fit_super_blocks(weight.reshape(-1, SUPER_BLOCK), grid, part, searched)
        return scales.view(out_f, -1), zeros.view(out_f, -1)
    if grid.granularity == "tensor":
        weights = None if importance is None else importance.expand_as(weight).reshape(1, -1)
        scale, zero = fit_rows(weight.reshape(1, -1), grid, None if shrink is None else shrink.reshape(1), weights)
        return scale.view(1, 1), zero.view(1, 1)
    g = grid.group_size_for(in_f)
    full = in_f // g
    scales, zeros = [], []
    if full:
        part = None if shrink is None else shrink[:, :full].reshape(-1)
        weights = None if importance is None else importance[: full * g].view(full, g).repeat(out_f, 1)
        s, z = fit_rows(weight[:, : full * g].reshape(out_f * full, g), grid, part, weights)
        scales.append(s.view(out_f, full))
        zeros.append(z.view(out_f, full))
    if in_f % g:
        weights = None if importance is None else importance[full * g :]
        s, z = fit_rows(weight[:, full * g :], grid, None if shrink is None else shrink[:, -1], weights)
        scales.append(s.view(out_f, 1))
        zeros.append(z.view(out_f, 1))
    return torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def to_compressed(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    grid: Grid,
    meta: dict | None = None,
    mask: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
) -> CompressedWeight:
    """Pack float codes/scales/zeros (and a sparsity mask, if any) into a validated CompressedWeight."""
    out_f, in_f = codes.shape
    meta = dict(meta or {})
    if grid.kquant:  # the GGUF export reads the type from here
        meta["kquant"] = grid.kquant
    return CompressedWeight(
        shape=(out_f, in_f),
        bits=grid.bits,
        group_size=grid.group_size_for(in_f),
        symmetric=grid.symmetric,
        codes=codes.to(torch.uint8).cpu(),
        scales=(scales.float() if grid.kquant else scales.half()).cpu(),
        zeros=(zeros.float() if grid.fractional_zero else zeros.to(torch.uint8)).cpu(),
        meta=meta,
        mask=None if mask is None else mask.cpu(),
        nm=nm,
    )


def quantize_weight(weight: torch.Tensor, grid: Grid, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Codes (float) of a whole [out, in] weight under given per-group scales and zeros."""
    in_f = weight.shape[1]
    if scales.shape == (1, 1):
        return quantize_codes(weight.float(), scales, zeros, grid.maxq)
    g = grid.group_size_for(in_f)
    scales, zeros = expand_groups(scales, in_f, g), expand_groups(zeros, in_f, g)
    return quantize_codes(weight.float(), scales, zeros, grid.maxq, grid.fractional_zero)


def fake_quantize(weight: torch.Tensor, grid: Grid, shrink: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight that RTN on `grid` reconstructs (quantize then dequantize)."""
    weight = weight.float()
    grid = grid.for_width(weight.shape[1])
    scales, zeros = fit_weight(weight, grid, shrink)
    codes = quantize_weight(weight, grid, scales, zeros)
    if scales.shape == (1, 1):
        return (codes - zeros) * scales
    g = grid.group_size_for(weight.shape[1])
    in_f = weight.shape[1]
    return (codes - expand_groups(zeros, in_f, g)) * expand_groups(scales, in_f, g)


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    """Refuse weights that cannot be quantized meaningfully (wrong rank, NaN or infinity)."""
    if weight.dim() != 2:
        raise GridError(f"{name} must be a 2-D [out, in] matrix, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise GridError(f"{name} contains {bad} NaN or infinite values; refusing to quantize it")


def kquant_grid(name: str) -> Grid:
    """The grid of the K-quant type `name` (a key of K_QUANTS)."""
    kind = K_QUANTS[name]
    return Grid(kind.bits, "group", kind.group_size, kind.symmetric, signed_scale=kind.symmetric, kquant=name)


def llamacpp_signed(bits: int) -> bool:
    """Whether llama.cpp's symmetric group-32 type of `bits` has signed scales (Q4_0, Q5_0); Q8_0 keeps the
    plain symmetric scale (its codes stop at -127, and its kernels are not written for -128)."""
    return bits < 8


def _legacy(bits: int) -> Grid:
    """llama.cpp's symmetric legacy types."""
    return Grid(bits, "group", 32, symmetric=True, signed_scale=llamacpp_signed(bits))


# llama.cpp falls back from Q3_K and Q2_K to IQ4_NL, which no grid here holds; Q4_0 is its nearest legacy type
K_QUANTS.update(
    q6_k=KQuant(bits=6, group_size=16, scale_bits=7, fallback=_legacy(8)),
    q5_k=KQuant(bits=5, group_size=32, scale_bits=6, min_bits=6, fallback=Grid(5, "group", 32, offset_exact=True)),
    q4_k=KQuant(bits=4, group_size=32, scale_bits=6, min_bits=6, fallback=_legacy(5)),
    q3_k=KQuant(bits=3, group_size=16, scale_bits=5, fallback=_legacy(4)),
    q2_k=KQuant(bits=2, group_size=16, scale_bits=4, min_bits=4, fallback=_legacy(4)),
)
