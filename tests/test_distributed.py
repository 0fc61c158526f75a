"""One model's calibration split over two real gloo processes (`compress --nproc 2`) against one process.

The statistics are summed in another order than one process sums them, so GPTQ's codes may differ
where a weight sits on a rounding boundary. The stated tolerance: at most 0.5 % of a layer's codes
differ, and the logits agree to 1e-3 (relative); RTN, whose codes use no statistics, matches exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from compresslm.models.assemble import load_compressed
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import save_model
from compresslm.models.tiny import byte_tokenizer, tiny_model

CALIB = ["--calib", "wikitext2", "--calib-samples", "8", "--calib-len", "64"]
IDS = torch.randint(3, 259, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    save_model(LoadedModel.from_module(tiny_model("llama"), byte_tokenizer(), name="tiny"), None, path)
    return path


def _compress(model_dir, recipe: str, out, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # each of two ranks gets one thread on this machine's two cores
    command = [sys.executable, "-m", "compresslm.cli", "compress", str(model_dir), "--recipe", recipe, *CALIB,
               "-o", str(out), "--quiet", *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("recipe", ["w4-g32-gptq", "w4-g32-rtn", "50%-sparsegpt"])
def test_two_processes_make_the_container_one_process_makes(model_dir, tmp_path, recipe):
    single, split = (
        _compress(model_dir, recipe, tmp_path / "one.clm"),
        _compress(model_dir, recipe, tmp_path / "two.clm", "--nproc", "2"),
    )
    assert single.returncode == 0 and split.returncode == 0, split.stderr[-3000:]
    one, two = load_compressed(tmp_path / "one.clm"), load_compressed(tmp_path / "two.clm")
    if recipe != "w4-g32-rtn":  # RTN calibrates nothing: both runs are one process's work
        assert two.container["calibration"]["processes"] == 2 and "processes" not in one.container["calibration"]
    for name, record in one.compressed.items():
        other = two.compressed[name]
        if recipe == "w4-g32-rtn":
            assert torch.equal(record.codes, other.codes), name
        if record.codes is not None:
            assert (record.codes != other.codes).float().mean() <= 0.005, name
    with torch.no_grad():
        a, b = one.model(input_ids=IDS).logits, two.model(input_ids=IDS).logits
    assert float((a - b).norm() / a.norm()) < 1e-3


def test_recipes_the_split_cannot_do_are_refused_before_any_process_starts(model_dir, tmp_path):
    result = _compress(model_dir, "w4-g32-awq", tmp_path / "x.clm", "--nproc", "2")
    assert result.returncode == 2 and "--nproc: AWQ and SmoothQuant" in result.stderr
    assert not (tmp_path / "x.clm").exists()
