"""The budget solver: knapsack allocation, and containers that fit the size asked for."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from compresslm.api import compress, parse_size
from compresslm.cli import main
from compresslm.engine.budget import BudgetTarget, output_fisher, plan_budget
from compresslm.errors import CompressLMError
from compresslm.formats.sizes import planned_nbytes
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import save_model
from compresslm.models.tiny import tiny_model
from compresslm.quant.allocation import allocate
from compresslm.quant.grid import Grid
from compresslm.recipe import preset


def test_allocation_matches_brute_force_closely():
    rng = random.Random(0)
    for _ in range(20):
        options = {}
        for layer in range(5):
            size = rng.randint(50, 200)
            options[f"l{layer}"] = [(bits * size, size * rng.uniform(0.5, 2) * 4.0 ** (-bits)) for bits in (2, 3, 4, 8)]
        budget = rng.uniform(2.5, 6) * sum(opts[0][0] / 2 for opts in options.values())
        choice = allocate(options, budget)
        cost = sum(options[n][i][0] for n, i in choice.items())
        error = sum(options[n][i][1] for n, i in choice.items())
        best = min(
            sum(options[n][i][1] for n, i in zip(options, combo, strict=True))
            for combo in itertools.product(range(4), repeat=5)
            if sum(options[n][i][0] for n, i in zip(options, combo, strict=True)) <= budget
        )
        assert cost <= budget and error <= best * 1.5 + 1e-12


def test_allocation_refuses_an_impossible_budget():
    with pytest.raises(CompressLMError, match="below the smallest possible size"):
        allocate({"a": [(10, 1.0), (20, 0.5)]}, 5)


def test_record_bytes_match_the_container(tokenizer, tmp_path):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    _, result, summary = compress(lm, "w3-g16-rtn", tmp_path / "m.clm", show_progress=False)
    predicted = sum(planned_nbytes(r.shape, Grid(3, "group", 16), aligned=False) for r in result.weights.values())
    assert 8 * predicted / summary["linear_parameters"] == pytest.approx(summary["linear_bits_per_param"], abs=1e-12)


def test_plan_fits_between_uniform_sizes(tokenizer, tmp_path):
    def tiny():
        return LoadedModel.from_module(tiny_model("llama", layers=4), tokenizer, name="tiny")

    sizes = {bits: compress(tiny(), f"w{bits}-g16-rtn", tmp_path / f"{bits}.clm", show_progress=False)[2]
             for bits in (3, 4)}  # fmt: skip
    target = (sizes[3]["bytes_on_disk"] + sizes[4]["bytes_on_disk"]) // 2
    base = preset("w4-g16-rtn")
    base.calibration.samples, base.calibration.length = 4, 32
    plan = plan_budget(tiny(), base, target_bytes=target, show_progress=False)
    assert plan.predicted_bytes <= target and len(set(plan.choices.values())) > 1
    _, _, summary = compress(tiny(), plan.recipe, tmp_path / "b.clm", show_progress=False)
    assert summary["bytes_on_disk"] <= target


def test_sparse_record_bytes_match_the_container(tokenizer, tmp_path):
    from compresslm.sparse.masks import SparsityPattern

    for name, pattern, bits in (("50%-sparsegpt+w3-g16-gptq", "50%", 3), ("2:4-sparsegpt+w4-g16-gptq", "2:4", 4)):
        lm = LoadedModel.from_module(tiny_model("llama", layers=1), tokenizer)
        recipe = preset(name)
        recipe.calibration.samples, recipe.calibration.length = 4, 32
        _, result, summary = compress(lm, recipe, tmp_path / "s.clm", show_progress=False)
        grid = Grid(bits, "group", 16)
        predicted = sum(planned_nbytes(r.shape, grid, SparsityPattern.parse(pattern), aligned=False)
                        for r in result.weights.values())  # fmt: skip
        assert 8 * predicted / summary["linear_parameters"] == pytest.approx(summary["linear_bits_per_param"])


def test_the_plan_can_choose_sparsity_and_still_fits(tokenizer, tmp_path):
    def tiny():
        return LoadedModel.from_module(tiny_model("llama", layers=2), tokenizer, name="tiny")

    base = preset("w8-g16-gptq")
    base.calibration.samples, base.calibration.length = 4, 32
    dense8 = compress(tiny(), base, tmp_path / "8.clm", show_progress=False)[2]["bytes_on_disk"]
    target = int(dense8 * 0.8)  # below every dense option offered (8 bits only): sparse layers must fill the gap
    plan = plan_budget(tiny(), base, target_bytes=target, bits_options=(8,), show_progress=False)
    sparse = [c for c in plan.choices.values() if "+" in str(c)]
    assert sparse and all(c.split("+")[1] in ("50%", "2:4") for c in sparse)
    assert any(stage.type == "prune" and stage.method == "sparsegpt" for stage in plan.recipe.stages)
    summary = compress(tiny(), plan.recipe, tmp_path / "b.clm", show_progress=False)[2]
    assert summary["bytes_on_disk"] <= target and summary["linear_sparsity"] > 0
    with pytest.raises(CompressLMError, match="sparse budget options need"):
        plan_budget(tiny(), preset("w4-g16-awq"), target_bytes=target, sparsity_options=("50%",))
    none = plan_budget(tiny(), base, target_bytes=dense8 * 2, sparsity_options=(), show_progress=False)
    assert all("+" not in str(c) for c in none.choices.values())


def test_parse_size():
    assert parse_size("60MB") == 60_000_000 and parse_size("1.5MiB") == 1_572_864 and parse_size("123") == 123
    with pytest.raises(CompressLMError, match="cannot read size 'sixty'"):
        parse_size("sixty")


def test_cli_target_size(tokenizer, tmp_path, capsys):
    source = str(save_model(tiny_model("llama", layers=4), tokenizer, tmp_path / "tiny"))
    argv = ["compress", source, "--recipe", "w4-g16-rtn", "-o", str(tmp_path / "b.clm"), "--calib-samples", "4",
            "--calib-len", "32", "--target-size", "180KB", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "b.clm").stat().st_size <= 180_000
    assert "layers by choice" in capsys.readouterr().err
    assert main([*argv, "--budget-sparsity", "none"]) == 0 and "+" not in capsys.readouterr().err
    assert main([*argv, "--budget-sparsity", "60 percent"]) == 2
    assert "60 percent" in capsys.readouterr().err
    assert main([*argv[:-3], "--target-bits", "4", "--target-size", "1MB"]) == 2
    assert main([*argv[:-3], "--target-size", "1KB", "--quiet"]) == 2
    assert "below the smallest possible size" in capsys.readouterr().err


def test_linear_bits_budget(tokenizer, tmp_path):
    base = preset("w4-g16-rtn")
    base.calibration.samples, base.calibration.length = 4, 32
    lm = LoadedModel.from_module(tiny_model("llama", layers=4), tokenizer, name="tiny")
    plan = plan_budget(lm, base, target_linear_bits=4.6, show_progress=False)
    assert "model.embed_tokens" not in plan.choices and len(set(plan.choices.values())) > 1
    _, _, summary = compress(lm, plan.recipe, tmp_path / "b.clm", show_progress=False)
    assert 4.3 < summary["linear_bits_per_param"] <= 4.6


def test_an_embedding_stage_is_carried_into_the_plan_and_counted(tokenizer, tmp_path):
    """Untied head (qwen2): the solver does not choose the embedding's bits, so the recipe's stage stays, and
    its bytes count in the fixed part: the plan fits the byte size of the uniform 4-bit file with that stage."""

    def tiny():
        return LoadedModel.from_module(tiny_model("qwen2", layers=4), tokenizer, name="tiny")

    def recipe(bits):
        return preset(f"w{bits}-g16-rtn+emb8-g32-sym")

    target = compress(tiny(), recipe(4), tmp_path / "4.clm", show_progress=False)[2]["bytes_on_disk"]
    base = recipe(4)
    base.calibration.samples, base.calibration.length = 4, 32
    plan = plan_budget(tiny(), base, target_bytes=target, show_progress=False)
    assert plan.recipe.stages[0].type == "quantize_embedding" and plan.recipe.stages[0].bits == 8
    assert plan.predicted_bytes <= target
    _, _, summary = compress(tiny(), plan.recipe, tmp_path / "b.clm", show_progress=False)
    assert summary["bytes_on_disk"] <= target and summary["embedding_bits_per_param"] == 8.5


def test_compress_to_a_target_plans_and_checks_the_file(tokenizer, tmp_path):
    base = preset("w4-g16-rtn")
    base.calibration.samples, base.calibration.length = 4, 32
    lm = LoadedModel.from_module(tiny_model("llama", layers=4), tokenizer, name="tiny")
    target = BudgetTarget(linear_bits=4.6)
    _, result, summary = compress(lm, base, tmp_path / "b.clm", show_progress=False, target=target)
    assert result.plan is not None and result.recipe.to_dict() == result.plan.recipe.to_dict()
    assert len(set(result.plan.choices.values())) > 1 and summary["linear_bits_per_param"] <= 4.6
    with pytest.raises(CompressLMError, match=r"over 3\.0"):
        BudgetTarget(linear_bits=3.0).check(result.plan, summary)
    with pytest.raises(CompressLMError, match="over the budget"):
        BudgetTarget(bits=1.0).check(result.plan, {**summary, "bytes_on_disk": result.plan.budget_bytes + 1})


def test_fisher_weights_every_linear_and_changes_the_plan(tokenizer):
    lm = LoadedModel.from_module(tiny_model("llama", layers=4), tokenizer, name="tiny")
    names = [info.name for block in lm.layout.blocks for info in block.linears]
    windows = torch.randint(0, 200, (4, 32))
    fisher = output_fisher(lm, windows, [*names, lm.layout.lm_head], batch_size=2)
    assert all(fisher[n].shape == (lm.model.get_submodule(n).out_features,) and (fisher[n] > 0).all() for n in names)
    assert not any(p.grad is not None for p in lm.model.parameters())  # weights stay frozen
    base = preset("w4-g16-rtn")
    base.calibration.samples, base.calibration.length = 4, 32
    plans = {s: plan_budget(lm, base, target_linear_bits=4.4, sensitivity=s, show_progress=False)
             for s in ("fisher", "output")}  # fmt: skip
    assert "fisher" in plans["fisher"].recipe.name and "output" in plans["output"].recipe.name
    with pytest.raises(CompressLMError, match="sensitivity='hessian' is not known"):
        plan_budget(lm, base, target_linear_bits=4.4, sensitivity="hessian", show_progress=False)


@pytest.mark.parametrize("sparsity", [None, "50%"])
def test_method_estimate_is_the_compression_the_plan_runs(tokenizer, sparsity):
    """The solver's "method" estimate of a first-block layer is exactly what the engine writes for it."""
    from compresslm.data.calibration import calibration_windows
    from compresslm.engine.blocks import collect_statistics
    from compresslm.engine.budget import _approximation
    from compresslm.models.forward import capture_first_block_inputs
    from compresslm.recipe import PruneStage, Recipe

    base = preset("w3-g16-gptq")
    base.calibration.samples, base.calibration.length = 4, 32
    base.dense_dtype = "float32"  # float16 rounding of the embedding would move the Hessian by a rounding
    lm = LoadedModel.from_module(tiny_model("llama", layers=1), tokenizer, name="tiny")
    settings = base.calibration
    calib = calibration_windows(lm.tokenizer, settings.source, settings.samples, settings.length, settings.seed)
    batches = capture_first_block_inputs(lm, calib.windows, settings.batch_size, lm.device)
    stats, _ = collect_statistics(lm.layout.blocks[0], batches, lm.device)
    name = "model.layers.0.self_attn.q_proj"
    weight = lm.model.get_submodule(name).weight.detach().float().clone()
    stage = base.stages[0]
    estimate = _approximation(name, weight, stats.hessian(name), stage, 3, sparsity, "method")
    stages = base.stages if sparsity is None else [PruneStage(method="sparsegpt", sparsity=sparsity), *base.stages]
    recipe = Recipe(stages, calibration=base.calibration, dense_dtype="float32")
    _, result, _ = compress(lm, recipe, show_progress=False)
    assert torch.equal(estimate, result.weights[name].dequantize().float())
    rounded = _approximation(name, weight, stats.hessian(name), stage, 3, sparsity, "rtn")
    assert not torch.equal(estimate, rounded)
    with pytest.raises(CompressLMError, match="estimate='exact' is not known"):
        plan_budget(lm, base, target_linear_bits=4.0, estimate="exact", show_progress=False)
