"""Compressibility certificates: cheap per-layer indicators, and the quantization error they predict.

Measured on the uncompressed model with one calibration pass (every block on the original model's
inputs, as the budget solver's sensitivity pass does), before anything is compressed:

* the weight's excess kurtosis and outlier share (|w| beyond 6 standard deviations): heavy tails set
  the range of a group and waste its levels;
* its spectrum: the effective rank (exp of the entropy of the normalized singular values) and the
  share of energy in the top 10 % of singular values, which say how low-rank it is;
* its inputs: the ratio of the largest to the median channel RMS (from the diagonal of XᵀX, the
  calibration Hessian), the entropy of the channels' energy, and the Hessian's trace;
* the predicted relative output error of round-to-nearest at each width,
  Σ_ij (w_ij − q(w_ij))² H_jj / tr(W H Wᵀ): each weight's rounding error times the energy of the
  input it multiplies, without the correlations between inputs (H's off-diagonal), so it costs one
  rounding and no product with H. (The textbook s²/12 per weight overestimates layers with heavy
  tails, where most weights round to the zero level.) This is what a layer would lose before any
  error feedback; GPTQ removes part of it, and the ranking of layers is what the budget needs;
* with `fisher_windows`, a model-level score of the loss increase at each width, ½ Σ F·e over every
  layer's output channels (F: the squared gradient of the loss at that output, from one backward
  pass; e: the channel's predicted squared output error over the calibration tokens), the
  second-order estimate the budget solver uses to compare layers. Its unit depends on the numbers of
  windows and tokens: compare scores of one model and calibration set, not across them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compresslm.data.calibration import CalibrationSet
from compresslm.fileio import atomic_path
from compresslm.models.loaded import LoadedModel
from compresslm.quant.grid import Grid
from compresslm.quant.rtn import rtn
from compresslm.runtime.linear import dense_weight

OUTLIER_SIGMAS = 6.0


@dataclass
class LayerDiagnosis:
    name: str
    role: str
    shape: tuple[int, int]
    kurtosis: float
    outlier_share: float
    effective_rank: float
    top10_energy: float
    activation_max_over_median: float
    activation_entropy: float  # bits; log2(in_features) when every channel carries the same energy
    hessian_trace: float
    predicted_error: dict[int, float]  # width -> predicted relative output error of RTN
    predicted_rows: dict[int, torch.Tensor] = field(repr=False, default_factory=dict)  # width -> per output channel

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "predicted_rows"}
        data["shape"] = list(self.shape)
        data["predicted_error"] = {str(b): e for b, e in self.predicted_error.items()}
        return data


def predicted_rtn_rows(weight: torch.Tensor, hessian_diag: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Each output channel's predicted squared output error of RTN on `grid`: Σ_j (w_j − q(w_j))² · H_jj."""
    delta = weight.double() - rtn(weight.float(), grid).dequantize().double()
    return (delta.pow(2) * hessian_diag.double().clamp_min(0)).sum(1)


def layer_indicators(
    name: str, role: str, weight: torch.Tensor, hessian: torch.Tensor, widths: tuple[int, ...], group_size: int
) -> LayerDiagnosis:
    """The indicators of one linear weight [out, in] with its inputs' XᵀX (see the module docstring)."""
    w = weight.double()
    centered = w - w.mean()
    std = float(centered.pow(2).mean().sqrt())
    kurtosis = float(centered.pow(4).mean() / std**4 - 3.0) if std > 0 else 0.0
    outliers = float((centered.abs() > OUTLIER_SIGMAS * std).double().mean()) if std > 0 else 0.0
    singular = torch.linalg.svdvals(w)
    p = singular / singular.sum().clamp_min(1e-300)
    effective_rank = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    energy = singular.pow(2)
    top = max(1, math.ceil(0.1 * len(singular)))
    top10 = float(energy[:top].sum() / energy.sum().clamp_min(1e-300))
    diag = torch.diagonal(hessian).double().clamp_min(0)
    rms = diag.sqrt()
    ratio = float(rms.max() / rms.median().clamp_min(1e-300))
    q = diag / diag.sum().clamp_min(1e-300)
    entropy = float(-(q[q > 0] * q[q > 0].log2()).sum())
    output_energy = float(((w @ hessian.double()) * w).sum())
    predicted, rows = {}, {}
    for bits in widths:
        grid = Grid(bits, "group" if group_size < weight.shape[1] else "channel", group_size)
        rows[bits] = predicted_rtn_rows(weight, diag, grid)
        predicted[bits] = float(rows[bits].sum() / output_energy) if output_energy > 0 else 0.0
    return LayerDiagnosis(name, role, tuple(weight.shape), kurtosis, outliers, effective_rank, top10, ratio, entropy,
                          float(diag.sum()), predicted, rows)  # fmt: skip


