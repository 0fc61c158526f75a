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


def test_train_table_answers_the_qat_question_from_whatever_is_measured():
    import train_table

    ppl = {"fp base": 20.0, "qat qat-w3": 39.0, "ptq base w3-g64-gptq": 45.0, "ptq qat-w3 w3-g64-gptq": 43.0}
    lines = train_table.answers({point: {"ppl": value} for point, value in ppl.items()})
    w3 = [line for line in lines if line.startswith("- W3 g64")]
    assert len(w3) == 1 and "39.000 vs 45.000 (-13.3 %)" in w3[0] and "recovers 24 %" in w3[0]
    assert w3[0].endswith("GPTQ of the QAT checkpoint's float weights: 43.000.")
    assert train_table.answers({"fp base": {"ppl": 20.0}}) == []


def test_train_table_sets_sparse_runs_with_zeros_held_beside_the_originals_joint_sweep():
    import train_table

    ppl = {"fp base": 20.0, "fp gmp-50%": 80.0, "ptq base 50%-sparsegpt": 40.0,
           "ptq base 50%-sparsegpt+w4-g64-gptq": 50.0, "ptq gmp-50% w4-g64-gptq-keepzeros": 90.0}  # fmt: skip
    rows = {point: {"ppl": value} for point, value in ppl.items()}
    table = train_table.sparse_quantized_table(rows)
    assert table[1] == "| sparse model | sparse, float | + W4 g64 GPTQ | + W3 g64 GPTQ | + W2 g64 GPTQ |"
    assert table[-2:] == ["| original, 50% SparseGPT + GPTQ (one sweep) | 40.000 | 50.000 | – | – |",
                          "| gmp-50%, zeros held | 80.000 | 90.000 | – | – |"]  # fmt: skip
    gmp = [line for line in train_table.answers(rows) if "(gmp-50%" in line]
    assert gmp[0].endswith("+ W4 g64 GPTQ, zeros held, vs SparseGPT + GPTQ of the original 90.000 vs 50.000 (+80.0 %).")
    assert train_table.sparse_quantized_table({"fp gmp-50%": {"ppl": 80.0}}) == []


def test_train_table_matrix_quantizes_sparse_runs_with_their_zeros_held():
    import train_table

    assert train_table.matrix_point("gmp-50%", "w2-g64-gptq") == "ptq gmp-50% w2-g64-gptq-keepzeros"
    assert train_table.matrix_point("gmp-50%", "50%-sparsegpt") == "ptq gmp-50% 50%-sparsegpt"
    assert train_table.matrix_point("qat-w4", "w3-g64-gptq") == "ptq qat-w4 w3-g64-gptq"
    assert "ptq nm-2:4 w3-g64-gptq" not in train_table.DEFAULT_POINTS
