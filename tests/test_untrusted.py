"""Files from others are data: crafted containers and checkpoints, NaN weights, bad output paths, stale temps."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compresslm.api import compress
from compresslm.cli import main
from compresslm.errors import CompressLMError, CorruptFileError
from compresslm.fileio import atomic_path, temp_sibling
from compresslm.formats.container import encode_header, read_header
from compresslm.models.assemble import load_compressed
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import load_model, save_model
from compresslm.models.tiny import tiny_model
from compresslm.recipe import RecipeError, load_recipe

CALIB = {"samples": 2, "length": 16, "source": "wikitext2"}


@pytest.fixture(scope="module")
def container(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("c") / "tiny.clm"
    recipe = load_recipe("w4-g16-rtn")
    recipe.calibration.samples, recipe.calibration.length, recipe.calibration.source = 2, 16, "wikitext2"
    compress(LoadedModel.from_module(tiny_model("llama"), tokenizer, name="tiny"), recipe, path, show_progress=False)
    return path


def _crafted(container: Path, tmp_path: Path, edit) -> Path:
    """A copy of `container` whose header `edit` changed, with a valid header checksum (a deliberate forgery)."""
    header, start = read_header(container)
    edit(header)
    out = tmp_path / "crafted.clm"
    out.write_bytes(encode_header(header) + container.read_bytes()[start:])
    return out


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_tokenizer_names_from_a_file_never_become_paths(container, tmp_path, capsys):
    """A header naming tokenizer files '/abs/path' or '../../x' is refused; nothing is written anywhere."""
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in (str(victim / "planted"), "../../../../" + str(victim.relative_to("/")) + "/planted", "sub/x.json"):

        def rename(header, name=name):
            files = header["tokenizer_files"]
            files[name] = files.pop("tokenizer.json")

        crafted = _crafted(container, tmp_path, rename)
        assert main(["info", str(crafted)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("compresslm: error:") and "is corrupt" in err and "tokenizer file name" in err
        assert not (victim / "planted").exists() and _files_under(victim) == set()


class _Planted:
    """Unpickling this touches a marker file: what a planted checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_checkpoint_never_runs(tokenizer, tmp_path, capsys):
    source = str(save_model(tiny_model("llama"), tokenizer, tmp_path / "tiny"))
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "code-ran"
    (out / "checkpoint.pt").write_bytes(pickle.dumps({"model": _Planted(marker)}))
    argv = ["train", source, "--steps", "2", "-o", str(out), "--data", "wikitext2", "--batch-size", "1",
            "--seq-len", "16", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "never reads pickles" in err and not marker.exists()


def test_a_damaged_safetensors_checkpoint_is_reported(tokenizer, tmp_path, capsys):
    source = str(save_model(tiny_model("llama"), tokenizer, tmp_path / "tiny"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    argv = ["train", source, "--steps", "2", "-o", str(out), "--data", "wikitext2", "--batch-size", "1",
            "--seq-len", "16", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("compresslm:")]
    assert len(errors) == 1 and "not a readable compresslm tensor file" in errors[0]


def test_an_edited_header_is_caught_by_its_checksum(container, tmp_path, capsys):
    data = bytearray(container.read_bytes())
    at = data.index(b'"rms_norm_eps": ') + len(b'"rms_norm_eps": ')
    data[at] = ord("7") if data[at] != ord("7") else ord("8")  # still valid JSON, another model
    edited = tmp_path / "edited.clm"
    edited.write_bytes(bytes(data))
    assert main(["info", str(edited)]) == 2
    assert "header checksum does not match" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h["config"].pop("model_type"), "config names no model_type"),
        (lambda h: h["blobs"][next(iter(h["blobs"]))].update(dtype="float17"), "dtype 'float17'"),
        (lambda h: h["config"].update(num_attention_heads=3), "corrupt"),
        (lambda h: h["config"].update(hidden_size=32), "corrupt"),
        (lambda h: h["config"].update(num_hidden_layers=10**9), "layers"),
        (lambda h: h["config"].update(vocab_size=2**40), "out of range"),
        (lambda h: next(iter(h["linears"].values())).update(bits=5), "corrupt"),
        (lambda h: next(iter(h["linears"].values())).update(bits="4"), "bits is '4'"),
        (lambda h: next(iter(h["linears"].values())).update(group_size=0), "group_size"),
        (lambda h: next(iter(h["linears"].values())).update(codes="nope"), "names blob 'nope'"),
        (lambda h: h["dense"].update({"model.secret.weight": next(iter(h["dense"].values()))}), "does not have"),
        (lambda h: h.update(linears=[]), "linears is list"),
        (lambda h: h.update(format_version=1), "format 1"),
        (lambda h: h.update(parameters=-5), "parameters"),
        (lambda h: h.update(recipe={"stages": [{"type": "quantize", "bits": 99}]}), "recipe"),
    ],
)
def test_a_forged_header_fails_cleanly(container, tmp_path, capsys, edit, message):
    """Forged headers (valid checksum, hostile fields) end in one line, exit 2, never a traceback."""
    crafted = _crafted(container, tmp_path, edit)
    assert main(["info", str(crafted)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compresslm: error:") and message in err[0], err


def test_info_shows_a_container_without_a_recipe(container, tmp_path, capsys):
    """QAT containers record a training recipe instead; a header may also carry neither."""
    for recipe, shown in ((None, "recipe not recorded"), ({"name": "qat-w4"}, "recipe qat-w4")):
        crafted = _crafted(container, tmp_path, lambda h, r=recipe: h.update(recipe=None, train_recipe=r))
        assert main(["info", str(crafted)]) == 0
        assert shown in capsys.readouterr().err


def test_a_forged_config_that_still_loads_changes_the_model_hash(container, tmp_path):
    original = load_compressed(container)
    slower_rope = _crafted(container, tmp_path, lambda h: h["config"]["rope_parameters"].update(rope_theta=1234.0))
    crafted = load_compressed(slower_rope)
    assert crafted.weights_fingerprint() == original.weights_fingerprint()
    assert crafted.fingerprint() != original.fingerprint()  # the hash covers the config


def test_trailing_bytes_and_truncation_are_refused(container, tmp_path):
    longer = tmp_path / "longer.clm"
    longer.write_bytes(container.read_bytes() + b"\0" * 64)
    with pytest.raises(CorruptFileError, match="trailing bytes"):
        read_header(longer)
    shorter = tmp_path / "shorter.clm"
    shorter.write_bytes(container.read_bytes()[:-64])
    with pytest.raises(CorruptFileError, match="cut short"):
        read_header(shorter)


def test_a_container_of_format_1_is_refused_with_advice(container, tmp_path):
    old = tmp_path / "old.clm"
    old.write_bytes(b"CLM1" + container.read_bytes()[4:])
    with pytest.raises(CorruptFileError, match=r"format 1.*compress the model again"):
        load_model(old)


def _nan_model(tokenizer, tmp_path: Path) -> str:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[3, :5] = float("nan")
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    return str(save_model(model, tokenizer, tmp_path / "nan"))


def test_nan_weights_are_named_at_load_for_every_command(tokenizer, tmp_path, capsys):
    source = _nan_model(tokenizer, tmp_path)
    commands = (["info", source], ["eval", source, "--ppl", "wikitext2", "--ctx", "32", "--limit", "1", "--json"],
                ["compress", source, "--recipe", "w4-g16-rtn", "-o", str(tmp_path / "x.clm")])  # fmt: skip
    for argv in commands:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        line = captured.err.strip()
        assert "model.embed_tokens.weight holds 5 NaN or infinite values (and 1 more tensors)" in line, argv
    assert not (tmp_path / "x.clm").exists()


def test_a_non_finite_metric_is_an_error_and_json_is_always_valid(tokenizer, tmp_path, capsys, monkeypatch):
    source = str(save_model(tiny_model("llama"), tokenizer, tmp_path / "tiny"))
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    # one window: the KL error bar is undefined (NaN in Python) and must come out as null
    assert main(["eval", source, "--kld", "--reference", source, "--ctx", "32", "--limit", "1", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"invalid JSON {c}"))
    assert payload["kld"]["kld_stderr"] is None
    from compresslm.eval.perplexity import perplexity

    lm = load_model(source)
    with torch.no_grad():  # NaN appearing after load (e.g. an overflowing dtype): the metric refuses
        lm.model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(CompressLMError, match="perplexity is not finite"):
        perplexity(lm, "wikitext2", ctx=32, limit=1, show_progress=False)


def test_output_paths_are_checked_before_any_compute(tokenizer, tmp_path, capsys, monkeypatch):
    import compresslm.api as api

    def no_compute(*args, **kwargs):
        raise AssertionError("compression started before the output path was checked")

    monkeypatch.setattr(api, "_compress_in_place", no_compute)
    source = str(save_model(tiny_model("llama"), tokenizer, tmp_path / "tiny"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [(str(tmp_path), "is a directory"), ("", "path is empty"), (str(a_file / "x.clm"), str(a_file / "x.clm"))]
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((str(locked / "x.clm"), str(locked / "x.clm")))
    for output, message in cases:
        assert main(["compress", source, "--recipe", "w4-g16-rtn", "-o", output, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and ".compresslm-tmp" not in err, err
    assert main(["train", source, "--steps", "1", "-o", str(a_file)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert main(["sweep", source, "--grid", "smoke", "--db", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "model.clm"
    script = (
        "import os, signal, sys\n"
        "from compresslm.fileio import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(target)], check=False)
    assert run.returncode == -signal.SIGKILL
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith(".model.clm.compresslm-tmp.") and not target.exists()
    live = temp_sibling(target)  # this process's own temporary: its writer is alive, it stays
    live.write_bytes(b"in progress")
    other_host = tmp_path / ".model.clm.compresslm-tmp.elsewhere.1.0123abcd"
    other_host.write_bytes(b"not ours to judge")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert not stale.exists() and live.exists() and other_host.exists()
    assert socket.gethostname()  # names in temporaries come from it


def test_a_prune_stage_that_prunes_nothing_is_refused():
    for preset in ("0%-magnitude", "0%-wanda", "0.0%-sparsegpt"):
        with pytest.raises(RecipeError, match="prunes nothing"):
            load_recipe(preset)


def test_written_files_follow_the_umask(tokenizer, tmp_path, container):
    old = os.umask(0o022)
    try:
        out = save_model(tiny_model("llama"), tokenizer, tmp_path / "m")
        modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
        written = tmp_path / "copy.clm"
        header, start = read_header(container)
        with atomic_path(written) as tmp:
            tmp.write_bytes(encode_header(header) + container.read_bytes()[start:])
    finally:
        os.umask(old)
    assert modes["m"] == 0o755 and modes["model.safetensors"] == 0o644
    assert set(modes.values()) <= {0o755, 0o644}
    assert written.stat().st_mode & 0o777 == 0o644
