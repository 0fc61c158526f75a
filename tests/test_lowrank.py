"""Low-rank error compensation: the pure fit, the registered stage, sizes and round trips on tiny models."""

from __future__ import annotations

import pytest
import torch

from compresslm.api import compress
from compresslm.compressed import CompressedWeight, InvalidCompressedWeight
from compresslm.data.calibration import calibration_windows
from compresslm.errors import CompressLMError
from compresslm.formats.sizes import record_nbytes
from compresslm.lowrank.compensation import fit_lowrank, whitening
from compresslm.lowrank.factorize import factorize, output_error_share, rank_for_ratio
from compresslm.models.assemble import load_compressed
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_model
from compresslm.recipe import LowRankStage, RecipeError, load_recipe, preset


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


# --- factorization: the layer replaced by its factors (SVD, ASVD, SVD-LLM's whitening) ---


@pytest.mark.parametrize("method", ["svd", "asvd", "whitened"])
def test_full_rank_factors_reconstruct_the_weight(method):
    weight, hessian = _problem(3)
    record = factorize(weight, 16, method, hessian, damp=1e-6)
    assert record.is_factored and not record.quantized and record.bits == 16
    assert record.lowrank[0].shape == (24, 16) and record.lowrank[1].shape == (16, 16)
    assert torch.allclose(record.dequantize(), weight, atol=2e-2, rtol=0)  # float16 factors
    assert record.meta["lowrank"]["output_error_left"] < 1e-5


def test_the_whitened_factors_leave_the_least_output_error():
    weight, hessian = _problem(4)
    left = {
        m: factorize(weight, 4, m, hessian).meta["lowrank"]["output_error_left"] for m in ("svd", "asvd", "whitened")
    }
    assert left["whitened"] < left["asvd"] < left["svd"]
    errors = [factorize(weight, r, "whitened", hessian).meta["lowrank"]["output_error_left"] for r in (2, 4, 8, 12)]
    assert errors == sorted(errors, reverse=True)
    assert output_error_share(weight, weight, hessian) == 0.0


def test_ranks_for_a_ratio_remove_at_least_that_share():
    for shape in ((64, 64), (192, 576), (1536, 576)):
        for ratio in (0.1, 0.2, 0.3, 0.4):
            rank = rank_for_ratio(shape, ratio)
            kept = rank * sum(shape) / (shape[0] * shape[1])
            assert kept <= 1 - ratio < (rank + 1) * sum(shape) / (shape[0] * shape[1])
    assert rank_for_ratio((4, 4), 0.9) == 0


def test_factored_records_check_their_fields():
    a, b = torch.zeros(8, 2, dtype=torch.float16), torch.zeros(2, 6, dtype=torch.float16)
    record = CompressedWeight.factored(a, b)
    assert record.shape == (8, 6) and record_nbytes(record, aligned=False) == 2 * (16 + 12)
    with pytest.raises(InvalidCompressedWeight, match="no mask"):
        CompressedWeight(shape=(8, 6), bits=16, group_size=6, symmetric=True, codes=None, scales=None, zeros=None,
                         lowrank=(a, b), mask=torch.ones(8, 6, dtype=torch.bool))  # fmt: skip
    with pytest.raises(InvalidCompressedWeight, match="needs codes"):
        CompressedWeight(shape=(8, 6), bits=4, group_size=6, symmetric=True, codes=None, scales=None, zeros=None)


def test_bad_factorization_settings_are_refused():
    with pytest.raises(RecipeError, match=r"ratio=1\.5 is not allowed"):
        load_recipe({"stages": [{"type": "lowrank", "ratio": 1.5}]})
    with pytest.raises(RecipeError, match="not both"):
        load_recipe({"stages": [{"type": "lowrank", "ratio": 0.2, "rank": 4}]})
    with pytest.raises(RecipeError, match="method='qr' is not allowed"):
        load_recipe({"stages": [{"type": "lowrank", "method": "qr"}]})
    with pytest.raises(RecipeError, match="stands alone"):
        preset("20%-whitened+w4-g64-gptq")
    assert load_recipe("30%-asvd").stages[0].ratio == pytest.approx(0.3)


