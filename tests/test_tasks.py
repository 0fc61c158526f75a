"""Task loaders on real rows of each format, malformed rows, and log-likelihood scoring on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compresslm.errors import DataError
from compresslm.eval.harness import evaluate_task, expected_calibration_error, loglikelihoods
from compresslm.eval.stats import mean_stderr
from compresslm.eval.tasks import ALL_TASKS, gsm8k_answer, load_task
from compresslm.models.loaded import LoadedModel
from compresslm.models.tiny import tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


@pytest.mark.parametrize(
    ("name", "count", "choices", "first_label"),
    [
        ("arc_easy", 3, 4, 0),
        ("arc_challenge", 3, 4, 2),
        ("piqa", 3, 2, 0),
        ("hellaswag", 2, 4, 3),
        ("winogrande", 3, 2, 1),
        ("boolq", 3, 2, 0),
        ("openbookqa", 3, 4, 1),
        ("mmlu", 3, 4, None),
        ("mmlu_5shot", 3, 4, None),
    ],
)
def test_multiple_choice_loaders_read_real_rows(name, count, choices, first_label):
    task = load_task(name, FIXTURES)
    assert task.kind == "multiple_choice" and len(task.items) == count
    assert all(len(item.choices) == choices and 0 <= item.label < choices for item in task.items)
    if first_label is not None:
        assert task.items[0].label == first_label
    assert len(task.sha256) == 64 and task.files


def test_prompts_follow_the_harness_formats():
    arc = load_task("arc_easy", FIXTURES).items[0]
    assert arc.context.startswith("Question: Which statement best explains") and arc.context.endswith("\nAnswer:")
    assert arc.choices[0] == " Sunlight is the source of energy for nearly all ecosystems."
    wino = load_task("winogrande", FIXTURES).items[0]
    assert wino.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria"]  # fmt: skip
    assert wino.choices[0] == wino.choices[1] == " always got the easier cases."
    five = load_task("mmlu_5shot", FIXTURES).items[0].context
    zero = load_task("mmlu", FIXTURES).items[0].context
    assert five.count("\nAnswer:") == 3 and zero.count("\nAnswer:") == 1  # the fixture's dev file has 2 rows
    assert load_task("boolq", FIXTURES).items[0].choices == [" no", " yes"]


def test_cloze_and_generation_loaders():
    lambada = load_task("lambada", FIXTURES)
    assert lambada.kind == "cloze" and lambada.items[0].answer == " signs"
    assert "5-row format sample" in lambada.note
    gsm = load_task("gsm8k", FIXTURES, gsm8k_shots=1)
    assert gsm.kind == "generation" and gsm.items[0].answer == "18"
    assert gsm.items[0].context.count("Question:") == 2  # one exemplar + the question


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 3 + 4 = 7.\n#### 1,234", "1234"),
        ("The answer is 42.", "42"),
        ("about -3.5 dollars", "-3.5"),
        ("none", None),
    ],
)
def test_gsm8k_final_number(text, expected):
    assert gsm8k_answer(text) == expected


def _copy(tmp_path: Path, folder: str) -> Path:
    shutil.copytree(FIXTURES / folder, tmp_path / folder)
    return tmp_path


def test_malformed_json_names_file_and_line(tmp_path):
    root = _copy(tmp_path, "arc_easy")
    path = root / "arc_easy" / "ARC-Easy-Test.jsonl"
    path.write_text(path.read_text() + '{"id": "x", "question": \n')
    with pytest.raises(DataError, match=r"ARC-Easy-Test\.jsonl, line 4: not valid JSON"):
        load_task("arc_easy", root)


def test_missing_field_and_bad_answer_key(tmp_path):
    root = _copy(tmp_path, "arc_easy")
    path = root / "arc_easy" / "ARC-Easy-Test.jsonl"
    row = json.loads(path.read_text().splitlines()[0])
    row["answerKey"] = "Z"
    path.write_text(json.dumps(row) + "\n" + json.dumps({"id": "y"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: answerKey 'Z'"):
        load_task("arc_easy", root)
    path.write_text(json.dumps({"id": "y"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: missing field 'question.stem'"):
        load_task("arc_easy", root)


def test_malformed_formats(tmp_path):
    root = _copy(tmp_path, "hellaswag")
    path = root / "hellaswag" / "hellaswag_val_full.txt"
    lines = path.read_text().split("\n")
    path.write_text("\n".join(lines[:5]) + "\n")
    with pytest.raises(DataError, match="not a multiple of 6"):
        load_task("hellaswag", root)
    lines[1] = "7"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"line 2: label must be 0-3"):
        load_task("hellaswag", root)
    root = _copy(tmp_path, "piqa")
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DataError, match="2 labels for 3 examples"):
        load_task("piqa", root)
    root = _copy(tmp_path, "mmlu")
    (root / "mmlu" / "val" / "abstract_algebra_val.csv").write_text('"q",a,b,c,d,E\n')
    with pytest.raises(DataError, match=r"abstract_algebra_val\.csv, line 1: expected question, 4 choices"):
        load_task("mmlu", root)


def test_data_directory_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPRESSLM_DATA", raising=False)
    with pytest.raises(DataError, match="--data-dir"):
        load_task("arc_easy")
    with pytest.raises(DataError, match=r"none of arc_easy/ARC-Easy-Test\.jsonl found"):
        load_task("arc_easy", tmp_path)
    with pytest.raises(DataError, match="unknown task 'arc'"):
        load_task("arc", tmp_path)
    monkeypatch.setenv("COMPRESSLM_DATA", str(FIXTURES))
    assert load_task("piqa").name == "piqa"
    assert set(ALL_TASKS) >= {"arc_easy", "hellaswag", "mmlu", "gsm8k", "lambada"}


def test_stderr_and_ece():
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(0.5 / 2 * (4 / 3) ** 0.5)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert expected_calibration_error([0.9, 0.9], [False, False]) == pytest.approx(0.9)


def test_scoring_on_a_tiny_model(tokenizer):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    single = loglikelihoods(lm, [("The cat sat", " on the mat")])
    batched = loglikelihoods(lm, [("A much longer context that pads the batch", " x"), ("The cat sat", " on the mat")])
    assert single[0][0] == pytest.approx(batched[1][0], abs=1e-4)  # padding does not change a score
    assert single[0][2] == len(b" on the mat")  # the byte tokenizer: one token per byte
    for name in ("arc_easy", "winogrande", "lambada"):
        result = evaluate_task(lm, load_task(name, FIXTURES), show_progress=False)
        assert 0.0 <= result.metrics["acc"] <= 1.0 and result.n == len(load_task(name, FIXTURES).items)
    subset = evaluate_task(lm, load_task("arc_easy", FIXTURES), limit=2, seed=1, show_progress=False)
    assert subset.n == 2 and subset.protocol["subset"] == {"limit": 2, "seed": 1, "sampling": "random"}
    gsm = evaluate_task(lm, load_task("gsm8k", FIXTURES, gsm8k_shots=1), max_new_tokens=4, show_progress=False)
    assert gsm.metrics["exact_match"] == 0.0


def test_single_token_choices_share_one_pass(tokenizer):
    lm = LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny")
    context = "Question: 1 + 1?\nAnswer:"
    shared = loglikelihoods(lm, [(context, "A"), (context, "B"), ("Other context:", "C")])  # one byte token each
    alone = [loglikelihoods(lm, [(context, x)])[0] for x in ("A", "B")]
    assert shared[0][2] == 1
    assert [r[0] for r in shared[:2]] == pytest.approx([r[0] for r in alone], abs=1e-5)


def test_lm_eval_task_names_are_accepted_and_found_under_either_folder(tmp_path, capsys):
    from compresslm.cli import main
    from compresslm.models.loading import save_model
    from compresslm.models.tiny import byte_tokenizer

    assert load_task("lambada_openai", FIXTURES).name == "lambada"
    (tmp_path / "lambada_openai").mkdir()  # a data folder laid out under lm-eval's name
    shutil.copy(FIXTURES / "samples" / "lambada_openai.head5.jsonl", tmp_path / "lambada_openai" / "lambada_test.jsonl")
    assert len(load_task("lambada", tmp_path).items) == len(load_task("lambada", FIXTURES).items)
    source = str(save_model(tiny_model("llama"), byte_tokenizer(), tmp_path / "tiny"))
    argv = ["eval", source, "--tasks", "lambada_openai,arc_easy", "--data-dir", str(FIXTURES), "--task-limit", "2",
            "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert set(json.loads(capsys.readouterr().out)["tasks"]) == {"lambada", "arc_easy"}
    assert main(["eval", source, "--tasks", "arc_easy", "--limit", "5", "--data-dir", str(FIXTURES)]) == 2
    assert "give --task-limit 5" in capsys.readouterr().err  # --limit counts windows: refused, not ignored
    assert main(["eval", source, "--tasks", "lambada_standard", "--data-dir", str(FIXTURES)]) == 2
    assert "lambada_openai (= lambada)" in capsys.readouterr().err
