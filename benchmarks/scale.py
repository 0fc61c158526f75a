"""A 7B-class model on a 24 GiB, two-core machine: streamed load, compression and evaluation, with peak memory.

The model is a real Llama-2-7B configuration with random weights (this machine has no 7B checkpoint
on PyPI): each linear is Gaussian with standard deviation 1/sqrt(in_features) times a per-tensor
factor drawn from [0.5, 1.5], norms are ones, and the tokenizer is compresslm's byte-level one (259
of the 32,000 rows of the embedding are ever used). Its perplexities measure nothing about language
and are labelled so; memory and time are what this benchmark is for.

Each step runs `compresslm` in a child process, whose peak resident memory comes from the kernel
(`wait4`), not from sampling. Steps that take longer than one sitting run in pieces: a piece is
killed (SIGKILL) at `--budget` seconds and the next invocation resumes the compression from its
journal, so the peak memory of a step is the largest of its pieces and its time is their sum
(each piece pays the start-up again: loading what lies outside the blocks and hashing the model).

    .venv/bin/python benchmarks/scale.py make --out /tmp/llama2-7b-random      # about 13.5 GB of bfloat16
    .venv/bin/python benchmarks/scale.py run --model /tmp/llama2-7b-random --budget 540   # repeat until done
    .venv/bin/python benchmarks/scale.py report
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_store import atomic_write

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
CONFIGS = {
    "llama-2-7b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
                   "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
                   "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
                   "bos_token_id": 1, "eos_token_id": 2},
}  # fmt: skip
# Llama-2 13B/34B(code)/70B shapes for the projection: (hidden, intermediate, layers, kv heads, heads)
PROJECTED = {"13B": (5120, 13824, 40, 40, 40), "34B": (8192, 22016, 48, 8, 64), "70B": (8192, 28672, 80, 8, 64)}
CALIBRATION = {"samples": 8, "length": 512}
EVAL = {"ctx": 512, "limit": 4}


def make(out: Path, config_name: str, layers: int | None, seed: int) -> None:
    """Write the random model as one safetensors shard per block (and one for the rest), block by block."""
    import torch
    from safetensors.torch import save_file

    from compresslm.models.tiny import byte_tokenizer

    config = dict(CONFIGS[config_name])
    if layers is not None:
        config["num_hidden_layers"] = layers
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        factor = 0.5 + torch.rand((), generator=generator).item()
        weight = torch.randn(out_f, in_f, generator=generator) * (factor / in_f**0.5)
        return weight.to(torch.bfloat16)

    shards: dict[str, str] = {}
    total = config["num_hidden_layers"]
    for index in range(total):
        prefix = f"model.layers.{index}."
        tensors = {
            prefix + "self_attn.q_proj.weight": linear(hidden, hidden),
            prefix + "self_attn.k_proj.weight": linear(kv, hidden),
            prefix + "self_attn.v_proj.weight": linear(kv, hidden),
            prefix + "self_attn.o_proj.weight": linear(hidden, hidden),
            prefix + "mlp.gate_proj.weight": linear(inter, hidden),
            prefix + "mlp.up_proj.weight": linear(inter, hidden),
            prefix + "mlp.down_proj.weight": linear(hidden, inter),
            prefix + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            prefix + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        }
        name = f"model-{index + 1:05d}-of-{total + 1:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        shards.update(dict.fromkeys(tensors, name))
        print(f"block {index + 1}/{total} written", file=sys.stderr)
    rest = {"model.embed_tokens.weight": linear(config["vocab_size"], hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            "lm_head.weight": linear(config["vocab_size"], hidden)}  # fmt: skip
    name = f"model-{total + 1:05d}-of-{total + 1:05d}.safetensors"
    save_file(rest, str(out / name), metadata={"format": "pt"})
    shards.update(dict.fromkeys(rest, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}, indent=1))
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=1))
    byte_tokenizer().save_pretrained(out)
    label = f"{config_name} configuration, random weights (seed {seed}); see benchmarks/scale.py\n"
    (out / "RANDOM_WEIGHTS.txt").write_text(label)


def steps(model: Path, work: Path) -> dict[str, list[str]]:
    calib = ["--calib-samples", str(CALIBRATION["samples"]), "--calib-len", str(CALIBRATION["length"])]
    evaluate = ["--ppl", "wikitext2", "--ctx", str(EVAL["ctx"]), "--limit", str(EVAL["limit"]), "--stream"]
    return {
        "compress w4-g128-rtn": ["compress", str(model), "--recipe", "w4-g128-rtn", "--stream", "-o",
                                 str(work / "rtn.clm")],
        "eval float": ["eval", str(model), *evaluate],
        "compress w4-g128-gptq": ["compress", str(model), "--recipe", "w4-g128-gptq", "--stream", *calib, "-o",
                                  str(work / "gptq.clm")],
        "eval w4-g128-gptq": ["eval", str(work / "gptq.clm"), *evaluate],
    }  # fmt: skip


def run_piece(command: list[str], budget: float) -> dict:
    """Run one piece of a step; kill it at `budget` seconds. Returns its wall time, peak RSS and outcome.

    The peak is the kernel's account of the child (`wait4`), so a killed piece has one too.
    """
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-m", "compresslm.cli", *command, "--json", "--quiet"],
                                 stdout=out, stderr=err, text=True)  # fmt: skip
        killed = False
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > budget:
                os.kill(child.pid, signal.SIGKILL)  # as a user's kill -9 would: the next piece resumes
                killed = True
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.5)
        code = child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    payload = json.loads(stdout) if stdout.strip() and code == 0 else None
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "killed": killed,
        "exit": code,
        "stderr_tail": stderr.strip()[-300:],
        "json": payload,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("--out", type=Path, required=True)
    mk.add_argument("--config", default="llama-2-7b", choices=sorted(CONFIGS))
    mk.add_argument("--layers", type=int, default=None, help="fewer blocks (a quick check of the script)")
    mk.add_argument("--seed", type=int, default=0)
    rn = sub.add_parser("run")
    rn.add_argument("--model", type=Path, required=True)
    rn.add_argument("--work", type=Path, default=Path("/tmp/compresslm-scale"))
    rn.add_argument("--budget", type=float, default=540.0, help="seconds this invocation may spend")
    rn.add_argument("--steps", nargs="*", default=None)
    rn.add_argument("--results", type=Path, default=RESULTS)
    rp = sub.add_parser("report")
    rp.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.command == "make":
        make(args.out, args.config, args.layers, args.seed)
        return
    if args.command == "report":
        write_report(args.results)
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    from compresslm.versions import versions

    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    config = json.loads((args.model / "config.json").read_text())
    results.setdefault("model", {"path": str(args.model), "config": config,
                                 "weights": (args.model / "RANDOM_WEIGHTS.txt").read_text().strip()})  # fmt: skip
    results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "versions": versions()}
    results["calibration"], results["eval"] = CALIBRATION, EVAL
    args.work.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    for name, command in steps(args.model, args.work).items():
        if args.steps and name not in args.steps:
            continue
        step = results.setdefault("steps", {}).setdefault(name, {"command": command, "pieces": [], "done": False})
        while not step["done"]:
            left = deadline - time.perf_counter()
            if left < 60:
                print(f"budget spent; run again to go on with '{name}'", file=sys.stderr)
                atomic_write(args.results, json.dumps(results, indent=1))
                return
            print(f"{name}: a piece of up to {left:.0f} s", file=sys.stderr)
            piece = run_piece(command, left)
            piece["next_block"] = _journalled_blocks(command)
            piece["block_finished_at"] = _block_finish_times(command)
            step["pieces"].append(piece)
            if piece["exit"] not in (0, -signal.SIGKILL):
                raise SystemExit(f"{name} failed: {piece['stderr_tail']}")
            step["done"] = piece["exit"] == 0
            atomic_write(args.results, json.dumps(results, indent=1))
    write_report(args.results)


def _journalled_blocks(command: list[str]) -> int | None:
    """How many blocks a streamed compression's journal holds (None: no journal, e.g. finished)."""
    if command[0] != "compress":
        return None
    out = Path(command[command.index("-o") + 1])
    state = out.with_name(f".{out.name}.partial") / "state.safetensors"
    if not state.is_file():
        return None
    from compresslm.fileio import load_tensors

    return load_tensors(state)[1]["carried"]["next_block"]


