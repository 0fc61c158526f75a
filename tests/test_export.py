"""Exports: GGUF read back with the `gguf` package equals the container bit for bit; HF directories load in
transformers; llama.cpp runs the GGUF (when llama-cpp-python is installed); bad inputs end in one line."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from compresslm.api import compress, export
from compresslm.cli import main
from compresslm.data.calibration import calibration_windows
from compresslm.errors import CompressLMError
from compresslm.formats.container import read_container
from compresslm.formats.gguf_export import EXACT_TYPES, _permute_rows, dequantize_gguf
from compresslm.models.assemble import load_compressed
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_config, tiny_model
from compresslm.quant.grid import K_QUANTS, Grid, fit_weight, kquant_grid
from compresslm.recipe import load_recipe

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def calib(tokenizer):
    return calibration_windows(tokenizer, "wikitext2", n=4, length=64, seed=0)


def _container(tmp_path, tokenizer, calib, family: str, recipe: str):
    lm = LoadedModel.from_module(tiny_model(family), tokenizer, name=f"tiny-{family}")
    path = tmp_path / f"{family}.clm"
    compress(lm, recipe, path, calibration=calib, show_progress=False)
    return path


def _read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def _gguf_weight(tensor, name: str, heads: dict) -> torch.Tensor:
    """A GGUF tensor decoded by the gguf package, its q/k rows put back in Hugging Face's order."""
    weight = dequantize_gguf(tensor.data, tensor.tensor_type.name)
    if name in heads:  # undo the export's permutation: applying it twice is not the inverse, so invert
        rows = weight.shape[0]
        order = torch.from_numpy(_permute_rows(np.arange(rows), heads[name]))
        restored = torch.empty_like(weight)
        restored[order] = weight
        return restored
    return weight


GGUF_PRESETS = {"Q8_0": "gguf-q8_0-rtn", "Q5_0": "gguf-q5_0-gptq", "Q4_0": "gguf-q4_0-awq",
                "Q5_1": "gguf-q5_1-rtn", "Q4_1": "gguf-q4_1-gptq"}  # fmt: skip


@pytest.mark.parametrize("gguf_type", sorted(GGUF_PRESETS))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_export_is_bit_exact(tmp_path, tokenizer, calib, family, gguf_type):
    path = _container(tmp_path, tokenizer, calib, family, GGUF_PRESETS[gguf_type] + "+emb8-g32-sym")
    out = tmp_path / "m.gguf"
    result = export(path, "gguf", out, show_progress=False)
    assert result["exact"] and result["requantized_tensors"] == 0
    embedding = 1 if gguf_type == "Q8_0" else 0  # the embedding is Q8_0 too
    assert result["tensor_types"][gguf_type] == 14 + embedding and result["tensor_types"]["Q8_0"] >= 1
    contents = read_container(path)
    reader, tensors = _read_gguf(out)
    assert reader.fields["general.architecture"].contents() == family
    config = contents.header["config"]
    heads = {}
    if family == "llama":
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for i in range(config["num_hidden_layers"]):
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down")):
            tensor = tensors[f"blk.{i}.{gg}.weight"]
            assert tensor.tensor_type.name == gguf_type
            got = _gguf_weight(tensor, gg, heads)
            assert torch.equal(got, contents.linears[f"model.layers.{i}.{hf}"].dequantize())
    embedding = dequantize_gguf(tensors["token_embd.weight"].data, "Q8_0")
    assert torch.equal(embedding, contents.embeddings["model.embed_tokens"].dequantize())
    norm = torch.from_numpy(np.array(tensors["output_norm.weight"].data))
    assert torch.equal(norm, contents.dense["model.norm.weight"].float())
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == config["vocab_size"]


