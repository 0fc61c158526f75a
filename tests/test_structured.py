"""Structured pruning: smaller models that plain transformers loads, exact where nothing that matters goes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compresslm.api import compress, shrink
from compresslm.cli import main
from compresslm.models.layout import discover_layout
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import load_model
from compresslm.models.tiny import tiny_model
from compresslm.recipe import RecipeError, load_recipe
from compresslm.recipe.structured import (
    PruneDepthStage,
    PruneWidthStage,
    StructureError,
    _rebuild,
    prune_depth,
    prune_width,
)
from compresslm.sparse.structure import head_steps, kept_heads, kept_width, top_heads

QUICK = {"samples": 2, "length": 32, "source": "wikitext2"}
IDS = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))


def _lm(tokenizer, family: str = "llama", layers: int = 3) -> LoadedModel:
    return LoadedModel.from_module(tiny_model(family, layers=layers), tokenizer, name=f"tiny-{family}")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_kept_counts_round_to_blocks_of_32_and_keep_query_groups_even():
    assert kept_width(1536, 0.5) == 768 and kept_width(1536, 0.25) == 1152 and kept_width(576, 0.25) == 448
    assert kept_width(100, 0.5) == 50 and kept_width(128, 0.1) == 115  # no 32-step for a narrow or odd width
    assert kept_width(1536, 0.01) == 1536  # too small a share to remove a step: refused by the stage
    assert head_steps(9, 3) == [3, 6, 9] and kept_heads(9, 3, 0.25) == 6 and kept_heads(9, 3, 0.8) == 3
    chosen = top_heads(torch.tensor([1.0, 5, 3, 9, 2, 0, 4, 4, 8]), 3, 6)
    assert chosen.tolist() == [1, 2, 3, 4, 6, 8]  # two from each group of three (a tie goes to the lower)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "olmo2"])
@pytest.mark.parametrize("stage", [
    PruneWidthStage(mlp=0.5, **QUICK), PruneWidthStage(heads=0.5, **QUICK), PruneWidthStage(hidden=0.5, **QUICK),
    PruneWidthStage(mlp=0.25, heads=0.5, hidden=0.25, score="taylor", **QUICK), PruneDepthStage(layers=1, **QUICK),
], ids=["mlp", "heads", "hidden", "all-taylor", "depth"])  # fmt: skip
def test_the_pruned_model_loads_in_plain_transformers(family, stage, tokenizer, tmp_path):
    lm = _lm(tokenizer, family)
    before = sum(p.numel() for p in lm.model.parameters())
    facts = (prune_width if stage.type == "prune_width" else prune_depth)(stage, lm)
    assert facts["parameters"] == {"from": before, "to": sum(p.numel() for p in lm.model.parameters())}
    assert facts["parameters"]["to"] < before
    lm.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded), _logits(lm.model))
    layout = discover_layout(reloaded)
    if "heads" in facts:  # every key/value group keeps the same number of query heads
        assert layout.num_heads == facts["heads"]["to"] and layout.num_heads % layout.num_kv_heads == 0


def test_rebuilding_with_nothing_removed_is_exact(tokenizer):
    lm = _lm(tokenizer)
    expected = _logits(lm.model)
    _rebuild(lm, copy.deepcopy(lm.model.config), dict(lm.model.state_dict()))
    assert torch.equal(_logits(lm.model), expected)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # still tied


def test_channels_heads_and_blocks_that_do_nothing_are_the_ones_removed_and_the_function_stays(tokenizer):
    lm = _lm(tokenizer)
    with torch.no_grad():
        for block in lm.model.model.layers:
            block.mlp.down_proj.weight[:, ::2] = 0  # half the MLP channels write nothing
            block.self_attn.o_proj.weight[:, 16:32] = 0  # head 1 (of group 0) writes nothing
            block.self_attn.o_proj.weight[:, 32:48] = 0  # head 2 (of group 1) writes nothing
        lm.model.model.layers[1].mlp.down_proj.weight.zero_()
        lm.model.model.layers[1].self_attn.o_proj.weight.zero_()  # block 1 adds nothing to the stream
    expected = _logits(lm.model)
    facts = prune_depth(PruneDepthStage(layers=1, **QUICK), lm)
    assert facts["removed_blocks"] == [1]
    lm.layout = discover_layout(lm.model)
    prune_width(PruneWidthStage(mlp=0.5, heads=0.5, **QUICK), lm)
    assert lm.model.config.intermediate_size == 64 and lm.model.config.num_attention_heads == 2
    assert torch.allclose(_logits(lm.model), expected, atol=1e-5, rtol=1e-5)


def test_refusals_come_before_compute_and_leave_the_model_as_it_was(tokenizer):
    for bad in ({"mlp": 1.0}, {"heads": -0.1}, {}, {"mlp": 0.5, "score": "cosine"}, {"mlp": 0.5, "samples": 0}):
        with pytest.raises(RecipeError):
            load_recipe({"stages": [{"type": "prune_width", **bad}]})
    with pytest.raises(RecipeError, match="layers=0"):
        load_recipe({"stages": [{"type": "prune_depth", "layers": 0}]})
    lm = _lm(tokenizer, layers=2)
    with pytest.raises(StructureError, match="at least one must remain"):
        prune_depth(PruneDepthStage(layers=2, **QUICK), lm)
    with pytest.raises(StructureError, match="removes none"):
        prune_width(PruneWidthStage(mlp=0.001, **QUICK), lm)
    for family, stage, message in (("gpt2", PruneWidthStage(mlp=0.5, **QUICK), "Conv1D"),
                                   ("phi3", PruneWidthStage(heads=0.5, **QUICK), "separate q, k, v"),
                                   ("stablelm", PruneWidthStage(heads=0.5, **QUICK), "does not follow"),
                                   ("opt", PruneWidthStage(heads=0.5, **QUICK), "does not follow")):  # fmt: skip
        lm = _lm(tokenizer, family)
        expected = _logits(lm.model)
        with pytest.raises(StructureError, match=message):
            prune_width(stage, lm)
        assert torch.equal(_logits(lm.model), expected)


def test_presets_make_one_width_stage_per_run_of_width_parts():
    stages = load_recipe("drop8+mlp25+heads33+w4-g64-rtn").stages
    assert [s.type for s in stages] == ["prune_depth", "prune_width", "quantize"]
    assert (stages[0].layers, stages[1].mlp, stages[1].heads, stages[1].hidden) == (8, 0.25, 0.33, 0.0)
    assert load_recipe("mlp50-taylor").stages[0].score == "taylor"
    with pytest.raises(RecipeError, match="same score"):
        load_recipe("mlp50+heads25-taylor")


def test_pruned_then_quantized_in_one_recipe_round_trips_through_the_container(tokenizer, tmp_path):
    lm = _lm(tokenizer)
    recipe = {"stages": [{"type": "prune_width", "mlp": 0.5, **QUICK}, {"type": "prune_depth", "layers": 1, **QUICK},
                         {"method": "rtn", "bits": 4, "group_size": 32}]}  # fmt: skip
    compressed, result, _ = compress(lm, recipe, tmp_path / "m.clm", show_progress=False)
    assert result.info["model_transforms"]["prune_width"]["mlp"] == {"from": 128, "to": 64}
    loaded = load_model(tmp_path / "m.clm")
    assert loaded.model.config.intermediate_size == 64 and loaded.model.config.num_hidden_layers == 2
    assert torch.equal(_logits(loaded.model), _logits(compressed.model))


def test_shrink_writes_a_plain_directory_and_refuses_container_stages_first(tokenizer, tmp_path, capsys):
    lm = _lm(tokenizer)
    _, summary = shrink(lm, {"stages": [{"type": "prune_width", "hidden": 0.5, **QUICK}]}, tmp_path / "small")
    assert summary["stages"][0]["hidden"] == {"from": 64, "to": 32}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "small").config.hidden_size == 32
    assert main(["shrink", str(tmp_path / "small"), "--recipe", "mlp50+w4-g64-rtn", "-o", str(tmp_path / "x")]) == 2
    assert "shrink takes whole-model stages only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    code = main(["shrink", str(tmp_path / "small"), "--recipe", "drop1", "--calib", "wikitext2", "--calib-samples", "2",
                 "--calib-len", "32", "-o", str(tmp_path / "smaller"), "--json", "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 0 and out["stages"][0]["layers"] == {"from": 3, "to": 2}
    assert "importance" not in captured.err  # --quiet reaches the stage's own bars
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "smaller").config.num_hidden_layers == 2


def test_heal_needs_a_teacher(tmp_path, capsys):
    assert main(["train", "smollm2-135m", "--recipe", "heal", "--steps", "1", "-o", str(tmp_path / "h")]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_a_recipe_refuses_a_model_before_its_first_whole_model_stage_runs(tokenizer, tmp_path):
    lm = _lm(tokenizer, "phi3")
    expected = _logits(lm.model)
    with pytest.raises(StructureError, match="separate q, k, v and o"):
        compress(lm, "drop1+heads50+w8-g16-rtn", tmp_path / "m.clm", show_progress=False)
    assert lm.model.config.num_hidden_layers == 3 and torch.equal(_logits(lm.model), expected)
    assert not (tmp_path / "m.clm").exists()
