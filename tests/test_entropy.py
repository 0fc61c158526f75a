"""Entropy-coded sizes: the Shannon bound, an ANS coder that decodes back exactly, and `info --entropy`."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from compresslm.api import compress
from compresslm.cli import main
from compresslm.data.calibration import calibration_windows
from compresslm.formats.ans import ans_decode, ans_encode
from compresslm.formats.container import ContainerReader
from compresslm.formats.entropy import entropy_summary, shannon_bits
from compresslm.formats.packing import unpack_bits
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_model


def _peaked_model():
    """A tiny model whose every row has an outlier, as trained weights do: the outlier sets the row's range and
    the other codes crowd a few middle levels (Gaussian initial weights give near-uniform codes instead)."""
    import torch

    model = tiny_model("llama")
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param[:, 0] = param[:, 0].abs() * 30 + param.abs().max()
    return model


@pytest.fixture(scope="module")
def container(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("entropy") / "w8.clm"
    lm = LoadedModel.from_module(_peaked_model(), tokenizer, name="tiny")
    compress(lm, "w8-rtn+emb8", path, calibration=calibration_windows(tokenizer, "wikitext2", 4, 64, 0),
             show_progress=False)  # fmt: skip
    return path


def test_the_shannon_bound_of_known_counts():
    assert shannon_bits(np.array([4.0, 4.0, 0.0, 0.0])) == pytest.approx(8.0)  # 8 fair coin flips
    assert shannon_bits(np.array([16.0, 0.0])) == 0.0


def test_ans_decodes_the_codes_back_exactly(container):
    reader = ContainerReader(container)
    entry = reader.header["linears"]["model.layers.0.mlp.up_proj"]
    bits = entry["bits"]
    codes = unpack_bits(reader.blob(entry["codes"]), bits, reader.header["blobs"][entry["codes"]]["shape"][0]).numpy()
    reader.close()
    counts = np.bincount(codes, minlength=1 << bits).astype(np.float64)
    words = ans_encode(codes, counts)
    assert np.array_equal(ans_decode(words, counts, len(codes)), codes)
    assert shannon_bits(counts) <= 8 * words.nbytes <= shannon_bits(counts) + 64


def test_entropy_summary_counts_every_record_and_the_file(container):
    summary = entropy_summary(container)
    assert len(summary["records"]) == 14 + 1  # the linears and the 8-bit embedding
    assert summary["codes_shannon_bytes"] <= summary["codes_stored_bytes"]
    assert summary["file_ans_bytes"] <= summary["bytes_on_disk"]
    assert summary["file_ans_bytes"] == summary["bytes_on_disk"] - summary["codes_stored_bytes"] + sum(
        min(r["packed"], r["ans"]) for r in summary["records"].values()
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


def test_an_entropy_coded_container_loads_the_same_records(container, tmp_path, capsys):
    import torch

    from compresslm.api import export
    from compresslm.formats.container import read_container, read_header
    from compresslm.models.assemble import load_compressed

    result = export(container, "clm-ans", tmp_path / "ans.clm", show_progress=False)
    assert result["bytes_on_disk"] < container.stat().st_size
    header, _ = read_header(tmp_path / "ans.clm")
    assert header["format_version"] == 3 and header["recipe"] == read_header(container)[0]["recipe"]
    coded = [e for e in header["linears"].values() if e.get("codes_encoding") == "ans"]
    assert coded and all(header["blobs"][e["codes"]]["dtype"] == "ans8" for e in coded)
    before, after = read_container(container), read_container(tmp_path / "ans.clm")
    for name, record in before.linears.items():
        again = after.linears[name]
        assert torch.equal(record.codes, again.codes) and torch.equal(record.scales, again.scales)
        assert (record.mask is None and again.mask is None) or torch.equal(record.mask, again.mask)
    ids = torch.arange(3, 40)[None, :]
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path / "ans.clm").model(input_ids=ids).logits,
                           load_compressed(container).model(input_ids=ids).logits)  # fmt: skip
    summary = entropy_summary(tmp_path / "ans.clm")  # reads ANS-coded codes too
    assert summary["codes_stored_bytes"] < entropy_summary(container)["codes_stored_bytes"]
    assert main(["export", str(container), "--format", "clm-ans", "-o", str(tmp_path / "ans.clm")]) == 2
    assert "exists" in capsys.readouterr().err


def test_damaged_ans_codes_are_refused(container, tmp_path):
    import json as _json

    from compresslm.api import export
    from compresslm.errors import CorruptFileError
    from compresslm.formats.container import encode_header, read_container, read_header

    path = tmp_path / "ans.clm"
    export(container, "clm-ans", path, show_progress=False)
    header, start = read_header(path)
    entry = next(e for e in header["linears"].values() if e.get("codes_encoding") == "ans")
    entry["codes_encoding"] = "huffman"  # an unknown encoding, with the header's checksum made valid again
    body = path.read_bytes()[start:]
    damaged = tmp_path / "damaged.clm"
    damaged.write_bytes(encode_header(header) + body)
    with pytest.raises(CorruptFileError, match="codes encoding 'huffman' is unknown"):
        read_container(damaged)
    _json.dumps(header)