def _wide_container(tmp_path, tokenizer, calib, recipe: str):
    """A one-block llama whose rows are multiples of 256 columns (K-quant super-blocks)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", layers=1)
    config.hidden_size, config.intermediate_size, config.head_dim = 256, 512, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # one super-block whose d is below float16's normal range
        model.model.layers[0].mlp.up_proj.weight[:4, :256] *= 1e-4
    lm = LoadedModel.from_module(model, tokenizer, name="tiny-wide")
    path = tmp_path / "wide.clm"
    compress(lm, recipe, path, calibration=calib, show_progress=False)
    return path


@pytest.mark.parametrize("recipe", ["gguf-q6_k-gptq", "gguf-q6_k-awq", "gguf-q3_k-rtn", "gguf-q3_k-gptq-noact",
                                    "50%-wanda+gguf-q3_k-gptq", "gguf-q4_k-gptq", "gguf-q4_k-awq",
                                    "gguf-q5_k-gptq-noact", "gguf-q2_k-rtn", "gguf-q3_k-gptq-clip",
                                    "gguf-q4_k-gptq-noact-wclip", "gguf-q6_k-gptq-wclip",
                                    "gguf-q2_k-gptq-wclip-refit", "gguf-q3_k-rtn-clip-refit"])  # fmt: skip
def test_kquant_gguf_export_is_exact(tmp_path, tokenizer, calib, recipe):
    """Same codes, scales and offsets. Symmetric types decode bit for bit; types with offsets compute
    (code - zero) · scale here and code · scale - offset in llama.cpp, equal up to float32 rounding."""
    path = _wide_container(tmp_path, tokenizer, calib, recipe + "+emb8-g32-sym")
    out = tmp_path / "m.gguf"
    result = export(path, "gguf", out, show_progress=False)
    gguf_type = next(t for t in ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K") if t.lower() in recipe)
    assert result["exact"] and result["tensor_types"][gguf_type] == 7, result["tensor_types"]
    contents = read_container(path)
    entry = contents.header["linears"]["model.layers.0.mlp.down_proj"]
    assert contents.header["blobs"][entry["scales"]]["dtype"] == "float32"  # d · sc, exact (quant.grid)
    assert contents.linears["model.layers.0.mlp.down_proj"].scales.dtype == torch.float32
    config = contents.header["config"]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    _, tensors = _read_gguf(out)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}  # fmt: skip
    for hf, gg in names.items():
        tensor = tensors[f"blk.0.{gg}.weight"]
        assert tensor.tensor_type.name == gguf_type
        record = contents.linears[f"model.layers.0.{hf}"]
        assert record.meta["kquant"] == gguf_type.lower()
        got, ours = _gguf_weight(tensor, gg, heads), record.dequantize()
        if record.symmetric:
            assert torch.equal(got, ours)
        else:
            assert float((got - ours).abs().max()) <= 1e-6 * float(ours.abs().max())
        if record.mask is not None:
            assert bool((record.dequantize()[~record.mask] == 0).all())


def test_an_uncompressed_model_exports_as_a_float_gguf(tmp_path, tokenizer):
    from compresslm.models.loading import save_model

    model = tiny_model("llama")
    save_model(model, tokenizer, tmp_path / "float")
    result = export(tmp_path / "float", "gguf", tmp_path / "f32.gguf", dtype="float32", show_progress=False)
    assert result["exact"] and set(result["tensor_types"]) == {"F32"}
    _, tensors = _read_gguf(tmp_path / "f32.gguf")
    got = torch.from_numpy(np.array(tensors["blk.1.ffn_down.weight"].data))
    assert torch.equal(got, model.model.layers[1].mlp.down_proj.weight.detach())
    with pytest.raises(CompressLMError, match="not a compresslm container"):
        export(tmp_path / "float", "hf", tmp_path / "hf", show_progress=False)


def test_kquant_grid_falls_back_where_super_blocks_do_not_divide_the_row(tmp_path, tokenizer, calib):
    path = _container(tmp_path, tokenizer, calib, "llama", "gguf-q6_k-rtn")  # 64- and 128-column rows
    result = export(path, "gguf", tmp_path / "m.gguf", show_progress=False)
    assert result["exact"] and result["tensor_types"]["Q8_0"] == 14 and "Q6_K" not in result["tensor_types"]
    assert read_container(path).linears["model.layers.0.mlp.up_proj"].bits == 8


def test_kquant_scales_are_float16_times_small_integers():
    weight = torch.randn(3, 512) * 0.02
    weight[0, :256] *= 1e-4
    for kquant, top in (("q6_k", 127), ("q5_k", 63), ("q4_k", 63), ("q3_k", 31), ("q2_k", 15)):
        kind = K_QUANTS[kquant]
        grid = kquant_grid(kquant)
        scales, zeros = fit_weight(weight, grid)
        assert scales.shape == (3, 512 // kind.group_size)
        if kind.symmetric:
            assert bool((zeros == 1 << (kind.bits - 1)).all())
        else:  # offsets: a float16 per super-block times integers up to the top one
            offsets = (zeros * scales).view(3, 2, -1)
            dmin = (offsets.amax(dim=2, keepdim=True) / kind.max_min).half().float()
            m = (offsets / dmin).round()
            assert torch.equal((dmin * m) / scales.view(3, 2, -1), zeros.view(3, 2, -1))
        assert scales.dtype == torch.float32  # d · sc: a float16 times an integer, exact in float32
        blocks = scales.view(3, 2, -1)
        d = blocks.abs().amax(dim=2, keepdim=True) / top
        assert torch.equal(d.half().float(), d) and float(d[0, 0]) < 2.0**-14  # below float16's normal range too
        ratio = blocks / d
        assert torch.equal(ratio, ratio.round()) and bool((ratio.abs() >= 1).all() and (ratio.abs() <= top).all())
        assert bool((ratio < 0).any()) == kind.symmetric  # symmetric types' scales carry their extreme's sign


def test_kquant_recipes_are_checked_before_compute():
    stage = load_recipe("gguf-q3_k-gptq").stages[0]
    assert (stage.bits, stage.group_size, stage.symmetric, stage.kquant, stage.signed_scale) == (
        3,
        16,
        True,
        "q3_k",
        True,
    )
    # llama.cpp's signed scales for its symmetric types, except Q8_0 (its codes stop at -127)
    assert [load_recipe(f"gguf-{t}-rtn").stages[0].signed_scale for t in ("q4_0", "q5_0", "q8_0", "q4_1", "q4_k")] == [
        True, True, False, False, False]  # fmt: skip
    with pytest.raises(CompressLMError, match="signed_scale applies to symmetric grids"):
        load_recipe({"stages": [{"type": "quantize", "bits": 4, "signed_scale": True}]})
    with pytest.raises(CompressLMError, match="q2_k, q3_k, q4_k, q5_k, q6_k; not q7_k"):
        load_recipe("gguf-q7_k-rtn")
    with pytest.raises(CompressLMError, match="no code is exactly zero"):
        load_recipe("50%-wanda+gguf-q4_k-gptq")
    with pytest.raises(CompressLMError, match="legacy types"):
        load_recipe("gguf-q6_0-rtn")
    assert load_recipe("gguf-q6_k-rtn-clip").stages[0].grid.clip_search  # a range per sub-block, then the lattice
    assert load_recipe("gguf-q3_k-gptq-wclip").stages[0].grid.clip_weighted
    with pytest.raises(CompressLMError, match="clip_weighted weights GPTQ's clip search"):
        load_recipe("gguf-q3_k-rtn-wclip")  # RTN has no Hessian to weight by
    assert load_recipe("gguf-q2_k-gptq-wclip-refit").stages[0].grid.refit
    with pytest.raises(CompressLMError, match="refit is a clip search of K-quant sub-blocks"):
        load_recipe("gguf-q4_0-gptq-clip-refit")  # a legacy type has no sub-block lattice
    with pytest.raises(CompressLMError, match="do not combine with offset_exact"):
        load_recipe({"stages": [{"type": "quantize", "bits": 4, "group_size": 32, "kquant": "q4_k",
                                 "offset_exact": True}]})  # fmt: skip
    bad = {"stages": [{"type": "quantize", "method": "rtn", "bits": 4, "group_size": 16, "symmetric": True,
                       "kquant": "q6_k"}]}  # fmt: skip
    with pytest.raises(CompressLMError, match="kquant q6_k is bits=6"):
        load_recipe(bad)


def test_pruned_weights_export_as_exact_zeros(tmp_path, tokenizer, calib):
    path = _container(tmp_path, tokenizer, calib, "qwen2", "50%-wanda+gguf-q4_0-rtn")
    out = tmp_path / "m.gguf"
    export(path, "gguf", out, show_progress=False)
    record = read_container(path).linears["model.layers.0.mlp.up_proj"]
    assert record.mask is not None
    _, tensors = _read_gguf(out)
    got = dequantize_gguf(tensors["blk.0.ffn_up.weight"].data, "Q4_0")
    assert torch.equal(got, record.dequantize())
    assert bool((got[~record.mask] == 0).all())


def test_offset_exact_grid_makes_every_offset_a_float16():
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * torch.logspace(-3, 0, 64)[:, None]
    for bits in (4, 5):
        scales, zeros = fit_weight(weight, Grid(bits, "group", 32, offset_exact=True))
        offsets = zeros * scales
        assert torch.equal(offsets.half().float(), offsets)
        plain, _ = fit_weight(weight, Grid(bits, "group", 32))
        assert bool((scales >= plain).all()) and float((scales / plain).max()) <= 1 + 2.0 ** (bits - 10)


def test_gguf_presets():
    stage = load_recipe("gguf-q4_1-gptq").stages[0]
    assert (stage.bits, stage.group_size, stage.symmetric, stage.offset_exact) == (4, 32, False, True)
    stage = load_recipe("gguf-q8_0-awq").stages[0]
    assert (stage.bits, stage.group_size, stage.symmetric, stage.offset_exact) == (8, 32, True, False)
    assert set(EXACT_TYPES.values()) == set(GGUF_PRESETS)
    with pytest.raises(CompressLMError, match="q8_0"):
        load_recipe("gguf-q8_1-rtn")


def test_unexportable_grid_is_refused_with_the_recipe_that_fits(tmp_path, tokenizer, calib):
    path = _container(tmp_path, tokenizer, calib, "llama", "w4-g32-gptq")
    out = tmp_path / "m.gguf"
    with pytest.raises(CompressLMError, match="gguf-q4_1"):
        export(path, "gguf", out, show_progress=False)
    assert not out.exists()
    result = export(path, "gguf", out, requantize=True, show_progress=False)
    assert result["requantized_tensors"] == 14 and not result["exact"]
    assert 0 < result["requantize_max_relative_error"] < 1e-3  # only the offsets were rounded to float16

    path = _container(tmp_path, tokenizer, calib, "llama", "w3-g16-gptq")
    with pytest.raises(CompressLMError, match="no GGUF type holds"):
        export(path, "gguf", tmp_path / "w3.gguf", show_progress=False)
    result = export(path, "gguf", tmp_path / "w3.gguf", requantize=True, show_progress=False)
    assert result["tensor_types"]["Q4_1"] == 14 and 0 < result["requantize_max_relative_error"] < 0.2


def test_export_bad_inputs_are_one_line(tmp_path, tokenizer, calib, capsys):
    path = _container(tmp_path, tokenizer, calib, "gpt2", "gguf-q4_0-rtn")
    out = tmp_path / "m.gguf"
    assert main(["export", str(path), "--format", "gguf", "-o", str(out)]) == 2
    assert "knows the families llama, mistral, qwen2; this model is 'gpt2'" in capsys.readouterr().err
    assert not out.exists()
    not_container = tmp_path / "x.clm"
    not_container.write_bytes(b"nope")
    assert main(["export", str(not_container), "--format", "hf", "-o", str(tmp_path / "hf")]) == 2
    assert "is not a compresslm container" in capsys.readouterr().err
    path = _container(tmp_path, tokenizer, calib, "llama", "gguf-q4_0-rtn")
    out.write_bytes(b"keep")
    assert main(["export", str(path), "--format", "gguf", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; remove it or pass --force" in err
    assert out.read_bytes() == b"keep"
    assert main(["export", str(path), "--format", "gguf", "-o", str(out), "--force", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exact"] is True


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_export_loads_in_transformers(tmp_path, tokenizer, calib, family):
    from transformers import AutoModelForCausalLM

    path = _container(tmp_path, tokenizer, calib, family, "w4-g16-gptq")
    result = export(path, "hf", tmp_path / "hf", dtype="float32", show_progress=False)
    assert result["shards"] == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    lm = load_compressed(path)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, lm.model(ids).logits, atol=1e-5, rtol=0)


def test_hf_export_shards(tmp_path, tokenizer, calib):
    from transformers import AutoModelForCausalLM

    from compresslm.formats.hf_export import export_hf

    path = _container(tmp_path, tokenizer, calib, "qwen2", "w4-g16-rtn")
    result = export_hf(path, tmp_path / "hf", "bfloat16", shard_bytes=40_000, show_progress=False)
    assert result["shards"] > 2
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f"model-{i:05d}-of-{result['shards']:05d}.safetensors"
                                                 for i in range(1, result["shards"] + 1)}  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16


def test_missing_llama_cpp_names_the_pip_command(monkeypatch):
    from compresslm.eval.llamacpp import require_llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(CompressLMError, match=r"pip install 'compresslm\[llama-cpp\]'"):
        require_llama_cpp()


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed: pip install 'compresslm[llama-cpp]'")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_cpp_scores_the_export_like_the_container(tmp_path, tokenizer, calib, family, capsys):
    from compresslm.eval.llamacpp import llamacpp_perplexity
    from compresslm.eval.perplexity import perplexity

    path = _container(tmp_path, tokenizer, calib, family, "gguf-q4_1-gptq+emb8-g32-sym")
    export(path, "gguf", tmp_path / "m.gguf", show_progress=False)
    lm = load_compressed(path)
    window = {"ctx": 128, "limit": 3, "show_progress": False}
    ours = perplexity(lm, "wikitext2", **window)
    theirs = llamacpp_perplexity(tmp_path / "m.gguf", "wikitext2", tokenizer=lm.tokenizer, **window)
    assert theirs.tokens == ours.tokens and theirs.protocol["backend"] == "llama.cpp"
    assert abs(theirs.ppl / ours.ppl - 1) < 0.005
    if family == "llama":  # the same file's speed through the command line
        command = ["eval", str(tmp_path / "m.gguf"), "--backend", "llama.cpp", "--speed", "--speed-prompt", "8",
                   "--speed-new", "4", "--repeats", "2", "--json"]  # fmt: skip
        assert main(command) == 0
        speed = json.loads(capsys.readouterr().out)["speed"]
        assert speed["decode_tokens_per_s"]["runs"] == 2 and speed["decode_tokens_per_s"]["median"] > 0


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")
@pytest.mark.parametrize("recipe", ["gguf-q6_k-rtn", "gguf-q3_k-gptq", "gguf-q4_k-gptq", "gguf-q2_k-awq"])
def test_llama_cpp_scores_a_kquant_export_like_the_container(tmp_path, tokenizer, calib, recipe):
    from compresslm.eval.llamacpp import llamacpp_perplexity
    from compresslm.eval.perplexity import perplexity

    path = _wide_container(tmp_path, tokenizer, calib, recipe + "+emb8-g32-sym")
    export(path, "gguf", tmp_path / "m.gguf", show_progress=False)
    lm = load_compressed(path)
    window = {"ctx": 128, "limit": 3, "show_progress": False}
    ours = perplexity(lm, "wikitext2", **window)
    theirs = llamacpp_perplexity(tmp_path / "m.gguf", "wikitext2", tokenizer=lm.tokenizer, **window)
    assert theirs.tokens == ours.tokens
    assert abs(theirs.ppl / ours.ppl - 1) < 0.005


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")
def test_llama_cpp_measures_kl_to_the_reference_like_the_torch_path(tmp_path, tokenizer, calib, capsys, monkeypatch):
    from compresslm.eval.distance import distance, reference_logits
    from compresslm.eval.llamacpp import llamacpp_distance, llamacpp_perplexity
    from compresslm.models.loading import load_model, save_model

    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    save_model(tiny_model("llama"), tokenizer, tmp_path / "float")  # the model _container compresses
    window = {"ctx": 128, "limit": 3}
    ref = reference_logits(load_model(tmp_path / "float"), "wikitext2", k=16, show_progress=False, **window)
    export(tmp_path / "float", "gguf", tmp_path / "f32.gguf", dtype="float32", show_progress=False)
    same = llamacpp_distance(tmp_path / "f32.gguf", ref, tokenizer=tokenizer, show_progress=False)
    assert same.kld_mean < 1e-4 and same.top1_agreement > 0.99 and abs(same.ppl / same.reference_ppl - 1) < 1e-3
    assert same.protocol["backend"] == "llama.cpp" and "top-16" in same.protocol["definition"]
    # with float32 weights and a float32 KV cache, llama.cpp's arithmetic is PyTorch's up to summation order
    exact = llamacpp_perplexity(
        tmp_path / "f32.gguf", tokenizer=tokenizer, kv_type="f32", show_progress=False, **window
    )
    assert abs(exact.ppl / same.reference_ppl - 1) < 1e-5 and exact.protocol["model"]["kv_cache"] == "f32"

    path = _container(tmp_path, tokenizer, calib, "llama", "gguf-q4_1-gptq+emb8-g32-sym")
    export(path, "gguf", tmp_path / "m.gguf", show_progress=False)
    ours = distance(load_compressed(path), ref, show_progress=False)
    theirs = llamacpp_distance(tmp_path / "m.gguf", ref, tokenizer=tokenizer, show_progress=False)
    assert theirs.tokens == ours.tokens and ours.kld_mean > 10 * same.kld_mean
    assert abs(theirs.kld_mean / ours.kld_mean - 1) < 0.2 and abs(theirs.ppl / ours.ppl - 1) < 0.005

    command = ["eval", str(tmp_path / "m.gguf"), "--backend", "llama.cpp", "--kld", "--reference",
               str(tmp_path / "float"), "--kld-topk", "16", "--ctx", "128", "--limit", "3", "--json"]  # fmt: skip
    assert main(command) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["kld_mean"] == pytest.approx(theirs.kld_mean) and payload["ppl"] == pytest.approx(theirs.ppl)
    assert main([*command[:5], "--limit", "3"]) == 2
    assert "--kld with the llama.cpp backend needs --reference MODEL" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")
def test_llama_cpp_refusal_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    assert main(["eval", str(bad), "--backend", "llama.cpp", "--ppl", "wikitext2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"compresslm: error: llama.cpp refused {bad}: ")
    assert main(["eval", str(bad), "--backend", "llama.cpp", "--ppl", "wikitext2", "--kld"]) == 2
    assert "needs --reference MODEL" in capsys.readouterr().err
    # the file is refused before the reference's pass (the reference here would not even load)
    assert main(["eval", str(bad), "--backend", "llama.cpp", "--kld", "--reference", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"compresslm: error: llama.cpp refused {bad}: ")
    assert main(["eval", str(bad), "--backend", "llama.cpp", "--ppl", "wikitext2", "--kv-bits", "4"]) == 2
    assert "measures --ppl, --kld and --speed; drop --kv-bits" in capsys.readouterr().err
    assert main(["eval", str(bad), "--ppl", "wikitext2", "--kv-type", "f32", "--threads", "1"]) == 2
    assert "--threads, --kv-type belong to --backend llama.cpp" in capsys.readouterr().err


def _ct_read_back(directory, name: str) -> torch.Tensor:
    """A packed layer decoded by the compressed-tensors library (scales in float32, as a float32 load has them)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    tensors = load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(config)
    scheme = next(s for s in config.config_groups.values() if name in s.targets)
    state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
    state["weight_scale"] = state["weight_scale"].float()
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


