"""The sequential engine and the .clm container on tiny models: bit-exact reload, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from compresslm.api import compress
from compresslm.cli import main
from compresslm.data.calibration import calibration_windows
from compresslm.errors import CompressLMError, CorruptFileError, DataError
from compresslm.formats.container import container_summary, read_header
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import load_model, save_model
from compresslm.models.tiny import tiny_model
from compresslm.runtime.linear import CompressedLinear

SMALL_CALIB = {"samples": 8, "length": 64, "batch_size": 4}


def _recipe(method="gptq", bits=4, group_size=16, **extra):
    return {"stages": [{"method": method, "bits": bits, "group_size": group_size, **extra}], "calibration": SMALL_CALIB}


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.fixture
def ids(tokenizer):
    return tokenizer("A short prompt to compare logits, bit for bit.", return_tensors="pt").input_ids


def test_round_trip_is_bit_exact_for_every_family(family, tokenizer, ids, tmp_path):
    lm = LoadedModel.from_module(tiny_model(family), tokenizer, name=f"tiny-{family}")
    lm, result, summary = compress(lm, _recipe(group_size=24), tmp_path / "m.clm", show_progress=False)
    assert all(isinstance(m, CompressedLinear) for m in (i.module for i in lm.layout.linears()))
    reloaded = load_model(tmp_path / "m.clm")
    assert reloaded.kind == "container"
    assert torch.equal(_logits(lm, ids), _logits(reloaded, ids))
    for name, record in result.weights.items():
        assert torch.equal(reloaded.compressed[name].codes, record.codes)
    assert summary["bytes_on_disk"] == (tmp_path / "m.clm").stat().st_size
    assert all(0 <= layer.relative_error < 1 for layer in result.layers)


def test_sizes_are_measured(tokenizer, tmp_path):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    _, _, s4 = compress(lm, _recipe("rtn", 4, 16), tmp_path / "w4.clm", show_progress=False)
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    _, _, s2 = compress(lm, _recipe("rtn", 2, 16), tmp_path / "w2.clm", show_progress=False)
    assert s2["bytes_on_disk"] < s4["bytes_on_disk"]
    # 4-bit codes + a float16 scale and a 4-bit zero point per 16 weights
    assert s4["linear_bits_per_param"] == pytest.approx(4 + 16 / 16 + 4 / 16)
    assert s2["linear_bits_per_param"] == pytest.approx(2 + 16 / 16 + 2 / 16)
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    _, _, sym = compress(lm, _recipe("rtn", 4, 16, symmetric=True), tmp_path / "s.clm", show_progress=False)
    assert sym["linear_bits_per_param"] == pytest.approx(4 + 1)  # symmetric: no zero points stored


def test_gptq_reconstructs_better_than_rtn_in_the_model(tokenizer, tmp_path):
    calib = calibration_windows(tokenizer, "wikitext2", n=8, length=64, seed=0)
    errors = {}
    for method in ("rtn", "gptq"):
        lm = LoadedModel.from_module(tiny_model("llama"), tokenizer)
        recipe = _recipe(method, 3, 16)
        _, result, _ = compress(lm, recipe, calibration=calib, show_progress=False)
        errors[method] = result.layers
    rtn_errors = [layer.relative_error for layer in errors["rtn"]]
    gptq_errors = [layer.relative_error for layer in errors["gptq"]]
    # the first block sees identical inputs in both runs, so its layers compare one to one
    assert all(g < r for g, r in zip(gptq_errors[:7], rtn_errors[:7], strict=True))
    assert sum(gptq_errors) < sum(rtn_errors)


def test_rtn_without_calibration_reports_no_error(tokenizer):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    _, result, _ = compress(lm, _recipe("rtn", 4, 16), show_progress=False)
    assert all(layer.relative_error is None for layer in result.layers) and result.calibration is None


def test_targets_limit_what_is_compressed(tokenizer):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    recipe = {"stages": [{"method": "rtn", "group_size": 16, "targets": ["down"]}]}
    _, result, _ = compress(lm, recipe, show_progress=False)
    assert {layer.role for layer in result.layers} == {"down"}
    assert isinstance(lm.model.model.layers[0].mlp.down_proj, CompressedLinear)
    assert isinstance(lm.model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    with pytest.raises(CompressLMError, match="targets no linear layer"):
        compress(LoadedModel.from_module(tiny_model("llama"), tokenizer), {"stages": [{"targets": ["nope"]}]})


def test_calibration_windows_are_seeded(tokenizer):
    a = calibration_windows(tokenizer, "c4", n=4, length=32, seed=0)
    b = calibration_windows(tokenizer, "c4", n=4, length=32, seed=0)
    c = calibration_windows(tokenizer, "c4", n=4, length=32, seed=1)
    assert torch.equal(a.windows, b.windows) and not torch.equal(a.windows, c.windows)
    assert a.windows.shape == (4, 32) and a.protocol["seed"] == 0 and a.protocol["documents"] == 1000
    with pytest.raises(DataError, match="no calibration source named"):
        calibration_windows(tokenizer, "nowhere", n=1, length=8)


@pytest.fixture
def container(tokenizer, tmp_path):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    compress(lm, _recipe("rtn", 4, 16), tmp_path / "m.clm", show_progress=False)
    return tmp_path / "m.clm"


def test_corrupt_blob_is_detected(container):
    data = bytearray(container.read_bytes())
    data[-100] ^= 0xFF
    container.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        load_model(container)


def test_truncated_container_is_detected(container):
    data = container.read_bytes()
    container.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        load_model(container)
    container.write_bytes(data[:20])
    with pytest.raises(CorruptFileError, match="truncated"):
        load_model(container)


def test_not_a_container(tmp_path):
    fake = tmp_path / "fake.clm"
    fake.write_bytes(b"hello world, not a container")
    with pytest.raises(CorruptFileError, match="not a compresslm container"):
        load_model(fake)


def test_header_records_provenance(container):
    header, _ = read_header(container)
    assert header["recipe"]["stages"][0]["method"] == "rtn"
    assert header["source_model"]["model_type"] == "llama"
    assert header["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert len(header["layers"]) == 14
    assert container_summary(container)["bits_per_param"] > 0


def test_cli_compress_and_info(tokenizer, tmp_path, capsys):
    source = save_model(tiny_model("llama"), tokenizer, tmp_path / "tiny")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_recipe("gptq", 4, 16)))
    out = tmp_path / "out.clm"
    assert main(["compress", str(source), "--recipe", str(recipe), "-o", str(out), "--calib", "wikitext2",
                 "--calib-samples", "4", "--calib-len", "32", "--json", "--quiet"]) == 0  # fmt: skip
    payload = json.loads(capsys.readouterr().out)
    assert payload["calibration"]["windows"] == 4 and payload["calibration"]["length"] == 32
    assert payload["bytes_on_disk"] == out.stat().st_size and len(payload["layers"]) == 14
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["container"]["linear_bits_per_param"] == payload["linear_bits_per_param"]
    assert main(["eval", str(out), "--ppl", "wikitext2", "--ctx", "64", "--limit", "2", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["protocol"]["model"]["kind"] == "container"


def test_cli_compress_rejects_bad_recipe_before_loading(capsys):
    assert main(["compress", "does-not-matter", "--recipe", "w4-nonsense", "-o", "x.clm"]) == 2
    assert "unknown preset 'w4-nonsense'" in capsys.readouterr().err


def test_hessians_are_shared_between_linears_reading_the_same_input(tokenizer):
    from compresslm.engine.blocks import collect_statistics
    from compresslm.models.forward import Batch, capture_first_block_inputs

    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    windows = calibration_windows(tokenizer, "wikitext2", n=2, length=32).windows
    batches = capture_first_block_inputs(lm, windows, 2, torch.device("cpu"))
    assert isinstance(batches[0], Batch)
    block = lm.layout.blocks[0]
    stats, outputs = collect_statistics(block, batches, torch.device("cpu"))
    assert len(outputs) == len(batches) and outputs[0].args[0].shape == batches[0].args[0].shape
    h = {name: stats.hessian(name) for name in stats.owner}
    names = {info.role: info.name for info in block.linears}
    assert stats.producer == {names["q"]: "model.layers.0.input_layernorm",
                              names["gate"]: "model.layers.0.post_attention_layernorm"}  # fmt: skip
    assert torch.equal(h[names["q"]], h[names["k"]]) and torch.equal(h[names["q"]], h[names["v"]])
    assert stats.owner[names["k"]] == stats.owner[names["v"]] == names["q"]
    assert stats.owner[names["up"]] == names["gate"]
    assert stats.owner[names["o"]] == names["o"] and h[names["down"]].shape == (128, 128)
    x = batches[0].args[0]
    normed = block.module.input_layernorm(x).reshape(-1, 64)
    assert torch.allclose(h[names["q"]], 2 / normed.shape[0] * normed.T @ normed, atol=1e-5)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_awq_folds_keep_the_function_and_reload_exactly(family, method, tokenizer, ids, tmp_path):
    """8-bit with AWQ scaling: a wrong fold would change the output far beyond 8-bit noise."""

    def salient_model():
        model = tiny_model(family)
        with torch.no_grad():  # salient channels, so that AWQ has a reason to scale
            model.get_input_embeddings().weight[:, :4] *= 8
        return LoadedModel.from_module(model, tokenizer)

    reference = _logits(salient_model(), ids)
    plain, _, _ = compress(salient_model(), _recipe("rtn", 8, 16), show_progress=False)
    plain_error = (_logits(plain, ids) - reference).abs().max()
    lm, result, _ = compress(salient_model(), _recipe(method, 8, 16, awq_scale=True), tmp_path / "a.clm",
                             show_progress=False)  # fmt: skip
    folds = result.info["scale_folds"]
    assert any(f["fold_into"] and f["alpha"] > 0 for f in folds)
    assert all(f["error_after"] <= f["error_before"] for f in folds if f["fold_into"])
    out = _logits(lm, ids)
    assert (out - reference).abs().max() < 2 * plain_error  # a wrong fold would be far off
    assert torch.equal(out, _logits(load_model(tmp_path / "a.clm"), ids))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_embedding_quantization_round_trips_and_shrinks(family, tokenizer, ids, tmp_path):
    lm = LoadedModel.from_module(tiny_model(family), tokenizer)
    _, _, plain = compress(lm, _recipe("rtn", 4, 16), tmp_path / "p.clm", show_progress=False)
    lm = LoadedModel.from_module(tiny_model(family), tokenizer)
    recipe = _recipe("rtn", 4, 16)
    recipe["stages"].insert(
        0, {"type": "quantize_embedding", "bits": 8, "group_size": 16, "targets": ["embedding", "lm_head"]}
    )
    lm, result, summary = compress(lm, recipe, tmp_path / "e.clm", show_progress=False)
    assert summary["bytes_on_disk"] < plain["bytes_on_disk"]
    assert summary["embedding_bits_per_param"] == pytest.approx(8 + 24 / 16)
    reloaded = load_model(tmp_path / "e.clm")
    assert torch.equal(_logits(lm, ids), _logits(reloaded, ids))
    head = reloaded.model.get_output_embeddings()
    if family == "qwen2":  # untied: the head is its own compressed linear
        assert isinstance(head, CompressedLinear) and "lm_head" in result.weights
    else:  # tied: the head still shares the (quantized) embedding
        assert head.weight is reloaded.model.get_input_embeddings().weight


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_head_quantized_by_gptq_after_the_blocks(family, tokenizer, ids, tmp_path):
    recipe = _recipe("gptq", 4, 16)
    recipe["stages"].append({"type": "quantize_embedding", "method": "gptq", "bits": 4, "group_size": 16,
                             "symmetric": True, "signed_scale": True, "targets": ["embedding", "lm_head"]})  # fmt: skip
    lm, result, _ = compress(LoadedModel.from_module(tiny_model(family), tokenizer), recipe, tmp_path / "h.clm",
                             show_progress=False)  # fmt: skip
    head = {layer.role: layer for layer in result.layers}
    reloaded = load_model(tmp_path / "h.clm")
    assert torch.equal(_logits(lm, ids), _logits(reloaded, ids))
    if family == "qwen2":  # untied: GPTQ on the lm_head, the embedding (a lookup table) rounded to nearest
        assert head["lm_head"].method == "gptq" and head["embedding"].method == "rtn"
        assert result.weights["lm_head"].meta["algorithm"] == "gptq"
    else:  # tied: one set of codes, fitted as the head, serves both roles
        assert head["embedding+lm_head"].method == "gptq" and 0 < head["embedding+lm_head"].relative_error < 1
        assert reloaded.model.get_output_embeddings().weight is reloaded.model.get_input_embeddings().weight
        record = result.embeddings["model.embed_tokens"]
        assert torch.equal(lm.model.get_input_embeddings().weight, record.dequantize())


def test_gptq_on_the_head_beats_rounding_on_its_inputs(tokenizer):
    from compresslm.engine.head import head_hessian, quantize_head
    from compresslm.models.forward import Batch
    from compresslm.quant.gptq import output_error
    from compresslm.quant.rtn import rtn
    from compresslm.recipe import QuantizeEmbeddingStage

    torch.manual_seed(0)
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    width = lm.model.config.hidden_size
    hidden = [Batch((torch.randn(2, 32, width) * torch.linspace(0.1, 3, width),), {}) for _ in range(4)]
    stage = QuantizeEmbeddingStage(method="gptq", bits=3, group_size=16)
    record, relative, _ = quantize_head(lm, stage, hidden, torch.device("cpu"))
    weight = lm.model.get_output_embeddings().weight.detach().float()
    h = head_hessian(lm, hidden, torch.device("cpu"))
    rounded = output_error(weight, rtn(weight, stage.grid).dequantize(), h)
    assert output_error(weight, record.dequantize(), h) < rounded
    assert relative == pytest.approx(output_error(weight, record.dequantize(), h) / output_error(weight, 0 * weight, h))
    with pytest.raises(CompressLMError, match="needs the final hidden states"):
        quantize_head(lm, stage, [], torch.device("cpu"))


def test_embedding_preset_suffix():
    from compresslm.recipe import RecipeError, preset

    recipe = preset("w4-g64-gptq+emb8")
    assert recipe.stages[0].type == "quantize_embedding" and recipe.stages[0].bits == 8
    stage = preset("gguf-q4_0-gptq+emb4-g32-sym-gptq").stages[0]
    assert (stage.method, stage.bits, stage.group_size, stage.symmetric, stage.signed_scale) == (
        "gptq",
        4,
        32,
        True,
        True,
    )
    assert stage.needs_calibration and not preset("w4-g64-gptq+emb8").stages[0].signed_scale
    with pytest.raises(RecipeError, match=r"cannot read 'emb3'"):
        preset("w4-gptq+emb3")


def test_min_share_is_checked():
    from compresslm.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"min_share=1\.0 is not allowed"):
        load_recipe({"stages": [{"type": "quantize_embedding", "min_share": 1.0}, {"method": "rtn"}]})


@pytest.mark.parametrize("min_share", [0.1, 0.5])
def test_an_embedding_under_its_share_stays_dense(min_share, tokenizer, tmp_path):
    """The tiny Llama's embedding holds about a sixth of its parameters: quantized at 0.1, left dense at 0.5."""
    recipe = {"stages": [{"type": "quantize_embedding", "bits": 8, "group_size": 32, "symmetric": True,
                          "targets": ["embedding", "lm_head"], "min_share": min_share},
                         {"method": "rtn", "bits": 4, "group_size": 16}]}  # fmt: skip
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    _, result, summary = compress(lm, recipe, tmp_path / "m.clm", show_progress=False)
    if min_share == 0.1:
        assert "model.embed_tokens" in result.embeddings and summary["embedding_bits_per_param"] == 8.5
        assert "embedding_left_dense" not in result.info
    else:
        assert not result.embeddings and summary["embedding_bits_per_param"] is None
        assert "under the 50% at which the recipe quantizes them" in result.info["embedding_left_dense"]


