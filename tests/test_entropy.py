"""Entropy-coded sizes: the Shannon bound, an ANS coder that decodes back exactly, and `info --entropy`."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from compresslm.api import compress
from compresslm.cli import main
from compresslm.data.calibration import calibration_windows
from compresslm.formats.container import ContainerReader
from compresslm.formats.entropy import ans_decode, ans_encode, entropy_summary, shannon_bits
from compresslm.formats.packing import unpack_bits
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_model


@pytest.fixture(scope="module")
def container(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("entropy") / "w4.clm"
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    compress(lm, "w4-g16-gptq+emb8", path, calibration=calibration_windows(tokenizer, "wikitext2", 4, 64, 0),
             show_progress=False)  # fmt: skip
    return path


def test_the_shannon_bound_of_known_counts():
    assert shannon_bits(np.array([4.0, 4.0, 0.0, 0.0])) == pytest.approx(8.0)  # 8 fair coin flips
    assert shannon_bits(np.array([16.0, 0.0])) == 0.0


def test_ans_decodes_the_codes_back_exactly(container):
    reader = ContainerReader(container)
    entry = reader.header["linears"]["model.layers.0.mlp.up_proj"]
    codes = unpack_bits(reader.blob(entry["codes"]), 4, reader.header["blobs"][entry["codes"]]["shape"][0]).numpy()
    reader.close()
    counts = np.bincount(codes, minlength=16).astype(np.float64)
    words = ans_encode(codes, counts)
    assert np.array_equal(ans_decode(words, counts, len(codes)), codes)
    assert shannon_bits(counts) <= 8 * words.nbytes <= shannon_bits(counts) + 64


def test_entropy_summary_counts_every_record_and_the_file(container):
    summary = entropy_summary(container)
    assert len(summary["records"]) == 14 + 1  # the linears and the 8-bit embedding
    assert summary["codes_shannon_bytes"] <= summary["codes_stored_bytes"]
    assert summary["file_ans_bytes"] <= summary["bytes_on_disk"]
    assert summary["file_ans_bytes"] == summary["bytes_on_disk"] - summary["codes_stored_bytes"] + sum(
        min(r["stored"], r["ans"]) for r in summary["records"].values()
    )
    embedding = summary["records"]["model.embed_tokens"]
    assert embedding["bits"] == 8 and embedding["shannon"] < embedding["stored"]  # 8-bit codes are far from uniform


def test_info_entropy(container, capsys):
    assert main(["info", str(container), "--entropy", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entropy"]["codes_stored_bytes"] > 0 and "records" in info["entropy"]
    assert main(["info", str(container), "--entropy"]) == 0
    assert "Shannon bound" in capsys.readouterr().err


def test_info_entropy_refusals(container, capsys, monkeypatch):
    assert main(["info", "smollm2-135m", "--entropy"]) == 2
    assert "smollm2-135m is not a container" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "constriction", None)
    assert main(["info", str(container), "--entropy"]) == 2
    assert "pip install 'compresslm[entropy]'" in capsys.readouterr().err
