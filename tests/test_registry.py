"""A method added by one options class and one registration runs end to end: no edits to the engine,
the container or the runtime (the steps of docs/architecture.md, "How to add a method")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

from compresslm.api import compress
from compresslm.compressed import CompressedWeight, InvalidCompressedWeight
from compresslm.data.calibration import calibration_windows
from compresslm.formats.container import read_header
from compresslm.formats.sizes import record_nbytes
from compresslm.models.assemble import load_compressed
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_model
from compresslm.recipe import STAGES, RecipeError, load_recipe, register_stage
from compresslm.recipe.fields import Targeted, check_bits


@dataclass
class HalfPrecisionStage(Targeted):
    """A toy linear method: store the weight (or what the stages before made of it) in float16,
    scaled by `factor`; `tag` is written into the record's meta."""

    factor: float = 1.0
    tag: str = "half"
    targets: list[str] = field(default_factory=lambda: ["all"])
    ignore: list[str] = field(default_factory=list)
    type: str = "test_half"

    needs_calibration = False

    def validate(self, where: str) -> None:
        if self.factor <= 0:
            raise RecipeError(f"{where}: factor={self.factor} is not allowed; use a positive number")
        self.check_targets(where)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return f"float16 x{self.factor:g}"


def half_precision(stage: HalfPrecisionStage, weight, record, hessian) -> CompressedWeight:
    source = weight if record is None else record.dequantize()
    made_by = f"{record.bits} bits" if record is not None else None
    return CompressedWeight.unquantized(source * stage.factor, meta={"tag": stage.tag, "after": made_by})


@dataclass
class ScaleEmbeddingStage:
    """A toy model transform: scale the token embedding before calibration."""

    factor: float = 2.0
    type: str = "test_scale_embedding"

    def validate(self, where: str) -> None:
        check_bits(where, 4)  # the shared checks are there to use

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def scale_embedding(stage: ScaleEmbeddingStage, lm: LoadedModel) -> dict:
    with torch.no_grad():
        lm.model.get_input_embeddings().weight.mul_(stage.factor)
    return {"factor": stage.factor}


register_stage("test_half", HalfPrecisionStage, "linear", half_precision)
register_stage("test_scale_embedding", ScaleEmbeddingStage, "model", scale_embedding)


def test_a_registered_linear_method_compresses_saves_and_reloads(tokenizer, tmp_path):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    expected = lm.model.get_submodule("model.layers.0.mlp.down_proj").weight.detach().clone() * 0.5
    recipe = {"stages": [{"type": "test_half", "factor": 0.5, "targets": ["down"]}]}
    _, result, summary = compress(lm, recipe, tmp_path / "m.clm", show_progress=False)
    assert set(result.weights) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    record = result.weights["model.layers.0.mlp.down_proj"]
    assert torch.equal(record.values, expected.to(torch.float16)) and record.meta["tag"] == "half"
    assert (result.layers[0].method, result.layers[0].grid) == ("test_half", "float16 x0.5")
    reloaded = load_compressed(tmp_path / "m.clm")
    assert torch.equal(reloaded.compressed["model.layers.0.mlp.down_proj"].values, record.values)
    assert summary["recipe"]["stages"][0]["factor"] == 0.5


def test_a_registered_stage_runs_after_the_built_in_ones_on_their_record(tokenizer):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    recipe = {"stages": [{"type": "test_half", "tag": "after-rtn"}, {"method": "rtn", "bits": 4, "group_size": 16}]}
    _, result, _ = compress(lm, recipe, show_progress=False)
    record = next(iter(result.weights.values()))
    assert record.meta == {"tag": "after-rtn", "after": "4 bits"}  # the RTN record came first, as the docs say
    assert result.layers[0].method == "rtn>test_half"


def test_a_registered_model_transform_runs_before_calibration(tokenizer):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    before = lm.model.get_input_embeddings().weight.detach().clone()
    recipe = {"stages": [{"type": "test_scale_embedding", "factor": 2.0}, {"method": "rtn", "group_size": 16}]}
    _, result, _ = compress(lm, recipe, show_progress=False)
    after = lm.model.get_input_embeddings().weight.detach()
    assert torch.allclose(after, (before * 2).to(torch.float16).float())  # then rounded to the dense dtype
    assert result.info["model_transforms"] == {"test_scale_embedding": {"factor": 2.0}}


def test_registered_options_are_validated_like_built_in_ones():
    with pytest.raises(RecipeError, match=r"stage 1 \(test_half\): factor=-1.0 is not allowed"):
        load_recipe({"stages": [{"type": "test_half", "factor": -1}]})
    with pytest.raises(RecipeError, match="unknown field 'bits'"):
        load_recipe({"stages": [{"type": "test_half", "bits": 4}]})
    with pytest.raises(RecipeError, match=r"type='nope' is not allowed; choose one of .*test_half"):
        load_recipe({"stages": [{"type": "nope"}]})


