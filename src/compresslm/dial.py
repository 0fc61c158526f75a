"""The dial: one nested artifact, many budgets, switched without re-compressing.

`compresslm compress MODEL --recipe dial -o ARTIFACT` quantizes every linear once with nested
widths (4 bits are the top of the 8-bit codes, 3 bits have codes of their own; `dial-shared` nests
all three in one code; see `compresslm.quant.nested`) and stores each input channel's calibration
norm. From that artifact:

* `set_budget(lm, bits=3, sparsity=0.5)` switches a loaded model in place (no disk, no calibration);
  `bits` may also map module paths to widths (per-layer budgets, e.g. the budget solver's);
* `materialize(ARTIFACT, OUT, bits=..., sparsity=...)` writes an ordinary container of that setting,
  which reloads to exactly the model `set_budget` gives;
* `compresslm eval ARTIFACT --dial bits=3,sparsity=0.5` evaluates a setting directly;
* `plan_widths(lm, avg_bits)` picks a width per layer for a size between the artifact's widths,
  from the artifact alone (`compresslm dial ARTIFACT --avg-bits 5 -o OUT`, `--dial avg_bits=5`).

Sparse settings at the width of the sparse planes (the `dial` preset's 8 bits): a ratio pruned on
its own (`separate_sparsity`, the preset's 50 and 70 %) is exactly the SparseGPT + GPTQ model a
dedicated run makes; other ratios at or above the nested-sparse plane's lowest level take that
plane's values and keep order, tuned by SparseGPT's sweep for its ratios (`sparse.nested`). Every
other sparse setting comes from one fixed order of the weights (Wanda's score), without weight
updates: expect Wanda's quality there, not SparseGPT's. Within the nested plane, and within the
fixed order, a higher sparsity keeps a subset of the weights a lower one keeps; the separately
pruned ratios each have a mask of their own.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from compresslm.errors import CompressLMError
from compresslm.formats.sizes import record_nbytes
from compresslm.models.loaded import LoadedModel
from compresslm.quant.allocation import allocate
from compresslm.quant.nested import kept_per_row, slice_record
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
    return setting


def apply_setting(lm: LoadedModel, setting: dict) -> DialReport:
    """Switch `lm` to a parsed setting: `bits` as given, or the widths `plan_widths` picks for `avg_bits`."""
    bits = plan_widths(lm, setting["avg_bits"]) if "avg_bits" in setting else setting.get("bits")
    return set_budget(lm, bits, setting.get("sparsity", 0.0))


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


def plan_widths(lm: LoadedModel, avg_bits: float) -> dict[str, int]:
    """One width per dial layer so the layers average at most `avg_bits` bits per weight (codes,
    scales and zero points counted), with the least estimated output error.

    Needs nothing but the artifact: each width's error is ‖(W_b − W_widest)·diag(‖x_j‖)‖², the
    squared output error its rounding adds over the calibration inputs, with the input norms ‖x_j‖
    the artifact stores. The widest width is the reference (error 0). The same multiple-choice
    knapsack as the budget solver picks the widths; unlike the solver it has no gradient to weigh
    layers by their effect on the loss (no data here), so an early and a late layer's unit of
    output error count the same.
    """
    layers = dial_layers(lm)
    if not layers:
        raise CompressLMError(f"{lm.source} has no dial layers; make the artifact with a dial recipe (--recipe dial)")
    options: dict[str, list[tuple[float, float]]] = {}
    widths: dict[str, list[int]] = {}
    params = 0
    for name, module in layers.items():
        nested = module.nested
        reference = nested.dequantize()
        scale = nested.importance.float()[None, :] if nested.importance is not None else 1.0
        widths[name] = sorted(nested.dial.widths)
        options[name] = []
        for bits in widths[name]:
            record = slice_record(nested, bits)
            error = float((((record.dequantize() - reference) * scale) ** 2).sum())
            options[name].append((float(8 * record_nbytes(record, aligned=False)), error))
        params += nested.codes.numel()
    low = sum(min(c for c, _ in opts) for opts in options.values()) / params
    high = sum(max(c for c, _ in opts) for opts in options.values()) / params
    if avg_bits < low:
        raise CompressLMError(
            f"avg_bits={avg_bits:g} is below this artifact's narrowest setting ({low:.3f} bits per weight with "
            f"scales and zero points); choose {low:.3f} to {high:.3f}"
        )
    choice = allocate(options, avg_bits * params)
    return {name: widths[name][index] for name, index in choice.items()}


def _fixed(record, sparsity: float):
    meta = {k: v for k, v in record.meta.items() if k != "dial"}
    meta["dialed"] = {"widths": list(record.dial.widths), "bits": record.bits, "sparsity": sparsity}
    return dataclasses.replace(record, importance=None, order=None, alternates=(), meta=meta)


def materialize(
    artifact: str | os.PathLike,
    output: str | os.PathLike,
    bits: int | dict[str, int] | None = None,
    sparsity: float = 0.0,
    avg_bits: float | None = None,
) -> tuple[DialReport, dict]:
    """Write an ordinary container holding one setting of a dial artifact; returns the switch report and sizes.

    `bits` is a width or module path -> width; `avg_bits` instead lets `plan_widths` choose them.
    """
    from compresslm.models.assemble import load_compressed, save_compressed

    if avg_bits is not None and bits is not None:
        raise CompressLMError("give either bits or avg_bits, not both")
    lm = load_compressed(artifact)
    if avg_bits is not None:
        bits = plan_widths(lm, avg_bits)
    report = set_budget(lm, bits, sparsity)
    header = lm.container
    nested = dial_layers(lm)
    linears = {  # a fixed setting: no calibration norms, no widths to dial further
        name: _fixed(m.compressed, sparsity) if name in nested else m.compressed
        for name, m in lm.model.named_modules()
        if isinstance(m, CompressedLinear)
    }
    embeddings = {k: v for k, v in lm.compressed.items() if k not in linears}
    metadata = {k: header[k] for k in ("recipe", "calibration", "source_model", "layers") if k in header}
    metadata["dial_setting"] = {"artifact": str(artifact), "bits": bits, "sparsity": sparsity, "avg_bits": avg_bits}
    summary = save_compressed(lm, linears, output, metadata, dense_dtype=header.get("dense_dtype", "float16"),
                             embeddings=embeddings)  # fmt: skip
    return report, summary
