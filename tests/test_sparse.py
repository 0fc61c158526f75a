"""Pruning: patterns and masks, magnitude / Wanda / SparseGPT, joint recipes, the container, OWL."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings

import pytest
import torch

from compresslm.api import compress
from compresslm.compressed import CompressedWeight, InvalidCompressedWeight
from compresslm.engine.allocation import owl_ratios
from compresslm.errors import CompressLMError
from compresslm.formats.packing import decode_nm, encode_nm, nm_index_bits
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import load_model
from compresslm.models.tiny import tiny_model
from compresslm.quant.gptq import GPTQOptions, gptq, output_error
from compresslm.quant.grid import Grid
from compresslm.recipe import Recipe, RecipeError, preset
from compresslm.sparse.masks import SparsityError, SparsityPattern, mask_overlap, select_mask
from compresslm.sparse.prune import apply_mask, magnitude, sparsegpt, wanda

SMALL_CALIB = {"samples": 8, "length": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def layer():
    """A weight and the Hessian of correlated inputs whose features differ widely in scale."""
    gen = torch.Generator().manual_seed(0)
    n, d_in, d_out = 2048, 96, 48
    x = torch.randn(n, 12, generator=gen) @ torch.randn(12, d_in, generator=gen)
    x = x + 0.2 * torch.randn(n, d_in, generator=gen)
    x = x * torch.logspace(-1, 1, d_in)[torch.randperm(d_in, generator=gen)]
    hessian = 2 / n * x.T @ x
    return torch.randn(d_out, d_in, generator=gen), hessian


def _rel(weight, record, hessian):
    return output_error(weight, record.dequantize(), hessian) / output_error(weight, torch.zeros_like(weight), hessian)


@pytest.mark.parametrize(
    ("text", "message"),
    [("3:2", "0 < N < M"), ("1.2", "[0, 1)"), ("120%", "[0, 1)"), ("0:4", "0 < N < M"), ("half", "cannot read")],
)
def test_impossible_patterns_are_rejected(text, message):
    with pytest.raises(SparsityError, match=re.escape(message)):
        SparsityPattern.parse(text)


def test_impossible_prune_presets_name_the_field():
    with pytest.raises(RecipeError, match=r"sparsity='3:2' is not allowed"):
        preset("3:2-wanda")
    with pytest.raises(RecipeError, match=r"sparsity='120%'"):
        preset("120%-sparsegpt")
    with pytest.raises(RecipeError, match="more than one"):
        preset("50%-wanda+2:4-magnitude")
    with pytest.raises(RecipeError, match="owl"):
        preset("2:4-wanda-owl")


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_masks_keep_exactly_n_of_every_m(n, m):
    mask = select_mask(torch.randn(32, 64), SparsityPattern(n=n, m=m))
    assert (mask.reshape(32, -1, m).sum(-1) == n).all()


def test_nm_needs_a_fitting_width():
    with pytest.raises(SparsityError, match="multiple of 4"):
        select_mask(torch.randn(8, 10), SparsityPattern(n=2, m=4))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.73, 0.95])
def test_ratio_is_accurate(ratio):
    scores = torch.randn(40, 96)
    rows = select_mask(scores, SparsityPattern(ratio=ratio))
    assert ((~rows).sum(1) == round(ratio * 96)).all()  # every row, exactly
    whole = select_mask(scores, SparsityPattern(ratio=ratio, scope="layer"))
    assert int((~whole).sum()) == round(ratio * scores.numel())


def test_nm_rank_encoding_round_trips_and_is_compact():
    for n, m in [(2, 4), (4, 8), (1, 2), (7, 8)]:
        mask = select_mask(torch.randn(16, 64), SparsityPattern(n=n, m=m))
        index = encode_nm(mask, n, m)
        assert index.max() < math.comb(m, n)
        assert torch.equal(decode_nm(index, n, m).reshape(16, 64), mask)
    assert nm_index_bits(2, 4) == 3  # 0.75 bit per weight, below a bitmask's 1


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(layer):
    weight, hessian = layer
    for text in ("50%", "70%", "2:4", "4:8"):
        pattern = SparsityPattern.parse(text)
        records = magnitude(weight, pattern), wanda(weight, hessian, pattern), sparsegpt(weight, hessian, pattern)
        errors = [_rel(weight, record, hessian) for record in records]
        assert errors[2] < errors[1] < errors[0], text


def test_pruned_records_are_exactly_sparse(layer):
    weight, hessian = layer
    for record in (
        magnitude(weight, SparsityPattern(ratio=0.6)),
        sparsegpt(weight, hessian, SparsityPattern(n=2, m=4)),
    ):
        dense = record.dequantize()
        assert torch.equal(dense != 0, record.mask & (dense != 0))
        assert (dense[~record.mask] == 0).all()
    assert sparsegpt(weight, hessian, SparsityPattern(n=2, m=4)).nm == (2, 4)


def test_joint_sparsegpt_quantizes_kept_weights_and_zeroes_the_rest(layer):
    weight, hessian = layer
    grid = Grid(4, "group", 32)
    record = sparsegpt(weight, hessian, SparsityPattern(n=2, m=4), grid)
    assert record.quantized and record.bits == 4 and record.nm == (2, 4)
    assert (record.dequantize()[~record.mask] == 0).all()
    pruned_only = sparsegpt(weight, hessian, SparsityPattern(n=2, m=4))
    # quantizing costs something on top of pruning, but not much at 4 bits
    assert _rel(weight, pruned_only, hessian) < _rel(weight, record, hessian) < 2 * _rel(weight, pruned_only, hessian)


def test_joint_sparsegpt_can_fit_its_grids_on_where_the_weights_end(layer):
    weight, hessian = layer
    grid, pattern = Grid(8, "group", 32), SparsityPattern(ratio=0.7)
    pruned_only = _rel(weight, sparsegpt(weight, hessian, pattern), hessian)
    errors = {}
    for fit_on in ("current", "final", "both"):
        record = sparsegpt(weight, hessian, pattern, grid, fit_on=fit_on)
        assert abs(record.sparsity - 0.7) < 0.01 and (record.dequantize()[~record.mask] == 0).all()
        errors[fit_on] = _rel(weight, record, hessian)
    # on this layer the updates of a group's later columns push weights past the range fitted when the
    # sweep reaches the group, and clipping them costs far more than 8-bit rounding
    assert errors["current"] > 1.1 * pruned_only
    assert max(errors["final"], errors["both"]) < 1.02 * pruned_only
    with pytest.raises(CompressLMError, match="fit_on must be"):
        sparsegpt(weight, hessian, pattern, grid, fit_on="later")


def test_gptq_holds_a_given_mask(layer):
    weight, hessian = layer
    mask = select_mask(weight.abs(), SparsityPattern(ratio=0.5))
    record = gptq(weight, hessian, Grid(4, "group", 32), GPTQOptions(act_order=True), mask=mask)
    assert torch.equal(record.mask, mask)
    assert (record.dequantize()[~mask] == 0).all()


def test_apply_mask_sets_pruned_codes_to_the_zero_point(layer):
    from compresslm.quant.rtn import rtn

    weight, _ = layer
    record = rtn(weight, Grid(4, "group", 32))
    mask = select_mask(weight.abs(), SparsityPattern(n=2, m=4))
    sparse = apply_mask(record, mask, (2, 4))
    assert torch.equal(sparse.codes[mask], record.codes[mask])
    assert (sparse.dequantize()[~mask] == 0).all()


def test_record_checks_the_nm_claim():
    mask = torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(InvalidCompressedWeight, match="exactly 2 of every 4"):
        CompressedWeight.unquantized(torch.randn(4, 8), mask, (2, 4))


def test_mask_overlap():
    a = select_mask(torch.randn(8, 16), SparsityPattern(ratio=0.5))
    assert mask_overlap(a, a) == 1.0
    assert mask_overlap(a, ~a) == 0.0 or int((~a).sum()) == 0


def test_owl_ratios_keep_the_global_ratio():
    ratios = owl_ratios([0.01, 0.05, 0.02, 0.03], [10, 10, 20, 10], target=0.7, lam=0.08)
    assert sum(r * p for r, p in zip(ratios, [10, 10, 20, 10], strict=True)) / 50 == pytest.approx(0.7)
    assert ratios[1] < ratios[3] < ratios[2] < ratios[0]  # more outliers, less pruning
    assert max(ratios) - min(ratios) == pytest.approx(0.16)
    assert owl_ratios([0.1, 0.1], [1, 1], 0.5, 0.08) == [0.5, 0.5]


def _tiny(tokenizer):
    return LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny-llama")


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.mark.parametrize(
    "name", ["50%-magnitude", "2:4-wanda", "60%-sparsegpt", "2:4-sparsegpt+w4-g16-gptq", "w4-g16-gptq+50%-wanda"]
)
def test_sparse_containers_reload_bit_exactly(name, tokenizer, tmp_path):
    recipe = preset(name)
    recipe.calibration.samples, recipe.calibration.length, recipe.calibration.batch_size = 8, 64, 4
    lm, result, _ = compress(_tiny(tokenizer), recipe, tmp_path / "m.clm", show_progress=False)
    reloaded = load_model(tmp_path / "m.clm")
    ids = tokenizer("Sparse weights must reload bit for bit.", return_tensors="pt").input_ids
    assert torch.equal(_logits(lm, ids), _logits(reloaded, ids))
    for key, record in result.weights.items():
        again = reloaded.compressed[key]
        assert torch.equal(again.mask, record.mask)
        assert torch.equal(again.dequantize(), record.dequantize())
        assert again.nm == record.nm


def test_joint_is_smaller_than_sparse_or_quantized_alone(tokenizer, tmp_path):
    sizes = {}
    for name in ("2:4-sparsegpt", "w4-g16-gptq", "2:4-sparsegpt+w4-g16-gptq"):
        recipe = preset(name)
        recipe.calibration.samples, recipe.calibration.length, recipe.calibration.batch_size = 8, 64, 4
        _, _, summary = compress(_tiny(tokenizer), recipe, tmp_path / f"{name}.clm", show_progress=False)
        sizes[name] = summary
    joint = sizes["2:4-sparsegpt+w4-g16-gptq"]
    assert joint["bytes_on_disk"] < sizes["w4-g16-gptq"]["bytes_on_disk"] < sizes["2:4-sparsegpt"]["bytes_on_disk"]
    # 2 of 4 codes at 4 bits + 3-bit pattern per 4 weights + float16 scale and 4-bit zero per 16
    assert joint["linear_bits_per_param"] == pytest.approx(2 + 0.75 + 1 + 0.25, abs=0.01)
    # 16-bit values of half the weights + the 2:4 pattern
    assert sizes["2:4-sparsegpt"]["linear_bits_per_param"] == pytest.approx(8 + 0.75, abs=0.01)


def test_prune_after_quantize_keeps_codes(tokenizer):
    quantized = compress(_tiny(tokenizer), "w4-g16-rtn", show_progress=False)[1]
    both = compress(_tiny(tokenizer), "w4-g16-rtn+50%-magnitude", show_progress=False)[1]
    for key, record in both.weights.items():
        assert torch.equal(record.codes[record.mask], quantized.weights[key].codes[record.mask])
        assert record.sparsity == pytest.approx(0.5)


def test_owl_allocation_keeps_the_global_ratio(tokenizer):
    recipe = preset("70%-wanda-owl")
    recipe.calibration.samples, recipe.calibration.length, recipe.calibration.batch_size = 8, 64, 4
    _, result, _ = compress(
        LoadedModel.from_module(tiny_model("llama", layers=4), tokenizer), recipe, show_progress=False
    )
    ratios = result.info["sparsity_allocation"]["block_ratios"]
    assert len(ratios) == 4 and len(set(ratios.values())) > 1
    pruned = sum(r.mask.numel() - int(r.mask.sum()) for r in result.weights.values())
    total = sum(r.mask.numel() for r in result.weights.values())
    assert pruned / total == pytest.approx(0.7, abs=0.01)


def test_nm_on_a_misfitting_layer_names_the_layer(tokenizer):
    with pytest.raises(Exception, match=r"model\.layers\.0\..*multiple of 3"):
        compress(_tiny(tokenizer), {"stages": [{"type": "prune", "method": "magnitude", "sparsity": "1:3"}]},
                 show_progress=False)  # fmt: skip


def test_mask_stability_of_magnitude_is_total(tokenizer):
    from compresslm.analysis.masks import mask_stability
    from compresslm.data.calibration import calibration_windows

    sets = tuple(calibration_windows(tokenizer, "wikitext2", n=4, length=32, seed=seed) for seed in (0, 1))
    lm = _tiny(tokenizer)
    same = mask_stability(lm, "50%-magnitude", sets)  # magnitude ignores the calibration text
    assert same.summary["mean_overlap"] == 1.0
    varied = mask_stability(lm, "50%-wanda", sets)
    assert varied.summary["mean_chance"] < varied.summary["mean_overlap"] <= 1.0


def test_sparse_kernel_is_reported_honestly_on_cpu(layer):
    from compresslm.runtime.linear import CompressedLinear

    weight, hessian = layer
    module = CompressedLinear(sparsegpt(weight, hessian, SparsityPattern(n=2, m=4)))
    assert "no semi-structured sparse kernel on cpu" in module.use_sparse_kernel()
    assert module.sparse_weight is None
    dense = CompressedLinear(magnitude(weight, SparsityPattern(ratio=0.5)))
    assert "not 2:4" in dense.use_sparse_kernel()
    x = torch.randn(3, weight.shape[1])
    assert torch.equal(module(x), x @ module.compressed.dequantize().T)


def test_grid_fit_after_quantizes_sparsegpts_result_on_its_mask(layer):
    """`grid_fit: after`: no joint sweep; float SparseGPT, then GPTQ on the kept weights, mask fixed."""
    from compresslm.engine.linear_stages import compress_weight
    from compresslm.quant.gptq import gptq
    from compresslm.recipe import PruneStage, QuantizeStage

    weight, hessian = layer
    stages = [PruneStage(method="sparsegpt", sparsity="70%", grid_fit="after"),
              QuantizeStage(method="gptq", bits=8, group_size=32)]  # fmt: skip
    record = compress_weight("layer", weight, stages, hessian)
    pruned = sparsegpt(weight, hessian, SparsityPattern(ratio=0.7))
    expected = gptq(pruned.dequantize(), hessian, stages[1].grid, stages[1].gptq_options, mask=pruned.mask)
    assert torch.equal(record.mask, pruned.mask) and torch.equal(record.dequantize(), expected.dequantize())
    joint = compress_weight("layer", weight, [dataclasses.replace(stages[0], grid_fit="current"), stages[1]], hessian)
    assert not torch.equal(joint.dequantize(), record.dequantize())  # one sweep: quantization updates pruning


def test_keep_zeros_holds_a_pruned_checkpoints_zeros(layer):
    """A checkpoint pruned before compression (sparsity-aware training): plain GPTQ writes into its zeros
    (and warns), `keep_zeros` holds them, as 2:4 metadata where they form 2:4 and as a bitmask otherwise."""
    from compresslm.engine.linear_stages import compress_weight
    from compresslm.recipe import QuantizeStage

    weight, hessian = layer
    stage = QuantizeStage(method="gptq", bits=4, group_size=32)
    for pattern in (SparsityPattern(n=2, m=4), SparsityPattern(ratio=0.5)):
        pruned = magnitude(weight, pattern).dequantize().float()
        with pytest.warns(UserWarning, match="keepzeros"):
            dense = compress_weight("layer", pruned, [stage], hessian)
        assert dense.mask is None and (dense.dequantize()[pruned == 0] != 0).any()
        held = compress_weight("layer", pruned, [dataclasses.replace(stage, keep_zeros=True)], hessian)
        assert torch.equal(held.mask, pruned != 0) and (held.dequantize()[pruned == 0] == 0).all()
        assert held.nm == pattern.nm
    # a 2:4 row whose group has one non-zero still stores 2:4 (a zero counts as kept)
    sparser = magnitude(weight, SparsityPattern(n=1, m=4)).dequantize().float()
    held = compress_weight("layer", sparser, [dataclasses.replace(stage, keep_zeros=True)], hessian)
    assert held.nm == (2, 4) and (held.dequantize()[sparser == 0] == 0).sum() >= (sparser == 0).sum() * 2 // 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compress_weight("layer", weight, [stage], hessian)  # a dense weight: no warning
    few = magnitude(weight, SparsityPattern(ratio=0.2)).dequantize().float()  # 20 % < 1 in 4: a mask would cost
    assert compress_weight("layer", few, [dataclasses.replace(stage, keep_zeros=True)], hessian).mask is None


def test_keep_zeros_is_refused_beside_a_prune_stage_or_the_dial():
    assert preset("w4-g64-gptq-keepzeros").stages[0].keep_zeros
    assert "keep_zeros" not in preset("w4-g64-gptq").to_dict()["stages"][0]  # earlier recipes keep their text
    with pytest.raises(RecipeError, match="keep_zeros holds"):
        preset("2:4-sparsegpt+w4-g64-gptq-keepzeros")
    with pytest.raises(RecipeError, match="nested widths"):
        Recipe.from_dict({"stages": [{"method": "gptq", "bits": 4, "nested_widths": [2, 4], "keep_zeros": True}]})


def test_keep_zeros_container_of_a_pruned_model_reloads_bit_exactly(tokenizer, tmp_path):
    lm = _tiny(tokenizer)
    with torch.no_grad():
        for name, module in lm.model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                module.weight.copy_(magnitude(module.weight, SparsityPattern(n=2, m=4)).dequantize())
    recipe = preset("w4-g16-gptq-keepzeros")
    recipe.calibration.samples, recipe.calibration.length, recipe.calibration.batch_size = 8, 64, 4
    lm, result, _ = compress(lm, recipe, tmp_path / "m.clm", show_progress=False)
    reloaded = load_model(tmp_path / "m.clm")
    ids = tokenizer("Trained zeros stay zeros.", return_tensors="pt").input_ids
    assert torch.equal(_logits(lm, ids), _logits(reloaded, ids))
    assert all(record.nm == (2, 4) and reloaded.compressed[key].nm == (2, 4) for key, record in result.weights.items())
