"""Calibrating on the original model: one pass per block, statistics cached and reused across recipes."""

from __future__ import annotations

import pytest
import torch

from compresslm.api import compress
from compresslm.engine import blocks, sequential
from compresslm.errors import CompressLMError
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_model
from compresslm.recipe import RecipeError, load_recipe, preset

CALIB = {"samples": 8, "length": 64, "batch_size": 4}


def _recipe(name: str, propagate: str = "original"):
    recipe = preset(name)
    for key, value in {**CALIB, "propagate": propagate}.items():
        setattr(recipe.calibration, key, value)
    return recipe


def _lm(tokenizer) -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel.from_module(tiny_model("llama", layers=3), tokenizer, name="tiny-llama")


def _same_records(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].dequantize(), b[k].dequantize()) for k in a)


@pytest.fixture
def no_forward(monkeypatch):
    """Make any calibration forward pass fail: what runs under it used the cache alone.

    One window may still run: the probe on which AWQ and SmoothQuant verify their scale folds.
    """
    capture = sequential.capture_first_block_inputs

    def refuse(*args, **kwargs):
        raise AssertionError("the model was run although the statistics were cached")

    def probe_only(lm, windows, batch_size, device):
        if windows.shape[0] > 1:
            refuse()
        return capture(lm, windows, batch_size, device)

    def arm():
        monkeypatch.setattr(sequential, "capture_first_block_inputs", probe_only)
        monkeypatch.setattr(sequential, "collect_statistics", refuse)  # the dial streams'
        monkeypatch.setattr(blocks, "collect_statistics", refuse)  # every walk's

    return arm


def test_a_cached_run_needs_no_forward_pass_and_gives_the_same_records(tokenizer, tmp_path, no_forward):
    cold = compress(_lm(tokenizer), _recipe("w4-g16-gptq"), show_progress=False, stats_cache=tmp_path)[1]
    uncached = compress(_lm(tokenizer), _recipe("w4-g16-gptq"), show_progress=False)[1]
    assert _same_records(cold.weights, uncached.weights)
    assert cold.calibration["propagate"] == "original" and cold.calibration["statistics_reused"] is False
    no_forward()
    warm = compress(_lm(tokenizer), _recipe("w4-g16-gptq"), show_progress=False, stats_cache=tmp_path)[1]
    assert warm.calibration["statistics_reused"] is True
    assert _same_records(cold.weights, warm.weights)
    assert [layer.relative_error for layer in warm.layers] == [layer.relative_error for layer in cold.layers]


@pytest.mark.parametrize("other", ["w3-g16-gptq", "w4-g16-awq", "50%-sparsegpt", "2:4-wanda", "w8a8-smoothquant"])
def test_other_recipes_reuse_the_same_statistics(other, tokenizer, tmp_path, no_forward):
    compress(_lm(tokenizer), _recipe("w4-g16-gptq"), show_progress=False, stats_cache=tmp_path)
    expected = compress(_lm(tokenizer), _recipe(other), show_progress=False)[1]
    no_forward()
    reused = compress(_lm(tokenizer), _recipe(other), show_progress=False, stats_cache=tmp_path)[1]
    assert _same_records(expected.weights, reused.weights)


def test_owl_fills_the_cache_in_its_own_pass(tokenizer, tmp_path, no_forward):
    first = compress(_lm(tokenizer), _recipe("70%-wanda-owl"), show_progress=False, stats_cache=tmp_path)[1]
    no_forward()
    again = compress(_lm(tokenizer), _recipe("70%-wanda-owl"), show_progress=False, stats_cache=tmp_path)[1]
    assert again.info["sparsity_allocation"] == first.info["sparsity_allocation"]
    assert _same_records(first.weights, again.weights)


def test_sequential_mode_differs_and_writes_no_cache(tokenizer, tmp_path):
    original = compress(_lm(tokenizer), _recipe("w4-g16-gptq"), show_progress=False)[1]
    sequential_ = compress(_lm(tokenizer), _recipe("w4-g16-gptq", "compressed"), show_progress=False,
                           stats_cache=tmp_path)[1]  # fmt: skip
    assert not any(tmp_path.iterdir())
    first_block = [k for k in original.weights if ".layers.0." in k]
    later = [k for k in original.weights if ".layers.0." not in k]
    assert _same_records(
        {k: original.weights[k] for k in first_block}, {k: sequential_.weights[k] for k in first_block}
    )
    assert not _same_records({k: original.weights[k] for k in later}, {k: sequential_.weights[k] for k in later})


def test_a_changed_model_misses_the_cache(tokenizer, tmp_path):
    compress(_lm(tokenizer), _recipe("w4-g16-gptq"), show_progress=False, stats_cache=tmp_path)
    lm = _lm(tokenizer)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    result = compress(lm, _recipe("w4-g16-gptq"), show_progress=False, stats_cache=tmp_path)[1]
    assert result.calibration["statistics_reused"] is False
    assert len(list(tmp_path.iterdir())) == 2


def test_a_damaged_cache_file_is_named(tokenizer, tmp_path):
    compress(_lm(tokenizer), _recipe("w4-g16-gptq"), show_progress=False, stats_cache=tmp_path)
    (entry,) = tmp_path.iterdir()
    block = entry / "block_001.safetensors"
    block.write_bytes(b"x" * block.stat().st_size)  # same size, so the marker still vouches for it
    with pytest.raises(CompressLMError, match=r"block_001\.safetensors is unreadable.*delete"):
        compress(_lm(tokenizer), _recipe("w4-g16-gptq"), show_progress=False, stats_cache=tmp_path)


def test_an_incomplete_cache_is_recomputed(tokenizer, tmp_path):
    cold = compress(_lm(tokenizer), _recipe("w4-g16-gptq"), show_progress=False, stats_cache=tmp_path)[1]
    (entry,) = tmp_path.iterdir()
    (entry / "block_002.safetensors").unlink()  # e.g. a run killed before the last block
    again = compress(_lm(tokenizer), _recipe("w4-g16-gptq"), show_progress=False, stats_cache=tmp_path)[1]
    assert again.calibration["statistics_reused"] is False and (entry / "block_002.safetensors").exists()
    assert _same_records(cold.weights, again.weights)


def test_unknown_propagation_is_rejected():
    with pytest.raises(RecipeError, match=r"propagate='sideways'.*compressed, original"):
        load_recipe({"stages": [{"method": "gptq"}], "calibration": {"propagate": "sideways"}})


def test_a_head_fitted_by_gptq_runs_the_blocks_although_their_statistics_are_cached(tokenizer, tmp_path):
    name = "w4-g16-gptq+emb4-g16-sym-gptq"  # the head needs the final hidden states, which no cache holds
    cold = compress(_lm(tokenizer), _recipe(name), show_progress=False, stats_cache=tmp_path)[1]
    warm = compress(_lm(tokenizer), _recipe(name), show_progress=False, stats_cache=tmp_path)[1]
    assert warm.calibration["statistics_reused"] and _same_records(cold.weights, warm.weights)
    assert _same_records(cold.embeddings, warm.embeddings)
    assert [layer.method for layer in warm.layers if layer.role == "embedding+lm_head"] == ["gptq"]
