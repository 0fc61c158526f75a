"""Sweeps: grid validation, Pareto frontiers, resume after an interrupted point, a tiny end-to-end run."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from compresslm.cli import main
from compresslm.models.loading import save_model
from compresslm.models.tiny import tiny_model
from compresslm.sweep.frontier import elasticity_table, pareto
from compresslm.sweep.grid import BUILTIN, GridError, load_grid, upgrade_point_key
from compresslm.sweep.runner import run_sweep
from compresslm.sweep.store import ResultStore

TINY_GRID = {
    "name": "tiny",
    "protocol": {"ppl": {"corpus": "wikitext2", "ctx": 64, "limit": 2}, "kld": True},
    "calibration": {"samples": 4, "length": 32, "batch_size": 2},
    "points": ["none", "w8-rtn", "w4-g16-rtn", "w4-g16-gptq", "50%-wanda", "w4-g16-rtn+kv4-g16"],
}


@pytest.fixture
def model_dir(tokenizer, tmp_path):
    return str(save_model(tiny_model("llama"), tokenizer, tmp_path / "tiny"))


def test_builtin_grids_validate():
    for name in BUILTIN:
        grid = load_grid(name)
        assert grid.points and grid.points[0].recipe is None  # each starts with the uncompressed reference
    full = load_grid("full")
    labels = [p.label for p in full.points]
    assert {"w8-awq", "w2-g64-awq", "2:4-sparsegpt+w4-g64-gptq"} <= set(labels)  # RTN/GPTQ/AWQ at 8/4/3/2 bits


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"points": ["w4-rtn"], "protocl": {}}, "unknown field 'protocl'"),
        ({"points": ["w4-rtn", {"recipe": "w4-rtn", "calibraton": {}}]}, "grid point 2: unknown field 'calibraton'"),
        ({"points": ["w9-rtn"]}, "grid point 1: unknown preset 'w9-rtn'"),
        ({"points": ["w4-rtn", "w4-rtn"]}, "duplicate point labels: w4-rtn"),
        ({"points": [{"recipe": "w4-rtn", "calibration": {"samples": 0}}]}, "samples=0"),
        ({"points": [], "product": [{"recipe": "w{bits}-{method}", "bits": [4]}]}, "uses 'method'"),
        ({"points": ["none"], "protocol": {"ppl": {"ctx": 1}}}, "ctx=1"),
        ({"points": ["none"], "protocol": {"tasks": ["arc"]}}, "unknown task(s) arc"),
        ({}, "no points"),
        ({"points": [{"label": "d", "recipe": "w4-rtn", "dial": "bits=3"}]}, "need a dial recipe"),
        ({"points": [{"label": "d", "recipe": "dial", "dial": "bits=5"}]}, "outside the recipe's widths"),
        ({"points": [{"label": "d", "recipe": "dial", "dial": "bit=3"}]}, "cannot read dial setting"),
        ({"points": [{"label": "d", "recipe": "dial", "dial": "avg_bits=2"}]}, "below the narrowest width"),
        ({"points": [{"label": "d", "recipe": "dial", "dial": "bits=4,avg_bits=5"}]}, "bits or avg_bits, not both"),
    ],
)
def test_bad_grids_fail_before_compute(grid, message):
    with pytest.raises(GridError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_grid(grid)


def test_budget_points(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    grid = load_grid({**TINY_GRID, "points": [{"label": "budget", "recipe": "w4-g16-rtn", "target_bits": 9.0},
                                              "w4-g16-rtn"]})  # fmt: skip
    rows = run_sweep(model_dir, grid, tmp_path / "r.sqlite", show_progress=False, log=lambda *a: None)
    budget = next(r for r in rows if r["label"] == "budget")
    assert budget["family"] == "budget solver" and budget["bits_per_param"] <= 9.0
    assert len(set(budget["budget"]["choices"].values())) > 1
    with pytest.raises(GridError, match="target_bits"):
        load_grid({"points": [{"label": "b", "recipe": "w4-rtn", "target_bits": -1}]})


def test_budget_sparsity_of_a_point():
    point = {"label": "b", "recipe": "w4-g64-gptq", "target_bits": 3.5}
    default, dense = load_grid({"points": [point, {**point, "label": "d", "budget_sparsity": []}]}).points
    assert default.budget_sparsity is None and dense.budget_sparsity == []
    assert "budget_sparsity" not in default.key and default.key != dense.key  # earlier keys unchanged
    with pytest.raises(GridError, match=r"budget_sparsity: .*60 percent"):
        load_grid({"points": [{**point, "budget_sparsity": ["60 percent"]}]})
    with pytest.raises(GridError, match="belongs to a budget point"):
        load_grid({"points": [{"label": "w", "recipe": "w4-rtn", "budget_sparsity": []}]})


def test_grid_file_and_product(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("points: [none]\nproduct:\n  recipe: 'w{bits}-g{group}-rtn'\n  bits: [4, 3]\n  group: [32, 64]\n")
    grid = load_grid(str(path))
    assert grid.name == "g" and [p.label for p in grid.points][1:] == ["w4-g32-rtn", "w4-g64-rtn", "w3-g32-rtn",
                                                                       "w3-g64-rtn"]  # fmt: skip
    with pytest.raises(GridError, match="neither a built-in"):
        load_grid(str(tmp_path / "missing.yaml"))


def test_pareto_on_synthetic_points():
    rows = [{"label": n, "family": "f", "bits": b, "ppl": q} for n, b, q in
            [("a", 2, 50), ("b", 3, 30), ("c", 3, 35), ("d", 4, 30), ("e", 5, 21), ("f", 8, 20)]]  # fmt: skip
    assert [r["label"] for r in pareto(rows, "bits", "ppl")] == ["a", "b", "e", "f"]
    rows.append({"label": "g", "family": "h", "bits": 3, "ppl": float("nan")})  # unusable rows are ignored
    assert [r["label"] for r in pareto(rows, "bits", "ppl")] == ["a", "b", "e", "f"]
    families, cells = elasticity_table(rows, [3.0, 8.0], cost="bits")
    assert families == ["f", "h"] and cells["f"][3.0]["label"] == "b" and cells["f"][8.0]["label"] == "f"


def test_budget_points_are_held_against_every_larger_uniform_point():
    from compresslm.sweep.report import _budget_vs_uniform

    rows = [{"label": "budget-3.5", "family": "budget solver", "bytes_on_disk": 100, "ppl": 30.0},
            {"label": "w4", "family": "gptq", "bytes_on_disk": 120, "ppl": 25.0},
            {"label": "w3", "family": "gptq", "bytes_on_disk": 105, "ppl": 40.0},
            {"label": "w2", "family": "gptq", "bytes_on_disk": 90, "ppl": 20.0},  # smaller: not compared
            {"label": "dial-4", "family": "dial", "bytes_on_disk": 130, "ppl": 10.0},  # not uniform
            {"label": "none", "family": "uncompressed", "bytes_on_disk": 300, "ppl": 5.0}]  # fmt: skip
    table = _budget_vs_uniform(rows)
    assert table[2] == "| budget-3.5 | 100 | 30.00 | 2 | 1 | w4 (25.00) | w2 (20.00) |"
    assert _budget_vs_uniform(rows[1:]) == []


def test_report_has_speed_and_memory_frontiers_when_measured(tmp_path):
    from compresslm.sweep.report import write_report

    def row(label, ppl, size, tps, rss):
        return {"label": label, "family": "gptq", "model": "tiny", "model_sha": "ab" * 8, "machine": "m",
                "ppl": ppl, "bits_per_param": size / 10, "linear_bits_per_param": size / 10, "bytes_on_disk": size,
                "decode_tokens_per_s": tps, "peak_rss_bytes": rss}  # fmt: skip

    rows = [row("fast", 30.0, 40, 100.0, 2**30), row("slow", 20.0, 80, 50.0, 2**31), row("bad", 40.0, 90, 40.0, 2**32)]
    write_report(rows, tmp_path)
    text = (tmp_path / "report.md").read_text()
    speed = text.split("### Pareto frontier: decode time per token")[1].split("###")[0]
    assert "| fast |" in speed and "| slow |" in speed and "| bad |" not in speed and "100.0 | 1024 |" in speed
    assert "### Pareto frontier: peak memory (RSS) vs ppl" in text


def test_dial_points_are_held_against_dedicated_points():
    from compresslm.recipe import preset
    from compresslm.sweep.report import _dial_vs_dedicated

    dial = preset("dial").to_dict()

    def point(label, recipe, ppl, size, family="gptq", **extra):
        return {"label": label, "family": family, "recipe": preset(recipe).to_dict() if recipe else dial,
                "ppl": ppl, "bytes_on_disk": size, **extra}  # fmt: skip

    rows = [point("w4-g64-gptq", "w4-g64-gptq", 24.0, 100), point("w4-g32-gptq", "w4-g32-gptq", 23.0, 110),
            point("w4-g64-gptq+emb4", "w4-g64-gptq+emb4", 26.0, 80), point("50%-sparsegpt", "50%-sparsegpt", 40.0, 150),
            point("dial-4", None, 24.6, 105, "dial", dial={"bits": 4}, artifact_bytes=400),
            point("dial-8-50%", None, 42.0, 140, "dial sparse", dial={"bits": 8, "sparsity": 0.5}, artifact_bytes=400),
            point("dial-3", None, 45.0, 90, "dial", dial={"bits": 3}, artifact_bytes=400),
            point("50%-sparsegpt+w8 joint", "50%-sparsegpt+w8-g64-gptq", 41.0, 120, "joint"),
            point("50%-sparsegpt+w8-g64-gptq", "50%-sparsegpt+w8-g64-gptq", 42.0, 120, "joint")]  # fmt: skip
    rows[-1]["recipe"]["stages"][0]["grid_fit"] = "after"  # quantized after SparseGPT, as the dial's planes are
    for row, bits in zip(rows, (4.3, 4.6, 4.1, 9.0, 4.3, 8.3, 3.3, 5.4, 5.4), strict=True):
        row["linear_bits_per_param"] = bits
    table = _dial_vs_dedicated(rows)
    assert "| dial-4 | bits=4 | 24.600 | w4-g64-gptq | 24.000 | 1.025 | 105 | 100 |" in table
    sparse = [line for line in table if line.startswith("| dial-8-50% |")]  # the same setting first, then float16
    assert (
        "| 50%-sparsegpt+w8-g64-gptq | 42.000 | 1.000 |" in sparse[0]
        and "| 50%-sparsegpt | 40.000 | 1.050 |" in sparse[1]
    )
    assert any(line.startswith("| dial-3 |") and "| – |" in line for line in table)  # no dedicated 3-bit point
    from compresslm.sweep.report import _dial_plot

    assert _dial_plot(rows, "dial", "protocol").startswith(b"\x89PNG")
    assert _dial_plot(rows[:2], "no dial", "protocol") is None
    assert table[-1].endswith("(220 bytes): 1.82x.")


def test_tiny_sweep_end_to_end_and_resume(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    grid = load_grid(TINY_GRID)
    db = tmp_path / "r.sqlite"
    # simulate a kill in the middle of the third point: its row stays 'running'
    import compresslm.sweep.runner as runner

    real_evaluate, calls = runner._evaluate, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(runner, "_evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model_dir, grid, db, show_progress=False, log=lambda *a: None)
    store = ResultStore(db)
    assert len(store.results()) == 2 and store.unfinished() == ["w4-g16-rtn"]
    store.close()
    monkeypatch.setattr(runner, "_evaluate", real_evaluate)
    done = []
    rows = run_sweep(model_dir, grid, db, show_progress=False, log=done.append)
    assert "2 of 6 points already done" in done[0] and len(done) == 5  # 4 points redone or new
    assert [r["label"] for r in rows] == ["none", "w8-rtn", "w4-g16-rtn", "w4-g16-gptq", "50%-wanda",
                                          "w4-g16-rtn+kv4-g16"]  # fmt: skip
    by = {r["label"]: r for r in rows}
    assert by["none"]["kld_mean"] == 0.0 and by["none"]["top1_agreement"] == 1.0
    assert 0 < by["w8-rtn"]["kld_mean"] < by["w4-g16-rtn"]["kld_mean"]
    assert by["w4-g16-rtn"]["bytes_on_disk"] < by["w8-rtn"]["bytes_on_disk"]
    assert by["50%-wanda"]["linear_sparsity"] == pytest.approx(0.5)
    assert by["w4-g16-gptq"]["ppl_low"] < by["w4-g16-gptq"]["ppl"] < by["w4-g16-gptq"]["ppl_high"]
    kv = by["w4-g16-rtn+kv4-g16"]
    assert kv["family"] == "rtn +kv4" and kv["kv_bytes"] < kv["kv_bytes_fp16"]
    assert kv["eval_protocol"]["kv_cache"].startswith("K4")


def test_a_point_can_start_from_another_model_with_the_same_tokenizer(model_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    student = str(save_model(tiny_model("llama", seed=1, layers=1), tokenizer, tmp_path / "student"))
    points = ["none", {"label": "student", "recipe": "none", "model": student},
              {"label": "student-w8", "recipe": "w8-rtn", "model": student}]  # fmt: skip
    grid = load_grid({**TINY_GRID, "points": points})
    rows = {r["label"]: r for r in run_sweep(model_dir, grid, tmp_path / "r.sqlite", show_progress=False,
                                             log=lambda *a: None)}  # fmt: skip
    assert rows["none"]["kld_mean"] == 0.0 and rows["student"]["kld_mean"] > 0  # measured against the sweep's model
    assert rows["student"]["start_model"]["source"] == student and rows["student"]["family"] == "other model"
    assert rows["student-w8"]["family"] == "other model>rtn"
    assert rows["student-w8"]["bytes_on_disk"] < rows["student"]["bytes_on_disk"] < rows["none"]["bytes_on_disk"]
    log: list[str] = []
    run_sweep(model_dir, grid, tmp_path / "r.sqlite", show_progress=False, log=log.append)
    assert "3 of 3 points already done" in log[0]
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<not-in-the-sweep-model>"])
    stranger = str(save_model(tiny_model("llama", seed=2, layers=1), other, tmp_path / "stranger"))
    with pytest.raises(GridError, match="another tokenizer"):
        run_sweep(model_dir, load_grid({**TINY_GRID, "points": [{"label": "s", "recipe": "none", "model": stranger}]}),
                  tmp_path / "r.sqlite", show_progress=False, log=lambda *a: None)  # fmt: skip
    with pytest.raises(GridError, match="dial or model, not both"):
        load_grid({"points": [{"label": "d", "recipe": "dial", "dial": "bits=3", "model": student}]})


def test_points_calibrating_on_the_original_model_share_statistics(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    grid = load_grid({
        "name": "shared",
        "protocol": {"ppl": {"corpus": "wikitext2", "ctx": 64, "limit": 2}, "kld": False},
        "calibration": {"samples": 4, "length": 32, "batch_size": 2, "propagate": "original"},
        "points": ["w4-g16-gptq", "w3-g16-gptq", "50%-sparsegpt"],
    })  # fmt: skip
    rows = run_sweep(model_dir, grid, tmp_path / "r.sqlite", show_progress=False, log=lambda *a: None)
    reused = [row["calibration"]["statistics_reused"] for row in rows]
    assert reused == [False, True, True]
    assert len(list((tmp_path / "cache" / "calibration-stats").iterdir())) == 1


def test_cli_sweep_and_report(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    grid_file = tmp_path / "tiny.yaml"
    import yaml

    grid_file.write_text(yaml.safe_dump({**TINY_GRID, "points": ["none", "w8-rtn", "w4-g16-rtn"]}))
    db, out = tmp_path / "r.sqlite", tmp_path / "report"
    argv = ["sweep", model_dir, "--grid", str(grid_file), "--db", str(db), "--out", str(out), "--quiet"]
    assert main([*argv, "--containers", str(tmp_path / "clm")]) == 0
    err = capsys.readouterr().err
    assert "frontier" in err and "report.html" in err
    assert f"generate {tmp_path / 'clm'}" in err and "open it with" in err  # the best kept container
    assert (out / "report.html").exists() and (out / "report.md").exists() and list(out.glob("*.png"))
    # the terminal and report.md list the same frontier, the uncompressed point first
    printed = err.split("frontier (bytes on disk vs ppl", 1)[1].split("\nreport:", 1)[0].splitlines()[2:]
    printed = [line.split()[0] for line in printed if line.startswith("  ") and line.split()]
    table = (out / "report.md").read_text().split("### Pareto frontier: bytes on disk vs ppl", 1)[1].split("###")[0]
    listed = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert printed == listed[1:] and printed[0] == "none"
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "Pareto frontier" in page
    assert main(["report", str(db), "--out", str(tmp_path / "again")]) == 0
    assert main(["report", str(tmp_path / "none.sqlite")]) == 2
    assert main(["sweep", model_dir, "--grid", str(tmp_path / "nope.yaml"), "--db", str(db), "--json"]) == 2
    assert "neither a built-in" in capsys.readouterr().err


def test_a_point_that_cannot_be_made_is_recorded_and_the_sweep_goes_on(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    grid_file = tmp_path / "tiny.yaml"
    import yaml

    impossible = {"label": "budget-0.5", "recipe": "w4-g16-rtn", "target_bits": 0.5}
    grid_file.write_text(yaml.safe_dump({**TINY_GRID, "points": [impossible, "w8-rtn"]}))
    db, out = tmp_path / "r.sqlite", tmp_path / "report"
    assert main(["sweep", model_dir, "--grid", str(grid_file), "--db", str(db), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "budget-0.5: not measured: the budget is below the smallest possible size" in err
    store = ResultStore(db)
    assert [r["label"] for r in store.results()] == ["w8-rtn"]  # the next point was measured
    assert [f["label"] for f in store.failures()] == ["budget-0.5"] and store.unfinished() == ["budget-0.5"]
    store.close()
    assert "Points not measured" in (out / "report.md").read_text()


def test_two_sweeps_can_share_a_database(model_dir, tmp_path, monkeypatch):
    """A point another process finished while this sweep ran is skipped, not measured again."""
    import compresslm.sweep.runner as runner

    grid = load_grid({**TINY_GRID, "points": ["none", "w8-rtn", "w4-g16-rtn"]})
    db = tmp_path / "r.sqlite"
    real_measure, measured = runner._measure, []

    def measure(point, base, *args, **kwargs):
        measured.append(point.label)
        row = real_measure(point, base, *args, **kwargs)
        if point.label == "none":  # meanwhile, "another sweep" finishes the last point
            other = ResultStore(db)
            last = grid.points[-1]
            key = (base.fingerprint(), runner.machine_id(), last.key, runner._protocol_key(grid))
            assert other.claim(*key, grid.name, last.label, "") == "claimed"
            other.finish(*key, {**row, "label": last.label, "family": "rtn"})
            other.close()
        return row

    monkeypatch.setattr(runner, "_measure", measure)
    rows = run_sweep(model_dir, grid, db, show_progress=False, log=lambda *a: None)
    assert measured == ["none", "w8-rtn"] and len(rows) == 3


def test_dial_points_share_one_artifact(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    points = [{"label": f"dial-{b}", "recipe": "dial-g16", "dial": f"bits={b}"} for b in (3, 4, 8)]
    points.append({"label": "dial-4-50", "recipe": "dial-g16", "dial": "bits=4,sparsity=0.5"})
    points.append({"label": "dial-avg6", "recipe": "dial-g16", "dial": "avg_bits=6"})
    grid = load_grid({**TINY_GRID, "points": ["none", *points]})
    rows = {r["label"]: r for r in run_sweep(model_dir, grid, tmp_path / "r.sqlite", tmp_path / "c",
                                             show_progress=False, log=lambda *a: None)}  # fmt: skip
    assert len(list((tmp_path / "c").glob("dial-*.clm"))) == 1  # compressed once for every setting
    assert rows["dial-3"]["family"] == "dial" and rows["dial-4-50"]["family"] == "dial sparse"
    assert rows["dial-3"]["bytes_on_disk"] < rows["dial-4"]["bytes_on_disk"] < rows["dial-8"]["bytes_on_disk"]
    assert rows["dial-3"]["artifact_bytes"] == rows["dial-8"]["artifact_bytes"]
    assert 0.45 < rows["dial-4-50"]["linear_sparsity"] < 0.55
    # planned widths: a size between the uniform ones
    assert rows["dial-4"]["bytes_on_disk"] < rows["dial-avg6"]["bytes_on_disk"] < rows["dial-8"]["bytes_on_disk"]
    assert rows["dial-avg6"]["linear_bits_per_param"] <= 6.05


def test_example_grids_load():
    from pathlib import Path

    from compresslm.sweep.grid import load_grid

    examples = sorted((Path(__file__).parent.parent / "examples" / "grids").glob("*.yaml"))
    assert examples
    for path in examples:
        grid = load_grid(str(path))
        assert grid.points and grid.name == path.stem


SIZES = {"bits_per_param": 5.0, "linear_bits_per_param": 4.5, "linear_sparsity": 0.0, "bytes_on_disk": 10}


def test_a_remeasured_point_supersedes_its_earlier_row(tmp_path, capsys):
    """Same label, grid and protocol under a new recipe key: the report shows the latest and says so."""
    db = tmp_path / "r.sqlite"
    store = ResultStore(db)
    for key, ppl in (("old-recipe", 30.0), ("new-recipe", 20.0)):
        store.claim("sha", "machine", key, "protocol", "g", "dial-4", "")
        store.finish("sha", "machine", key, "protocol", {"label": "dial-4", "family": "rtn", "ppl": ppl,
                                                         **SIZES})  # fmt: skip
    store.claim("sha", "machine", "other", "protocol", "g", "w4", "")
    store.finish("sha", "machine", "other", "protocol", {"label": "w4", "family": "gptq", "ppl": 25.0,
                                                         **SIZES})  # fmt: skip
    assert [r["ppl"] for r in store.results()] == [30.0, 20.0, 25.0]
    latest = store.results(latest=True)
    assert sorted((r["label"], r["ppl"], r["superseded"]) for r in latest) == [("dial-4", 20.0, 1), ("w4", 25.0, 0)]
    store.close()
    assert main(["report", str(db), "--out", str(tmp_path / "rep")]) == 0
    assert "1 earlier measurement(s)" in capsys.readouterr().err
    assert "1 earlier measurement(s)" in (tmp_path / "rep" / "report.md").read_text()


def test_rows_from_an_older_kernel_release_are_found_again(tmp_path):
    """A kernel update must not make a finished sweep start over: the machine id has no release."""
    import os
    import platform

    from compresslm.sweep.store import machine_id

    path = tmp_path / "r.sqlite"
    store = ResultStore(path)
    here = f"{platform.machine()} {os.cpu_count()} cpus, {platform.system()} 6.1.0-old-build"
    elsewhere = f"{platform.machine()} {os.cpu_count() + 1} cpus, {platform.system()} 6.1.0-old-build"
    for machine in (here, elsewhere):
        store.claim("sha", machine, "point", "protocol", "g", "w4", "")
        store.finish("sha", machine, "point", "protocol", {"label": "w4", "ppl": 25.0})
    store.close()
    store = ResultStore(path)
    assert store.is_done("sha", machine_id(), "point", "protocol")
    assert platform.release() not in machine_id()
    assert {row["machine"] for row in store.results()} == {machine_id(), elsewhere}


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_claim_is_held_by_a_live_owner_and_taken_over_from_a_dead_one(tmp_path, monkeypatch):
    import compresslm.sweep.store as store_module

    store = ResultStore(tmp_path / "r.sqlite")
    key = ("sha", "machine", "point", "protocol")
    assert store.claim(*key, "g", "p", "") == "claimed"
    assert store.claim(*key, "g", "p", "") == "claimed"  # this process's own claim (a rerun after an interrupt)
    host = socket.gethostname()
    for owner, heartbeat, expected in (
        (f"{host}:1", time.time() - 10_000, "busy"),  # a live process on this host, however old its heartbeat
        (f"{host}:{_dead_pid()}", time.time(), "claimed"),  # its process is gone
        ("elsewhere:123", time.time(), "busy"),  # another host, fresh heartbeat
        ("elsewhere:123", time.time() - 2 * store_module.STALE_AFTER_S, "claimed"),  # another host, silent
        (None, None, "claimed"),  # released by an interrupted sweep
    ):
        with store.db:
            store.db.execute("UPDATE points SET owner=?, heartbeat=?", (owner, heartbeat))
        assert store.claim(*key, "g", "p", "") == expected, owner
    store.finish(*key, {"ppl": 1.0})
    assert store.claim(*key, "g", "p", "") == "done"
    store.fail(*key, "impossible")
    assert store.claim(*key, "g", "p", "9999") == "claimed"  # failed before this sweep began: tried again
    store.fail(*key, "impossible")
    assert store.claim(*key, "g", "p", "2000-01-01") == "done"  # failed during this sweep: not again
    store.close()


def test_two_sweep_processes_split_a_grid(model_dir, tmp_path):
    """Two real `compresslm sweep` processes on one database: every point measured exactly once."""
    import yaml

    points = ["none", "w8-rtn", "w4-g16-rtn", "w3-g16-rtn", "w4-g16-gptq", "w3-g16-gptq", "50%-wanda",
              "50%-magnitude"]  # fmt: skip
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(yaml.safe_dump({**TINY_GRID, "points": points}))
    db = tmp_path / "r.sqlite"
    env = {**os.environ, "COMPRESSLM_CACHE": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "compresslm.cli", "sweep", model_dir, "--grid", str(grid_file), "--db", str(db),
            "--quiet"]  # fmt: skip
    runs = [subprocess.Popen([*argv, "--out", str(tmp_path / f"report{i}")], env=env, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]  # fmt: skip
    logs = [run.communicate(timeout=600)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    measured = [line.split(":")[0].strip() for log in logs for line in log.splitlines() if ": ppl " in line]
    assert sorted(measured) == sorted(points), logs  # each point once, by one of the two
    store = ResultStore(db)
    assert len(store.results()) == len(points) and store.unfinished() == []
    store.close()


def test_point_keys_are_versioned_and_keep_only_what_differs_from_defaults():
    plain, budget = load_grid(
        {"points": ["w4-g64-gptq", {"label": "b", "recipe": "w4-g64-gptq", "target_bits": 3.5}]}
    ).points
    key = json.loads(plain.key)
    assert key == {"key_version": 2, "recipe": {"name": "w4-g64-gptq", "stages": [{"type": "quantize", "method": "gptq",
                                                                                    "group_size": 64}]}}  # fmt: skip
    assert json.loads(budget.key)["target_bits"] == 3.5
    # a field added later with its default does not change a key: the keys list only what differs
    assert "keep_zeros" not in plain.key and "separate_sparsity" not in plain.key


def test_rows_stored_under_old_keys_are_upgraded(tmp_path):
    point = load_grid({"points": ["w4-g64-rtn"]}).points[0]
    old_key = json.dumps(point.recipe.to_dict(), sort_keys=True)  # how compresslm 0.2 keyed it
    store = ResultStore(tmp_path / "r.sqlite")
    assert store.claim("sha", "machine", old_key, "protocol", "grid", "w4", "2000-01-01") == "claimed"
    store.finish("sha", "machine", old_key, "protocol", {"ppl": 1.0})
    assert store.upgrade_keys(upgrade_point_key) == 1
    assert store.is_done("sha", "machine", point.key, "protocol")
    assert store.upgrade_keys(upgrade_point_key) == 0  # current keys stay
    assert upgrade_point_key("not json") is None and upgrade_point_key(json.dumps({"stages": "x"})) is None
    store.close()


def test_the_families_grid_labels_its_lines():
    from compresslm.sweep.runner import family

    grid = load_grid("families")
    labels = {point.label: family(point) for point in grid.points}
    assert labels["20%-whitened"] == "low-rank whitened" and labels["w3-g64-gptq+lqer8"] == "gptq+lqer"
    assert labels["rot+w3-g64-gptq"] == "rotated>gptq" and labels["none"] == "uncompressed"
    assert grid.points[4].recipe.calibration.propagate == "original"
