"""Switching a loaded dial artifact to a setting in place: widths (one, or per layer) and a sparsity."""

from __future__ import annotations

import time
from dataclasses import dataclass

from compresslm.errors import CompressLMError
from compresslm.models.loaded import LoadedModel
from compresslm.quant.nested import kept_per_row
from compresslm.runtime.linear import CompressedLinear
from compresslm.sparse.nested import kept_per_column


@dataclass
class DialReport:
    layers: int
    bits: dict[int, int]  # width -> number of layers at it
    sparsity: float
    seconds: float


def dial_layers(lm: LoadedModel) -> dict[str, CompressedLinear]:
    """The model's linears that hold a nested record (empty for anything not made by a dial recipe)."""
    return {n: m for n, m in lm.model.named_modules() if isinstance(m, CompressedLinear) and m.nested is not None}


def parse_setting(text: str) -> dict:
    """'bits=3,sparsity=0.5' -> {'bits': 3, 'sparsity': 0.5} (or avg_bits=5.5 for planned widths), with clear errors."""
    setting: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("bits", "sparsity", "avg_bits"):
            raise CompressLMError(
                f"cannot read dial setting '{part}'; use bits=B (or avg_bits=A) and/or sparsity=S, "
                "e.g. bits=3,sparsity=0.5"
            )
        try:
            setting[key] = int(value) if key == "bits" else float(value)
        except ValueError:
            raise CompressLMError(f"dial {key} must be a number, got '{value}'") from None
    if not setting:
        raise CompressLMError("empty dial setting; use bits=B (or avg_bits=A) and/or sparsity=S")
    if "bits" in setting and "avg_bits" in setting:
        raise CompressLMError("a dial setting takes bits or avg_bits, not both")
    if setting.get("avg_bits", 1.0) <= 0:
        raise CompressLMError(f"dial avg_bits must be positive, got {setting['avg_bits']:g}")
    if not 1 <= setting.get("bits", 1) <= 8:
        raise CompressLMError(f"dial bits must be a width from 1 to 8, got {setting['bits']}")
    if not 0 <= setting.get("sparsity", 0.0) < 1:
        raise CompressLMError(f"dial sparsity must be a share in [0, 1), got {setting['sparsity']:g}")
    return setting


def set_budget(lm: LoadedModel, bits: int | dict[str, int] | None = None, sparsity: float = 0.0) -> DialReport:
    """Switch every dial layer of `lm` to `bits` (a width, or module path -> width) and `sparsity`, in place."""
    layers = dial_layers(lm)
    if not layers:
        raise CompressLMError(f"{lm.source} has no dial layers; make the artifact with a dial recipe (--recipe dial)")
    for module in layers.values():  # every layer can take the sparsity before any is switched
        kept_per_row(module.in_features, sparsity)
        for plane in module.nested.alternates:
            if plane.order is not None:
                kept_per_column(module.in_features, plane.dial.order_block, sparsity)
    widths = list(next(iter(layers.values())).nested.dial.widths)
    per_layer = bits if isinstance(bits, dict) else {}
    unknown = sorted(set(per_layer) - set(layers))
    if unknown:
        raise CompressLMError(f"no dial layer named {unknown[0]!r} ({len(unknown)} unknown); see `compresslm info`")
    for value in [*per_layer.values(), *([] if isinstance(bits, dict) or bits is None else [bits])]:
        if value not in widths:
            raise CompressLMError(f"{value} bits is not a width of this artifact; it has {widths}")
    started = time.perf_counter()
    counts: dict[int, int] = {}
    for name, module in layers.items():
        width = per_layer.get(name, module.compressed.bits) if isinstance(bits, dict) else bits or module.nested.bits
        module.dial(width, sparsity)
        counts[width] = counts.get(width, 0) + 1
    lm.compressed = {**lm.compressed, **{name: module.compressed for name, module in layers.items()}}
    lm.changed()
    return DialReport(len(layers), counts, sparsity, time.perf_counter() - started)
