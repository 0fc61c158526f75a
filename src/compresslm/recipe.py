"""Recipes: what to do to a model, as data that is validated before any compute.

A recipe is an ordered list of stages plus calibration settings, readable from YAML/JSON, a
Python dict, or a preset name. Every field is checked up front: an unknown field or an
impossible value raises :class:`RecipeError` naming the stage, the field, the value and what is
allowed, so a typo never costs a calibration run.

A preset name may end in `+emb8` or `+emb4` to also quantize the token embedding (and a tied
lm_head) group-wise with 8 or 4 bits, group 64: `w4-g64-gptq+emb8`.

Preset names are patterns: `w<bits>[-g<group>]-<method>[-sym][-clip][-act|-noact][-awq]`, e.g.
`w4-gptq` (group 128, asymmetric, act-order with static groups: GPTQ's default here, as in
llm-compressor), `w3-g64-gptq-noact` (columns in their natural order, dynamic groups),
`w4-g64-awq` (AWQ scaling and clip search, then
rounding), `w4-g64-gptq-awq` (AWQ scaling, then GPTQ), `w8-rtn` (per-channel), `w4-g64-gptq-keepzeros`
(an already pruned checkpoint: its exact zeros are held as a mask, 2:4 where they form one, instead of
GPTQ's error feedback writing into them). W8A8 presets:
`w8a8-smoothquant` (per-token dynamic int8 activations), `w8a8-smoothquant-static` (per-tensor
static), `w8a8-rtn` (no smoothing). Activation quantization is simulated in float (PyTorch has no
int8 matmul kernel on this CPU path) and labelled so. `w8-rtn` and other names
without `-g` use group 128 for 2–4 bits and per-channel for 5–8 bits.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compresslm.errors import CompressLMError
from compresslm.quant.gptq import GPTQOptions
from compresslm.quant.grid import Grid
from compresslm.sparse.masks import SparsityError, SparsityPattern


class RecipeError(CompressLMError):
    """A recipe field that is unknown or has an impossible value."""


QUANT_METHODS = ("rtn", "gptq", "awq")
CALIBRATED_METHODS = ("gptq", "awq")
DENSE_DTYPES = ("float16", "bfloat16", "float32")


# where SparseGPT + quantization fits its grids (see PruneStage); `after` runs no joint sweep
GRID_FITS = ("current", "final", "both", "after")


@dataclass
class QuantizeStage:
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
    targets: list[str] = field(default_factory=lambda: ["all"])
    ignore: list[str] = field(default_factory=list)
    type: str = "quantize"

    def validate(self, where: str) -> None:
        _choice(where, "method", self.method, QUANT_METHODS)
        if not 2 <= self.bits <= 8:
            raise RecipeError(f"{where}: bits={self.bits} is not allowed; choose 2 to 8")
        _choice(where, "granularity", self.granularity, ("group", "channel", "tensor"))
        if self.granularity == "group" and self.group_size < 1:
            raise RecipeError(f"{where}: group_size={self.group_size} is not allowed; use a positive column count")
        if not 0 < self.damp < 10:
            raise RecipeError(f"{where}: damp={self.damp} is not allowed; use a small positive fraction such as 0.01")
        if self.block_size < 1:
            raise RecipeError(f"{where}: block_size={self.block_size} is not allowed; use a positive column count")
        if self.smoothquant and self.uses_awq_scaling:
            raise RecipeError(f"{where}: smoothquant and AWQ scaling both rescale inputs; choose one")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise RecipeError(f"{where}: smoothquant_alpha={self.smoothquant_alpha} is not allowed; choose 0 to 1")
        if self.act_bits and not 2 <= self.act_bits <= 8:
            raise RecipeError(f"{where}: act_bits={self.act_bits} is not allowed; choose 0 (off) or 2 to 8")
        _choice(where, "act_granularity", self.act_granularity, ("token", "tensor"))
        if self.awq_grid < 1:
            raise RecipeError(f"{where}: awq_grid={self.awq_grid} is not allowed; use a positive number of steps")
        if self.act_order is True and self.method != "gptq":
            raise RecipeError(f"{where}: act_order=true needs method gptq, not {self.method}")
        if not self.targets:
            raise RecipeError(f"{where}: targets is empty; give roles (q, k, v, o, gate, up, down, ...) or 'all'")
        if self.keep_zeros and self.nested_widths:
            raise RecipeError(f"{where}: keep_zeros does not combine with the dial's nested widths")
        if self.nested_widths:
            self._validate_nested(where)
        elif self.separate_widths or self.dial_sparsity or self.separate_sparsity:
            raise RecipeError(
                f"{where}: separate_widths, dial_sparsity and separate_sparsity belong to a dial; "
                "give nested_widths too"
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
            _choice(where, "separate_sparsity_fit", self.separate_sparsity_fit, GRID_FITS)
            try:
                check_levels(self.separate_sparsity, [1.0] * len(self.separate_sparsity))
            except CompressLMError as exc:
                raise RecipeError(f"{where}: separate_sparsity: {exc}") from None

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.granularity, self.group_size, self.symmetric, self.clip_search)

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

    def applies_to(self, role: str, name: str) -> bool:
        """True if a linear with this role or exact module path is targeted and not ignored."""
        if role in self.ignore or any(part in name for part in self.ignore):
            return False
        return "all" in self.targets or role in self.targets or name in self.targets


@dataclass
class QuantizeEmbeddingStage:
    """Round-to-nearest quantization of the token embedding (a tied lm_head follows it) or lm_head.

    In small models the embedding is a large share of the bytes (a fifth of SmolLM2-135M's
    parameters), so it matters for bits per parameter. Rows are tokens; groups run along the hidden
    dimension, exactly as for a linear layer's input dimension.
    """

    bits: int = 8
    granularity: str = "group"
    group_size: int = 64
    symmetric: bool = False
    targets: list[str] = field(default_factory=lambda: ["embedding"])
    type: str = "quantize_embedding"

    def validate(self, where: str) -> None:
        if not 2 <= self.bits <= 8:
            raise RecipeError(f"{where}: bits={self.bits} is not allowed; choose 2 to 8")
        _choice(where, "granularity", self.granularity, ("group", "channel", "tensor"))
        if self.granularity == "group" and self.group_size < 1:
            raise RecipeError(f"{where}: group_size={self.group_size} is not allowed; use a positive column count")
        for target in self.targets:
            _choice(where, "targets", target, ("embedding", "lm_head"))
        if not self.targets:
            raise RecipeError(f"{where}: targets is empty; choose embedding and/or lm_head")

    @property
    def grid(self) -> Grid:
        return Grid(self.bits, self.granularity, self.group_size, self.symmetric)


PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl")


@dataclass
class PruneStage:
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
    quantize stage on the kept weights with the mask fixed (at 70 % the joint sweep moved 8-bit
    perplexity by 3-12 % where rounding SparseGPT's result moved it by 1.5 %,
    `benchmarks/results/sparse_then_round_70_w8.md`).
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
        _choice(where, "method", self.method, PRUNE_METHODS)
        _choice(where, "scope", self.scope, ("row", "layer"))
        _choice(where, "grid_fit", self.grid_fit, GRID_FITS)
        if self.grid_fit != "current" and self.method != "sparsegpt":
            raise RecipeError(f"{where}: grid_fit belongs to SparseGPT's joint quantization, not to {self.method}")
        _choice(where, "allocation", self.allocation, ALLOCATIONS)
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
        if not 0 < self.damp < 10:
            raise RecipeError(f"{where}: damp={self.damp} is not allowed; use a small positive fraction such as 0.01")
        if self.block_size < 1:
            raise RecipeError(f"{where}: block_size={self.block_size} is not allowed; use a positive column count")
        if not self.targets:
            raise RecipeError(f"{where}: targets is empty; give roles (q, k, v, o, gate, up, down, ...) or 'all'")

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

    def applies_to(self, role: str, name: str) -> bool:
        return QuantizeStage.applies_to(self, role, name)  # same targeting rules


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

    @property
    def config(self):
        from compresslm.kv.cache import KVQuantConfig

        return KVQuantConfig(
            self.bits, self.group_size, self.value_group, self.window, self.outliers, pre_rope=self.pre_rope,
            rotate=self.rotate, key_axis=self.key_axis, sink=self.sink,
        )  # fmt: skip


STAGES: dict[str, type] = {
    "quantize": QuantizeStage,
    "quantize_embedding": QuantizeEmbeddingStage,
    "prune": PruneStage,
    "kv_cache": KVCacheStage,
}


PROPAGATE = ("compressed", "original")


@dataclass
class CalibrationSettings:
    source: str = "c4"
    samples: int = 128
    length: int = 512
    seed: int = 0
    batch_size: int = 8
    # "compressed": block i calibrates on the outputs of the already-compressed blocks before it (sequential);
    # "original": every block calibrates on the uncompressed model's activations, so the statistics depend
    # on the model and the windows alone and can be computed once and reused by every recipe.
    propagate: str = "compressed"

    def validate(self) -> None:
        for name in ("samples", "length", "batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise RecipeError(f"calibration: {name}={value} is not allowed; use a positive number")
        _choice("calibration", "propagate", self.propagate, PROPAGATE)


@dataclass
class Recipe:
    """An ordered list of stages, calibration settings and how dense tensors are stored."""

    stages: list[Any]
    name: str = "custom"
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    dense_dtype: str = "float16"

    def validate(self) -> Recipe:
        if not self.stages:
            raise RecipeError("recipe has no stages")
        for index, stage in enumerate(self.stages, start=1):
            stage.validate(f"stage {index} ({stage.type})")
        prunes = any(isinstance(stage, PruneStage) for stage in self.stages)
        if prunes and any(getattr(stage, "keep_zeros", False) for stage in self.stages):
            raise RecipeError(
                "keep_zeros holds a checkpoint's own zeros; with a prune stage its mask is held "
                "already: drop one of the two"
            )
        self.calibration.validate()
        _choice("recipe", "dense_dtype", self.dense_dtype, DENSE_DTYPES)
        return self

    @property
    def needs_calibration(self) -> bool:
        return any(getattr(s, "needs_calibration", False) for s in self.stages)

    @property
    def kv_cache(self) -> KVCacheStage | None:
        return next((s for s in self.stages if isinstance(s, KVCacheStage)), None)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "stages": [_stage_dict(s) for s in self.stages],
            "calibration": dataclasses.asdict(self.calibration),
            "dense_dtype": self.dense_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}")
        _check_keys("recipe", data, ("name", "stages", "calibration", "dense_dtype"))
        raw_stages = data.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise RecipeError("recipe: 'stages' must be a non-empty list")
        stages = []
        for index, raw in enumerate(raw_stages, start=1):
            if not isinstance(raw, dict):
                raise RecipeError(f"stage {index}: must be a mapping, got {type(raw).__name__}")
            kind = raw.get("type", "quantize")
            if kind not in STAGES:
                raise RecipeError(f"stage {index}: type='{kind}' is not allowed; choose one of {', '.join(STAGES)}")
            stages.append(_build(STAGES[kind], raw, f"stage {index} ({kind})"))
        calibration = _build(CalibrationSettings, data.get("calibration") or {}, "calibration")
        recipe = cls(
            stages=stages,
            name=str(data.get("name", "custom")),
            calibration=calibration,
            dense_dtype=data.get("dense_dtype", "float16"),
        )
        return recipe.validate()


def _choice(where: str, name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise RecipeError(f"{where}: {name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _check_keys(where: str, data: dict, allowed: tuple) -> None:
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown field '{key}'; allowed fields: {', '.join(allowed)}")


def _build(kind: type, data: dict, where: str) -> Any:
    """Instantiate dataclass `kind` from `data`, checking field names and value types."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    _check_keys(where, data, tuple(fields))
    values = {}
    for key, value in data.items():
        expected = fields[key].type if isinstance(fields[key].type, str) else fields[key].type.__name__
        if expected.endswith(" | None"):
            if value is None:
                values[key] = None
                continue
            expected = expected.removesuffix(" | None")
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
        }.get(expected, True)
        if not ok:
            raise RecipeError(f"{where}: {key}={value!r} is not allowed; expected {expected}")
        values[key] = float(value) if expected == "float" else value
    return kind(**values)