def _block_finish_times(command: list[str]) -> dict[str, float]:
    """When each journalled block was finished (its dense file's mtime), by block index; {} without a journal.

    The journal is removed when the file is complete, so the last piece's blocks are not timed.
    """
    if command[0] != "compress":
        return {}
    out = Path(command[command.index("-o") + 1])
    journal = out.with_name(f".{out.name}.partial")
    return {str(int(f.stem.split("-")[1])): f.stat().st_mtime for f in sorted(journal.glob("dense-*.safetensors"))}


def seconds_per_block(pieces: list[dict], busy: list[list] = ()) -> list[float]:
    """The time between consecutive blocks finished within one piece (a block after a restart also pays
    the start-up, so it is left out): one block's load, statistics, compression and propagation.
    Blocks whose time overlaps a `busy` window ([start, end, what] in epoch seconds: other work on the
    same cores) are left out too."""
    finished: dict[int, float] = {}
    for piece in pieces:
        finished.update({int(k): v for k, v in (piece.get("block_finished_at") or {}).items()})
    first = 0
    owner: dict[int, int] = {}  # block -> the piece that finished it
    for number, piece in enumerate(pieces):
        last = piece.get("next_block")
        if last is None:
            continue
        for block in range(first, last):
            owner[block] = number
        first = max(first, last)

    def alone(start: float, end: float) -> bool:
        return all(end <= window[0] or start >= window[1] for window in busy)

    timed = [b for b in sorted(finished) if b - 1 in finished and owner.get(b) == owner.get(b - 1)]
    return [finished[b] - finished[b - 1] for b in timed if alone(finished[b - 1], finished[b])]


