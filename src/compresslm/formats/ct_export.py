"""compressed-tensors export: the packed format llm-compressor writes and vLLM and transformers load.

A quantized record whose grid the format holds (integer codes of 2-8 bits, per group of columns that
divides the row, per channel or per tensor; integer zero points) is packed by the
`compressed-tensors` library itself (`PackedQuantizationCompressor`): our codes `c` with zero point
`z` are its signed values `c - 2**(bits-1)` with zero point `z - 2**(bits-1)`, and its
`(q - zp) · scale` is our `(c - z) · scale`. Scales stay float16 (ours are float16 values; a
bfloat16 copy would round them), or float32 in a float32 export: a loader decodes in the scales' dtype,
and only float32 products are ours bit for bit; there, a K-quant's float32 scales d · sc pack too.
Everything else (float zero points, low-rank terms, shorter last
groups, GPT-2's transposed Conv1D layers, float16 weights of a pruned-only record) is written dense
in the chosen dtype and listed in the config's `ignore`. A sparse record is packed with its pruned
weights at the zero point, so they decode to exact zeros (the format's sparse encodings are not
written). Layers quantized alike share one config group, targeted by their names.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from compresslm.compressed import CompressedWeight
from compresslm.errors import CompressLMError
from compresslm.formats.container import ContainerReader
from compresslm.formats.hf_export import DTYPES, SHARD_BYTES, record_names, write_directory

INSTALL = "the compressed-tensors export needs its library: pip install 'compresslm[compressed-tensors]'"


def _library():
    try:
        from compressed_tensors.compressors import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError:
        raise CompressLMError(INSTALL) from None
    return PackedQuantizationCompressor, QuantizationArgs, QuantizationConfig, QuantizationScheme


def _strategy(entry: dict) -> tuple[str, int | None] | None:
    """The format's strategy (and group size) for a header record, or None when it is written dense."""
    if entry.get("values") is not None or entry.get("lowrank") or not 2 <= entry["bits"] <= 8:
        return None
    in_f = entry["shape"][1]
    if entry.get("scales_shape") == [1, 1]:
        return "tensor", None
    if entry["group_size"] == in_f:
        return "channel", None
    if in_f % entry["group_size"] == 0:
        return "group", entry["group_size"]
    return None


def _packable(entry: dict, blobs: dict, name: str, transposed: frozenset[str], dtype: str) -> bool:
    """Integer zero points, and float16 scales unless the export is float32 (a K-quant's float32 scales
    d · sc would round to float16: such a record is written dense)."""
    float_zeros = entry.get("zeros") and blobs[entry["zeros"]]["dtype"] in ("float16", "float32")
    wide_scales = entry.get("scales") and blobs[entry["scales"]]["dtype"] != "float16" and dtype != "float32"
    return not float_zeros and not wide_scales and name not in transposed and _strategy(entry) is not None


def export_compressed_tensors(container: str | os.PathLike, output: str | os.PathLike, dtype: str = "float16",
                              transposed: frozenset[str] = frozenset(), shard_bytes: int = SHARD_BYTES,
                              show_progress: bool = True) -> dict:  # fmt: skip
    """Write `container` as a compressed-tensors checkpoint directory at `output` (atomically)."""
    compressor, QuantizationArgs, QuantizationConfig, QuantizationScheme = _library()
    torch_dtype = DTYPES[dtype]
    reader = ContainerReader(container)
    try:
        header = reader.header
        blobs = header["blobs"]
        groups: dict[tuple, list[str]] = {}
        for name, entry in header["linears"].items():
            if _packable(entry, blobs, name, transposed, dtype):
                strategy, group_size = _strategy(entry)
                groups.setdefault((entry["bits"], entry["symmetric"], strategy, group_size), []).append(name)
        schemes = {}
        scheme_of = {}
        for number, ((bits, symmetric, strategy, group_size), names) in enumerate(sorted(groups.items())):
            args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                                    group_size=group_size, dynamic=False)  # fmt: skip
            schemes[f"group_{number}"] = QuantizationScheme(targets=names, weights=args)
            scheme_of.update(dict.fromkeys(names, schemes[f"group_{number}"]))
        dense_linears = [name for name in header["linears"] if name not in scheme_of]
        names = record_names(header)

        def tensors() -> Iterator[dict[str, torch.Tensor]]:
            for kind, name in names:
                if kind == "dense":
                    yield {name: _cast(reader.dense(name), torch_dtype)}
                    continue
                record = reader.linear(name) if kind == "linear" else reader.embedding(name)
                if name in scheme_of:
                    packed = compressor.compress(_module_state(record, torch_dtype), scheme_of[name])
                    yield {f"{name}.{key}": value.contiguous() for key, value in packed.items()}
                else:
                    weight = record.dequantize()
                    yield {f"{name}.weight": _cast(weight.T if name in transposed else weight, torch_dtype)}

        quantization = QuantizationConfig(config_groups=schemes, format="pack-quantized",
                                          quantization_status="compressed", ignore=dense_linears)  # fmt: skip
        config = {**header["config"], "dtype": dtype,
                  "quantization_config": quantization.model_dump(mode="json", exclude_none=True)}  # fmt: skip
        written = write_directory(output, tensors(), len(names), config, reader.tokenizer_files(), shard_bytes,
                                  "export compressed-tensors", show_progress)  # fmt: skip
        packed_count = len(scheme_of)
        return {"path": str(output), "format": "compressed-tensors", "dtype": dtype, "packed_linears": packed_count,
                "dense_linears": len(dense_linears), **written}  # fmt: skip
    finally:
        reader.close()


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor


def _module_state(record: CompressedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What the library's compressor takes: the weight our codes decode to, the scales (float32 in a float32
    export, else as stored) and signed zero points."""
    offset = 1 << (record.bits - 1)
    # a pruned weight dequantizes to 0, which the library rounds to the zero point: it decodes to exact 0
    scales = record.scales.float() if dtype == torch.float32 else record.scales.clone()
    state = {"weight": record.dequantize(), "weight_scale": scales}
    state["weight_zero_point"] = (record.zeros.to(torch.int16) - offset).to(torch.int8)
    return state
