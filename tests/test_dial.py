"""The dial: nested widths as code prefixes, nested sparsity, switching in place, materialized settings."""

from __future__ import annotations

import pytest
import torch

from compresslm.api import compress
from compresslm.cli import main
from compresslm.dial import materialize, parse_setting, plan_widths, set_budget
from compresslm.errors import CompressLMError
from compresslm.formats.sizes import record_nbytes
from compresslm.models.assemble import load_compressed
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import save_model
from compresslm.models.tiny import tiny_model
from compresslm.quant.gptq import GPTQOptions, gptq, hessian_from_inputs, output_error
from compresslm.quant.grid import Grid
from compresslm.quant.nested import nested_mask, nested_quantize, nested_rank, slice_record, with_alternates
from compresslm.recipe import RecipeError, preset
from compresslm.runtime.linear import CompressedLinear
from compresslm.sparse.nested import nested_sparsegpt, order_mask


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    weight = torch.randn(64, 96)
    inputs = torch.randn(1024, 96) @ (0.3 * torch.randn(96, 96) + torch.eye(96))  # correlated inputs
    return weight, hessian_from_inputs(inputs)


@pytest.mark.parametrize("calibrated", [False, True])
def test_narrower_codes_are_prefixes_and_errors_fall_with_width(layer, calibrated):
    weight, hessian = layer
    record = nested_quantize(weight, (3, 4, 8), 32, hessian if calibrated else None)
    assert record.bits == 8 and record.zeros.dtype == torch.float16
    errors = []
    for bits in (3, 4, 8):
        sliced = slice_record(record, bits)
        assert torch.equal(sliced.codes, record.codes >> (8 - bits))  # the prefix property
        assert int(sliced.codes.max()) < 1 << bits
        errors.append(output_error(weight, sliced.dequantize(), hessian))
    assert errors[0] > errors[1] > errors[2]


def test_rounding_all_at_once_matches_the_column_sweep():
    from compresslm.quant.nested import _joint_round, _joint_sweep, nested_range

    torch.manual_seed(1)
    weight = torch.randn(40, 100)  # 100 columns: a short last group of 4
    scales, zeros = nested_range(weight, 32, 8)
    identity = {"perm": torch.arange(100), "hinv": torch.eye(100), "dead": torch.zeros(100, dtype=torch.bool)}
    for widths, priorities in (((3, 4, 8), (0.5, 1.0, 0.01)), ((4, 8), (1.0, 0.002))):
        swept = _joint_sweep(weight, scales, zeros, widths, priorities, 32, identity, 128)
        assert torch.equal(_joint_round(weight, scales, zeros, widths, priorities, 32, rows_per_chunk=7), swept)


def test_nested_gptq_beats_rounding_at_the_narrow_widths(layer):
    weight, hessian = layer
    nested = nested_quantize(weight, (3, 4, 8), 32, hessian)
    rounded = nested_quantize(weight, (3, 4, 8), 32, None)
    dedicated = gptq(weight, hessian, Grid(3, "group", 32), GPTQOptions(act_order=True))
    for bits in (3, 4):
        assert output_error(weight, slice_record(nested, bits).dequantize(), hessian) < output_error(
            weight, slice_record(rounded, bits).dequantize(), hessian
        )
    # sharing codes costs the narrowest width something, but it stays near a dedicated GPTQ
    narrow = output_error(weight, slice_record(nested, 3).dequantize(), hessian)
    assert narrow < 1.6 * output_error(weight, dedicated.dequantize(), hessian)


def test_sparsity_order_is_nested(layer):
    weight, hessian = layer
    record = nested_quantize(weight, (3, 4, 8), 32, hessian)
    record.importance = torch.diagonal(hessian).sqrt().half()
    previous = None
    for sparsity in (0.0, 0.5, 0.7, 0.9, 0.98):
        mask = nested_mask(record, sparsity)
        kept = torch.ones_like(record.codes, dtype=torch.bool) if mask is None else mask
        assert int(kept.sum()) == 64 * round((1 - sparsity) * 96)
        if previous is not None:
            assert not (kept & ~previous).any()  # every kept weight was kept at the lower sparsity
        previous = kept


