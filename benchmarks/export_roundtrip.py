"""GGUF export round trip: llama.cpp's perplexity of an export against compresslm's of the container.

For each method (RTN, GPTQ, AWQ) and each GGUF type whose grid a recipe can hold exactly (Q8_0, Q5_0,
Q4_0 symmetric; Q5_1, Q4_1 asymmetric with float16 offsets; the K-quants Q6_K ... Q2_K), the reference
model is compressed with the `gguf-<type>-<method>` preset under the benchmark protocol (calibration
128 x 512 C4 windows, seed 0), exported to GGUF (lossless: the export checks it), then both are scored
on the same WikiText-2 windows (test, GPTQ row protocol, ctx 2048, first 40 windows) and the same
token ids (the container's tokenizer): the container by PyTorch in float32, the GGUF by llama.cpp
through llama-cpp-python with a float32 KV cache (`--kv-type`; llama.cpp's default is float16, rows
measured so are kept under `POINT@kv-f16`). What remains is llama.cpp's arithmetic (it rounds
activations to 8 bits for its quantized matrix products), not the weights, which are bit for bit the
container's. A point named `POINT+dequantized` scores the same container dequantized into a float32
GGUF, which llama.cpp multiplies without rounding activations: it separates the weights from the
runtime's arithmetic. Points are recorded as they finish; a rerun skips them (`--budget` stops
starting new points after that many seconds).

    .venv/bin/python benchmarks/export_roundtrip.py [--points gguf-q4_0-rtn ...] [--budget 540]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from point_runner import command_line, commands
from results_store import add_row, atomic_write, load_rows

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "export_roundtrip.json"
TYPES = ("q8_0", "q5_0", "q4_0", "q5_1", "q4_1", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k")
POINTS = [f"gguf-{t}-{m}" for m in ("rtn", "gptq", "awq") for t in TYPES]
DEQUANTIZED = "+dequantized"
CT_POINTS = ["ct:gguf-q4_0-rtn", "ct:gguf-q4_0-gptq", "ct:gguf-q4_0-awq", "ct:w4-g64-awq", "ct:w8-rtn"]


def run_ct_point(name: str, workdir: Path, limit: int, rows: dict) -> dict:
    """A compressed-tensors export (float32, so its scales decode exactly) loaded by transformers and scored
    by the same loop as the container. The container's perplexity is taken from a GGUF row of the same
    container (same weights fingerprint, same windows) where one exists: the same number, not measured twice."""
    from compresslm.api import compress, export
    from compresslm.eval.perplexity import perplexity
    from compresslm.models.loading import load_model

    preset = name.removeprefix("ct:")
    container, directory = workdir / f"{preset}.clm", workdir / f"{preset}-ct"
    if not container.exists():
        compress(load_model("smollm2-135m"), preset, container, show_progress=False)
    lm = load_model(container)
    same = [row for row in rows.values() if row["protocol"]["model"].get("sha256") == lm.fingerprint()
            and row["protocol"]["limit"] == limit]  # fmt: skip
    if same:
        ours = same[0]["ppl_container_torch"]
    else:
        ours = perplexity(lm, "wikitext2", ctx=2048, limit=limit, show_progress=False).ppl
    del lm
    exported = export(container, "compressed-tensors", directory, dtype="float32", overwrite=True,
                      show_progress=False)  # fmt: skip
    theirs = perplexity(load_model(directory), "wikitext2", ctx=2048, limit=limit, show_progress=False)
    return {
        "point": name,
        "ppl_container_torch": ours,
        "container_ppl_from": same[0]["point"] if same else "measured",
        "ppl_export_transformers": theirs.ppl,
        "relative_gap": theirs.ppl / ours - 1,
        "container_bytes": container.stat().st_size,
        "export_bytes": sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".safetensors"),
        "packed_linears": exported["packed_linears"],
        "dense_linears": exported["dense_linears"],
        "protocol": theirs.protocol,
        "command": command_line("benchmarks/export_roundtrip.py"),
    }


def run_point(name: str, workdir: Path, limit: int, kv_type: str) -> dict:
    from compresslm.api import compress, export
    from compresslm.eval.llamacpp import llamacpp_perplexity
    from compresslm.eval.perplexity import perplexity
    from compresslm.models.loading import load_model

    preset = name.removesuffix(DEQUANTIZED)
    container, gguf = workdir / f"{preset}.clm", workdir / f"{name}.gguf"
    started = time.perf_counter()
    if not container.exists():
        compress(load_model("smollm2-135m"), preset, container, show_progress=False)
    compress_seconds = time.perf_counter() - started
    lm = load_model(container)
    ours = perplexity(lm, "wikitext2", ctx=2048, limit=limit, show_progress=False)
    if name.endswith(DEQUANTIZED):  # the container's weights as float32: no type of llama.cpp's rounds them
        hf = workdir / f"{preset}-hf"
        export(container, "hf", hf, dtype="float32", overwrite=True, show_progress=False)
        exported = export(hf, "gguf", gguf, dtype="float32", overwrite=True, show_progress=False)
    else:
        exported = export(container, "gguf", gguf, overwrite=True, show_progress=False)
    theirs = llamacpp_perplexity(gguf, "wikitext2", ctx=2048, limit=limit, tokenizer=lm.tokenizer,
                                 kv_type=kv_type, show_progress=False)  # fmt: skip
    assert theirs.tokens == ours.tokens
    return {
        "point": name,
        "kv_type": kv_type,
        "ppl_container_torch": ours.ppl,
        "ppl_gguf_llama_cpp": theirs.ppl,
        "relative_gap": theirs.ppl / ours.ppl - 1,
        "container_bytes": container.stat().st_size,
        "gguf_bytes": exported["bytes_on_disk"],
        "gguf_tensor_types": exported["tensor_types"],
        "export_exact": exported.get("exact", True),
        "compress_seconds": compress_seconds,
        "torch_eval_seconds": ours.protocol["wall_time_s"],
        "llama_cpp_eval_seconds": theirs.protocol["wall_time_s"],
        "protocol": ours.protocol,
        "llama_cpp_protocol": {k: theirs.protocol[k] for k in ("backend", "model", "versions", "wall_time_s")},
        "command": command_line("benchmarks/export_roundtrip.py"),
    }


def key(point: str, kv_type: str) -> str:
    """Rows scored with llama.cpp's default float16 KV cache are kept apart from the float32 ones."""
    return point if kv_type == "f32" else f"{point}@kv-{kv_type}"


