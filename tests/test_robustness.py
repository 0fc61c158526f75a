"""Bit flips in stored parts: seeded, counted exactly, nothing at rate 0, range checks that catch exponent flips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compresslm.analysis.robustness import PARTS, corrupt, flip_bits
from compresslm.api import compress
from compresslm.cli import main
from compresslm.data.calibration import calibration_windows
from compresslm.errors import CompressLMError
from compresslm.models.assemble import load_compressed
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_model


@pytest.fixture(scope="module")
def container(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("flips") / "m.clm"
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    compress(lm, "50%-wanda+w4-g16-rtn", path, calibration=calibration_windows(tokenizer, "wikitext2", 4, 64, 0),
             show_progress=False)  # fmt: skip
    return path


def _logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=torch.arange(3, 40)[None, :]).logits


def test_flips_are_seeded_and_counted_exactly():
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
    a, flips = flip_bits(data, 1e-2, np.random.default_rng(5))
    b, again = flip_bits(data, 1e-2, np.random.default_rng(5))
    assert np.array_equal(a, b) and flips == again > 0
    assert int(np.unpackbits(a ^ data).sum()) == flips  # every drawn flip is one changed bit
    assert flip_bits(data, 0.0, np.random.default_rng(5))[1] == 0


@pytest.mark.parametrize("part", PARTS)
def test_rate_zero_changes_nothing_and_flips_change_the_model(container, part):
    clean = _logits(load_compressed(container))
    lm = load_compressed(container)
    hit = corrupt(lm, part, 0.0, seed=0, protect=True)
    assert hit.flips == 0 and hit.protected_values == 0 and hit.bits > 0
    assert torch.allclose(_logits(lm), clean, atol=1e-5)  # a float weight instead of a packed one: same values
    lm = load_compressed(container)
    hit = corrupt(lm, part, 1e-2, seed=1)
    assert 0 < hit.flips < hit.bits and not torch.equal(_logits(lm), clean)


def test_range_checks_catch_flipped_exponents(container):
    lm = load_compressed(container)
    unprotected = corrupt(lm, "scales", 3e-2, seed=2)
    wild = _logits(lm)
    lm = load_compressed(container)
    protected = corrupt(lm, "scales", 3e-2, seed=2, protect=True)
    assert protected.flips == unprotected.flips and protected.protected_values > 0
    clean = _logits(load_compressed(container))
    assert torch.isfinite(_logits(lm)).all()
    assert (_logits(lm) - clean).norm() < (wild - clean).nan_to_num(1e6, 1e6, -1e6).norm()


def test_bad_requests_are_refused(container, tmp_path, capsys):
    with pytest.raises(CompressLMError, match="part 'weights' is not one of"):
        corrupt(load_compressed(container), "weights", 1e-3)
    with pytest.raises(CompressLMError, match="a probability in"):
        corrupt(load_compressed(container), "codes", 2.0)
    assert main(["robustness", str(tmp_path / "none.clm")]) == 2
    assert "is not a .clm container" in capsys.readouterr().err


def test_robustness_command(container, capsys):
    argv = ["robustness", str(container), "--parts", "codes,scales", "--rates", "0,1e-2", "--seeds", "0,1",
            "--ctx", "64", "--limit", "2", "--quiet"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert len(runs) == 2 * 2 * 2 and {r["part"] for r in runs} == {"codes", "scales"}
    clean = [r for r in runs if r["rate"] == 0]
    assert all(r["flips"] == 0 and r["kld_mean"] == pytest.approx(0.0, abs=1e-6) for r in clean)
    assert main(argv) == 0
    assert "bit flips" in capsys.readouterr().err


def test_recompression_cycles(tmp_path, tokenizer, capsys):
    from compresslm.models.loading import save_model
    from compresslm.sweep.recompression import recompression_drift

    source = tmp_path / "hf"
    save_model(LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny"), None, source)
    rows = recompression_drift(str(source), ["w4-g16-rtn"], 3, tmp_path / "same", ctx=64, limit=2,
                               show_progress=False)  # fmt: skip
    assert [r["cycle"] for r in rows] == [1, 2, 3]
    assert rows[0]["drift_from_source"] > 0 and rows[0]["drift_from_first"] == 0.0
    # RTN on its own grid is nearly a fixed point: a second cycle moves far less than the first
    assert rows[1]["drift_from_previous"] < 0.1 * rows[0]["drift_from_source"]
    rows = recompression_drift(str(source), ["w4-g16-rtn", "w3-g32-rtn"], 2, tmp_path / "other", ctx=64, limit=2,
                               show_progress=False)  # fmt: skip
    assert rows[1]["recipe"] == "w3-g32-rtn" and rows[1]["drift_from_previous"] > 0
    argv = ["recompress", str(source), "--recipe", "w4-g16-rtn", "--cycles", "1", "-o", str(tmp_path / "cli"),
            "--ctx", "64", "--limit", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 0 and "compression cycles" in capsys.readouterr().err
    assert main([*argv[:3], "nosuchpreset", *argv[4:]]) == 2
