"""The command line: one JSON object on stdout with --json, one-line errors with status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from compresslm.cli import main
from compresslm.models.loading import save_model
from compresslm.models.tiny import tiny_model


@pytest.fixture
def model_dir(tokenizer, tmp_path):
    return str(save_model(tiny_model("llama"), tokenizer, tmp_path / "tiny"))


@pytest.fixture
def text_file(sample_text, tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text(sample_text)
    return str(path)


def test_eval_json_is_one_object_on_stdout(model_dir, text_file, capsys):
    assert main(["eval", model_dir, "--ppl", text_file, "--ctx", "64", "--limit", "3", "--json"]) == 0
    out, _ = capsys.readouterr()
    payload = json.loads(out)  # the whole of stdout is one JSON document
    assert {"ppl", "tokens", "windows", "protocol"} <= payload.keys()
    assert payload["windows"] == 3 and payload["tokens"] == 3 * 63
    assert payload["protocol"]["ctx"] == 64 and payload["protocol"]["model"]["kind"] == "hf_dir"


def test_eval_human_output_goes_to_stderr(model_dir, text_file, capsys):
    assert main(["eval", model_dir, "--ppl", text_file, "--ctx", "64", "--limit", "2", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "token perplexity" in err and "2/" in err


def test_info_json(model_dir, capsys):
    assert main(["info", model_dir, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"]["num_blocks"] == 2
    assert info["parameters"]["total"] == info["model"]["parameters"]


def test_info_human(model_dir, capsys):
    assert main(["info", model_dir]) == 0
    err = capsys.readouterr().err
    assert "LlamaForCausalLM" in err and "linear.gate" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "nosuchmodel", "--ppl", "wikitext2"], "unknown model name 'nosuchmodel'; known names:"),
        (["info", "./missing-dir"], "no such file or directory: ./missing-dir"),
    ],
)
def test_errors_are_one_line_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("compresslm: error: ") and message in err
    assert err.count("\n") == 1


def test_eval_without_metric(model_dir, capsys):
    assert main(["eval", model_dir]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_console_script_exit_status(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"\x00" * 32)
    proc = subprocess.run(
        [sys.executable, "-m", "compresslm.cli", "info", str(bad)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("compresslm: error: ")
    assert "is not a GGUF file" in proc.stderr


def test_unwritable_output_is_one_line_and_leaves_nothing(model_dir, tmp_path, capsys):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("a file where a directory is needed")
    out = blocked / "m.clm"
    assert main(["compress", model_dir, "--recipe", "w4-g16-rtn", "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("compresslm: error: ") and "file-not-dir" in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file-not-dir", "tiny"]


def test_masks_compares_two_calibration_sets(model_dir, capsys):
    argv = ["masks", model_dir, "--recipe", "50%-wanda", "--calib", "wikitext2", "--calib-b", "c4"]
    assert main([*argv, "--calib-samples", "4", "--calib-len", "32", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["layers"]) == 14  # 2 blocks x 7 linears
    for row in report["layers"].values():
        assert 0.0 <= row["overlap"] <= 1.0 and row["chance"] == pytest.approx(1 / 3)
    assert [c["source"] for c in report["calibrations"]] != [None, None]


def test_masks_refuses_identical_sets(model_dir, capsys):
    argv = ["masks", model_dir, "--recipe", "50%-wanda", "--seed-b", "0", "--calib-samples", "2", "--calib-len", "16"]
    assert main(argv) == 2
    assert "identical" in capsys.readouterr().err


def test_eval_tasks_and_speed_in_one_json(model_dir, capsys):
    from pathlib import Path

    data = str(Path(__file__).parent / "fixtures" / "tasks")
    argv = ["eval", model_dir, "--tasks", "arc_easy,winogrande", "--data-dir", data, "--speed", "--speed-prompt",
            "16", "--speed-new", "4", "--repeats", "2", "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload["tasks"]) == {"arc_easy", "winogrande"}
    assert {"acc", "acc_stderr", "acc_norm", "ece", "n", "protocol"} <= set(payload["tasks"]["arc_easy"])
    speed = payload["speed"]["per_batch"]["1"]
    assert speed["decode_tokens_per_s"]["runs"] == 2 and speed["kv_cache_bytes"] > 0
    assert main(["eval", model_dir, "--tasks", "arc", "--data-dir", data]) == 2
    assert "unknown task(s) arc" in capsys.readouterr().err


def test_lm_eval_without_the_extra_says_how_to_install(model_dir, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["lm-eval", model_dir, "--tasks", "arc_easy"]) == 2
    assert "pip install 'compresslm[lm-eval]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ppl", "nosuchcorpus"], "no corpus named 'nosuchcorpus'"),
        (["--tasks", "nosuchtask"], "unknown task(s) nosuchtask"),
        (["--ppl", "wikitext2", "--dial", "bits=99"], "bits"),
    ],
)
def test_eval_arguments_are_checked_before_the_model_loads(argv, message, capsys, monkeypatch):
    import compresslm.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_model", refuse)
    assert main(["eval", "smollm2-135m", *argv]) == 2
    assert message in capsys.readouterr().err