GGUF_HEADER = "| point | container ppl (torch) | GGUF ppl (llama.cpp) | gap | GGUF bytes | within 0.3 % |"
CT_HEADER = (
    "| point | container ppl (torch) | export ppl (transformers) | gap | packed / dense linears | within 0.1 % |"
)


def gguf_cells(row: dict) -> str:
    gap = row["relative_gap"]
    return (f"{row['ppl_container_torch']:.4f} | {row['ppl_gguf_llama_cpp']:.4f} | {100 * gap:+.3f} % | "
            f"{row['gguf_bytes']:,} | {'yes' if abs(gap) <= 0.003 else 'no'}")  # fmt: skip


def ct_cells(row: dict) -> str:
    gap = row["relative_gap"]
    return (f"{row['ppl_container_torch']:.4f} | {row['ppl_export_transformers']:.4f} | {100 * gap:+.4f} % | "
            f"{row['packed_linears']} / {row['dense_linears']} | {'yes' if abs(gap) <= 0.001 else 'no'}")  # fmt: skip


def table(rows: dict, names: list[str], header: str = GGUF_HEADER, cells=gguf_cells) -> list[str]:
    """A table of `names` (a point not measured yet shows as such), each row's columns from `cells`."""
    lines = [header, "|---|---:|---:|---:|---:|---|"]
    for name in names:
        row = rows.get(name)
        lines.append(f"| {name} | not run yet | | | | |" if row is None else f"| {name} | {cells(row)} |")
    return lines


