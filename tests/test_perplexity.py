"""Perplexity: the protocol's arithmetic, its options, and its label."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compresslm.data.corpora import Corpus
from compresslm.errors import ProtocolError
from compresslm.eval.perplexity import perplexity, tokenize_corpus, window_plan


def _corpus(text: str) -> Corpus:
    return Corpus("sample", None, text, "test", "raw")


def test_window_plan_non_overlapping_drops_remainder():
    assert window_plan(10, 4, 4) == [(0, 1), (4, 1)]


def test_window_plan_sliding_scores_each_token_once():
    plan = window_plan(10, 4, 2)
    assert plan == [(0, 1), (2, 2), (4, 2), (6, 2)]
    scored = set()
    for start, first in plan:
        positions = set(range(start + first, start + 4))
        assert not positions & scored
        scored |= positions
    assert scored == set(range(1, 10))


@pytest.mark.parametrize(
    ("n", "ctx", "stride", "message"),
    [(3, 4, 4, "fewer than one window"), (10, 1, 1, "ctx must be at least 2"), (10, 4, 5, "stride must be")],
)
def test_window_plan_errors(n, ctx, stride, message):
    with pytest.raises(ProtocolError, match=message):
        window_plan(n, ctx, stride)


def test_matches_a_direct_computation(tiny_lm, sample_text):
    corpus = _corpus(sample_text)
    result = perplexity(tiny_lm, corpus, ctx=64, show_progress=False)
    ids = tokenize_corpus(tiny_lm.tokenizer, corpus)
    windows = ids[: (ids.numel() // 64) * 64].view(-1, 64)
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result.windows == windows.shape[0]
    assert result.tokens == windows.shape[0] * 63
    assert result.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert len(result.window_nll) == result.windows


def test_uniform_model_has_perplexity_equal_to_vocab(tiny_lm, sample_text):
    with torch.no_grad():
        tiny_lm.model.lm_head.weight.zero_()  # tied: embeddings are zero too, logits are all 0
    result = perplexity(tiny_lm, _corpus(sample_text), ctx=32, limit=3, show_progress=False)
    assert result.ppl == pytest.approx(len(tiny_lm.tokenizer), rel=1e-6)


def test_batch_size_and_limit(tiny_lm, sample_text):
    corpus = _corpus(sample_text)
    one = perplexity(tiny_lm, corpus, ctx=64, limit=5, show_progress=False)
    many = perplexity(tiny_lm, corpus, ctx=64, limit=5, batch_size=3, show_progress=False)
    assert one.windows == many.windows == 5
    assert one.ppl == pytest.approx(many.ppl, rel=1e-5)
    assert one.protocol["windows_available"] > 5


def test_sliding_window_differs_and_is_labelled(tiny_lm, sample_text):
    corpus = _corpus(sample_text)
    dense = perplexity(tiny_lm, corpus, ctx=64, stride=64, show_progress=False)
    slide = perplexity(tiny_lm, corpus, ctx=64, stride=32, show_progress=False)
    assert slide.protocol["windowing"] == "sliding" and dense.protocol["windowing"] == "non-overlapping"
    assert slide.tokens != dense.tokens
    ids = tokenize_corpus(tiny_lm.tokenizer, corpus)
    assert slide.tokens == 63 + 32 * (len(window_plan(ids.numel(), 64, 32)) - 1)


def test_protocol_label(tiny_lm, sample_text):
    result = perplexity(tiny_lm, _corpus(sample_text), ctx=32, limit=2, show_progress=False)
    p = result.protocol
    for key in ("dataset", "text_sha256", "split", "ctx", "stride", "windows", "tokens_scored", "bos",
                "model", "eval_dtype", "versions", "wall_time_s", "join"):  # fmt: skip
        assert key in p
    assert p["bos"] == "none" and p["tokens_scored"] == result.tokens == 62
    assert p["model"]["sha256"] == tiny_lm.fingerprint()
    assert p["versions"]["torch"] == torch.__version__


def test_dtype_evaluates_a_copy(tiny_lm, sample_text):
    result = perplexity(tiny_lm, _corpus(sample_text), ctx=32, limit=2, dtype="bfloat16", show_progress=False)
    assert result.protocol["eval_dtype"] == "bfloat16"
    assert tiny_lm.dtype == torch.float32


def test_bad_options(tiny_lm, sample_text):
    corpus = _corpus(sample_text)
    with pytest.raises(ProtocolError, match="exceeds the model's 512 positions"):
        perplexity(tiny_lm, corpus, ctx=1024, show_progress=False)
    with pytest.raises(ProtocolError, match="batch_size"):
        perplexity(tiny_lm, corpus, ctx=32, batch_size=0, show_progress=False)
    with pytest.raises(ProtocolError, match="limit"):
        perplexity(tiny_lm, corpus, ctx=32, limit=0, show_progress=False)
    with pytest.raises(ProtocolError, match="unknown dtype"):
        perplexity(tiny_lm, corpus, ctx=32, dtype="int3", show_progress=False)


def test_wikitext2_by_name(tiny_lm):
    result = perplexity(tiny_lm, "wikitext2", ctx=128, limit=1, show_progress=False)
    assert result.protocol["dataset"] == "wikitext2" and result.protocol["split"] == "test"
    assert result.protocol["join"] == "gptq-rows"
