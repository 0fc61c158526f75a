"""The same code paths on CUDA (skipped where no GPU is present, as in CI).

Compression calibrates on the GPU, containers reload onto it bit-exactly, dial switches and
training steps run there, and the quantized KV cache works there: "unchanged on CUDA".
"""

from __future__ import annotations

import pytest
import torch

from compresslm.api import compress
from compresslm.dial import set_budget
from compresslm.eval.perplexity import perplexity
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import load_model
from compresslm.models.tiny import tiny_model
from compresslm.recipe import preset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CALIB = {"samples": 8, "length": 64, "batch_size": 4}


def _lm(tokenizer) -> LoadedModel:
    return LoadedModel.from_module(tiny_model("llama", layers=2).cuda(), tokenizer, name="tiny-llama")


def _recipe(name: str, **calibration):
    recipe = preset(name)
    for key, value in {**CALIB, **calibration}.items():
        setattr(recipe.calibration, key, value)
    return recipe


@pytest.mark.parametrize(
    "name", ["w4-g16-rtn", "w4-g16-gptq", "w4-g16-awq", "50%-sparsegpt", "2:4-wanda", "w8a8-smoothquant", "dial"]
)
def test_compress_on_cuda_reloads_bit_exactly(name, tokenizer, tmp_path):
    lm, result, _ = compress(_lm(tokenizer), _recipe(name), tmp_path / "m.clm", show_progress=False)
    assert lm.device.type == "cuda"
    ids = torch.arange(3, 40, device="cuda")[None]
    reloaded = load_model(tmp_path / "m.clm", device="cuda")
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, reloaded.model(input_ids=ids).logits)
    assert all(layer.relative_error is None or layer.relative_error < 1 for layer in result.layers)


def test_original_propagation_with_a_cache_on_cuda(tokenizer, tmp_path):
    first = compress(_lm(tokenizer), _recipe("w4-g16-gptq", propagate="original"), show_progress=False,
                     stats_cache=tmp_path)[1]  # fmt: skip
    again = compress(_lm(tokenizer), _recipe("w3-g16-gptq", propagate="original"), show_progress=False,
                     stats_cache=tmp_path)[1]  # fmt: skip
    assert first.calibration["statistics_reused"] is False and again.calibration["statistics_reused"] is True


def test_dial_switches_on_cuda(tokenizer, tmp_path):
    compress(_lm(tokenizer), _recipe("dial"), tmp_path / "d.clm", show_progress=False)
    lm = load_model(tmp_path / "d.clm", device="cuda")
    set_budget(lm, bits=3, sparsity=0.5)
    assert next(lm.model.parameters()).device.type == "cuda"
    assert perplexity(lm, "wikitext2", ctx=64, limit=2, show_progress=False).ppl > 1


@pytest.mark.parametrize("recipe", ["qat-w4", "random-precision", "cast-2:4", "lora-qat-w4", "qat-w4a8", "gmp-50%"])
def test_training_steps_run_on_cuda(recipe, tokenizer, tmp_path):
    from compresslm.train.trainer import train, train_recipe

    spec = train_recipe(recipe)
    spec.batch_size, spec.seq_len = 2, 32
    summary = train(_lm(tokenizer), spec, 3, tmp_path / "run", show_progress=False)
    assert summary["steps"] == 3


def test_quantized_kv_cache_on_cuda(tokenizer):
    from compresslm.eval.kv_quality import kv_perplexity
    from compresslm.kv.cache import KVQuantConfig

    result = kv_perplexity(_lm(tokenizer), KVQuantConfig(bits=4, group_size=16), ctx=64, limit=2, chunk=16,
                           show_progress=False)  # fmt: skip
    assert result["ppl"] > 1
