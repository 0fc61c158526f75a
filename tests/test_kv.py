"""The quantized KV cache: packing, generation parity at 8 bits, measured bytes, quality monotonicity."""

from __future__ import annotations

import json

import pytest
import torch

from compresslm.cli import main
from compresslm.errors import CompressLMError
from compresslm.eval.kv_quality import kv_perplexity, passkey_prompt
from compresslm.formats.packing import pack_lastdim, unpack_lastdim
from compresslm.kv.cache import KVQuantConfig, QuantizedKVCache, fp16_kv_bytes, make_cache
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import save_model
from compresslm.models.tiny import tiny_model
from compresslm.quant.rotation import hadamard_matrix, rotate_last


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_lastdim_packing_round_trips(bits):
    codes = torch.randint(0, 1 << bits, (2, 3, 7, 32), dtype=torch.uint8)
    packed = pack_lastdim(codes, bits)
    assert packed.shape[-1] == 32 * bits // 8
    assert torch.equal(unpack_lastdim(packed, bits), codes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 9}, "2 to 8"),
        ({"group_size": 12}, "multiple of 8"),
        ({"window": -1}, "window"),
        ({"outliers": 0.7}, "outliers"),
        ({"key_axis": "head"}, "key_axis must be 'channel' or 'token'"),
        ({"sink": 4}, "multiple of 8 tokens below group_size"),
        ({"sink": 128, "group_size": 128}, "multiple of 8 tokens below group_size"),
        ({"key_axis": "token", "outliers": 0.01}, "use key_axis='channel'"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(CompressLMError, match=message):
        KVQuantConfig(**kwargs)


@pytest.fixture
def model():
    return tiny_model("llama")


@pytest.fixture
def prompt(tokenizer):
    return tokenizer("A fixed prompt for greedy decoding through the cache. " * 4, return_tensors="pt").input_ids


def test_8bit_generation_matches_full_precision(model, prompt):
    with torch.no_grad():
        reference = model.generate(prompt, max_new_tokens=24, do_sample=False)
        cache = make_cache(model, KVQuantConfig(bits=8, group_size=16, value_group=16))
        quantized = model.generate(prompt, max_new_tokens=24, do_sample=False, past_key_values=cache)
    assert torch.equal(quantized, reference)


def test_reported_bytes_are_the_tensors_bytes(model, prompt):
    config = KVQuantConfig(bits=4, group_size=16, value_group=16, window=8, outliers=0.01, sink=8)
    cache = make_cache(model, config)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
    assert isinstance(cache, QuantizedKVCache) and cache.get_seq_length() == prompt.shape[1]
    total = 0
    for layer in cache.layers:
        for group in [*layer.key_groups, *layer.value_groups]:
            total += sum(t.numel() * t.element_size() for k, t in group.items() if k != "outliers")
            total += sum(t.numel() * t.element_size() for t in group.get("outliers", {}).values())
        total += (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
        total += (layer.sink_keys.numel() + layer.sink_values.numel()) * layer.sink_keys.element_size()
        assert layer.sink_keys.shape[-2] == 8 and layer.keys.shape[-2] < config.window + config.group_size
        assert all(g["codes"].dtype == torch.uint8 for g in layer.key_groups)
    assert cache.nbytes() == total < fp16_kv_bytes(model, prompt.shape[1])


def test_fewer_bits_cost_quality_and_save_bytes(tokenizer):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    results = {bits: kv_perplexity(lm, KVQuantConfig(bits=bits, group_size=32, value_group=16), ctx=128, limit=2,
                                   chunk=16, show_progress=False) for bits in (8, 4, 2)}  # fmt: skip
    assert results[8]["kld_mean"] < results[4]["kld_mean"] < results[2]["kld_mean"]
    assert results[2]["kv_bytes"] < results[4]["kv_bytes"] < results[8]["kv_bytes"] < results[8]["kv_bytes_fp16"]
    full = kv_perplexity(lm, None, ctx=128, limit=2, chunk=16, show_progress=False)
    assert full["ppl"] == pytest.approx(results[8]["reference_ppl"], rel=1e-9)


def test_passkey_prompt_hides_the_key(tokenizer):
    ids, key = passkey_prompt(tokenizer, 300, 0.5, 12345, "filler words " * 100)
    text = tokenizer.decode(ids[0])
    assert key == "12345" and text.count("12345") == 2 and text.endswith("The pass key is")
    assert abs(ids.shape[1] - 300) < 20


def test_cli_kv(tokenizer, tmp_path, capsys):
    source = str(save_model(tiny_model("llama"), tokenizer, tmp_path / "tiny"))
    argv = ["eval", source, "--kv-bits", "4", "--kv-group", "32", "--kv-value-group", "16", "--ctx", "96", "--limit",
            "1", "--kv-chunk", "32", "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["kv_bytes"] < payload["kv_bytes_fp16"] and payload["kv"]["kld_mean"] > 0
    assert main(["eval", source, "--passkey", "512"]) == 2
    assert "--passkey needs --kv-bits" in capsys.readouterr().err


def test_kv_stage_travels_with_the_container_and_into_evaluation(tokenizer, tmp_path):
    from compresslm.api import compress
    from compresslm.eval.perplexity import perplexity
    from compresslm.models.loading import load_model
    from compresslm.recipe import RecipeError, preset

    recipe = preset("w4-g16-rtn+kv2-g16")
    assert recipe.kv_cache.bits == 2 and recipe.kv_cache.group_size == 16
    kv = preset("kv4-g128-w32-s8-pre-rot-kt").kv_cache
    assert (kv.window, kv.sink, kv.pre_rope, kv.rotate, kv.key_axis) == (32, 8, True, True, "token")
    with pytest.raises(RecipeError, match="multiple of 8"):
        preset("kv4-g12")
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    compress(lm, "w4-g16-rtn+kv2-g16", tmp_path / "m.clm", show_progress=False)
    reloaded = load_model(tmp_path / "m.clm")
    assert reloaded.kv_cache.bits == 2
    reloaded.kv_cache.chunk = 16  # several chunks per window, so later ones read the quantized cache
    through = perplexity(reloaded, "wikitext2", ctx=96, limit=1, show_progress=False)
    reloaded.kv_cache = None
    plain = perplexity(reloaded, "wikitext2", ctx=96, limit=1, show_progress=False)
    assert through.protocol["kv_cache"].startswith("K2") and through.ppl != plain.ppl
    only_kv = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    compress(only_kv, "kv4", tmp_path / "kv.clm", show_progress=False)  # no weight is compressed
    assert load_model(tmp_path / "kv.clm").kv_cache.bits == 4


def test_pre_rope_keys_round_trip_through_the_rotation(model, prompt):
    config = KVQuantConfig(bits=8, group_size=16, window=100_000, pre_rope=True, full_precision="model")  # all kept
    cache = make_cache(model, config)
    with torch.no_grad():
        model(input_ids=prompt[:, :40], past_key_values=cache, use_cache=True)
        through = model(input_ids=prompt[:, 40:60], past_key_values=cache, use_cache=True).logits
        direct = model(input_ids=prompt[:, :60]).logits[:, 40:60]
    assert torch.allclose(through, direct, atol=1e-5)
    with torch.no_grad():
        quantized = model.generate(prompt, max_new_tokens=16, do_sample=False, past_key_values=make_cache(
            model, KVQuantConfig(bits=8, group_size=16, value_group=16, pre_rope=True)))  # fmt: skip
        reference = model.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(quantized, reference)


def test_hadamard_is_orthogonal_and_self_inverse():
    h = hadamard_matrix(64)
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6) and torch.equal(h, h.T)
    x = torch.randn(3, 5, 64)
    assert torch.allclose(rotate_last(rotate_last(x)), x, atol=1e-5)
    with pytest.raises(CompressLMError, match="power-of-two"):
        hadamard_matrix(48)


def test_rotation_tames_an_outlier_channel():
    from compresslm.kv.cache import QuantizedKVLayer

    keys = torch.randn(1, 2, 32, 64)
    keys[..., 5] *= 30  # one outlier channel, as real keys have
    errors = {}
    for rotate in (False, True):
        layer = QuantizedKVLayer(KVQuantConfig(bits=4, group_size=32, value_group=64, rotate=rotate, key_axis="token"))
        layer.lazy_initialization(keys, keys)
        errors[rotate] = (layer._dequantize_keys(layer._quantize_keys(keys)) - keys).pow(2).mean()
    assert errors[True] < 0.5 * errors[False]


def test_rotated_8bit_cache_generates_the_same_tokens(model, prompt):
    config = KVQuantConfig(bits=8, group_size=16, value_group=16, rotate=True, key_axis="token")
    with torch.no_grad():
        cache = make_cache(model, config)
        quantized = model.generate(prompt, max_new_tokens=16, do_sample=False, past_key_values=cache)
        reference = model.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(quantized, reference)


def test_sink_tokens_stay_exact(model, prompt):
    config = KVQuantConfig(bits=2, group_size=16, value_group=16, sink=8)
    cache = make_cache(model, config)
    with torch.no_grad():
        model(input_ids=prompt[:, :5], past_key_values=cache, use_cache=True)  # fewer tokens than the sink
        model(input_ids=prompt[:, 5:40], past_key_values=cache, use_cache=True)
        plain = make_cache(model, None)
        model(input_ids=prompt[:, :40], past_key_values=plain, use_cache=True)
    layer = cache.layers[0]
    assert cache.get_seq_length() == 40 and layer.sink_keys.shape[-2] == 8
    assert layer.quantized_tokens == 24 and layer.keys.shape[-2] == 8  # groups end at positions 16 and 32
    assert layer.sink_keys.dtype == torch.float16  # 16 bits, like the float16 cache it is compared with
    assert torch.allclose(layer.sink_keys.float(), plain.layers[0].keys[..., :8, :], atol=1e-3)
