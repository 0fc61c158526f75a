"""Models read block by block from sharded safetensors: same containers as the resident path, one block resident."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compresslm.api import compress
from compresslm.data.calibration import CalibrationSet
from compresslm.errors import CompressLMError, CorruptFileError
from compresslm.formats.container import read_header
from compresslm.models.loading import load_model
from compresslm.models.tiny import tiny_model


def _sharded(family: str, tokenizer, directory: Path, layers: int = 3) -> Path:
    """A tiny model saved as many small safetensors shards, as big checkpoints are."""
    tiny_model(family, layers=layers).save_pretrained(directory, max_shard_size="20KB")
    tokenizer.save_pretrained(directory)
    return directory


def _calibration() -> CalibrationSet:
    windows = torch.randint(3, 259, (4, 64), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(windows, {"windows_sha256": "test-windows"})


def _comparable(path: Path) -> tuple[dict, bytes]:
    """The header without timings, and the blob area."""
    header, start = read_header(path)
    header = json.loads(json.dumps(header))
    header.pop("compression_seconds")
    for layer in header["layers"]:
        layer.pop("seconds")
    return header, path.read_bytes()[start:]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the two paths then reduce in the same order
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "preset", ["w4-g32-gptq", "w4-g32-awq", "w3-g32-rtn+emb8", "50%-sparsegpt-owl", "2:4-wanda+w4-g32-gptq"]
)
def test_streamed_container_equals_resident(family, preset, tokenizer, tmp_path, one_thread):
    source = _sharded(family, tokenizer, tmp_path / "model")
    _, _, resident = compress(str(source), preset, tmp_path / "resident.clm", calibration=_calibration(),
                              show_progress=False)  # fmt: skip
    lm, result, streamed = compress(str(source), preset, tmp_path / "streamed.clm", calibration=_calibration(),
                                    show_progress=False, stream=True)  # fmt: skip
    assert _comparable(tmp_path / "streamed.clm") == _comparable(tmp_path / "resident.clm")
    assert abs(streamed["bytes_on_disk"] - resident["bytes_on_disk"]) <= 64  # the timings' digits pad differently
    assert lm.lazy.most_resident == 1 and not lm.lazy.resident  # one block in memory at a time, none after
    assert result.weights == {}  # the records went to the file, not into memory
    assert not list(tmp_path.glob(".*compresslm-tmp*"))  # the spill file is gone


def test_only_one_block_of_weights_is_ever_in_memory(tokenizer, tmp_path):
    """Counted on the tensors themselves: original layers a block swapped out must be dropped too."""
    source = _sharded("llama", tokenizer, tmp_path / "model", layers=4)
    lm = load_model(source, lazy=True)
    original = [info.module for info in lm.layout.linears()]
    counts = []

    def count(module, dtype, skip, path=""):  # the engine rounds each module as it is read: count the layers then
        rounding(module, dtype, skip, path)
        counts.append((path, sum(not m.weight.is_meta for m in original)))

    from compresslm.engine import sequential

    rounding = sequential._round_dense
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sequential, "_round_dense", count)
        compress(lm, "w4-g32-gptq", tmp_path / "out.clm", calibration=_calibration(), show_progress=False,
                 stream=True)  # fmt: skip
    per_block = len(lm.layout.blocks[0].linears)
    outside = [("model.embed_tokens", 0), ("lm_head", 0)]  # read to embed the windows, and again to store them
    blocks = [(f"model.layers.{i}", per_block) for i in range(4)]
    assert counts == [("", 0), *outside, *blocks, *outside]  # the whole model's rounding first
    assert all(m.weight.is_meta for m in original)


@pytest.mark.parametrize(("family_name", "tied"), [("llama", True), ("qwen2", False)])
def test_lazy_load_reads_the_embedding_and_head_only_while_held(family_name, tied, tokenizer, tmp_path):
    source = _sharded(family_name, tokenizer, tmp_path / "model")
    lm = load_model(source, lazy=True)
    embedding, head = lm.model.model.embed_tokens, lm.model.lm_head
    assert lm.model.model.norm.weight.device.type == "cpu"  # the small tensors outside the blocks are read
    assert all(p.is_meta for p in [*lm.model.model.layers.parameters(), embedding.weight, head.weight])
    whole = load_model(source)
    with lm.lazy.holding(lm.model):
        assert torch.equal(embedding.weight, whole.model.model.embed_tokens.weight)
        assert torch.equal(head.weight, whole.model.lm_head.weight)
        assert (head.weight is embedding.weight) == tied  # tied again after reading
    assert embedding.weight.is_meta and head.weight.is_meta and (head.weight is embedding.weight) == tied
    assert lm.fingerprint() == whole.fingerprint()  # hashed tensor by tensor, same identity
    assert embedding.weight.is_meta


def test_stats_cache_reused_when_streaming(tokenizer, tmp_path, one_thread):
    source = _sharded("llama", tokenizer, tmp_path / "model")
    recipe = {"stages": [{"method": "gptq", "bits": 4, "group_size": 32}], "calibration": {"propagate": "original"}}
    cache = tmp_path / "stats"
    compress(str(source), recipe, tmp_path / "a.clm", calibration=_calibration(), show_progress=False,
             stats_cache=cache, stream=True)  # fmt: skip
    _, result, _ = compress(str(source), recipe, tmp_path / "b.clm", calibration=_calibration(), show_progress=False,
                            stats_cache=cache, stream=True)  # fmt: skip
    assert result.calibration["statistics_reused"]
    assert _comparable(tmp_path / "a.clm")[1] == _comparable(tmp_path / "b.clm")[1]


def test_missing_shard_is_named(tokenizer, tmp_path):
    source = _sharded("llama", tokenizer, tmp_path / "model")
    shard = sorted(source.glob("model-*.safetensors"))[3]
    shard.unlink()
    with pytest.raises(CorruptFileError, match=f"shard {shard.name} is missing"):
        load_model(source, lazy=True)


def test_truncated_shard_is_named(tokenizer, tmp_path):
    source = _sharded("llama", tokenizer, tmp_path / "model")
    shard = sorted(source.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match=f"{shard.name} is a corrupt or truncated safetensors file"):
        load_model(source, lazy=True)


def test_index_path_outside_the_directory_is_refused(tokenizer, tmp_path):
    source = _sharded("llama", tokenizer, tmp_path / "model")
    index_file = source / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CorruptFileError, match="not a plain file name"):
        load_model(source, lazy=True)


def test_checkpoint_missing_a_tensor_is_said_before_reading(tokenizer, tmp_path):
    source = _sharded("llama", tokenizer, tmp_path / "model")
    index_file = source / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"].pop("model.layers.2.mlp.down_proj.weight")
    index_file.write_text(json.dumps(index))
    others = [name for name, s in index["weight_map"].items() if s == shard]
    assert not others  # the shard holds this tensor alone, so it is gone from the checkpoint
    (source / shard).unlink()
    with pytest.raises(CorruptFileError, match=re.escape("no tensor model.layers.2.mlp.down_proj.weight")):
        load_model(source, lazy=True)


def test_non_finite_block_weight_stops_the_walk(tokenizer, tmp_path):
    model = tiny_model("llama", layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    source = tmp_path / "model"
    model.save_pretrained(source, max_shard_size="20KB")
    tokenizer.save_pretrained(source)
    target = tmp_path / "out.clm"
    target.write_bytes(b"previous")
    with pytest.raises(CorruptFileError, match=re.escape("model.layers.1.mlp.up_proj.weight holds 1 NaN")):
        compress(str(source), "w4-g32-rtn", target, show_progress=False, stream=True)
    assert target.read_bytes() == b"previous"  # an existing file at the target is left as it was
    assert not list(tmp_path.glob(".*compresslm-tmp*"))


def test_streaming_refuses_what_it_cannot_do(tiny_lm, tokenizer, tmp_path):
    with pytest.raises(CompressLMError, match="give an output path"):
        compress(tiny_lm, "w4-g32-rtn", stream=True)
    with pytest.raises(CompressLMError, match="does not stream"):
        compress(tiny_lm, "w4-g32-rtn", tmp_path / "x.clm", stream=True)


def test_cli_compress_stream(tokenizer, tmp_path):
    source = _sharded("qwen2", tokenizer, tmp_path / "model")
    out = tmp_path / "cli.clm"
    run = subprocess.run([sys.executable, "-m", "compresslm.cli", "compress", str(source), "--recipe", "w4-g32-rtn",
                          "-o", str(out), "--stream", "--quiet", "--json"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["bytes_on_disk"] == out.stat().st_size
    assert load_model(out).container["linear_parameters"] > 0


@pytest.mark.parametrize("family_name", ["llama", "qwen2", "gpt2", "opt", "falcon", "gemma2"])
def test_streamed_perplexity_equals_resident(family_name, tokenizer, tmp_path, sample_text):
    from compresslm.data.corpora import Corpus
    from compresslm.eval.perplexity import perplexity

    source = _sharded(family_name, tokenizer, tmp_path / "model")
    corpus = Corpus("sample", None, sample_text, "test", "raw")
    resident = perplexity(load_model(source), corpus, ctx=64, limit=5, batch_size=2, show_progress=False)
    lazy = load_model(source, lazy=True)
    streamed = perplexity(lazy, corpus, ctx=64, limit=5, batch_size=2, show_progress=False)
    assert streamed.window_nll == resident.window_nll  # the same operations on the same batches
    assert lazy.lazy.most_resident == 1 and not lazy.lazy.resident
    assert streamed.protocol["streamed"]


@pytest.mark.parametrize("family_name", ["llama", "qwen2", "gpt2"])
def test_streamed_task_scores_equal_resident(family_name, tokenizer, tmp_path):
    """Multiple choice with contexts of different lengths (so batches are padded) and a cloze item."""
    from compresslm.eval.harness import evaluate_task
    from compresslm.eval.tasks import Item, TaskData

    items = [
        Item("The cat sat on the", [" mat", " moon and the stars", " dog"], 0, id="1"),
        Item("Water is", [" wet", " dry"], 0, id="2"),
        Item("One two three four five six seven eight", [" nine", " ten", " eleven twelve"], 0, id="3"),
    ]
    choice = TaskData("toy", "multiple_choice", items, [], "none")
    cloze = TaskData("toy-cloze", "cloze", [Item("one two three", answer=" four"), Item("a b", answer=" c")], [], "n")
    source = _sharded(family_name, tokenizer, tmp_path / "model")
    whole, lazy = load_model(source), load_model(source, lazy=True)
    for task in (choice, cloze):
        resident = evaluate_task(whole, task, batch_size=2, show_progress=False)
        streamed = evaluate_task(lazy, task, batch_size=2, show_progress=False)
        assert streamed.metrics == resident.metrics
        assert streamed.protocol["streamed"] and "streamed" not in resident.protocol
    assert lazy.lazy.most_resident == 1 and not lazy.lazy.resident
    generation = TaskData("toy-gen", "generation", [Item("1+1=", answer="2")], [], "n")
    with pytest.raises(CompressLMError, match="needs the whole model in memory"):
        evaluate_task(lazy, generation, show_progress=False)


def test_cli_eval_stream(tokenizer, tmp_path):
    source = _sharded("llama", tokenizer, tmp_path / "model")
    runs = [subprocess.run([sys.executable, "-m", "compresslm.cli", "eval", str(source), "--ppl", "wikitext2",
                            "--ctx", "64", "--limit", "3", "--json", "--quiet", *extra],
                           capture_output=True, text=True) for extra in ([], ["--stream"])]  # fmt: skip
    assert all(run.returncode == 0 for run in runs), runs[1].stderr
    whole, streamed = (json.loads(run.stdout) for run in runs)
    assert streamed["ppl"] == whole["ppl"]
    refused = subprocess.run([sys.executable, "-m", "compresslm.cli", "eval", str(source), "--speed", "--stream"],
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "--ppl, --kld and --tasks" in refused.stderr


def test_streamed_kl_equals_resident(tokenizer, tmp_path, sample_text):
    """The reference's top-k log-probabilities and the compressed model's KL to them, both models streamed."""
    from compresslm.data.corpora import Corpus
    from compresslm.eval.distance import distance, reference_logits

    source = _sharded("qwen2", tokenizer, tmp_path / "model")
    out = tmp_path / "model.clm"
    compress(str(source), "w3-g32-rtn", out, calibration=_calibration(), show_progress=False)
    corpus = Corpus("sample", None, sample_text, "test", "raw")
    window = {"ctx": 64, "limit": 3, "k": 8, "show_progress": False}
    whole = reference_logits(load_model(source), corpus, cache_dir=tmp_path / "a", **window)
    lazy_reference = load_model(source, lazy=True)
    streamed = reference_logits(lazy_reference, corpus, cache_dir=tmp_path / "b", **window)
    assert torch.equal(streamed.top_logprobs, whole.top_logprobs) and torch.equal(streamed.top_ids, whole.top_ids)
    assert lazy_reference.lazy.most_resident == 1 and not lazy_reference.lazy.resident
    resident = distance(load_model(out), whole, corpus, show_progress=False)
    lazy = load_model(out, lazy=True)
    streamed_distance = distance(lazy, whole, corpus, show_progress=False)
    assert streamed_distance.kld_mean == resident.kld_mean > 0 and streamed_distance.protocol["streamed"]
    assert lazy.lazy.most_resident == 1


@pytest.mark.parametrize("preset", ["w4-g32-gptq", "w3-g32-rtn+emb8", "w8a8-smoothquant-static", "2:4-wanda"])
def test_streamed_container_evaluates_like_the_resident_one(family, preset, tokenizer, tmp_path, sample_text):
    from compresslm.data.corpora import Corpus
    from compresslm.eval.perplexity import perplexity

    source = _sharded(family, tokenizer, tmp_path / "model")
    out = tmp_path / "model.clm"
    compress(str(source), preset, out, calibration=_calibration(), show_progress=False)
    corpus = Corpus("sample", None, sample_text, "test", "raw")
    whole = load_model(out)
    lazy = load_model(out, lazy=True)
    assert lazy.fingerprint() == whole.fingerprint()
    resident = perplexity(whole, corpus, ctx=64, limit=4, batch_size=2, show_progress=False)
    streamed = perplexity(lazy, corpus, ctx=64, limit=4, batch_size=2, show_progress=False)
    assert streamed.window_nll == resident.window_nll
    assert lazy.lazy.most_resident == 1 and not lazy.lazy.resident


def test_damage_in_a_later_block_is_reported_when_reached(tokenizer, tmp_path, sample_text):
    from compresslm.data.corpora import Corpus
    from compresslm.eval.perplexity import perplexity

    source = _sharded("llama", tokenizer, tmp_path / "model")
    out = tmp_path / "model.clm"
    compress(str(source), "w4-g32-rtn", out, show_progress=False)
    header, start = read_header(out)
    blob = header["blobs"]["model.layers.2.mlp.up_proj.codes"]
    data = bytearray(out.read_bytes())
    data[start + blob["offset"]] ^= 0xFF
    out.write_bytes(bytes(data))
    lazy = load_model(out, lazy=True)  # the header and the first blocks are sound
    damaged = re.escape("checksum mismatch in tensor 'model.layers.2.mlp.up_proj.codes'")
    with pytest.raises(CorruptFileError, match=damaged):
        perplexity(lazy, Corpus("sample", None, sample_text, "test", "raw"), ctx=64, limit=2, show_progress=False)


_KILL_AFTER_BLOCK = """
import os, signal, sys
from compresslm.models import assemble
journalled = assemble.StreamingSave.block
def block(self, block, carried, run):
    journalled(self, block, carried, run)
    if carried.next_block == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # killed between two blocks, as a user's kill -9 would