_PRESET = re.compile(
    r"^w(?P<bits>[2-8])(?:-g(?P<group>\d+))?-(?P<method>rtn|gptq|awq)(?P<flags>(?:-(?:sym|clip|act|noact|awq|keepzeros))*)$"
)


SMOOTHQUANT_PRESETS = {
    # W8A8: SmoothQuant α = 0.5, per-channel symmetric int8 weights, per-token dynamic int8 activations.
    "w8a8-smoothquant": {"method": "rtn", "bits": 8, "granularity": "channel", "symmetric": True,
                         "smoothquant": True, "smoothquant_alpha": 0.5, "act_bits": 8, "act_granularity": "token"},
    "w8a8-smoothquant-static": {"method": "rtn", "bits": 8, "granularity": "channel", "symmetric": True,
                                "smoothquant": True, "smoothquant_alpha": 0.5, "act_bits": 8,
                                "act_granularity": "tensor"},
    "w8a8-rtn": {"method": "rtn", "bits": 8, "granularity": "channel", "symmetric": True, "act_bits": 8},
}  # fmt: skip


_KV_PRESET = re.compile(
    r"^kv(?P<bits>[2-8])(?:-g(?P<group>\d+))?(?:-w(?P<window>\d+))?(?:-s(?P<sink>\d+))?"
    r"(?P<pre>-pre)?(?P<rot>-rot)?(?P<kt>-kt)?$"
)
_DIAL_PRESET = re.compile(r"^dial(?:-g(?P<group>\d+))?(?P<rtn>-rtn)?(?P<shared>-shared)?$")
_PRUNE_PRESET = re.compile(
    r"^(?P<sparsity>\d+(?:\.\d+)?%|\d+:\d+)-(?P<method>magnitude|wanda|sparsegpt)(?P<flags>(?:-(?:layer|owl))*)$"
)