def test_registration_refuses_what_the_engine_could_not_run():
    @dataclass
    class NoType:
        def validate(self, where: str) -> None: ...

    @dataclass
    class Untargeted:
        type: str = "test_untargeted"

        def validate(self, where: str) -> None: ...

    with pytest.raises(ValueError, match="need a field `type"):
        register_stage("test_no_type", NoType, "linear", half_precision)
    with pytest.raises(ValueError, match="applies_to"):
        register_stage("test_untargeted", Untargeted, "linear", half_precision)
    with pytest.raises(ValueError, match="needs an apply function"):
        register_stage("test_untargeted", Untargeted, "model")
    impostor = dataclasses.make_dataclass(
        "Impostor", [("type", str, field(default="quantize"))], bases=(HalfPrecisionStage,)
    )
    with pytest.raises(ValueError, match="registered already"):
        register_stage("quantize", impostor, "linear", half_precision)
    with pytest.raises(ValueError, match="role"):
        register_stage("test_half", HalfPrecisionStage, "block", half_precision)
    assert STAGES["quantize"].apply is None and STAGES["test_half"].apply is half_precision


@dataclass
class ResidualFactorsStage(Targeted):
    """A toy error-compensation stage: the rank-`rank` SVD of what the stages before left out."""

    rank: int = 2
    targets: list[str] = field(default_factory=lambda: ["all"])
    ignore: list[str] = field(default_factory=list)
    type: str = "test_residual_factors"

    needs_calibration = False

    def validate(self, where: str) -> None:
        if self.rank < 1:
            raise RecipeError(f"{where}: rank={self.rank} is not allowed; use a positive rank")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def residual_factors(stage: ResidualFactorsStage, weight, record, hessian) -> CompressedWeight:
    u, s, vh = torch.linalg.svd(weight - record.dequantize(), full_matrices=False)
    a = (u[:, : stage.rank] * s[: stage.rank]).half()
    return dataclasses.replace(record, lowrank=(a, vh[: stage.rank].half()))


register_stage("test_residual_factors", ResidualFactorsStage, "linear", residual_factors)


def test_low_rank_factors_are_stored_counted_and_reloaded(tokenizer, tmp_path):
    rtn_only = {"stages": [{"method": "rtn", "bits": 3, "group_size": 16}], "calibration": {"samples": 4, "length": 32}}
    with_factors = {**rtn_only, "stages": [*rtn_only["stages"], {"type": "test_residual_factors", "rank": 4}]}
    results = {}
    for label, recipe in (("rtn", rtn_only), ("factors", with_factors)):
        lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
        original = {i.name: i.module.weight.detach().clone() for i in lm.layout.linears()}
        calibration = load_recipe(recipe).calibration
        windows = calibration_windows(tokenizer, "wikitext2", calibration.samples, calibration.length, 0)
        _, result, summary = compress(lm, recipe, tmp_path / f"{label}.clm", calibration=windows, show_progress=False)
        error = sum(float((original[n] - r.dequantize()).pow(2).sum()) for n, r in result.weights.items())
        results[label] = (result, summary, error)
    result, summary, error = results["factors"]
    assert error < results["rtn"][2]  # the factors take back part of the rounding error
    reloaded = load_compressed(tmp_path / "factors.clm")
    for name, record in result.weights.items():
        a, b = reloaded.compressed[name].lowrank
        assert torch.equal(a, record.lowrank[0]) and torch.equal(b, record.lowrank[1])
        assert torch.equal(reloaded.compressed[name].dequantize(), record.dequantize())
    header, _ = read_header(tmp_path / "factors.clm")
    stored = sum(header["blobs"][k]["nbytes"] for e in header["linears"].values() for k in e["lowrank"])
    assert stored == sum(2 * r.lowrank[0].numel() + 2 * r.lowrank[1].numel() for r in result.weights.values())
    extra = sum(record_nbytes(r, aligned=False) for r in result.weights.values()) - sum(
        record_nbytes(r, aligned=False) for r in results["rtn"][0].weights.values()
    )
    assert extra == stored
    assert summary["linear_bits_per_param"] > results["rtn"][1]["linear_bits_per_param"]


def test_low_rank_factors_of_the_wrong_shape_are_refused():
    values = torch.zeros(8, 6, dtype=torch.float16)
    with pytest.raises(InvalidCompressedWeight, match="low-rank factors must be"):
        CompressedWeight(
            shape=(8, 6), bits=16, group_size=6, symmetric=True, codes=None, scales=None, zeros=None,
            values=values, lowrank=(torch.zeros(8, 2, dtype=torch.float16), torch.zeros(3, 6, dtype=torch.float16)),
        )  # fmt: skip