assemble.StreamingSave.block = block
from compresslm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("preset", ["w4-g32-gptq", "w4-g32-awq", "dial"])
def test_a_killed_streaming_compression_resumes(preset, tokenizer, tmp_path, one_thread):
    source = _sharded("llama", tokenizer, tmp_path / "model", layers=4)
    out = tmp_path / "out.clm"
    script = tmp_path / "kill.py"
    script.write_text(_KILL_AFTER_BLOCK)
    args = ["compress", str(source), "--recipe", preset, "--calib-samples", "4", "--calib-len", "64", "--stream",
            "--quiet"]  # fmt: skip
    killed = subprocess.run([sys.executable, str(script), *args, "-o", str(out)], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert killed.returncode == -9 and not out.exists()
    assert (tmp_path / ".out.clm.partial" / "state.safetensors").is_file()
    resumed = subprocess.run([sys.executable, "-m", "compresslm.cli", *args, "-o", str(out)], capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed a killed run of the same compression at block 2" in resumed.stdout + resumed.stderr
    assert not (tmp_path / ".out.clm.partial").exists()
    whole = subprocess.run([sys.executable, "-m", "compresslm.cli", *args, "-o", str(tmp_path / "whole.clm")],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    assert _comparable(out) == _comparable(tmp_path / "whole.clm")


def test_a_journal_of_another_compression_is_started_afresh(tokenizer, tmp_path):
    source = _sharded("llama", tokenizer, tmp_path / "model")
    out = tmp_path / "out.clm"
    from compresslm.models.assemble import StreamingSave

    class Interrupted(Exception):
        pass

    def stop(self, block, carried, run):
        journalled(self, block, carried, run)
        raise Interrupted

    journalled = StreamingSave.block
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StreamingSave, "block", stop)
        with pytest.raises(Interrupted):
            compress(str(source), "w4-g32-rtn", out, show_progress=False, stream=True)
    _, result, _ = compress(str(source), "w3-g32-rtn", out, show_progress=False, stream=True)
    assert "resumed_at_block" not in result.info
    _, _, _ = compress(str(source), "w3-g32-rtn", tmp_path / "fresh.clm", show_progress=False, stream=True)
    assert _comparable(out)[1] == _comparable(tmp_path / "fresh.clm")[1]


_FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from compresslm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_during_the_streaming_write_leaves_the_old_file(tokenizer, tmp_path):
    source = _sharded("llama", tokenizer, tmp_path / "model")
    out = tmp_path / "out.clm"
    out.write_bytes(b"an earlier container")
    script = tmp_path / "limited.py"
    script.write_text(_FILE_SIZE_LIMIT)
    run = subprocess.run([sys.executable, str(script), "20000", "compress", str(source), "--recipe", "w8-g32-rtn",
                          "--stream", "--quiet", "-o", str(out)], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("compresslm: error: cannot write") and "File too large" in last
    assert out.read_bytes() == b"an earlier container"
    assert not list(tmp_path.glob(".out.clm.compresslm-tmp*"))


def test_a_block_that_cannot_fit_is_said_before_starting(tokenizer, tmp_path, monkeypatch):
    source = _sharded("llama", tokenizer, tmp_path / "model")
    monkeypatch.setenv("COMPRESSLM_MAX_MEMORY", "100KiB")  # a cap below one tiny block's needs
    out = tmp_path / "out.clm"
    with pytest.raises(CompressLMError, match=r"the largest block of .* needs about 0\.0 GiB .* 0\.0 GiB is available"):
        compress(str(source), "w4-g32-gptq", out, show_progress=False, stream=True)
    assert not out.exists() and not (tmp_path / ".out.clm.partial").exists()
    monkeypatch.setenv("COMPRESSLM_MAX_MEMORY", "lots")
    with pytest.raises(CompressLMError, match="cannot read COMPRESSLM_MAX_MEMORY 'lots'"):
        compress(str(source), "w4-g32-gptq", out, show_progress=False, stream=True)


def test_info_counts_every_parameter_of_a_container(tokenizer, tmp_path):
    source = _sharded("qwen2", tokenizer, tmp_path / "model")  # an untied head, quantized by +emb8
    out = tmp_path / "model.clm"
    compress(str(source), "w4-g32-rtn+emb8", out, show_progress=False)
    infos = [subprocess.run([sys.executable, "-m", "compresslm.cli", "info", str(path), "--json"],
                            capture_output=True, text=True) for path in (source, out)]  # fmt: skip
    assert all(info.returncode == 0 for info in infos), infos[1].stderr
    float_info, container_info = (json.loads(info.stdout) for info in infos)
    assert container_info["parameters"]["total"] == float_info["parameters"]["total"]
    assert container_info["parameters"]["lm_head"] == float_info["parameters"]["lm_head"]
    assert container_info["model"]["sha256"] == load_model(out).fingerprint()


def test_a_gguf_tensor_type_that_cannot_be_dequantized_is_named_before_reading(tokenizer, tmp_path):
    from compresslm.api import export
    from compresslm.models.loading import save_model

    save_model(tiny_model("llama"), tokenizer, tmp_path / "float")
    gguf = tmp_path / "m.gguf"
    export(tmp_path / "float", "gguf", gguf, dtype="float32", show_progress=False)
    data = bytearray(gguf.read_bytes())
    name = b"blk.0.ffn_down.weight"
    at = data.index(name) + len(name) + 4 + 2 * 8  # past the name, the dimension count (u32) and two u64 dimensions
    assert data[at : at + 4] == (0).to_bytes(4, "little")  # F32
    data[at : at + 4] = (26).to_bytes(4, "little")  # I32: as many bytes, and no dequantization exists for it
    gguf.write_bytes(data)
    run = subprocess.run([sys.executable, "-m", "compresslm.cli", "eval", str(gguf), "--ppl", "wikitext2", "--stream"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "blk.0.ffn_down.weight is of GGUF type I32, which cannot be dequantized" in run.stderr
