"""Training for compressibility: STE gradients, schedules, resume after a kill, a run that lowers the loss."""

from __future__ import annotations

import itertools

import pytest
import torch

from compresslm.cli import main
from compresslm.errors import CompressLMError
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import load_model, save_model
from compresslm.models.tiny import tiny_model
from compresslm.train import trainer
from compresslm.train.fake import FakeQuantLinear, magnitude_mask, prune_schedule, round_ste
from compresslm.train.trainer import TrainRecipe, train, train_recipe


def test_round_ste_passes_gradients_straight_through():
    x = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0, -2.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_fake_quant_linear_matches_rtn_and_learns_its_step():
    from compresslm.quant.grid import Grid
    from compresslm.quant.rtn import rtn

    linear = torch.nn.Linear(64, 8)
    module = FakeQuantLinear(linear, widths=(4, 3), group_size=32)
    assert module.bits == 4
    expected = rtn(linear.weight.detach(), Grid(4, "group", 32)).dequantize()
    assert torch.allclose(module.quantized_weight(), expected, atol=1e-3)
    module.set_bits(3)
    out = module(torch.randn(5, 64)).pow(2).sum()
    out.backward()
    assert module.weight.grad is not None and module.log_steps["3"].grad is not None
    assert module.log_steps["4"].grad is None  # only the active width trains its step
    with pytest.raises(ValueError, match="not among"):
        module.set_bits(2)


@pytest.mark.parametrize("kind", ["cubic", "linear", "cosine"])
def test_prune_schedules_rise_monotonically_to_the_target(kind):
    values = [prune_schedule(step, 100, 0.7, kind) for step in range(0, 121, 10)]
    assert values[0] == 0.0 and values[10] == pytest.approx(0.7) and values[-1] == pytest.approx(0.7)
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values))
    assert prune_schedule(50, 100, 0.7, "cubic") > prune_schedule(50, 100, 0.7, "linear")  # cubic prunes early
    mask = magnitude_mask(torch.randn(4, 16), 0.0, (2, 4))
    assert (mask.reshape(4, 4, 4).sum(-1) == 2).all()


def test_bad_train_recipes():
    with pytest.raises(CompressLMError, match="unknown training recipe"):
        train_recipe("qat-w9")
    with pytest.raises(CompressLMError, match="unknown field 'widht'"):
        train_recipe({"widht": [4]})
    with pytest.raises(CompressLMError, match="width=7 is not allowed; choose one of 2, 3, 4, 5, 6, 8"):
        train_recipe({"widths": [7]})
    with pytest.raises(CompressLMError, match="widths='4' is not allowed; expected list"):
        train_recipe({"widths": "4"})  # typed like every other recipe's fields
    with pytest.raises(CompressLMError, match="group_size=0 is not allowed"):
        train_recipe({"widths": [4], "group_size": 0})
    with pytest.raises(CompressLMError, match="random_precision needs"):
        train_recipe({"widths": [4], "random_precision": True})
    with pytest.raises(CompressLMError, match="dynamic_nm needs an nm pattern"):
        train_recipe({"dynamic_nm": True})
    with pytest.raises(CompressLMError, match="needs distill on"):
        train_recipe({"hidden_weight": 1.0, "distill": False, "ce_weight": 1.0})


def _recipe(**extra):
    return TrainRecipe(batch_size=2, seq_len=48, lr=1e-3, ce_weight=1.0, data="wikitext2", checkpoint_every=3, **extra)


def _tiny(tokenizer):
    return LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")


def test_qat_run_lowers_the_loss_and_exports(tokenizer, tmp_path):
    summary = train(_tiny(tokenizer), _recipe(name="qat", widths=[3]), 10, tmp_path / "out", show_progress=False)
    assert summary["last_loss"] < summary["first_loss"]
    assert (tmp_path / "out" / "loss.csv").exists() and (tmp_path / "out" / "loss.png").exists()
    assert load_model(summary["model"]).kind == "hf_dir"
    container = load_model(summary["container"])
    assert {r.bits for r in container.compressed.values()} == {3}
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()  # removed once the run is complete


