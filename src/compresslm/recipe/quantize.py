"""The `quantize` stage: weights of the targeted linear layers on an integer grid (RTN, GPTQ, AWQ),
optionally with input smoothing, simulated activation quantization and the dial's nested widths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from compresslm.errors import CompressLMError
from compresslm.quant.gptq import GPTQOptions
from compresslm.quant.grid import Grid
from compresslm.recipe.fields import RecipeError, Targeted, check_bits, check_group, check_solver, choice, stage_dict
from compresslm.recipe.registry import register_stage

QUANT_METHODS = ("rtn", "gptq", "awq")
CALIBRATED_METHODS = ("gptq", "awq")


# where SparseGPT + quantization fits its grids (see PruneStage); `after` runs no joint sweep
GRID_FITS = ("current", "final", "both", "after")


@dataclass
class QuantizeStage(Targeted):
    """Quantize the weights of the targeted linear layers."""

    method: str = "rtn"
    bits: int = 4
    granularity: str = "group"
    group_size: int = 128
    symmetric: bool = False
    clip_search: bool = False
    act_order: bool | None = None  # None: on for gptq (as in llm-compressor), meaningless otherwise
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    awq_scale: bool = False
    awq_grid: int = 20
    smoothquant: bool = False
    smoothquant_alpha: float = 0.5
    act_bits: int = 0
    act_granularity: str = "token"
    nested_widths: list[int] = field(default_factory=list)  # the dial: these widths are prefixes of `bits`
    nested_priorities: list[float] = field(default_factory=list)  # per width; empty = quant.nested's default
    separate_widths: list[int] = field(default_factory=list)  # dial widths kept as their own codes, not prefixes
    dial_sparsity: list[float] = field(default_factory=list)  # sparsity levels of a nested-sparse plane (GPTQ)
    dial_sparsity_priorities: list[float] = field(default_factory=list)  # one weight per level
    separate_sparsity: list[float] = field(default_factory=list)  # dial ratios pruned on their own (SparseGPT)
    separate_sparsity_fit: str = "after"  # how those ratios are quantized: PruneStage.grid_fit's choices
    keep_zeros: bool = False  # hold the weight's exact zeros (a pruned checkpoint) as its mask
    offset_exact: bool = False  # asymmetric scales such that zero x scale is a float16 (GGUF Q4_1/Q5_1)
    kquant: str = ""  # a llama.cpp K-quant type whose two-level scales the grid is (q2_k ... q6_k)
    signed_scale: bool = False  # symmetric: the largest |w| on the lowest code (llama.cpp's Q4_0, Q3_K ...)
    clip_weighted: bool = False  # GPTQ's clip search weights each column by its input's mean square
    refit: bool = False  # K-quants: the clip search rounds at candidate steps, refitting each by least squares
    targets: list[str] = field(default_factory=lambda: ["all"])
    ignore: list[str] = field(default_factory=list)
    type: str = "quantize"

    def validate(self, where: str) -> None:
        choice(where, "method", self.method, QUANT_METHODS)
        check_bits(where, self.bits)
        check_group(where, self.granularity, self.group_size)
        check_solver(where, self.damp, self.block_size)
        if self.smoothquant and self.uses_awq_scaling:
            raise RecipeError(f"{where}: smoothquant and AWQ scaling both rescale inputs; choose one")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise RecipeError(f"{where}: smoothquant_alpha={self.smoothquant_alpha} is not allowed; choose 0 to 1")
        check_bits(where, self.act_bits, "act_bits", off=True)
        choice(where, "act_granularity", self.act_granularity, ("token", "tensor"))
        if self.awq_grid < 1:
            raise RecipeError(f"{where}: awq_grid={self.awq_grid} is not allowed; use a positive number of steps")
        if self.act_order is True and self.method != "gptq":
            raise RecipeError(f"{where}: act_order=true needs method gptq, not {self.method}")
        self.check_targets(where)
        if self.clip_weighted and not (self.clip_search and self.method == "gptq"):
            raise RecipeError(
                f"{where}: clip_weighted weights GPTQ's clip search; it needs method gptq and clip_search"
            )
        if self.refit and not (self.kquant and self.clip_search):
            raise RecipeError(f"{where}: refit is a clip search of K-quant sub-blocks; it needs kquant and clip_search")
        if self.signed_scale and not self.symmetric:
            raise RecipeError(f"{where}: signed_scale applies to symmetric grids; set symmetric=true or drop it")
        if self.offset_exact and (self.symmetric or self.nested_widths):
            raise RecipeError(f"{where}: offset_exact shapes asymmetric grids' scales; this one is symmetric or nested")
        if self.kquant:
            self._validate_kquant(where)
        if self.keep_zeros and self.nested_widths:
            raise RecipeError(f"{where}: keep_zeros does not combine with the dial's nested widths")
        if self.nested_widths:
            self._validate_nested(where)
        elif self.separate_widths or self.dial_sparsity or self.separate_sparsity:
            raise RecipeError(
                f"{where}: separate_widths, dial_sparsity and separate_sparsity belong to a dial; "
                "give nested_widths too"
            )

    def _validate_kquant(self, where: str) -> None:
        from compresslm.quant.grid import K_QUANTS

        choice(where, "kquant", self.kquant, tuple(K_QUANTS))
        kind = K_QUANTS[self.kquant]
        wanted = (kind.bits, "group", kind.group_size, kind.symmetric, kind.symmetric)
        if (self.bits, self.granularity, self.group_size, self.symmetric, self.signed_scale) != wanted:
            raise RecipeError(
                f"{where}: kquant {self.kquant} is bits={kind.bits}, group_size={kind.group_size}, "
                f"symmetric={kind.symmetric}, signed_scale={kind.symmetric}; got bits={self.bits}, "
                f"{self.granularity} {self.group_size}, symmetric={self.symmetric}, signed_scale={self.signed_scale}"
            )
        if self.offset_exact or self.nested_widths or self.smoothquant or self.act_bits:
            raise RecipeError(
                f"{where}: kquant grids do not combine with offset_exact, nested widths, SmoothQuant or activation bits"
            )

    def _validate_nested(self, where: str) -> None:
        from compresslm.quant.nested import check_widths

        try:
            widths = check_widths(self.nested_widths)
        except CompressLMError as exc:
            raise RecipeError(f"{where}: nested_widths: {exc}") from None
        if widths[-1] != self.bits:
            raise RecipeError(f"{where}: nested_widths {list(widths)} must end at bits={self.bits} (the widest)")
        if self.method not in ("gptq", "rtn") or self.granularity != "group" or self.symmetric:
            raise RecipeError(f"{where}: nested widths need method gptq or rtn on an asymmetric group grid")
        if self.clip_search or self.awq_scale or self.smoothquant or self.act_bits:
            raise RecipeError(f"{where}: nested widths do not combine with clip search, AWQ, SmoothQuant or A-bits")
        if self.nested_priorities and len(self.nested_priorities) != len(widths):
            raise RecipeError(f"{where}: nested_priorities needs one weight per width {list(widths)}")
        separate = self.separate_widths
        if len(set(separate)) != len(separate) or any(not 2 <= b <= 8 or b in widths for b in separate):
            raise RecipeError(
                f"{where}: separate_widths {list(separate)} must be distinct widths in 2..8 outside nested_widths"
            )
        if self.dial_sparsity:
            from compresslm.sparse.nested import check_levels

            if self.method != "gptq":
                raise RecipeError(f"{where}: dial_sparsity updates weights from calibration; it needs method gptq")
            try:
                check_levels(self.dial_sparsity, self.dial_sparsity_priorities or [1.0] * len(self.dial_sparsity))
            except CompressLMError as exc:
                raise RecipeError(f"{where}: dial_sparsity: {exc}") from None
        elif self.dial_sparsity_priorities:
            raise RecipeError(f"{where}: dial_sparsity_priorities without dial_sparsity levels")
        if self.separate_sparsity:
            from compresslm.sparse.nested import check_levels

            if self.method != "gptq":
                raise RecipeError(f"{where}: separate_sparsity prunes with SparseGPT; it needs method gptq")
            choice(where, "separate_sparsity_fit", self.separate_sparsity_fit, GRID_FITS)
            try:
                check_levels(self.separate_sparsity, [1.0] * len(self.separate_sparsity))
            except CompressLMError as exc:
                raise RecipeError(f"{where}: separate_sparsity: {exc}") from None

    # fields added after containers had been written, with their defaults: left out of the stored recipe
    # while at the default, so the recipe text of older containers stays as it was (sweep keys do not need
    # this: `Recipe.key` lists only fields that differ from their defaults)
    LATER_FIELDS: ClassVar[dict] = {"separate_sparsity": [], "keep_zeros": False, "offset_exact": False,
                                    "kquant": "", "signed_scale": False, "clip_weighted": False,
                                    "refit": False}  # fmt: skip

    def to_dict(self) -> dict:
        data = stage_dict(self)
        if "separate_sparsity" not in data:  # the fit of separately pruned ratios says nothing without them
            data.pop("separate_sparsity_fit", None)
        return data

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.granularity, self.group_size, self.symmetric, self.clip_search,
                    offset_exact=self.offset_exact, kquant=self.kquant, signed_scale=self.signed_scale,
                    clip_weighted=self.clip_weighted, refit=self.refit)  # fmt: skip

    @property
    def dial_widths(self) -> list[int]:
        """Every width a dial made by this stage serves: the shared chain and the separate widths."""
        return sorted({*self.nested_widths, *self.separate_widths})

    @property
    def uses_act_order(self) -> bool:
        return self.method == "gptq" and self.act_order is not False

    @property
    def gptq_options(self) -> GPTQOptions:
        return GPTQOptions(self.block_size, self.damp, self.uses_act_order, self.static_groups)

    @property
    def uses_awq_scaling(self) -> bool:
        """AWQ's activation-aware scaling before quantization: method awq, or awq_scale on rtn/gptq."""
        return self.method == "awq" or self.awq_scale

    @property
    def needs_calibration(self) -> bool:
        return (
            self.method in CALIBRATED_METHODS
            or self.awq_scale
            or self.smoothquant
            or (self.act_bits > 0 and self.act_granularity == "tensor")
        )

    @property
    def rescales_inputs(self) -> bool:
        return self.uses_awq_scaling or self.smoothquant


register_stage("quantize", QuantizeStage, "linear")