@pytest.mark.parametrize("recipe", ["gguf-q4_1-gptq", "w8-rtn", "50%-wanda+w4-g16-gptq", "w3-g32-rtn-sym"])
def test_compressed_tensors_export_reads_back_as_the_container(tmp_path, tokenizer, calib, recipe):
    path = _container(tmp_path, tokenizer, calib, "qwen2", recipe)
    result = export(path, "compressed-tensors", tmp_path / "ct", show_progress=False)
    assert result["packed_linears"] == 14 and result["dense_linears"] == 0
    contents = read_container(path)
    for name, record in contents.linears.items():
        assert torch.equal(_ct_read_back(tmp_path / "ct", name), record.dequantize())


def test_compressed_tensors_export_loads_in_transformers(tmp_path, tokenizer, calib):
    from transformers import AutoModelForCausalLM

    from compresslm.models.loading import load_model

    path = _container(tmp_path, tokenizer, calib, "llama", "w4-g32-gptq-sym")
    export(path, "compressed-tensors", tmp_path / "ct", dtype="float32", show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    lm = load_compressed(path)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lm.model(ids).logits)
    # asymmetric packed layers: transformers' compressed modules refuse them, so load_model decodes at load;
    # a float32 export keeps float32 scales, so the decoded weights are the container's bit for bit
    path = _container(tmp_path, tokenizer, calib, "llama", "w4-g32-rtn")
    export(path, "compressed-tensors", tmp_path / "asym", dtype="float32", show_progress=False)
    decoded, lm = load_model(tmp_path / "asym"), load_compressed(path)
    with torch.no_grad():
        assert torch.equal(decoded.model(ids).logits, lm.model(ids).logits)