def test_the_cached_rank_gives_the_same_masks(layer):
    weight, hessian = layer
    record = nested_quantize(weight, (3, 4, 8), 32, hessian)
    record.importance = torch.diagonal(hessian).sqrt().half()
    rank = nested_rank(record)
    assert rank.dtype == torch.int16
    assert torch.equal(rank.sort(dim=1).values, torch.arange(96, dtype=torch.int16).expand(64, 96))  # permutations
    for sparsity in (0.3, 0.5, 0.9):
        assert torch.equal(nested_mask(record, sparsity, rank), nested_mask(record, sparsity))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: slice_record(r, 5), "not one of this weight's nested widths"),
        (lambda r: nested_mask(r, 1.5), "sparsity must be in"),
        (lambda r: nested_quantize(torch.randn(8, 16), (4, 9), 8), "distinct bit widths in 2..8"),
        (lambda r: nested_quantize(torch.randn(8, 16), (4,), 8), "at least two"),
    ],
)
def test_bad_settings_are_refused(layer, call, message):
    record = nested_quantize(layer[0], (3, 4, 8), 32)
    with pytest.raises(CompressLMError, match=message):
        call(record)


def test_a_separate_width_is_the_dedicated_quantization(layer):
    weight, hessian = layer
    chain = nested_quantize(weight, (4, 8), 32, hessian, priorities=tuple(preset("dial").stages[0].nested_priorities))
    dedicated = gptq(weight, hessian, Grid(3, "group", 32), GPTQOptions(act_order=True))
    record = with_alternates(chain, [dedicated])
    assert record.meta["dial"]["widths"] == [3, 4, 8] and record.meta["dial"]["chain"] == [4, 8]
    three = slice_record(record, 3)
    assert torch.equal(three.dequantize(), dedicated.dequantize()) and three.meta["dial"]["active"] == 3
    assert torch.equal(slice_record(record, 4).codes, record.codes >> 4)
    # a 4-bit-first chain serves 4 bits better than the chain that also carries 3 bits
    shared = nested_quantize(weight, (3, 4, 8), 32, hessian)
    four = [output_error(weight, slice_record(r, 4).dequantize(), hessian) for r in (record, shared)]
    assert four[0] < four[1]
    with pytest.raises(CompressLMError, match="repeat a width"):
        with_alternates(chain, [dedicated, dedicated])
    with pytest.raises(CompressLMError, match="outside"):
        with_alternates(chain, [gptq(weight, hessian, Grid(4, "group", 32))])


def test_nested_sparse_masks_are_prefixes_and_beat_the_fixed_order(layer):
    weight, hessian = layer
    grid = Grid(8, "group", 32)
    plane = nested_sparsegpt(weight, hessian, (0.5, 0.7), (1.0, 0.5), grid, block_size=64)
    assert plane.order.dtype == torch.uint8 and plane.meta["dial"]["order_block"] == 64
    previous = None
    for sparsity in (0.0, 0.3, 0.5, 0.6, 0.7, 0.9):
        mask = order_mask(plane, sparsity)
        kept = torch.ones_like(plane.codes, dtype=torch.bool) if mask is None else mask
        assert int(kept[:, :64].sum()) == 64 * round((1 - sparsity) * 64)  # per row, per block of 64 columns
        assert int(kept[:, 64:].sum()) == 64 * round((1 - sparsity) * 32)  # the shorter last block
        if previous is not None:
            assert not (kept & ~previous).any()
        previous = kept
    # at its levels, the updated values beat pruning the weights by a fixed order without updates
    record = nested_quantize(weight, (4, 8), 32, hessian)
    record.importance = torch.diagonal(hessian).sqrt().half()
    for sparsity in (0.5, 0.7):
        fixed = record.dequantize() * nested_mask(record, sparsity)
        updated = plane.dequantize() * order_mask(plane, sparsity)
        assert output_error(weight, updated, hessian) < output_error(weight, fixed, hessian)
    with pytest.raises(CompressLMError, match="increasing ratios"):
        nested_sparsegpt(weight, hessian, (0.7, 0.5), (1.0, 1.0), grid)
    with pytest.raises(CompressLMError, match="leaves no weight"):
        order_mask(plane, 0.999)


