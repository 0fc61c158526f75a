"""Scale folds (AWQ, SmoothQuant) are verified numerically: a norm computing x̂·(1 + w) is folded as such."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compresslm.engine.smoothing as smoothing
from compresslm.api import compress
from compresslm.errors import UnsupportedArchitectureError
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_model
from compresslm.recipe import load_recipe


class OffsetRMSNorm(nn.Module):
    """An RMSNorm that computes x̂·(1 + w), as Gemma's does: the same function as `norm` when w = w_norm − 1."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().clone() - 1.0)
        self.eps = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * (1.0 + self.weight)


def _offset_norm_model() -> nn.Module:
    model = tiny_model("llama")
    with torch.no_grad():  # norms far from 1, so that a wrong fold shows
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(0)) + 0.5)
    for layer in model.model.layers:
        layer.input_layernorm = OffsetRMSNorm(layer.input_layernorm)
        layer.post_attention_layernorm = OffsetRMSNorm(layer.post_attention_layernorm)
    return model


def _recipe(name: str):
    recipe = load_recipe(name)
    recipe.calibration.samples, recipe.calibration.length, recipe.calibration.source = 4, 32, "wikitext2"
    return recipe


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 259, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("recipe", ["w8-g16-awq", "w8a8-smoothquant"])
def test_a_one_plus_w_norm_is_folded_as_such(tokenizer, recipe):
    model = _offset_norm_model()
    reference = _logits(model)
    lm = LoadedModel.from_module(model, tokenizer, name="offset-norms")
    result = compress(lm, _recipe(recipe), show_progress=False)[1]
    norm_folds = [f for f in result.info["scale_folds"] if f["fold_into"] and "layernorm" in f["fold_into"]]
    assert norm_folds and all(f["norm_offset"] == 1.0 for f in norm_folds)
    assert all(f["verified"] < 2e-3 for f in result.info["scale_folds"] if f["fold_into"])
    assert _relative(_logits(lm.model), reference) < 0.05  # 8-bit weights: close to the float model


def test_the_plain_fold_fails_the_check_and_is_refused(tokenizer, monkeypatch):
    """Today's fold (weight / s) on an x̂·(1 + w) norm changes the block: the check catches it."""
    real = smoothing._apply_fold

    def plain_only(consumers, producer, transposed, s, fold, reference, block_output):
        if producer.weight.dim() == 1:
            for info in consumers:
                smoothing._scale_columns(info, s)
            smoothing._divide_outputs(producer, s, transposed, 0.0)
            change = smoothing._relative_change(block_output(), reference)
            assert change > 1e-2  # the wrong fold is far outside the tolerance
            raise UnsupportedArchitectureError(f"plain fold changed the block by {change:.3g}")
        return real(consumers, producer, transposed, s, fold, reference, block_output)

    monkeypatch.setattr(smoothing, "_apply_fold", plain_only)
    lm = LoadedModel.from_module(_offset_norm_model(), tokenizer, name="offset-norms")
    with pytest.raises(UnsupportedArchitectureError, match="plain fold changed the block"):
        compress(lm, _recipe("w8-g16-awq"), show_progress=False)


def test_a_fold_no_form_explains_is_refused_naming_the_module(tokenizer):
    class ShiftedNorm(OffsetRMSNorm):  # x̂·(2 + w): neither form the fold knows
        def forward(self, x):
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return x * (2.0 + self.weight)

    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.input_layernorm = ShiftedNorm(layer.input_layernorm)
    lm = LoadedModel.from_module(model, tokenizer, name="shifted-norms")
    with pytest.raises(UnsupportedArchitectureError, match=r"input_layernorm \(ShiftedNorm\).*changes the block"):
        compress(lm, _recipe("w8-g16-awq"), show_progress=False)


def test_gemma_awq_keeps_the_model(tokenizer):
    from transformers import AutoModelForCausalLM, GemmaConfig

    config = GemmaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=torch.Generator().manual_seed(2)))
    reference = _logits(model)
    lm = LoadedModel.from_module(model, tokenizer, name="tiny-gemma")
    result = compress(lm, _recipe("w8-g16-awq"), show_progress=False)[1]
    assert any(f["norm_offset"] == 1.0 for f in result.info["scale_folds"])
    assert _relative(_logits(lm.model), reference) < 0.05