def test_compressed_tensors_float32_export_packs_kquant_scales(tmp_path, tokenizer, calib):
    path = _wide_container(tmp_path, tokenizer, calib, "gguf-q6_k-rtn")
    assert export(path, "compressed-tensors", tmp_path / "f16", show_progress=False)["packed_linears"] == 0
    result = export(path, "compressed-tensors", tmp_path / "ct", dtype="float32", show_progress=False)
    assert result["packed_linears"] == 7 and result["dense_linears"] == 0
    for name, record in read_container(path).linears.items():
        assert torch.equal(_ct_read_back(tmp_path / "ct", name), record.dequantize())


def test_compressed_tensors_writes_what_it_cannot_pack_dense(tmp_path, tokenizer, calib):
    path = _container(tmp_path, tokenizer, calib, "qwen2", "w4-g24-rtn")  # a shorter last group
    result = export(path, "compressed-tensors", tmp_path / "ct", show_progress=False)
    assert result["packed_linears"] == 0 and result["dense_linears"] == 14  # 64 and 128 columns: neither divides
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.self_attn.q_proj" in config["ignore"]


def test_missing_compressed_tensors_names_the_pip_command(tmp_path, tokenizer, calib, monkeypatch):
    path = _container(tmp_path, tokenizer, calib, "llama", "w4-g16-rtn")
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    monkeypatch.setitem(sys.modules, "compressed_tensors.compressors", None)
    with pytest.raises(CompressLMError, match=r"pip install 'compresslm\[compressed-tensors\]'"):
        export(path, "compressed-tensors", tmp_path / "ct", show_progress=False)
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("recipe", ["w4-g16-gptq", "w3-g16-rtn", "50%-wanda+w4-g16-rtn", "w8-rtn", "2:4-sparsegpt"])
def test_packed_weights_compute_what_float_weights_compute(tmp_path, tokenizer, calib, recipe):
    from compresslm.runtime.linear import CompressedLinear

    path = _container(tmp_path, tokenizer, calib, "llama", recipe)
    packed, dense = load_compressed(path), load_compressed(path, float_weights=True)
    layers = [m for m in packed.model.modules() if isinstance(m, CompressedLinear)]
    assert layers and all(m.packed for m in layers)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed.model(ids).logits, dense.model(ids).logits)
    assert packed.fingerprint() == dense.fingerprint()
    for name, record in read_container(path).linears.items():
        again = packed.compressed[name]
        assert torch.equal(again.dequantize(), record.dequantize())
        assert (again.mask is None) == (record.mask is None) and again.nm == record.nm