def test_dial_recipe_validation():
    stage = preset("dial").stages[0]
    assert (stage.nested_widths, stage.separate_widths) == ([4, 8], [3])
    assert preset("dial-shared").stages[0].nested_widths == [3, 4, 8]
    assert preset("dial-g32-rtn").stages[0].separate_widths == []
    quantize = stage.__class__
    with pytest.raises(RecipeError, match="separate_widths"):
        quantize(method="gptq", bits=8, nested_widths=[4, 8], separate_widths=[4]).validate("stage")
    with pytest.raises(RecipeError, match="belong to a dial"):
        quantize(method="gptq", bits=8, separate_widths=[3]).validate("stage")
    with pytest.raises(RecipeError, match="needs method gptq"):
        quantize(method="rtn", bits=8, nested_widths=[4, 8], dial_sparsity=[0.5]).validate("stage")
    with pytest.raises(RecipeError, match="dial_sparsity: nested sparsity levels"):
        quantize(method="gptq", bits=8, nested_widths=[4, 8], dial_sparsity=[0.5, 1.2]).validate("stage")
    with pytest.raises(RecipeError, match="must end at bits=4"):
        preset("w4-g16-gptq").stages[0].__class__(method="gptq", bits=4, nested_widths=[3, 8]).validate("stage")
    with pytest.raises(RecipeError, match="do not combine with a pruning stage"):
        preset("dial+50%-wanda")
    assert stage.separate_sparsity == [0.5, 0.7]
    with pytest.raises(RecipeError, match="separate_sparsity prunes with SparseGPT"):
        quantize(method="rtn", bits=8, nested_widths=[4, 8], separate_sparsity=[0.5]).validate("stage")
    with pytest.raises(RecipeError, match="separate_sparsity: nested sparsity levels"):
        quantize(method="gptq", bits=8, nested_widths=[4, 8], separate_sparsity=[0.7, 0.5]).validate("stage")
    with pytest.raises(RecipeError, match="belong to a dial"):
        quantize(method="gptq", bits=8, separate_sparsity=[0.5]).validate("stage")


def test_recipes_without_pruned_ratios_keep_their_text():
    """A field added later is left out while empty: recipes and sweep keys written before stay the same."""
    assert "separate_sparsity" not in preset("w4-g64-gptq").to_dict()["stages"][0]
    assert "grid_fit" not in preset("50%-sparsegpt").to_dict()["stages"][0]
    assert preset("dial").to_dict()["stages"][0]["separate_sparsity"] == [0.5, 0.7]


def test_pruned_alternates_are_checked(layer):
    weight, hessian = layer
    chain = nested_quantize(weight, (4, 8), 16, hessian)
    pruned = gptq(weight, hessian, Grid(8, "group", 16, False), GPTQOptions())
    pruned = pruned.__class__(**{**pruned.__dict__, "mask": weight.abs() > 0.5, "meta": {"dial": {}}})
    with pytest.raises(CompressLMError, match="name its ratio"):
        with_alternates(chain, [pruned])
    named = pruned.__class__(**{**pruned.__dict__, "meta": {"dial": {"sparsity": 0.6}}})
    with pytest.raises(CompressLMError, match="repeat"):
        with_alternates(chain, [named, named])
    record = with_alternates(chain, [named])
    assert record.meta["dial"]["widths"] == [4, 8] and slice_record(record, 8) is record


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from compresslm.models.tiny import byte_tokenizer

    path = tmp_path_factory.mktemp("dial") / "tiny.dial.clm"
    lm = LoadedModel.from_module(tiny_model("llama", layers=2), byte_tokenizer(), name="tiny")
    recipe = preset("dial-g16")
    recipe.calibration.samples, recipe.calibration.length = 4, 32
    compressed, _, _ = compress(lm, recipe, path, show_progress=False)
    return path, compressed


def test_artifact_reloads_at_its_widest_width_bit_exactly(artifact):
    path, compressed = artifact
    reloaded = load_compressed(path)
    record = next(iter(reloaded.compressed.values()))
    assert record.bits == 8 and record.importance is not None
    ids = torch.arange(40)[None] % 200
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, compressed.model(ids).logits)
        for lm in (reloaded, compressed):  # sparse settings come from the nested-sparse plane, order included
            set_budget(lm, 8, 0.6)
        assert torch.equal(reloaded.model(ids).logits, compressed.model(ids).logits)
    layer = next(m for m in reloaded.model.modules() if isinstance(m, CompressedLinear))
    assert layer.compressed.meta["algorithm"] == "nested-sparsegpt" and 0.55 < layer.compressed.sparsity < 0.65
    set_budget(reloaded, 8, 0.3)  # below the plane's lowest level: the fixed order on the dense codes
    assert layer.compressed.meta["algorithm"] != "nested-sparsegpt" and 0.25 < layer.compressed.sparsity < 0.35
    set_budget(compressed, 8)