def write_markdown(rows: dict) -> None:
    extra = [name for name in rows if name not in POINTS and "@" not in name and not name.startswith("ct:")]
    default_kv = [name for name in rows if "@kv-f16" in name]
    lines = [
        "# GGUF export round trip (SmolLM2-135M-Instruct)",
        "",
        "Each container compressed with the `gguf-<type>-<method>` preset is exported to GGUF without loss "
        "(every tensor bit for bit the container's), then scored twice on the same token windows: the "
        "container by PyTorch (float32), the GGUF by llama.cpp with a float32 KV cache. WikiText-2 raw test, "
        "GPTQ row protocol, ctx 2048, first 40 windows (81,880 predicted tokens); calibration 128 x 512 C4 "
        "windows, seed 0. Goal: llama.cpp within 0.3 % of the container.",
        "",
        *table(rows, POINTS),
    ]
    if extra:
        lines += [
            "",
            "The same containers dequantized into float32 GGUF files (`POINT+dequantized`): llama.cpp multiplies "
            "float32 weights without rounding its activations to 8 bits, so this gap is what the two runtimes' "
            "arithmetic leaves once the quantized matrix products are gone.",
            "",
            *table(rows, extra),
        ]
    lines += [
        "",
        "## compressed-tensors export loaded by transformers",
        "",
        "The container exported as compressed-tensors (float32: its scales stay exact, so transformers decodes "
        "the container's weights bit for bit), loaded by transformers (`AutoModelForCausalLM.from_pretrained`, "
        "the packed layers decoded at load, as `compresslm` loads any compressed-tensors directory) and scored "
        "by the same loop and windows. Goal: within 0.1 %. Where a GGUF row above holds the same container "
        "(same weights fingerprint), its container perplexity is reused.",
        "",
        *table(rows, CT_POINTS, CT_HEADER, ct_cells),
    ]
    if default_kv:
        lines += [
            "",
            "Scored with llama.cpp's default float16 KV cache (measured before the float32 cache was used; an "
            "earlier version of the presets made these containers, so their container column differs from the "
            "rows above where the preset has changed since, as gguf-q4_0-rtn's has):",
            "",
            *table(rows, default_kv),
        ]
    if rows:
        v = next(iter(rows.values()))["protocol"]["versions"]
        lines += [
            "",
            "The reference model's weights sit on a 4-bit group-32 grid (its source is Q4_1), so Q4_1 and the "
            "wider types are close to lossless on it for every method; the gap column is what this table is for.",
            "",
            commands(rows, command_line("benchmarks/export_roundtrip.py")) + " One point per piece (resumable), on a "
            f"2-core machine ({platform.machine()}); points ran beside other jobs at times (their gaps do not "
            f"depend on timing; no timing is reported). Versions: compresslm {v['compresslm']}, torch {v['torch']}, "
            f"transformers {v['transformers']}, llama-cpp-python {v.get('llama_cpp_python')}; {v['platform']}.",
        ]
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="*", default=POINTS)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--kv-type", choices=("f32", "f16"), default="f32", help="llama.cpp's KV cache type")
    parser.add_argument("--budget", type=float, default=None, help="start no new point after this many seconds")
    parser.add_argument("--workdir", default="/tmp/compresslm-export-roundtrip")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = load_rows(RESULTS)
    for name in args.points:
        if key(name, args.kv_type) in rows or name in rows:
            continue
        if args.budget is not None and time.perf_counter() - started > args.budget:
            break
        if name.startswith("ct:"):
            row = run_ct_point(name, workdir, args.limit, rows)
            rows = add_row(RESULTS, name, row)
            print(f"{name}: torch {row['ppl_container_torch']:.4f}, transformers {row['ppl_export_transformers']:.4f} "
                  f"({100 * row['relative_gap']:+.4f} %)", flush=True)  # fmt: skip
            continue
        row = run_point(name, workdir, args.limit, args.kv_type)
        rows = add_row(RESULTS, key(name, args.kv_type), row)
        print(f"{name}: torch {row['ppl_container_torch']:.4f}, llama.cpp {row['ppl_gguf_llama_cpp']:.4f} "
              f"({100 * row['relative_gap']:+.3f} %)", flush=True)  # fmt: skip
    write_markdown(rows)


if __name__ == "__main__":
    main()
