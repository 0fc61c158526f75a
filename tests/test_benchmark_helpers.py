"""The benchmark scripts' shared helpers: results two queues can share, and the commands a table cites."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import point_runner
from results_store import add_row, load_rows


def test_add_row_keeps_rows_another_queue_wrote(tmp_path):
    path = tmp_path / "table.json"
    mine = add_row(path, "a", {"ppl": 1.0})
    add_row(path, "b", {"ppl": 2.0})  # the other queue, after this one loaded its rows
    mine = add_row(path, "c", {"ppl": 3.0})
    assert sorted(mine) == ["a", "b", "c"] and load_rows(path) == mine


def test_a_table_cites_every_command_that_measured_it():
    rows = {"x": {"command": "run --points x"}, "y": {"command": "run --points y"}, "z": {"command": "run --points x"}}
    text = point_runner.commands(rows, "run --points z")
    assert text == "Commands, in the order first run: `run --points x`; `run --points y`."
    assert point_runner.commands({"x": {}}, "run") == "Command: `run`."
    assert "1 older rows did not record theirs" in point_runner.commands({**rows, "old": {}}, "run")


def test_train_table_names_points_that_ran_with_another_thread_count():
    import train_table

    rows = {
        "fp base": {"eval_protocol": {"torch_threads": 1}, "command": "a"},
        "train x": {"command": "a"},  # no count of its own: its queue's evaluations ran with one thread
        "train y": {"command": "b"},
        "fp y": {"eval_protocol": {"torch_threads": 2}, "command": "b"},
        "train z": {"torch_threads": 1, "command": "c"},
    }
    assert train_table.threads_line(rows)[0].endswith(": 1, except 2: train y, fp y.")
    assert train_table.threads_line({"train x": {}}) == []
