"""KL divergence, top-1 agreement and Δp against a cached reference, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from compresslm.api import compress
from compresslm.cli import main
from compresslm.errors import ProtocolError
from compresslm.eval.distance import distance, reference_distance, reference_logits, token_kld
from compresslm.eval.perplexity import perplexity
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import save_model
from compresslm.models.tiny import tiny_model

WINDOWS = {"ctx": 96, "limit": 3}


def _tiny(tokenizer):
    return LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny-llama")


@pytest.fixture
def reference(tokenizer, tmp_path):
    return reference_logits(_tiny(tokenizer), "wikitext2", k=16, cache_dir=tmp_path, show_progress=False, **WINDOWS)


def test_self_distance_is_zero_and_ppl_matches(tokenizer, reference):
    lm = _tiny(tokenizer)
    result = distance(lm, reference, "wikitext2", show_progress=False)
    assert result.kld_mean == 0.0 and result.kld_max == 0.0
    assert result.top1_agreement == 1.0
    assert result.delta_p_mean == 0.0
    assert result.ppl == pytest.approx(perplexity(lm, "wikitext2", show_progress=False, **WINDOWS).ppl, rel=1e-12)
    assert result.ppl == pytest.approx(result.reference_ppl, rel=1e-12)
    assert result.tokens == 3 * 95


def test_reference_distance_reads_the_same_numbers_from_the_reference_pass(tokenizer, reference):
    measured = distance(_tiny(tokenizer), reference, "wikitext2", show_progress=False)
    read = reference_distance(reference)
    assert read.ppl == pytest.approx(measured.ppl, rel=1e-12)
    assert read.window_nll == pytest.approx(measured.window_nll, rel=1e-12)
    assert (read.kld_mean, read.top1_agreement, read.delta_p_mean) == (0.0, 1.0, 0.0)
    assert (read.tokens, read.windows) == (measured.tokens, measured.windows)
    assert read.protocol["text_sha256"] == measured.protocol["text_sha256"]


def test_fewer_bits_move_further_from_the_reference(tokenizer, reference):
    klds = {}
    for recipe in ("w8-rtn", "w4-g16-rtn", "w3-g16-rtn"):
        lm = _tiny(tokenizer)
        compress(lm, recipe, show_progress=False)
        klds[recipe] = distance(lm, reference, "wikitext2", show_progress=False).kld_mean
    assert 0 < klds["w8-rtn"] < klds["w4-g16-rtn"] < klds["w3-g16-rtn"]


def test_coarsened_kl_equals_full_kl_when_k_is_the_vocabulary():
    gen = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(3 * torch.randn(5, 12, generator=gen), dim=-1)
    model = torch.log_softmax(3 * torch.randn(5, 12, generator=gen), dim=-1)
    full = (ref.exp() * (ref - model)).sum(dim=1)
    values, ids = torch.topk(ref, 12, dim=1)
    assert torch.allclose(token_kld(values, model, ids.int()), full, atol=1e-6)
    values, ids = torch.topk(ref, 3, dim=1)  # fewer tokens: a lower bound
    assert (token_kld(values, model, ids.int()) <= full + 1e-6).all()


def test_reference_is_cached_and_a_damaged_cache_is_recomputed(tokenizer, tmp_path, reference):
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    again = reference_logits(_tiny(tokenizer), "wikitext2", k=16, cache_dir=tmp_path, show_progress=False, **WINDOWS)
    assert torch.equal(again.top_ids, reference.top_ids)
    files[0].write_bytes(b"not a tensor file")
    healed = reference_logits(_tiny(tokenizer), "wikitext2", k=16, cache_dir=tmp_path, show_progress=False, **WINDOWS)
    assert torch.equal(healed.top_logprobs, reference.top_logprobs)


def test_other_text_is_refused(tokenizer, reference, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("completely different words " * 200)
    with pytest.raises(ProtocolError, match="another text"):
        distance(_tiny(tokenizer), reference, str(other), show_progress=False)


def test_cli_kld_on_a_container(tokenizer, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    source = save_model(tiny_model("llama"), tokenizer, tmp_path / "tiny")
    assert main(["compress", str(source), "--recipe", "w4-g16-rtn", "-o", str(tmp_path / "m.clm"), "--quiet"]) == 0
    capsys.readouterr()
    argv = ["eval", str(tmp_path / "m.clm"), "--ppl", "wikitext2", "--ctx", "64", "--limit", "2", "--kld"]
    assert main([*argv, "--json", "--quiet"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["kld_mean"] > 0 and 0 < payload["top1_agreement"] <= 1
    assert payload["protocol"]["reference_model"]["path"] == str(source.resolve())
    assert main(["eval", str(source), "--kld", "--ctx", "64", "--limit", "1"]) == 2
    assert "--reference" in capsys.readouterr().err