def write_report(path: Path) -> None:
    results = json.loads(path.read_text())
    config = results["model"]["config"]
    gib = 1024**3
    lines = [
        "# A 7B-class model on two cores and 24 GiB: streamed compression and evaluation",
        "",
        f"Model: {results['model']['weights']} — {config['num_hidden_layers']} blocks, hidden "
        f"{config['hidden_size']}, intermediate {config['intermediate_size']}, vocabulary {config['vocab_size']}, "
        "stored as bfloat16 safetensors, one shard per block, computed in float32. **Random weights: the "
        "perplexities below say nothing about language**; memory and time are what is measured.",
        f"Calibration (GPTQ): {CALIBRATION['samples']} windows of {CALIBRATION['length']} tokens of the shipped C4 "
        f"sample. Evaluation: WikiText-2 test, ctx {EVAL['ctx']}, the first {EVAL['limit']} windows, streamed.",
        f"Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs; "
        + ", ".join(f"{k} {v}" for k, v in results["machine"]["versions"].items() if k in ("compresslm", "torch",
                                                                                          "transformers")),
        "Peak RSS is the kernel's maximum resident set size of the `compresslm` process (wait4). A step run in "
        "pieces was killed (SIGKILL) at the end of each piece and resumed from its journal; its time is the sum "
        "of its pieces (each pays the start-up again), its peak the largest piece's.",
        *([f"Conditions: {results['note']}"] if results.get("note") else []),
        "",
        "| step | pieces | wall time | peak RSS | result |",
        "|---|---:|---:|---:|---|",
    ]  # fmt: skip
    per_block = None
    for name, step in results.get("steps", {}).items():
        pieces = step["pieces"]
        wall = sum(p["wall_s"] for p in pieces)
        peak = max((p["peak_rss_bytes"] or 0) for p in pieces) if pieces else 0
        final = pieces[-1]["json"] if pieces and step["done"] else None
        done = pieces[-1].get("next_block") if pieces else None
        outcome = f"not finished: {done} of {config['num_hidden_layers']} blocks journalled" if done else "not finished"
        if done and not step["done"]:
            lines_note = f"{wall / done:.0f} s per block so far"
            outcome += f" ({lines_note})"
        if final and "ppl" in final:
            outcome = f"ppl {final['ppl']:.4g} (random weights)"
        elif final and "bytes_on_disk" in final:
            outcome = f"{final['bytes_on_disk'] / gib:.2f} GiB file, {final['linear_bits_per_param']:.3f} linear bits"
        timed = sorted(seconds_per_block(pieces, results.get("busy", [])))
        if name == "compress w4-g128-gptq" and timed:
            per_block = timed[len(timed) // 2]
            spread = (f"median of {len(timed)} blocks timed within a piece with nothing else running, "
                      f"{timed[0]:.0f}–{timed[-1]:.0f} s")  # fmt: skip
        lines.append(f"| `{name}` | {len(pieces)} | {wall / 60:.1f} min | {peak / gib:.2f} GiB | {outcome} |")
    if per_block is not None:
        lines += ["", f"GPTQ: {per_block:.0f} s per block ({spread}; a block read from disk, its statistics, its "
                  "seven layers' GPTQ and error reports, and its outputs for the next block).", "",
                  "Projection (an assumption, not a measurement): time per block scaled by the block's parameter "
                  "count. GPTQ's factorizations grow with the cube of a layer's input width, faster than that, so "
                  "for the wider models the projection is a lower bound.", "",
                  "| model | blocks | parameters per block | projected GPTQ time |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        base = _block_params(config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"],
                             config["num_attention_heads"])  # fmt: skip
        for label, (hidden, inter, layers, kv, heads) in PROJECTED.items():
            params = _block_params(hidden, inter, kv, heads)
            hours = per_block * params / base * layers / 3600
            lines.append(f"| Llama-2 {label} | {layers} | {params / 1e6:.0f} M | {hours:.1f} h |")
    lines += ["", "Command: `.venv/bin/python benchmarks/scale.py run --model DIR --steps STEP --budget 570` (repeated "
              "until the step is done; an evaluation with `--budget 1500`: it does not resume), then "
              "`benchmarks/scale.py report`. Model: `benchmarks/scale.py make --out DIR`."]  # fmt: skip
    atomic_write(path.with_suffix(".md"), "\n".join(lines) + "\n")


def _block_params(hidden: int, inter: int, kv_heads: int, heads: int) -> int:
    kv = hidden // heads * kv_heads
    return 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter


if __name__ == "__main__":
    main()