def test_switching_in_memory_equals_the_materialized_container(artifact, tmp_path):
    path, _ = artifact
    lm = load_compressed(path)
    ids = torch.arange(48)[None] % 200
    for bits, sparsity in ((8, 0.0), (4, 0.0), (3, 0.0), (4, 0.5), (8, 0.5), (8, 0.75)):
        report = set_budget(lm, bits, sparsity)
        assert report.bits == {bits: report.layers} and report.seconds >= 0
        materialize(path, tmp_path / f"{bits}-{sparsity}.clm", bits, sparsity)
        fixed = load_compressed(tmp_path / f"{bits}-{sparsity}.clm")
        with torch.no_grad():
            assert torch.equal(lm.model(ids).logits, fixed.model(ids).logits)
        assert not any(isinstance(m, CompressedLinear) and m.nested is not None for m in fixed.model.modules())
    sizes = {b: (tmp_path / f"{b}-0.0.clm").stat().st_size for b in (3, 4, 8)}
    assert sizes[3] < sizes[4] < sizes[8]


def test_per_layer_budgets_and_bad_settings(artifact):
    path, _ = artifact
    lm = load_compressed(path)
    name = next(n for n, m in lm.model.named_modules() if isinstance(m, CompressedLinear))
    report = set_budget(lm, {name: 3})
    assert lm.model.get_submodule(name).compressed.bits == 3 and report.bits[3] == 1
    with pytest.raises(CompressLMError, match="9 bits is not a width"):
        set_budget(lm, 9)
    with pytest.raises(CompressLMError, match="sparsity must be in"):
        set_budget(lm, 4, 1.5)
    before = {n: m.compressed for n, m in lm.model.named_modules() if isinstance(m, CompressedLinear)}
    with pytest.raises(CompressLMError, match="leaves no weight"):
        set_budget(lm, 4, 0.999)  # refused before any layer is switched
    assert all(m.compressed is before[n] for n, m in lm.model.named_modules() if isinstance(m, CompressedLinear))
    with pytest.raises(CompressLMError, match="no dial layer named"):
        set_budget(lm, {"model.nowhere": 4})
    with pytest.raises(CompressLMError, match="cannot read dial setting"):
        parse_setting("bits=3,width=2")


def test_planned_widths_fit_the_average_and_trade_error_for_bits(artifact, tmp_path):
    path, _ = artifact
    lm = load_compressed(path)
    layers = {n: m for n, m in lm.model.named_modules() if isinstance(m, CompressedLinear)}
    params = sum(m.nested.codes.numel() for m in layers.values())

    def bits_of(plan: dict[str, int]) -> float:
        stored = sum(record_nbytes(slice_record(layers[n].nested, b), aligned=False) for n, b in plan.items())
        return 8 * stored / params

    plans = {}
    for avg in (4.5, 6.0, 8.5, 10.5):
        plans[avg] = plan_widths(lm, avg)
        assert set(plans[avg]) == set(layers) and bits_of(plans[avg]) <= avg
    assert set(plans[10.5].values()) == {8}  # room for everything: the widest width throughout
    assert sum(plans[6.0].values()) < sum(plans[8.5].values()) < sum(plans[10.5].values())
    assert len(set(plans[6.0].values())) > 1  # a size between two widths mixes them
    with pytest.raises(CompressLMError, match="below this artifact's narrowest setting"):
        plan_widths(lm, 2.0)
    report, summary = materialize(path, tmp_path / "avg6.clm", avg_bits=6.0)
    assert sum(report.bits.values()) == len(layers)
    assert summary["linear_bits_per_param"] <= 6.0 + 0.05  # padding of each blob to 64 bytes aside
    with pytest.raises(CompressLMError, match="either bits or avg_bits"):
        materialize(path, tmp_path / "both.clm", bits=4, avg_bits=6.0)


