"""Sweeps on a real local Ray cluster (started by the tests): same rows as the local executor, a killed
worker's point retried without loss or duplicates, two drivers on one database splitting the points."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from compresslm.models.loaded import LoadedModel  # noqa: E402
from compresslm.models.loading import save_model  # noqa: E402
from compresslm.models.tiny import byte_tokenizer, tiny_model  # noqa: E402
from compresslm.sweep.grid import load_grid  # noqa: E402
from compresslm.sweep.runner import run_sweep  # noqa: E402
from compresslm.sweep.store import ResultStore  # noqa: E402

GRID = {
    "name": "ray-test",
    "protocol": {"ppl": {"corpus": "wikitext2", "ctx": 64, "limit": 2}},
    "calibration": {"samples": 4, "length": 32, "source": "wikitext2"},
    "points": ["none", "w8-rtn", "w4-g32-rtn", "w4-g32-gptq", "50%-wanda"],
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ray-cache")
    os.environ["COMPRESSLM_CACHE"] = str(cache)  # inherited by the workers the cluster starts
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.pop("COMPRESSLM_CACHE", None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    save_model(LoadedModel.from_module(tiny_model("llama"), byte_tokenizer(), name="tiny"), None, path)
    return path


def _rows(db) -> dict[str, dict]:
    store = ResultStore(db)
    try:
        return {r["label"]: r for r in store.results("ray-test")}
    finally:
        store.close()


def test_the_ray_executor_writes_the_rows_the_local_one_does(cluster, model_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray workers compute with 1 thread each (one CPU per point)
    try:
        local = run_sweep(
            model_dir, load_grid(GRID), tmp_path / "local.sqlite", show_progress=False, log=lambda m: None
        )
    finally:
        torch.set_num_threads(threads)
    remote = run_sweep(model_dir, load_grid(GRID), tmp_path / "ray.sqlite", show_progress=False, log=lambda m: None,
                       executor="ray")  # fmt: skip
    assert sorted(r["label"] for r in local) == sorted(r["label"] for r in remote) == sorted(GRID["points"])
    by_label = {r["label"]: r for r in local}
    for row in remote:  # (file sizes differ by a few header bytes: the header records the compression's time)
        assert row["ppl"] == by_label[row["label"]]["ppl"], row["label"]
        assert row["linear_bits_per_param"] == by_label[row["label"]]["linear_bits_per_param"]
    assert {r["executor"]["kind"] for r in remote if r["label"] != "none"} == {"ray"}


def _kill_first_worker(found: list[tuple[int, float]], stop: threading.Event) -> None:
    """SIGKILL the first Ray worker seen running a sweep point (its process title names the task); its pid and
    the time of the kill go into `found`."""
    while not stop.is_set() and not found:
        out = subprocess.run(["pgrep", "-f", "ray::_measure_remote"], capture_output=True, text=True).stdout.split()
        if out:
            pid = int(out[0])
            os.kill(pid, signal.SIGKILL)
            found.append((pid, time.time()))
        time.sleep(0.02)


def test_a_killed_worker_is_retried_and_nothing_is_lost_or_duplicated(cluster, model_dir, tmp_path):
    killed: list[tuple[int, float]] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_worker, args=(killed, stop), daemon=True)
    killer.start()
    try:
        rows = run_sweep(model_dir, load_grid(GRID), tmp_path / "k.sqlite", show_progress=False, log=lambda m: None,
                         executor="ray")  # fmt: skip
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was seen running a point"
    assert sorted(r["label"] for r in rows) == sorted(GRID["points"])  # every point once
    pid, at = killed[0]
    done = [r["executor"] for r in rows if "executor" in r]
    # the killed worker may have finished points before it died, none after; the point it was running is retried
    assert all(e["finished"] < at for e in done if e["pid"] == pid)
    assert any(e["finished"] > at and e["pid"] != pid for e in done)
    store = ResultStore(tmp_path / "k.sqlite")
    assert store.unfinished() == [] and store.failures("ray-test") == []
    store.close()


def test_two_drivers_on_one_database_split_the_points(cluster, model_dir, tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(GRID))
    db = str(tmp_path / "shared.sqlite")
    command = [sys.executable, "-m", "compresslm.cli", "sweep", str(model_dir), "--grid", str(grid), "--db", db,
               "--executor", "ray", "--address", cluster, "--json", "--quiet"]  # fmt: skip
    drivers = [subprocess.Popen([*command, "--out", str(tmp_path / f"report{i}")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
    outputs = [driver.communicate(timeout=600) for driver in drivers]
    assert [d.returncode for d in drivers] == [0, 0], [err[-2000:] for _, err in outputs]
    rows = _rows(tmp_path / "shared.sqlite")
    assert sorted(rows) == sorted(GRID["points"])
    store = ResultStore(tmp_path / "shared.sqlite")
    results = store.results("ray-test", latest=False)
    store.close()
    assert len(results) == len(GRID["points"])  # measured once each, by one driver or the other


def test_bad_executor_arguments_fail_before_anything_loads(tmp_path, capsys):
    from compresslm.cli import main

    code = main(["sweep", "nosuchmodel", "--grid", "smoke", "--db", str(tmp_path / "x.sqlite"), "--address", "auto"])
    assert code == 2 and "--executor ray" in capsys.readouterr().err
