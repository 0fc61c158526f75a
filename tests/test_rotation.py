"""The `rotate` stage: the rotated model computes the same function in float; refusals leave the model as it was."""

from __future__ import annotations

import json

import pytest
import torch

from compresslm.api import compress
from compresslm.data.calibration import calibration_windows
from compresslm.errors import UnsupportedArchitectureError
from compresslm.formats.container import read_header
from compresslm.models.assemble import load_compressed
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_model
from compresslm.quant.rotation import random_orthogonal
from compresslm.recipe import RecipeError, load_recipe, preset
from compresslm.recipe.rotation import RotateStage, rotate

ROTATABLE = ["llama", "qwen2", "mistral", "qwen3", "gemma"]
REFUSED = {
    "gpt2": "nn.Linear layers and rotary positions only",
    "opt": "nn.Linear layers and rotary positions only",
    "phi3": "separate q, k, v, o",
    "gpt_neox": "separate q, k, v, o",
    "olmo2": "normalizes model.layers.0.self_attn.o_proj's output",
    "gemma2": "normalizes model.layers.0.self_attn.o_proj's output",
    "stablelm": "not an RMS norm",
}


def _model(family: str) -> torch.nn.Module:
    """A tiny model whose norms have weights other than 1 (or 0), so that folding them is exercised."""
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("Norm") and getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n", [1, 7, 64, 576, 896])
def test_random_orthogonal_matrices_are_orthogonal_and_seeded(n):
    q = random_orthogonal(n, 3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_orthogonal(n, 3)) and (n == 1 or not torch.equal(q, random_orthogonal(n, 4)))


@pytest.mark.parametrize("family", ROTATABLE)
def test_the_rotated_model_computes_the_same_function(family, tokenizer):
    model = _model(family)
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
    lm = LoadedModel.from_module(model, tokenizer, name=family)
    facts = rotate(RotateStage(seed=1), lm)
    with torch.no_grad():
        after = lm.model(input_ids=_ids()).logits
    assert float((after - before).norm() / before.norm()) < 1e-5
    assert facts["folded_norms"] == 2 * len(lm.layout.blocks) + 1 and facts["logits_change"] < 1e-5
    embed = lm.model.get_input_embeddings().weight
    assert not torch.allclose(embed, tiny_model(family).get_input_embeddings().weight)  # it did rotate
    assert lm.model.get_output_embeddings().weight.data_ptr() != embed.data_ptr()


@pytest.mark.parametrize("family", list(REFUSED))
def test_families_the_rotation_does_not_fit_are_refused_and_left_as_they_were(family, tokenizer):
    model = _model(family)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    lm = LoadedModel.from_module(model, tokenizer, name=family)
    tied = lm.layout.tied_lm_head
    with pytest.raises(UnsupportedArchitectureError, match=REFUSED[family]):
        rotate(RotateStage(), lm)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head.data_ptr() == embed.data_ptr()) == tied


def test_rotated_and_quantized_model_round_trips(tokenizer, tmp_path):
    calibration = calibration_windows(tokenizer, "wikitext2", 8, 64, 0)
    lm = LoadedModel.from_module(_model("llama"), tokenizer, name="tiny")
    _, result, _ = compress(lm, "rot+w4a8-g16-gptq", tmp_path / "m.clm", calibration=calibration,
                            show_progress=False)  # fmt: skip
    assert result.info["model_transforms"]["rotate"]["untied_lm_head"] is True
    header, _ = read_header(tmp_path / "m.clm")
    assert header["config"]["tie_word_embeddings"] is False and "lm_head.weight" not in header["aliases"]
    reloaded = load_compressed(tmp_path / "m.clm")
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=_ids()).logits, lm.model(input_ids=_ids()).logits)
    assert json.dumps(result.recipe.to_dict()["stages"][0]) == json.dumps({"seed": 0, "heads": True, "type": "rotate"})


def test_rotation_presets_and_refusals():
    stages = preset("rot-s3+w4a8-g64-gptq").stages
    assert isinstance(stages[0], RotateStage) and stages[0].seed == 3
    assert stages[1].act_bits == 8 and stages[1].bits == 4 and stages[1].group_size == 64
    with pytest.raises(RecipeError, match="seed=-1 is not allowed"):
        load_recipe({"stages": [{"type": "rotate", "seed": -1}, {"method": "rtn"}]})


def test_a_lazily_loaded_model_is_refused(tiny_lm):
    tiny_lm.lazy = object()
    with pytest.raises(UnsupportedArchitectureError, match="whole model in memory"):
        rotate(RotateStage(), tiny_lm)
