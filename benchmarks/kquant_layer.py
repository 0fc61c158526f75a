"""llama.cpp's own quantizer against compresslm's on real layers: the layer output error of each GGUF type.

Seven linears of `smollm2-135m`, each with its input Hessian H from 32 x 512-token C4 calibration windows
(seed 0) on the uncompressed model. Each is quantized to a GGUF type by:

* `llama.cpp` / `llama.cpp+imatrix`: ggml's own quantizer (`ggml_quantize_chunk` from the libggml that
  llama-cpp-python ships; the function `llama-quantize` calls per tensor), without and with an importance
  matrix (each column's mean squared input, diag(H) / 2: what llama.cpp's imatrix tool collects); its
  output is decoded by the `gguf` package;
* `rtn` / `gptq` / `gptq-wclip` / `gptq-wclip-refit`: compresslm on the type's own grid (`gguf-<type>`
  presets: round to nearest; GPTQ with act-order; GPTQ with the clip search weighted by the same importance;
  the same search rounding at candidate steps and refitting each by least squares, K-quants only).

The score is the layer output error tr(ΔW H ΔWᵀ) relative to `llama.cpp`'s (lower is better), so each row
reads "how much of llama.cpp's error is left". K-quant types need rows of 256 columns: on this model only
the MLP down projection (1536 wide) has them; the 576-wide linears are scored on Q4_0, the type llama.cpp
gives them in its Q3_K and Q2_K files.

    .venv/bin/python benchmarks/kquant_layer.py
"""

from __future__ import annotations

import ctypes
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from results_store import atomic_write

from compresslm.quant.gptq import GPTQOptions, gptq, output_error
from compresslm.quant.grid import Grid, kquant_grid, llamacpp_signed
from compresslm.quant.rtn import rtn
from compresslm.versions import versions

RESULTS = Path(__file__).parent / "results" / "kquant_layer"
DOWN = [f"model.layers.{i}.mlp.down_proj" for i in (0, 10, 20, 29)]
NARROW = ["model.layers.3.mlp.gate_proj", "model.layers.10.self_attn.q_proj", "model.layers.20.self_attn.o_proj"]
TYPES = {"q6_k": DOWN, "q4_k": DOWN, "q3_k": DOWN, "q2_k": DOWN, "q4_0": NARROW + DOWN}
MAKERS = ("llama.cpp", "llama.cpp+imatrix", "rtn", "gptq", "gptq-wclip", "gptq-wclip-refit")


def _ggml():
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    return lib


def llamacpp_quantize(lib, weight: torch.Tensor, kind: str, imatrix: torch.Tensor | None) -> torch.Tensor:
    """`weight` quantized to `kind` by ggml and decoded back by the gguf package (float32)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind.upper()]
    x = np.ascontiguousarray(weight.numpy(), dtype=np.float32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros(x.size // block * size, dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix.numpy(), dtype=np.float32)
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                      None if im is None else im.ctypes.data)  # fmt: skip
    if written != out.size:
        raise RuntimeError(f"ggml wrote {written} bytes for {kind}, expected {out.size}")
    return torch.from_numpy(gguf.quants.dequantize(out, qtype).reshape(x.shape).copy())


def grid_of(kind: str) -> Grid:
    if kind.endswith("_k"):
        return kquant_grid(kind)
    return Grid(4, "group", 32, symmetric=True, signed_scale=llamacpp_signed(4))


def errors(lib, weight: torch.Tensor, hessian: torch.Tensor, kind: str) -> dict[str, float]:
    """Each maker's layer output error for one weight and type."""
    grid = grid_of(kind)
    wclip = replace(grid, clip_search=True, clip_weighted=True)
    act = GPTQOptions(act_order=True)
    approx = {
        "llama.cpp": llamacpp_quantize(lib, weight, kind, None),
        "llama.cpp+imatrix": llamacpp_quantize(lib, weight, kind, hessian.diagonal() / 2),
        "rtn": rtn(weight, grid).dequantize(),
        "gptq": gptq(weight, hessian, grid, act).dequantize(),
        "gptq-wclip": gptq(weight, hessian, wclip, act).dequantize(),
    }
    if grid.kquant:
        approx["gptq-wclip-refit"] = gptq(weight, hessian, replace(wclip, refit=True), act).dequantize()
    return {maker: output_error(weight, found, hessian) for maker, found in approx.items()}


def main() -> None:
    import nested_sparse_layer

    started = time.perf_counter()
    nested_sparse_layer.LAYERS = sorted({name for names in TYPES.values() for name in names})
    weights, hessians = nested_sparse_layer.hessians()
    lib = _ggml()
    rows = []
    for kind, names in TYPES.items():
        for name in names:
            found = errors(lib, weights[name], hessians[name], kind)
            base = found["llama.cpp"]
            rows.append(
                {"type": kind, "layer": name, "error": found, "relative": {k: v / base for k, v in found.items()}}
            )
            print(kind, name, {k: round(v / base, 4) for k, v in found.items()}, flush=True)
    payload = {"rows": rows, "seconds": time.perf_counter() - started, "versions": versions()}
    atomic_write(RESULTS.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    write_markdown(payload)


def write_markdown(payload: dict) -> None:
    rows, v = payload["rows"], payload["versions"]
    lines = ["# llama.cpp's quantizer against compresslm's on real layers (SmolLM2-135M-Instruct)", "",
             " ".join(__doc__.split("\n\n")[1].split()), "",
             "Layer output error tr(ΔW H ΔWᵀ) relative to llama.cpp's (without imatrix); lowest in bold.", "",
             "| type | layer | " + " | ".join(MAKERS) + " |", "|---|---|" + "---:|" * len(MAKERS)]  # fmt: skip
    for row in rows:
        best = min(row["relative"].values())
        values = [row["relative"].get(m) for m in MAKERS]
        cells = " | ".join("–" if value is None else f"**{value:.3f}**" if value == best else f"{value:.3f}"
                           for value in values)  # fmt: skip
        lines.append(f"| {row['type'].upper()} | {row['layer'].removeprefix('model.layers.')} | {cells} |")
    lines += ["", "Geometric mean per type:", "", "| type | " + " | ".join(MAKERS) + " |",
              "|---|" + "---:|" * len(MAKERS)]  # fmt: skip
    for kind in TYPES:
        chosen = [r["relative"] for r in rows if r["type"] == kind]
        means = [float(np.exp(np.mean([np.log(r[m]) for r in chosen]))) if m in chosen[0] else None for m in MAKERS]
        lines.append(f"| {kind.upper()} | " + " | ".join("–" if m is None else f"{m:.3f}" for m in means) + " |")
    source = (
        "The model's weights sit on a 4-bit group-32 grid (its source is Q4_1). Q4_K's sub-blocks of 32 "
        "nearly hold that grid, so rounding to nearest keeps most of it, and GPTQ's updates move weights off "
        "it: the one type where llama.cpp with its importance matrix leaves less error than GPTQ here."
    )
    lines += ["", source]
    lines += ["", f"Command: `.venv/bin/python benchmarks/kquant_layer.py` ({payload['seconds']:.0f} s, "
              f"{platform.machine()}). Versions: compresslm {v['compresslm']}, torch {v['torch']}, "
              f"llama-cpp-python {v.get('llama_cpp_python')}, gguf {v.get('gguf')}."]  # fmt: skip
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