def test_cli_dial_per_layer_widths(artifact, tmp_path, capsys):
    import json

    path, _ = artifact
    name = next(n for n, m in load_compressed(path).model.named_modules() if isinstance(m, CompressedLinear))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({name: 3}))
    assert main(["dial", str(path), "--bits-per-layer", str(plan), "-o", str(tmp_path / "one.clm")]) == 0
    assert "1 layers at 3 bits" in capsys.readouterr().err
    assert load_compressed(tmp_path / "one.clm").model.get_submodule(name).compressed.bits == 3
    assert main(["dial", str(path), "--avg-bits", "6", "-o", str(tmp_path / "avg.clm")]) == 0
    assert main(["eval", str(path), "--dial", "avg_bits=6", "--ppl", "wikitext2", "--ctx", "64", "--limit", "1",
                 "--quiet"]) == 0  # fmt: skip
    plan.write_text(json.dumps({name: "three"}))
    assert main(["dial", str(path), "--bits-per-layer", str(plan), "-o", str(tmp_path / "bad.clm")]) == 2
    assert "module path -> bits" in capsys.readouterr().err
    assert main(["dial", str(path), "--bits-per-layer", str(tmp_path / "none.json"), "-o", str(tmp_path / "x")]) == 2


def test_a_plain_container_has_no_dial(tiny_lm, tmp_path):
    compress(tiny_lm, "w4-g16-rtn", tmp_path / "plain.clm", show_progress=False)
    with pytest.raises(CompressLMError, match="no dial layers"):
        set_budget(load_compressed(tmp_path / "plain.clm"), 4)


def test_cli_dial_and_eval(tokenizer, tmp_path, capsys):
    source = str(save_model(tiny_model("llama", layers=2), tokenizer, tmp_path / "tiny"))
    artifact = str(tmp_path / "a.clm")
    common = ["--calib-samples", "4", "--calib-len", "32", "--quiet"]
    assert main(["compress", source, "--recipe", "dial-g16-rtn", "-o", artifact, *common]) == 0
    assert main(["dial", artifact, "--bits", "3", "--sparsity", "0.5", "-o", str(tmp_path / "b3.clm")]) == 0
    assert "layers at 3 bits" in capsys.readouterr().err
    assert main(["eval", artifact, "--dial", "bits=4", "--ppl", "wikitext2", "--ctx", "64", "--limit", "1",
                 "--json", "--quiet"]) == 0  # fmt: skip
    assert '"dial"' in capsys.readouterr().out
    assert main(["eval", artifact, "--dial", "bits=five", "--ppl", "wikitext2"]) == 2


def _nbytes(header: dict, entry: dict, skip: tuple[str, ...] = ()) -> int:
    blobs = ("codes", "scales", "zeros", "mask", "importance", "order")
    keys = [entry[k] for k in blobs if entry.get(k) and k not in skip]
    return sum(header["blobs"][key]["nbytes"] for key in keys + entry.get("code_planes", []))


def test_a_low_budget_reads_only_what_it_needs(artifact):
    path, _ = artifact
    full = load_compressed(path)
    header, linears = full.container, full.container["linears"].values()
    ids = torch.arange(40)[None] % 200
    # 4 bits: the first four bit planes of the shared chain, not its deeper planes, the 3-bit codes
    # or the nested-sparse plane
    low = load_compressed(path, dial_bits=4)
    deeper = sum(header["blobs"][key]["nbytes"] for e in linears for key in e["code_planes"][4:])
    separate = sum(_nbytes(header, alt) for e in linears for alt in e["alternates"])
    assert full.bytes_read - low.bytes_read == deeper + separate
    set_budget(full, 4)
    with torch.no_grad():
        assert torch.equal(low.model(ids).logits, full.model(ids).logits)
    with pytest.raises(CompressLMError, match="not a width"):
        set_budget(low, 8)  # wider than what was read
    # 3 bits: its own codes (and the calibration norms), nothing of the shared chain or the sparse plane
    three = load_compressed(path, dial_bits=3)
    chain = sum(_nbytes(header, e, skip=("importance",)) for e in linears)
    chain += sum(_nbytes(header, a) for e in linears for a in e["alternates"] if a.get("order") or a.get("mask"))
    assert full.bytes_read - three.bytes_read == chain
    set_budget(full, 3)
    with torch.no_grad():
        assert torch.equal(three.model(ids).logits, full.model(ids).logits)
    with pytest.raises(CompressLMError, match="not a width of this artifact"):
        load_compressed(path, dial_bits=5)