def _quantize_preset(part: str, match: re.Match) -> dict:
    bits = int(match["bits"])
    flags = set(filter(None, match["flags"].split("-")))
    stage: dict = {"method": match["method"], "bits": bits}
    if match["group"]:
        stage["group_size"] = int(match["group"])
    elif bits >= 5:
        stage["granularity"] = "channel"
    stage["symmetric"] = "sym" in flags
    stage["clip_search"] = "clip" in flags
    if "act" in flags or "noact" in flags:
        stage["act_order"] = "act" in flags
    stage["awq_scale"] = "awq" in flags
    if "keepzeros" in flags:
        stage["keep_zeros"] = True
    return stage


# stage fields added after sweeps had recorded points, with their defaults: left out of a stage's dict
# while at the default, so recipes (and the sweep keys made from them) written before keep their exact text
_LATER_FIELDS = {"separate_sparsity": [], "grid_fit": "current", "keep_zeros": False}


def _stage_dict(stage) -> dict:
    data = dataclasses.asdict(stage)
    for name, default in _LATER_FIELDS.items():
        if name in data and data[name] == default:
            del data[name]
    if "separate_sparsity" not in data:  # the fit of separately pruned ratios says nothing without them
        data.pop("separate_sparsity_fit", None)
    return data


def _dial_preset(match: re.Match) -> dict:
    """3, 4 and 8 bits in one artifact. With GPTQ, 3 bits get codes of their own unless `-shared`.

    One code cannot serve GPTQ's 3 and 4 bits at once (`benchmarks/results/nested_layer.md`), so
    the 8-bit codes nest 4 bits only, weighted 1 : 0.002 (there: 4 bits at 1.06x a dedicated GPTQ's
    layer error, 8 bits at 41x a dedicated 8-bit GPTQ's, whose steps are 16x finer). Rounding
    (`-rtn`) nests all three for free: its 3-bit cells are exactly pairs of 4-bit cells.
    With GPTQ, sparse settings at 8 bits come from a nested-sparse plane (`sparse.nested`) tuned
    for 50/60/70/80 %, weighted 1/0.5/0.5/0.2 (`benchmarks/results/nested_sparse_layer.md`),
    except 50 and 70 %, pruned on their own by SparseGPT: on the reference model the shared plane
    reached 1.25x (50 %) and 1.9x (70 %) a dedicated SparseGPT's perplexity
    (`benchmarks/results/sweep_full`), its per-layer excess compounding over the layers.
    """
    stage = {"method": "rtn" if match["rtn"] else "gptq", "bits": 8, "group_size": int(match["group"] or 64)}
    if match["rtn"] or match["shared"]:
        return {**stage, "nested_widths": [3, 4, 8]}
    return {**stage, "nested_widths": [4, 8], "nested_priorities": [1.0, 0.002], "separate_widths": [3],
            "dial_sparsity": [0.5, 0.6, 0.7, 0.8], "dial_sparsity_priorities": [1.0, 0.5, 0.5, 0.2],
            "separate_sparsity": [0.5, 0.7]}  # fmt: skip


