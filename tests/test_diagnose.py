"""Compressibility certificates: indicator fields, the JSON schema, and predictions that rank layers as
measured RTN errors do."""

from __future__ import annotations

import json

import pytest
import torch

from compresslm.analysis.diagnose import diagnose, layer_indicators, predicted_rtn_rows
from compresslm.cli import main
from compresslm.data.calibration import calibration_windows
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import save_model
from compresslm.models.tiny import tiny_model
from compresslm.quant.grid import Grid
from compresslm.quant.rtn import rtn

FIELDS = {"name", "role", "shape", "kurtosis", "outlier_share", "effective_rank", "top10_energy",
          "activation_max_over_median", "activation_entropy", "hessian_trace", "predicted_error"}  # fmt: skip


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_the_diagonal_prediction_ranks_layers_as_their_measured_rtn_error():
    generator = torch.Generator().manual_seed(0)
    predicted, measured = [], []
    for dof in (2, 3, 4, 5, 6, 8, 10, 14, 20, 30, 60, 200):  # heavier to lighter tails: Student-t weights
        normal = torch.randn(48, 64, generator=generator)
        chi2 = torch.randn(48, 64, dof, generator=generator).pow(2).mean(-1)
        weight = normal / chi2.sqrt()
        mixing = torch.eye(64) + 0.3 * torch.randn(64, 64, generator=generator) / 8  # correlated inputs
        inputs = (torch.randn(400, 64, generator=generator) * torch.linspace(0.2, 2.0, 64)) @ mixing
        hessian = inputs.T @ inputs
        grid = Grid(3, "group", 16)
        delta = weight - rtn(weight, grid).dequantize()
        measured.append(float(((delta @ hessian) * delta).sum() / ((weight @ hessian) * weight).sum()))
        rows = predicted_rtn_rows(weight, torch.diagonal(hessian), grid)
        predicted.append(float(rows.sum() / ((weight @ hessian) * weight).sum()))
    assert _spearman(predicted, measured) >= 0.9
    assert all(0.5 < p / m < 2.0 for p, m in zip(predicted, measured, strict=True))  # the right size, too


def test_indicators_of_one_layer():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    weight[0, 0] = 40.0  # one outlier
    layer = layer_indicators("l", "q", weight, torch.eye(64), (2, 4), 16)
    assert layer.kurtosis > 10 and 0 < layer.outlier_share <= 2 / weight.numel()
    assert 1 < layer.effective_rank <= 32 and 0 < layer.top10_energy <= 1
    assert layer.activation_max_over_median == pytest.approx(1.0) and layer.activation_entropy == pytest.approx(6.0)
    assert layer.predicted_error[2] > layer.predicted_error[4] > 0


def test_diagnose_a_model(tokenizer, tmp_path, capsys):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    calibration = calibration_windows(tokenizer, "wikitext2", 4, 64, 0)
    result = diagnose(lm, calibration, (2, 4), 16, fisher_windows=2, show_progress=False)
    assert len(result["layers"]) == 14 and all(set(layer) >= FIELDS for layer in result["layers"])
    score = result["predicted_loss_score"]
    assert score["2"] > score["4"] > 0
    json.dumps(result)  # the JSON the CLI prints
    save_model(lm, None, tmp_path / "hf")
    argv = ["diagnose", str(tmp_path / "hf"), "--bits", "2,4", "--group-size", "16", "--calib", "wikitext2",
            "--calib-samples", "4", "--calib-length", "64", "--fisher-windows", "2", "--quiet"]  # fmt: skip
    assert main([*argv, "--json", "--out", str(tmp_path / "diag")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layers"][0]["predicted_error"].keys() == {"2", "4"}
    assert (tmp_path / "diag" / "diagnosis.json").is_file() and (tmp_path / "diag" / "kurtosis.png").is_file()
    assert main([*argv[:3], "9,4", *argv[4:]]) == 2