def test_kquant_offsets_survive_the_container_packing_and_a_dtype_cast(tmp_path, tokenizer, calib):
    from compresslm.runtime.linear import CompressedLinear

    path = _wide_container(tmp_path, tokenizer, calib, "gguf-q4_k-gptq")
    stored = read_container(path).linears["model.layers.0.mlp.down_proj"]
    assert stored.zeros.dtype == torch.float32 and stored.meta["kquant"] == "q4_k"
    packed, dense = load_compressed(path), load_compressed(path, float_weights=True)
    assert all(m.packed for m in packed.model.modules() if isinstance(m, CompressedLinear))
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed.model(ids).logits, dense.model(ids).logits)
    packed.model.to(torch.bfloat16)  # float buffers are cast; the zero points' bit patterns must not be
    assert torch.equal(packed.compressed["model.layers.0.mlp.down_proj"].zeros, stored.zeros)


def test_packed_weights_are_small_in_memory(tmp_path, tokenizer, calib):
    from compresslm.runtime.linear import CompressedLinear

    path = _container(tmp_path, tokenizer, calib, "llama", "w4-g32-rtn")
    packed, dense = load_compressed(path), load_compressed(path, float_weights=True)

    def weight_bytes(lm):
        return sum(m.weight_nbytes() for m in lm.model.modules() if isinstance(m, CompressedLinear))

    # 4-bit codes two to a byte, float16 scales and uint8 zeros per group of 32: 0.5 + 3/32 bytes per weight
    params = sum(m.in_features * m.out_features for m in packed.model.modules() if isinstance(m, CompressedLinear))
    assert weight_bytes(packed) == params * (0.5 + 3 / 32)
    assert weight_bytes(dense) == params * 4


