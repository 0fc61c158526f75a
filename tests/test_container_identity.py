"""Every preset family, a budget plan and a recipe file compress a tiny model to the same container bytes.

The fixture `fixtures/container_hashes.json` was recorded before the architecture step (issue 28)
moved code between modules: a refactor must not change what is written. Two digests per case: the
blob area (every packed code, scale, mask and dense tensor) and the header with the fields that vary
by machine or run removed (versions, timings, the calibration file's absolute path). A deliberate
format change bumps the container version and re-records the fixture:

    COMPRESSLM_RECORD_HASHES=1 .venv/bin/python -m pytest tests/test_container_identity.py

The digests are kept per kind of CPU (`machine_key`: the vector width PyTorch's kernels use and the
vendor, whose MKL kernels differ): float sums in GPTQ, SparseGPT and training end in other last bits
on an AVX2 AMD machine than on an AVX-512 Intel one, and a few codes round the other way, so bytes
are comparable only between runs on the same kind of CPU. The first set (Intel, AVX-512) was
recorded before the architecture step; the AMD AVX2 set was recorded on the code of 8d01205, which
passed the Intel set; the AMD AVX-512 set on the code of 7fb78f7, before GPTQ's sweep moved to the
transposed weight, XᵀX to its upper blocks, bit packing to whole words and the container writer to
copy-free tensor bytes (each writes the same bytes). On a kind of CPU with no digests the tests are
skipped, saying so; record them on the code before a refactor, then refactor.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from compresslm.api import compress
from compresslm.data.calibration import calibration_windows
from compresslm.engine.budget import plan_budget
from compresslm.formats.container import read_header
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_model
from compresslm.recipe import load_recipe
from compresslm.train.trainer import TrainRecipe, train

FIXTURE = Path(__file__).parent / "fixtures" / "container_hashes.json"
RECORD = os.environ.get("COMPRESSLM_RECORD_HASHES") == "1"
CALIBRATION = {"source": "wikitext2", "samples": 8, "length": 64, "batch_size": 4}

# one case per preset family and flag, at group 16 (the tiny model's rows are 64 or 128 wide)
PRESETS = [
    "w4-g64-gptq", "w3-g16-gptq-noact", "w4-g16-gptq-act", "w2-g16-gptq", "w4-g16-rtn", "w8-rtn", "w4-g16-rtn-sym",
    "w4-g16-awq", "w8-awq", "w4-g16-gptq-awq", "w4-g16-gptq-awq-clip", "w4-g16-gptq-awq-sym",
    "w4-g16-gptq-keepzeros", "w8a8-smoothquant", "w8a8-smoothquant-static", "w8a8-rtn",
    "50%-magnitude", "50%-magnitude-layer", "2:4-magnitude", "50%-wanda", "2:4-wanda", "70%-wanda-owl",
    "50%-sparsegpt", "2:4-sparsegpt", "70%-sparsegpt-owl",
    "2:4-sparsegpt+w4-g16-gptq", "50%-sparsegpt+w4-g16-gptq", "w4-g16-gptq+50%-sparsegpt", "w4-g16-gptq+2:4-wanda",
    "w4-g16-gptq+emb8", "w3-g16-gptq+emb4", "w4-g16-rtn+kv4-g16", "w4-g16-gptq+kv2-g32-w32-s8-pre-rot",
    "dial-g16", "dial-g16-shared", "dial-g16-rtn", "w3-g16-gptq+lqer4", "w4-g16-rtn+lqer4-plain",
]  # fmt: skip

# recipes written as data: SparseGPT then W8 quantized after it (a sweep grid's point), and a file-like dict
RECIPES = {
    "recipe:70%-sparsegpt+w8-g16-gptq-after": {
        "name": "70%-sparsegpt+w8-g16-gptq",
        "stages": [
            {"type": "prune", "method": "sparsegpt", "sparsity": "70%", "grid_fit": "after"},
            {"method": "gptq", "bits": 8, "group_size": 16},
        ],
    },
    "recipe:mixed-targets": {
        "name": "mixed",
        "stages": [
            {"method": "gptq", "bits": 3, "group_size": 16, "targets": ["q", "k", "v", "o"]},
            {"method": "rtn", "bits": 8, "granularity": "channel", "targets": ["gate", "up", "down"]},
        ],
        "dense_dtype": "bfloat16",
    },
    "recipe:propagate-original": {
        "stages": [{"method": "gptq", "bits": 4, "group_size": 16}],
        "calibration": {"propagate": "original"},
    },
}
CASES = [*PRESETS, *RECIPES, "budget:w4-g16-gptq@3.5"]  # linear bits per weight


def _normalized_header(header: dict) -> dict:
    """The header without what varies by machine or run (versions, timings, the data file's path)."""
    header = json.loads(json.dumps(header))
    header.pop("versions", None)
    header.pop("compression_seconds", None)
    header["config"].pop("transformers_version", None)
    for layer in header.get("layers", []):
        layer.pop("seconds", None)
    if header.get("calibration"):
        header["calibration"].pop("origin", None)
    return header


def _digests(path: Path) -> dict:
    header, start = read_header(path)
    blobs = path.read_bytes()[start:]
    text = json.dumps(_normalized_header(header), sort_keys=True)
    return {"header": hashlib.sha256(text.encode()).hexdigest(), "blobs": hashlib.sha256(blobs).hexdigest()}


def _check(key: str, path: Path, recorded: dict) -> None:
    """Record the container's digests under `key`, or require the recorded ones."""
    found = _digests(path)
    if RECORD:
        recorded[key] = found
        return
    assert key in recorded, f"{key} has no recorded digests; record them (see the module docstring)"
    changed = [part for part in found if found[part] != recorded[key][part]]
    assert not changed, f"{key}: the container's {' and '.join(changed)} changed"


def _recipe(case: str, lm: LoadedModel):
    if case.startswith("budget:"):
        name, bits = case.removeprefix("budget:").split("@")
        base = load_recipe(name)
        base.calibration.__dict__.update(CALIBRATION)
        return plan_budget(lm, base, target_linear_bits=float(bits), fisher_windows=4, show_progress=False).recipe
    recipe = load_recipe(RECIPES.get(case, case))
    for key, value in CALIBRATION.items():
        setattr(recipe.calibration, key, value)
    return recipe.validate()


def machine_key() -> str:
    """The kind of CPU whose float sums the digests hold: PyTorch's kernel width and the CPU's vendor."""
    vendor = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        vendor = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                       if line.startswith("vendor_id")), vendor)  # fmt: skip
    return f"{torch.backends.cpu.get_cpu_capability()} {vendor}"


