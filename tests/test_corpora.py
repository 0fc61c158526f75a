"""Corpora: the shipped WikiText-2 text is byte-exact and the join rules are the named ones."""

from __future__ import annotations

import hashlib
from importlib import resources

import pytest

from compresslm.data.corpora import load_corpus, wikitext2_rows
from compresslm.errors import DataError

TEST_RAW_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
VALID_RAW_SHA256 = "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"


def test_shipped_files_are_the_original_bytes():
    root = resources.files("compresslm.data").joinpath("wikitext-2-raw")
    assert hashlib.sha256(root.joinpath("wiki.test.raw").read_bytes()).hexdigest() == TEST_RAW_SHA256
    assert hashlib.sha256(root.joinpath("wiki.valid.raw").read_bytes()).hexdigest() == VALID_RAW_SHA256
    assert root.joinpath("LICENSE.md").is_file()


def test_wikitext2_rows_match_the_hub_split():
    raw = load_corpus("wikitext2", "test", join="raw").text
    rows = wikitext2_rows(raw)
    assert len(rows) == 4358  # the row count of wikitext-2-raw-v1 test
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    corpus = load_corpus("wikitext2", "test")
    assert corpus.join == "gptq-rows"
    assert corpus.text == "\n\n".join(rows)
    assert corpus.describe()["text_sha256"] == hashlib.sha256(corpus.text.encode()).hexdigest()


def test_validation_split_and_bad_split():
    assert load_corpus("wikitext2", "validation").split == "validation"
    with pytest.raises(DataError, match="unknown wikitext2 split 'train'"):
        load_corpus("wikitext2", "train")
    with pytest.raises(DataError, match="unknown join rule"):
        load_corpus("wikitext2", "test", join="words")


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello\nworld\n")
    assert load_corpus(str(txt)).text == "hello\nworld\n"
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    corpus = load_corpus(str(jsonl))
    assert corpus.text == "one\n\ntwo" and corpus.join == "jsonl-text"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: expected an object with a string 'text' field"):
        load_corpus(str(jsonl))
    jsonl.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_corpus(str(jsonl))


def test_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="no corpus named 'nope'"):
        load_corpus("nope")
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        load_corpus(str(empty))
