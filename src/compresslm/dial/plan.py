"""Planning a width per dial layer for a size between the artifact's widths, from the artifact alone,
and applying a parsed setting (`bits`, or `avg_bits` planned here)."""

from __future__ import annotations

from compresslm.dial.switch import DialReport, dial_layers, set_budget
from compresslm.errors import CompressLMError
from compresslm.formats.sizes import record_nbytes
from compresslm.models.loaded import LoadedModel
from compresslm.quant.allocation import allocate
from compresslm.quant.nested import slice_record


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


def apply_setting(lm: LoadedModel, setting: dict) -> DialReport:
    """Switch `lm` to a parsed setting: `bits` as given, or the widths `plan_widths` picks for `avg_bits`."""
    bits = plan_widths(lm, setting["avg_bits"]) if "avg_bits" in setting else setting.get("bits")
    return set_budget(lm, bits, setting.get("sparsity", 0.0))