@pytest.fixture(scope="module")
def recorded():
    machines: dict = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    key = machine_key()
    if RECORD:  # update the cases that run on this kind of CPU, keep the others
        found = machines.setdefault(key, {})
        yield found
        FIXTURE.write_text(json.dumps(machines, indent=1, sort_keys=True) + "\n")
    elif key not in machines:
        pytest.skip(f"no container digests recorded for this kind of CPU ({key}); see the module docstring")
    else:
        yield machines[key]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in one fixed order, whatever the machine's core count
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES)
def test_container_bytes_are_unchanged(case, recorded, tokenizer, tmp_path, one_thread):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny-llama")
    recipe = _recipe(case, lm)
    settings = recipe.calibration
    calib = calibration_windows(tokenizer, settings.source, settings.samples, settings.length, settings.seed)
    compress(lm, recipe, tmp_path / "m.clm", calibration=calib, show_progress=False)
    _check(case, tmp_path / "m.clm", recorded)


# training exports: QAT at one width, random precision at two (one container each), learned widths
TRAINING = {
    "train:qat-w3": {"widths": [3]},
    "train:random-precision-4,3": {"widths": [4, 3], "random_precision": True},
    "train:gmp-50%-w4": {"widths": [4], "sparsity": 0.5, "prune_every": 2},
}


@pytest.mark.parametrize("case", TRAINING)
def test_training_exports_are_unchanged(case, recorded, tokenizer, tmp_path, one_thread):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny-llama")
    recipe = TrainRecipe(name=case.removeprefix("train:"), batch_size=2, seq_len=48, lr=1e-3, data="wikitext2",
                         checkpoint_every=100, **TRAINING[case])  # fmt: skip
    summary = train(lm, recipe, 4, tmp_path / "out", show_progress=False)
    containers = summary.get("containers") or {recipe.widths[0]: summary["container"]}
    for bits, path in sorted(containers.items()):
        _check(f"{case}@{bits}", Path(path), recorded)