def _prune_preset(match: re.Match) -> dict:
    flags = set(filter(None, match["flags"].split("-")))
    stage: dict = {"type": "prune", "method": match["method"], "sparsity": match["sparsity"]}
    if "layer" in flags:
        stage["scope"] = "layer"
    if "owl" in flags:
        stage["allocation"] = "owl"
    return stage


def preset(name: str) -> Recipe:
    """The recipe for a preset name: parts joined by '+', applied in the order written.

    Parts: a quantization preset (`w4-g64-gptq`, see the module docstring), a pruning preset
    `<ratio%|N:M>-<magnitude|wanda|sparsegpt>[-layer][-owl]` (`50%-wanda`, `2:4-sparsegpt`,
    `70%-wanda-owl`), a W8A8 preset, `emb8`/`emb4`, or a KV-cache part
    `kv<bits>[-g<tokens>][-w<window>][-s<sink tokens>][-pre][-rot][-kt]` (`w4-g64-gptq+kv4`,
    `kv2-g64-w128`, `kv4-g128-s4-pre`; see KVCacheStage). `2:4-sparsegpt+w4-gptq` prunes, then
    quantizes with the mask held; `w4-gptq+50%-wanda` quantizes, then prunes the quantized weights.
    """
    lowered = name.lower()
    stages: list[dict] = []
    embedding = None
    for part in lowered.split("+"):
        if part in ("emb8", "emb4"):
            embedding = {"type": "quantize_embedding", "bits": int(part[3:]), "group_size": 64}
        elif match := _KV_PRESET.match(part):
            kv = {"type": "kv_cache", "bits": int(match["bits"])}
            sizes = (("group_size", match["group"]), ("window", match["window"]), ("sink", match["sink"]))
            kv.update({k: int(v) for k, v in sizes if v})
            kv.update(pre_rope=bool(match["pre"]), rotate=bool(match["rot"]))
            if match["kt"]:
                kv["key_axis"] = "token"
            stages.append(kv)
        elif part in SMOOTHQUANT_PRESETS:
            stages.append(dict(SMOOTHQUANT_PRESETS[part]))
        elif match := _DIAL_PRESET.match(part):  # one artifact, 3/4/8 bits (see compresslm.dial)
            stages.append(_dial_preset(match))
        elif match := _PRUNE_PRESET.match(part):
            stages.append(_prune_preset(match))
        elif match := _PRESET.match(part):
            stages.append(_quantize_preset(part, match))
        else:
            raise RecipeError(
                f"unknown preset '{name}' (cannot read '{part}'); presets look like w4-gptq, w4-g64-gptq, "
                "w3-g32-gptq-act, w4-g64-awq, w4-g64-gptq-awq, w8-rtn, w8a8-smoothquant, 50%-wanda, "
                "2:4-sparsegpt, 2:4-sparsegpt+w4-gptq, 70%-wanda-owl, dial, dial-shared, dial-g32-rtn, "
                "with +emb8/+emb4 for the embedding (or give a YAML/JSON recipe file)"
            )
    if not stages:
        raise RecipeError(f"preset '{name}' names no quantization or pruning stage")
    kinds = [stage.get("type", "quantize") for stage in stages]
    if "prune" in kinds and any(stage.get("nested_widths") for stage in stages):
        raise RecipeError(f"preset '{name}': the dial's nested widths do not combine with a pruning stage yet")
    if kinds.count("prune") > 1 or kinds.count("quantize") > 1 or kinds.count("kv_cache") > 1:
        raise RecipeError(f"preset '{name}' has more than one pruning, quantization or KV-cache part")
    return Recipe.from_dict({"name": lowered, "stages": ([embedding] if embedding else []) + stages})


def load_recipe(spec: str | dict | Recipe) -> Recipe:
    """A Recipe from a preset name, a YAML/JSON file path, a dict, or a Recipe (validated)."""
    if isinstance(spec, Recipe):
        return spec.validate()
    if isinstance(spec, dict):
        return Recipe.from_dict(spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {spec}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:  # yaml.YAMLError or json.JSONDecodeError
            raise RecipeError(f"{path}: cannot parse recipe: {str(exc).splitlines()[0]}") from exc
        recipe = Recipe.from_dict(data)
        if recipe.name == "custom":
            recipe.name = path.stem
        return recipe
    return preset(spec)