def test_packed_weights_follow_a_dtype_cast(tmp_path, tokenizer, calib):
    path = _container(tmp_path, tokenizer, calib, "qwen2", "w4-g16-rtn")
    packed, dense = load_compressed(path), load_compressed(path, float_weights=True)
    packed.model.to(torch.bfloat16)
    dense.model.to(torch.bfloat16)
    ids = torch.randint(3, 259, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(packed.model(ids).logits, dense.model(ids).logits)
    layer = packed.model.model.layers[0].mlp.up_proj
    assert layer.compressed.scales.dtype == torch.float16 and layer.dequantized().dtype == torch.bfloat16


def test_generate_streams_the_same_reply_packed_and_float(tmp_path, tokenizer, calib, capsys):
    from compresslm.eval.generate import generate_torch

    path = _container(tmp_path, tokenizer, calib, "llama", "w4-g16-rtn")
    pieces: list[str] = []
    packed = generate_torch(load_compressed(path), "Hello", max_new_tokens=6, on_text=pieces.append)
    dense = generate_torch(load_compressed(path, float_weights=True), "Hello", max_new_tokens=6)
    assert packed.text == dense.text == "".join(pieces) and 1 <= packed.new_tokens <= 6
    assert main(["generate", str(path), "--prompt", "Hello", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == generate_torch(load_compressed(path), "Hello",
                                                                          max_new_tokens=3).text  # fmt: skip
    assert main(["generate", str(path), "--prompt", "Hello", "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_a_factorized_model_exports_as_its_product(tmp_path, tokenizer, calib, capsys):
    from transformers import AutoModelForCausalLM

    path = _container(tmp_path, tokenizer, calib, "llama", "20%-whitened")
    assert main(["export", str(path), "--format", "gguf", "-o", str(tmp_path / "m.gguf"), "--quiet"]) == 2
    assert "no low-rank factors" in capsys.readouterr().err
    result = export(path, "gguf", tmp_path / "m.gguf", requantize=True, show_progress=False)
    assert not result["exact"] and result["requantized_tensors"] > 0 and result["requantize_max_relative_error"] < 1e-3
    _, tensors = _read_gguf(tmp_path / "m.gguf")
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "F16"
    export(path, "compressed-tensors", tmp_path / "ct", dtype="float32", show_progress=False)  # dense products
    export(path, "hf", tmp_path / "hf", dtype="float32", show_progress=False)
    lm = load_compressed(path)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    for directory in ("ct", "hf"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / directory, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, lm.model(ids).logits, atol=1e-4, rtol=0)