def test_resume_after_a_kill_gives_the_same_model(tokenizer, tmp_path, monkeypatch):
    recipe = _recipe(name="gmp", sparsity=0.5, prune_every=2)
    train(_tiny(tokenizer), recipe, 8, tmp_path / "straight", show_progress=False)

    calls = []
    real = trainer.prune_schedule

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # inside step 7, after the checkpoint of step 6
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "prune_schedule", dying)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny(tokenizer), recipe, 8, tmp_path / "resumed", show_progress=False)
    assert (tmp_path / "resumed" / "checkpoint.safetensors").exists()
    monkeypatch.setattr(trainer, "prune_schedule", real)
    train(_tiny(tokenizer), recipe, 8, tmp_path / "resumed", show_progress=False)
    a = load_model(tmp_path / "straight" / "model").model.state_dict()
    b = load_model(tmp_path / "resumed" / "model").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weight = a["model.layers.0.mlp.up_proj.weight"]
    assert float((weight == 0).float().mean()) == pytest.approx(0.5)


def test_random_precision_and_cli(tokenizer, tmp_path, capsys):
    source = str(save_model(tiny_model("llama"), tokenizer, tmp_path / "tiny"))
    argv = ["train", source, "--recipe", "random-precision", "--steps", "4", "-o", str(tmp_path / "rp"),
            "--data", "wikitext2", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "loss" in capsys.readouterr().err
    rows = (tmp_path / "rp" / "loss.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("step,loss")
    assert main(["train", source, "--recipe", "qat-w9", "--steps", "1", "-o", str(tmp_path / "x")]) == 2
    recipe = tmp_path / "plain.yaml"
    recipe.write_text("name: plain\ndistill: false\n")
    capsys.readouterr()
    argv = ["train", source, "--recipe", str(recipe), "--teacher", str(tmp_path / "absent"), "--steps", "1",
            "-o", str(tmp_path / "y")]  # fmt: skip
    assert main(argv) == 2
    assert "distill off" in capsys.readouterr().err  # refused before any model (or the absent teacher) loads
    assert not (tmp_path / "y").exists()


def test_random_precision_exports_one_container_per_width_on_its_own_steps(tokenizer, tmp_path):
    lm = _tiny(tokenizer)
    summary = train(lm, _recipe(name="rp", widths=[4, 3], random_precision=True), 3, tmp_path / "o",
                    show_progress=False)  # fmt: skip
    assert sorted(summary["containers"]) == [3, 4] and "container" not in summary
    float_weights = {i.name: i.module.weight.detach() for i in load_model(summary["model"]).layout.linears()}
    for bits, path in summary["containers"].items():
        records = load_model(path).compressed
        assert {r.bits for r in records.values()} == {bits}
        for name, record in records.items():  # the trained float weight rounded on that width's grid
            step = record.scales.float().repeat_interleave(record.group_size, dim=1)[:, : record.shape[1]]
            zero = record.zeros.float().repeat_interleave(record.group_size, dim=1)[:, : record.shape[1]]
            codes = torch.clamp(torch.round(float_weights[name] / step) + zero, 0, (1 << bits) - 1)
            assert torch.equal(record.codes.long(), codes.long())


def test_a_pruned_container_fine_tunes_with_its_masks_and_the_original_as_teacher(tokenizer, tmp_path):
    from compresslm.api import compress

    original = _tiny(tokenizer)
    compress(_tiny(tokenizer), "2:4-magnitude", tmp_path / "p.clm", show_progress=False)
    pruned = load_model(tmp_path / "p.clm")
    kept = {name: record.mask for name, record in pruned.compressed.items()}
    summary = train(pruned, _recipe(name="ft", nm=[2, 4]), 3, tmp_path / "o", show_progress=False, teacher=original)
    trained = {i.name: i.module.weight.detach() for i in load_model(summary["model"]).layout.linears()}
    assert sorted(trained) == sorted(kept)
    for name, mask in kept.items():
        assert bool((trained[name][~mask.bool()] == 0).all())  # the container's pruned weights stay pruned
    other = tiny_model("llama")
    other.resize_token_embeddings(other.config.vocab_size + 8)
    other = LoadedModel.from_module(other, tokenizer, name="other")
    with pytest.raises(CompressLMError, match="vocabulary"):
        train(load_model(tmp_path / "p.clm"), _recipe(name="x"), 1, tmp_path / "x", show_progress=False, teacher=other)
    assert not (tmp_path / "x").exists()  # refused before anything is written
    with pytest.raises(CompressLMError, match="distill off"):
        no_teacher = _recipe(name="y", distill=False)
        train(load_model(tmp_path / "p.clm"), no_teacher, 1, tmp_path / "y", show_progress=False, teacher=original)
    assert not (tmp_path / "y").exists()


def test_dynamic_2_4_masks_move_during_training_and_end_valid(tokenizer, tmp_path):
    lm = _tiny(tokenizer)
    wrapped = trainer._wrap(lm, _recipe(nm=[2, 4], dynamic_nm=True))
    module = wrapped[0]
    module.refresh_dynamic_mask()
    before = module.mask.clone()
    module(torch.randn(3, module.in_features)).sum().backward()
    assert (module.weight.grad[before == 0] != 0).any()  # pruned weights still receive gradients (SR-STE)
    summary = train(_tiny(tokenizer), _recipe(name="cast", nm=[2, 4], dynamic_nm=True), 6, tmp_path / "o",
                    show_progress=False)  # fmt: skip
    model = load_model(summary["model"])
    for info in model.layout.linears():
        groups = (info.module.weight.detach() != 0).reshape(info.module.out_features, -1, 4).sum(-1)
        assert bool((groups <= 2).all())  # every group of 4 keeps at most 2 (exactly 2 unless a weight is 0)


def test_lora_qat_trains_only_the_adapters_and_merges(tokenizer, tmp_path):
    lm = _tiny(tokenizer)
    original = {i.name: i.module.weight.detach().clone() for i in lm.layout.linears()}
    summary = train(lm, _recipe(name="lora", widths=[4], lora_rank=4), 8, tmp_path / "o", show_progress=False)
    assert summary["last_loss"] < summary["first_loss"]
    merged = load_model(summary["model"])
    changed = [not torch.equal(i.module.weight.detach(), original[i.name]) for i in merged.layout.linears()]
    assert all(changed)  # the low-rank updates were merged into every linear
    assert {r.bits for r in load_model(summary["container"]).compressed.values()} == {4}


def test_hidden_state_distillation_is_in_the_loss(tokenizer, tmp_path):
    plain = train(_tiny(tokenizer), _recipe(name="a", widths=[3]), 3, tmp_path / "a", show_progress=False)
    hidden = train(_tiny(tokenizer), _recipe(name="b", widths=[3], hidden_weight=1.0), 3, tmp_path / "b",
                   show_progress=False)  # fmt: skip
    assert hidden["first_loss"] > plain["first_loss"]  # the same KL plus a positive hidden-state term


def test_learned_activation_clipping_trains_and_exports(tokenizer, tmp_path):
    linear = torch.nn.Linear(32, 8)
    module = FakeQuantLinear(linear, widths=(4,), group_size=16, act_bits=4)
    x = torch.randn(6, 32)
    module(x).pow(2).sum().backward()
    assert float(module.log_clip.detach().exp()) == pytest.approx(float(x.abs().max()), rel=1e-5)  # first batch
    assert module.log_clip.grad is not None and module.log_clip.grad != 0
    summary = train(_tiny(tokenizer), _recipe(name="a8", widths=[4], act_bits=8), 4, tmp_path / "o",
                    show_progress=False)  # fmt: skip
    container = load_model(summary["container"])
    configs = [m.activation_config() for m in container.model.modules() if hasattr(m, "activation_config")]
    assert configs and all(c and c["bits"] == 8 and c["granularity"] == "tensor" for c in configs)
    with pytest.raises(CompressLMError, match="act_bits=9"):
        train_recipe({"act_bits": 9})


def test_learned_widths_mix_the_grids_and_count_container_bits():
    from compresslm.formats.sizes import planned_nbytes
    from compresslm.quant.grid import Grid

    linear = torch.nn.Linear(96, 8)
    module = FakeQuantLinear(linear, widths=(2, 4, 8), group_size=32, learn_widths=True)
    assert module.widths == (8, 4, 2) and module.mixing
    probs = module.width_probs().detach()
    expected = sum(p * module._quantized_at(module.weight, b) for p, b in zip(probs, (8, 4, 2), strict=True))
    assert torch.allclose(module.quantized_weight(), expected)
    bits = [8 * planned_nbytes((8, 96), Grid(b, "group", 32), aligned=False) for b in (8, 4, 2)]
    assert float(module.expected_bits().detach()) == pytest.approx(sum(bits) / 3)
    x = torch.randn(3, 96)
    (module(x).pow(2).sum() + module.expected_bits()).backward()
    assert module.width_logits.grad is not None and module.weight.grad is not None
    # the mixture is recomputed in the backward (memory): same gradients as keeping it
    grads = [t.grad.clone() for t in (module.weight, module.width_logits, module.log_steps["2"])]
    module.zero_grad()
    (torch.nn.functional.linear(x, module._mixture(module.weight), module.bias).pow(2).sum()
     + module.expected_bits()).backward()  # fmt: skip
    for grad, t in zip(grads, (module.weight, module.width_logits, module.log_steps["2"]), strict=True):
        assert torch.allclose(grad, t.grad)
    with torch.no_grad():
        module.width_logits.copy_(torch.tensor([0.0, 2.0, 1.0]))
    module.fix_width()
    assert not module.mixing and module.bits == 4 and float(module.expected_bits()) == bits[1]
    with pytest.raises(ValueError, match="two or more"):
        FakeQuantLinear(linear, widths=(4,), learn_widths=True)


def test_a_heavy_rate_term_drives_every_layer_to_the_narrowest_width(tokenizer, tmp_path):
    with pytest.raises(CompressLMError, match="two or more widths"):
        train_recipe({"widths": [4], "rate_weight": 0.1})
    assert train_recipe("learned-widths").rate_weight > 0
    runs = {}
    for weight in (1e-9, 100.0):
        recipe = _recipe(name="rate", widths=[8, 4, 2], rate_weight=weight, width_lr=0.5, fix_widths_at=0.5)
        runs[weight] = train(_tiny(tokenizer), recipe, 6, tmp_path / f"rate{weight}", show_progress=False)
    heavy, light = runs[100.0], runs[1e-9]
    assert set(heavy["widths"].values()) == {2}
    assert heavy["linear_bits_per_weight"] < light["linear_bits_per_weight"]
    container = load_model(heavy["container"])
    assert {r.bits for r in container.compressed.values()} == {2}
    rows = (tmp_path / "rate100.0" / "loss.csv").read_text().splitlines()
    assert rows[0].split(",")[5] == "bits" and rows[1].split(",")[5] == "mixed" and rows[-1].split(",")[5] == "2"


def test_learned_widths_resume_after_a_kill(tokenizer, tmp_path, monkeypatch):
    recipe = _recipe(name="rate", widths=[8, 4, 2], rate_weight=0.5, width_lr=0.5, fix_widths_at=0.5)
    straight = train(_tiny(tokenizer), recipe, 6, tmp_path / "straight", show_progress=False)
    real = FakeQuantLinear.fix_width

    def dying(self):  # the first fix happens in step 4, after the checkpoint of step 3
        raise KeyboardInterrupt

    monkeypatch.setattr(FakeQuantLinear, "fix_width", dying)
    with pytest.raises(KeyboardInterrupt):
        train(_tiny(tokenizer), recipe, 6, tmp_path / "resumed", show_progress=False)
    monkeypatch.setattr(FakeQuantLinear, "fix_width", real)
    resumed = train(_tiny(tokenizer), recipe, 6, tmp_path / "resumed", show_progress=False)
    assert resumed["widths"] == straight["widths"]
    a = load_model(straight["model"]).model.state_dict()
    b = load_model(resumed["model"]).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