@pytest.mark.parametrize("name", ["w8a8-smoothquant", "w8a8-smoothquant-static", "w8a8-rtn"])
def test_w8a8_presets_round_trip_and_stay_close(name, tokenizer, ids, tmp_path):
    from compresslm.recipe import preset

    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[:, :4] *= 8  # activation outliers for SmoothQuant to migrate
    reference = _logits(LoadedModel.from_module(model, tokenizer), ids)
    recipe = preset(name)
    recipe.calibration.samples, recipe.calibration.length = 8, 64
    lm, result, _ = compress(LoadedModel.from_module(model, tokenizer), recipe, tmp_path / "q.clm", show_progress=False)
    out = _logits(lm, ids)
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()
    assert "simulated" in result.info["activation_quantization"]
    reloaded = load_model(tmp_path / "q.clm")
    layer = reloaded.model.model.layers[0].self_attn.q_proj
    assert layer.act_bits == 8 and layer.act_granularity == ("tensor" if "static" in name else "token")
    assert torch.equal(out, _logits(reloaded, ids))
    if "smoothquant" in name:
        assert all(f["method"] == "smoothquant" for f in result.info["scale_folds"])


def test_smoothquant_migrates_outliers():
    from compresslm.quant.smoothquant import fake_quantize_activations, smoothquant_scales

    torch.manual_seed(0)
    x = torch.randn(256, 32)
    x[:, 3] *= 50
    w = torch.randn(16, 32) * 0.1
    s = smoothquant_scales(x.abs().amax(0), [w], 0.5)
    exact = x @ w.T
    plain = fake_quantize_activations(x, 8) @ w.T
    smooth = fake_quantize_activations(x / s, 8) @ (w * s).T
    assert (smooth - exact).pow(2).mean() < (plain - exact).pow(2).mean()


def test_fingerprint_follows_compression(tokenizer):
    base = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    before = base.fingerprint()
    a = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    b = LoadedModel.from_module(tiny_model("llama"), tokenizer)
    assert a.fingerprint() == before  # same weights, same hash
    compress(a, _recipe("rtn", 4, 16), show_progress=False)
    compress(b, _recipe("rtn", 3, 16), show_progress=False)
    assert len({before, a.fingerprint(), b.fingerprint()}) == 3


def test_a_containers_parameter_count_includes_its_compressed_linears(tokenizer, tmp_path):
    from compresslm.models.layout import parameter_counts

    model = tiny_model("llama")
    total = sum(p.numel() for p in model.parameters())
    lm = LoadedModel.from_module(model, tokenizer, name="tiny")
    compress(lm, "w4-g16-rtn", tmp_path / "m.clm", show_progress=False)
    loaded = load_model(tmp_path / "m.clm")
    assert loaded.describe()["parameters"] == total
    assert parameter_counts(loaded.model, loaded.layout)["total"] == total