@pytest.mark.parametrize("stage", [{"rank": 40}, {"ratio": 0.99}])
def test_a_factorization_that_saves_nothing_is_refused_before_any_compute(tokenizer, monkeypatch, stage):
    from compresslm.engine import blocks

    def refuse(*args, **kwargs):
        raise AssertionError("calibration ran before the rank was checked")

    monkeypatch.setattr(blocks, "collect_statistics", refuse)
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    recipe = load_recipe({"stages": [{"type": "lowrank", "ratio": None, **stage}]})
    with pytest.raises(RecipeError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        compress(lm, recipe, show_progress=False)


def test_a_factorized_model_round_trips_and_runs_on_its_factors(tokenizer, tmp_path):
    calibration = calibration_windows(tokenizer, "wikitext2", 8, 64, 0)
    summaries = {}
    for name in ("20%-svd", "20%-whitened", "40%-whitened"):
        lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
        _, result, summary = compress(lm, name, tmp_path / f"{name}.clm", calibration=calibration,
                                      show_progress=False)  # fmt: skip
        summaries[name] = (lm, result, summary)
    lm, result, summary = summaries["20%-whitened"]
    record = result.weights["model.layers.0.mlp.up_proj"]  # [128, 64]: rank 34 removes 20.3 %
    assert record.is_factored and record.lowrank[0].shape == (128, 34)
    assert result.layers[0].method == "whitened"
    params = sum(r.lowrank[0].numel() + r.lowrank[1].numel() for r in result.weights.values())
    dense = sum(r.out_features * r.in_features for r in result.weights.values())
    assert 0.75 < params / dense <= 0.8
    assert summary["linear_bits_per_param"] == pytest.approx(16 * params / dense)
    first = [layer.relative_error for layer in result.layers][:7]
    plain = [layer.relative_error for layer in summaries["20%-svd"][1].layers][:7]
    assert sum(first) < sum(plain)  # the first block's layers see the same inputs
    assert sum(first) < sum(layer.relative_error for layer in summaries["40%-whitened"][1].layers[:7])
    module = lm.model.get_submodule("model.layers.0.mlp.up_proj")
    x = torch.randn(3, 64)
    assert torch.allclose(module(x), x @ record.dequantize().T, atol=1e-5)  # two thin matmuls
    reloaded = load_compressed(tmp_path / "20%-whitened.clm")
    again = reloaded.compressed["model.layers.0.mlp.up_proj"]
    assert torch.equal(again.lowrank[0], record.lowrank[0]) and torch.equal(again.lowrank[1], record.lowrank[1])
    ids = torch.arange(3, 40)[None, :]
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)


def test_the_budget_solver_chooses_each_layers_rank(tokenizer, tmp_path):
    from compresslm.engine.budget import BudgetTarget

    recipe = load_recipe("30%-whitened")
    recipe.calibration.source, recipe.calibration.samples, recipe.calibration.length = "wikitext2", 8, 64
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    target = BudgetTarget(linear_bits=16 * 0.7, sensitivity="output")  # 30 % of the linears' parameters removed
    _, result, summary = compress(lm, recipe, tmp_path / "m.clm", target=target, show_progress=False)
    plan = result.plan
    assert len({ratio for ratio in plan.choices.values()}) >= 3  # ranks differ between layers
    kept = summary["linear_bits_per_param"] * summary["linear_parameters"] + 16 * plan.dense_linear_params
    assert 16 * 0.69 < kept / (summary["linear_parameters"] + plan.dense_linear_params) <= 16 * 0.7
    assert all(isinstance(stage, LowRankStage) and stage.method == "whitened" for stage in plan.recipe.stages)
    reloaded = load_compressed(tmp_path / "m.clm")
    ids = torch.arange(3, 40)[None, :]
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=ids).logits, lm.model(input_ids=ids).logits)
    with pytest.raises(CompressLMError, match="takes no sparsity options"):
        compress(LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny"), recipe,
                 target=BudgetTarget(linear_bits=8, sparsity=("50%",)), show_progress=False)  # fmt: skip