def diagnose(
    lm: LoadedModel,
    calibration: CalibrationSet,
    widths: tuple[int, ...] = (2, 3, 4, 8),
    group_size: int = 64,
    fisher_windows: int = 0,
    batch_size: int = 4,
    show_progress: bool = True,
) -> dict:
    """Every linear's indicators and predictions, and (with `fisher_windows`) the model-level predicted loss."""
    from compresslm.engine.blocks import BlockWalk
    from compresslm.engine.budget import output_fisher
    from compresslm.models.forward import capture_first_block_inputs

    lm.model.eval()
    names = [info.name for info in lm.layout.linears()]
    fisher = output_fisher(lm, calibration.windows[:fisher_windows], names) if fisher_windows else {}
    batches = capture_first_block_inputs(lm, calibration.windows, batch_size, lm.device)
    walk = BlockWalk(lm, batches, lm.device, propagate="original", label="diagnose", show_progress=show_progress)
    layers: list[LayerDiagnosis] = []
    for step in walk:
        for info in step.block.linears:
            weight = dense_weight(info.module, info.transposed).float()
            layers.append(layer_indicators(info.name, info.role, weight, step.stats.hessian(info.name), widths,
                                           group_size))  # fmt: skip
    summary: dict = {"layers": [layer.to_dict() for layer in layers], "widths": list(widths), "group_size": group_size,
                     "calibration": calibration.protocol}  # fmt: skip
    if fisher:  # ½ Σ F·e: the second-order estimate of the loss increase at each width, every layer at once
        summary["predicted_loss_score"] = {
            str(bits): 0.5 * sum(float((fisher[layer.name].double() * layer.predicted_rows[bits]).sum())
                                 for layer in layers) / max(fisher_windows, 1)
            for bits in widths
        }  # fmt: skip
        summary["fisher_windows"] = fisher_windows
    return summary


INDICATORS = {
    "kurtosis": "excess kurtosis of the weights",
    "outlier_share": "share of weights beyond 6 standard deviations",
    "effective_rank": "effective rank of the weights",
    "activation_max_over_median": "input channel RMS, max / median",
    "hessian_trace": "trace of the calibration Hessian",
}


def write_diagnosis(result: dict, out: str | os.PathLike, model: str) -> Path:
    """`diagnosis.json` and one plot per indicator (layers in model order, coloured by role), written as one
    folder that appears complete or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    roles = sorted({layer["role"] for layer in layers})
    with atomic_path(out, directory=True) as tmp:
        (tmp / "diagnosis.json").write_text(json.dumps(result, indent=1))
        for key, label in INDICATORS.items():
            fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
            for role in roles:
                points = [(i, layer[key]) for i, layer in enumerate(layers) if layer["role"] == role]
                ax.plot([i for i, _ in points], [v for _, v in points], marker="o", linestyle="", label=role)
            values = [layer[key] for layer in layers]
            if min(values) > 0 and max(values) > 20 * min(values):  # spans orders of magnitude: a log axis
                ax.set_yscale("log")
            ax.set_xlabel("linear layer, in model order")
            ax.set_ylabel(label)
            ax.set_title(f"{model}: {label}", fontsize=11)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            fig.subplots_adjust(left=0.1, right=0.85, bottom=0.14)
            fig.savefig(tmp / f"{key}.png")
            plt.close(fig)
    return Path(out)