def test_the_chain_calibrates_on_its_own_stream(artifact, tmp_path):
    """The 4-bit setting equals a dial of the 4/8 chain alone, which propagates at 4 bits."""
    from compresslm.models.tiny import byte_tokenizer
    from compresslm.recipe import Recipe

    path, _ = artifact
    lm = LoadedModel.from_module(tiny_model("llama", layers=2), byte_tokenizer(), name="tiny")
    stage = {"method": "gptq", "bits": 8, "group_size": 16, "nested_widths": [4, 8], "nested_priorities": [1.0, 0.002]}
    recipe = Recipe.from_dict({"stages": [stage], "calibration": {"samples": 4, "length": 32}})
    chain, result, _ = compress(lm, recipe, tmp_path / "chain.clm", show_progress=False)
    assert "dial_streams" not in result.calibration
    dial = load_compressed(path)
    assert dial.container["calibration"]["dial_streams"]["chain"] == [4]
    set_budget(dial, 4)
    set_budget(chain, 4)
    ids = torch.arange(40)[None] % 200
    with torch.no_grad():
        assert torch.equal(dial.model(ids).logits, chain.model(ids).logits)


def test_the_3_bit_setting_is_the_dedicated_gptq_model(artifact, tmp_path):
    from compresslm.models.tiny import byte_tokenizer

    path, _ = artifact
    lm = LoadedModel.from_module(tiny_model("llama", layers=2), byte_tokenizer(), name="tiny")
    recipe = preset("w3-g16-gptq")
    recipe.calibration.samples, recipe.calibration.length = 4, 32
    dedicated, _, _ = compress(lm, recipe, tmp_path / "w3.clm", show_progress=False)
    dial = load_compressed(path)
    set_budget(dial, 3)
    ids = torch.arange(40)[None] % 200
    with torch.no_grad():
        assert torch.equal(dial.model(ids).logits, dedicated.model(ids).logits)


def test_a_pruned_ratio_is_the_dedicated_sparsegpt_model(artifact, tmp_path):
    """8 bits at 50 %: exactly SparseGPT 50 % then GPTQ W8 on its mask, calibrated on its own 50 %-sparse stream."""
    from compresslm.models.tiny import byte_tokenizer

    path, _ = artifact
    lm = LoadedModel.from_module(tiny_model("llama", layers=2), byte_tokenizer(), name="tiny")
    recipe = preset("50%-sparsegpt+w8-g16-gptq")
    recipe.stages[0].grid_fit = "after"  # as the dial quantizes its pruned planes
    recipe.calibration.samples, recipe.calibration.length = 4, 32
    dedicated, _, _ = compress(lm, recipe, tmp_path / "s50.clm", show_progress=False)
    dial = load_compressed(path)
    assert dial.container["calibration"]["dial_streams"]["pruned ratios"] == [0.5, 0.7]
    set_budget(dial, 8, 0.5)
    ids = torch.arange(40)[None] % 200
    with torch.no_grad():
        assert torch.equal(dial.model(ids).logits, dedicated.model(ids).logits)
    layer = next(m for m in dial.model.modules() if isinstance(m, CompressedLinear))
    assert layer.compressed.meta["algorithm"] != "nested-sparsegpt"
    set_budget(dial, 8, 0.6)  # between the pruned ratios: the nested-sparse plane
    assert layer.compressed.meta["algorithm"] == "nested-sparsegpt"


def test_dial_metadata_is_a_typed_record_with_the_stored_form():
    from compresslm.compressed import DialMeta, InvalidCompressedWeight

    plane = DialMeta(widths=(8,), active=8, sparse=True, levels=(0.5, 0.7), priorities=(1.0, 0.5), order_block=64)
    stored = plane.to_dict()
    assert stored == {"widths": [8], "priorities": [1.0, 0.5], "active": 8, "sparse": True, "levels": [0.5, 0.7],
                      "order_block": 64}  # fmt: skip
    assert DialMeta.of({"dial": stored}) == plane and DialMeta.of({}) is None
    assert DialMeta(widths=(3, 4, 8)).chain_widths == (3, 4, 8)
    assert DialMeta(widths=(3, 4, 8), chain=(4, 8)).chain_widths == (4, 8)
    with pytest.raises(InvalidCompressedWeight, match="unknown fields"):
        DialMeta.of({"dial": {"widths": [4], "path": "/etc/passwd"}})
