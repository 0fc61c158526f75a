"""Recipes: presets, files, and errors that name the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from compresslm.recipe import Recipe, RecipeError, load_recipe, preset


def test_presets():
    r = preset("w4-gptq")
    stage = r.stages[0]
    assert (stage.method, stage.bits, stage.granularity, stage.group_size, stage.symmetric) == (
        "gptq",
        4,
        "group",
        128,
        False,
    )
    assert r.needs_calibration
    s8 = preset("w8-rtn").stages[0]
    assert s8.granularity == "channel" and not preset("w8-rtn").needs_calibration
    act = preset("w3-g64-gptq-sym-act").stages[0]
    assert (act.bits, act.group_size, act.symmetric, act.act_order) == (3, 64, True, True)
    assert preset("w4-rtn-clip").stages[0].clip_search
    assert preset("w4-gptq").stages[0].uses_act_order  # GPTQ's default, as in llm-compressor
    assert not preset("w4-gptq-noact").stages[0].uses_act_order
    assert not preset("w4-rtn").stages[0].uses_act_order
    assert Recipe.from_dict({"stages": [{"method": "gptq", "act_order": None}]}).stages[0].uses_act_order


def test_unknown_preset():
    with pytest.raises(RecipeError, match="unknown preset 'w4-awesome'"):
        preset("w4-awesome")


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"method": "gptq", "bitz": 4}, "stage 1 (quantize): unknown field 'bitz'; allowed fields: method, bits"),
        ({"bits": 9}, "stage 1 (quantize): bits=9 is not allowed; choose 2 to 8"),
        ({"method": "magic"}, "method='magic' is not allowed; choose one of rtn, gptq"),
        ({"group_size": 0}, "group_size=0 is not allowed"),
        ({"bits": "four"}, "bits='four' is not allowed; expected int"),
        ({"symmetric": "yes"}, "symmetric='yes' is not allowed; expected bool"),
        ({"method": "rtn", "act_order": True}, "act_order=true needs method gptq"),
        ({"method": "gptq", "act_order": "yes"}, "act_order='yes' is not allowed; expected bool"),
        ({"targets": []}, "targets is empty"),
    ],
)
def test_validation_errors(stage, message):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"stages": [stage]})
    assert message in str(info.value)


def test_recipe_level_errors():
    with pytest.raises(RecipeError, match="recipe: unknown field 'stage'"):
        Recipe.from_dict({"stage": []})
    with pytest.raises(RecipeError, match="non-empty list"):
        Recipe.from_dict({"stages": []})
    with pytest.raises(RecipeError, match="calibration: unknown field 'n'"):
        Recipe.from_dict({"stages": [{}], "calibration": {"n": 3}})
    with pytest.raises(RecipeError, match="calibration: samples=0"):
        Recipe.from_dict({"stages": [{}], "calibration": {"samples": 0}})
    with pytest.raises(RecipeError, match="dense_dtype='int8' is not allowed"):
        Recipe.from_dict({"stages": [{}], "dense_dtype": "int8"})
    with pytest.raises(RecipeError, match="type='distill' is not allowed"):
        Recipe.from_dict({"stages": [{"type": "distill"}]})


def test_yaml_file_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "stages:\n  - method: gptq\n    bits: 3\n    group_size: 64\n    targets: [gate, up, down]\n"
        "calibration:\n  samples: 16\n  length: 256\n"
    )
    recipe = load_recipe(str(path))
    assert recipe.name == "mine" and recipe.stages[0].targets == ["gate", "up", "down"]
    assert recipe.calibration.samples == 16
    assert load_recipe(recipe.to_dict()).to_dict() == recipe.to_dict()


def test_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="cannot parse recipe"):
        load_recipe(str(bad))


def test_targets_and_ignore():
    stage = Recipe.from_dict({"stages": [{"targets": ["q", "k"], "ignore": ["layers.0."]}]}).stages[0]
    assert stage.applies_to("q", "model.layers.1.self_attn.q_proj")
    assert not stage.applies_to("q", "model.layers.0.self_attn.q_proj")
    assert not stage.applies_to("down", "model.layers.1.mlp.down_proj")


def test_grid_fit_belongs_to_sparsegpt():
    from compresslm.recipe import Recipe

    stages = [{"type": "prune", "method": "sparsegpt", "sparsity": "50%", "grid_fit": "both"}, {"bits": 8}]
    assert Recipe.from_dict({"stages": [{**stages[0], "grid_fit": "after"}, stages[1]]}).stages[0].grid_fit == "after"
    recipe = Recipe.from_dict({"stages": stages})
    assert recipe.to_dict()["stages"][0]["grid_fit"] == "both"
    with pytest.raises(RecipeError, match="grid_fit"):
        Recipe.from_dict({"stages": [{"type": "prune", "method": "wanda", "grid_fit": "final"}]})
    with pytest.raises(RecipeError, match="grid_fit"):
        Recipe.from_dict({"stages": [{"type": "prune", "method": "sparsegpt", "grid_fit": "later"}]})


def test_separate_sparsity_fit_is_checked_and_shown_only_with_pruned_ratios():
    dial = preset("dial").to_dict()
    stage = next(st for st in dial["stages"] if st.get("separate_sparsity"))
    assert stage["separate_sparsity_fit"] == "after"
    with pytest.raises(RecipeError, match="separate_sparsity_fit"):
        Recipe.from_dict({**dial, "stages": [{**stage, "separate_sparsity_fit": "later"}]})
    assert "separate_sparsity_fit" not in preset("w4-g64-gptq").to_dict()["stages"][0]  # earlier keys hold
