"""Low-rank error compensation: the pure fit, the registered stage, sizes and round trips on tiny models."""

from __future__ import annotations

import pytest
import torch

from compresslm.api import compress
from compresslm.data.calibration import calibration_windows
from compresslm.errors import CompressLMError
from compresslm.formats.sizes import record_nbytes
from compresslm.lowrank.compensation import fit_lowrank, whitening
from compresslm.models.assemble import load_compressed
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_model
from compresslm.recipe import RecipeError, load_recipe, preset


def _problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    error = torch.randn(24, 16, generator=generator)
    inputs = torch.randn(300, 16, generator=generator) * torch.linspace(0.05, 4.0, 16)  # uneven channels
    return error, inputs.T @ inputs


def _output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = delta.double()
    return float(((delta @ hessian.double()) * delta).sum())


@pytest.mark.parametrize("whiten", [True, False])
def test_full_rank_reconstructs_the_error(whiten):
    error, hessian = _problem()
    fit = fit_lowrank(error, 16, hessian if whiten else None, damp=0.0)
    assert torch.allclose(fit.left @ fit.right, error, atol=1e-4) and fit.kept_loss < 1e-8 * fit.total_loss


def test_the_whitened_truncation_loss_is_the_output_error_left():
    error, hessian = _problem(1)
    for rank in (1, 4, 9):
        fit = fit_lowrank(error, rank, hessian, damp=0.01)
        factor, lam = whitening(hessian.double(), 0.01)
        damped = hessian.double() + lam * torch.eye(16, dtype=torch.float64)
        assert factor.shape == (16, 16) and lam == fit.damp_used
        measured = _output_error(error - fit.left @ fit.right, damped)
        assert measured == pytest.approx(fit.kept_loss, rel=1e-5)
        assert fit.total_loss == pytest.approx(_output_error(error, damped), rel=1e-9)


def test_whitening_fits_the_output_better_than_the_weights():
    error, hessian = _problem(2)
    whitened = fit_lowrank(error, 4, hessian, damp=0.0)
    plain = fit_lowrank(error, 4, None)
    assert _output_error(error - whitened.left @ whitened.right, hessian) < _output_error(
        error - plain.left @ plain.right, hessian
    )


def test_bad_ranks_are_refused():
    error, _ = _problem()
    with pytest.raises(CompressLMError, match="rank 17 is not allowed"):
        fit_lowrank(error, 17)
    with pytest.raises(RecipeError, match="rank=0 is not allowed"):
        load_recipe({"stages": [{"method": "rtn"}, {"type": "lowrank_compensation", "rank": 0}]})
    with pytest.raises(RecipeError, match="needs a quantization or pruning part"):
        preset("lqer8")
    with pytest.raises(RecipeError, match="do not combine with a low-rank"):
        preset("dial+lqer8")


def test_a_rank_a_layer_cannot_hold_is_refused_before_any_compute(tokenizer, monkeypatch):
    from compresslm.engine import blocks

    def refuse(*args, **kwargs):
        raise AssertionError("calibration ran before the rank was checked")

    monkeypatch.setattr(blocks, "collect_statistics", refuse)
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    with pytest.raises(RecipeError, match=r"rank=100 is more than model\.layers\.0\.self_attn\.q_proj"):
        compress(lm, "w4-g16-gptq+lqer100", show_progress=False)


def test_compensation_lowers_the_error_and_its_bytes_are_counted(tokenizer, tmp_path):
    calibration = calibration_windows(tokenizer, "wikitext2", 8, 64, 0)
    results = {}
    for name in ("w3-g16-gptq", "w3-g16-gptq+lqer4", "w3-g16-gptq+lqer4-plain"):
        lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
        recipe = load_recipe(name)
        _, result, summary = compress(lm, recipe, tmp_path / f"{name}.clm", calibration=calibration,
                                      show_progress=False)  # fmt: skip
        results[name] = (lm, result, summary)
    _, base, base_summary = results["w3-g16-gptq"]
    lm, compensated, summary = results["w3-g16-gptq+lqer4"]
    _, plain, _ = results["w3-g16-gptq+lqer4-plain"]
    first = [layer.relative_error for layer in compensated.layers][:7]  # the first block sees the same inputs
    assert all(c < b for c, b in zip(first, [layer.relative_error for layer in base.layers][:7], strict=True))
    assert all(w <= p for w, p in zip(first, [layer.relative_error for layer in plain.layers][:7], strict=True))
    assert compensated.layers[0].method == "gptq>lowrank_compensation"
    record = compensated.weights["model.layers.0.self_attn.q_proj"]
    assert record.lowrank[0].shape == (64, 4) and record.meta["lowrank"]["rank"] == 4
    factor_bytes = sum(2 * (r.lowrank[0].numel() + r.lowrank[1].numel()) for r in compensated.weights.values())
    linear_bytes = sum(record_nbytes(r, aligned=False) for r in compensated.weights.values())
    assert linear_bytes - sum(record_nbytes(r, aligned=False) for r in base.weights.values()) == factor_bytes
    assert summary["linear_bits_per_param"] == pytest.approx(8 * linear_bytes / summary["linear_parameters"])
    assert summary["linear_bits_per_param"] > base_summary["linear_bits_per_param"]
    reloaded = load_compressed(tmp_path / "w3-g16-gptq+lqer4.clm")
    ids = torch.arange(3, 40)[None, :]
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)
