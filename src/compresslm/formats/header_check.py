"""Checks of a container header read from a file, before anything is built from it.

A container may come from someone else, so its header is data: these functions check its layout
(every byte of the file belongs to the header, a blob or zero padding; nothing trails), every
blob's declared dtype against an allow-list and its byte count against its shape, and every
field the reader will use (types, ranges, blob references, tokenizer file names), and the model
config against its family's defaults (`check_config`). They raise
`ValueError` with the reason; the container module turns it into one `... is corrupt: reason` line.
Whether the tensors fit the model that the config describes is checked by the reader, on a model
built on the meta device (no memory is allocated for a config that asks for a huge model).
"""

from __future__ import annotations

import math
import re

import torch

from compresslm.formats.packing import packed_nbytes

ALIGN = 64
# Tensor dtypes a blob may declare; packed codes are "u1".."u8", raw files "bytes".
TENSOR_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8,
                 "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
                 "bool": torch.bool}  # fmt: skip
PACKED_DTYPES = {f"u{bits}": bits for bits in range(1, 9)}
ANS_DTYPES = {f"ans{bits}": bits for bits in range(1, 9)}  # ANS-coded codes: uint32 words, as many as they need
# Files a tokenizer's save_pretrained writes; a container stores only these (plain names, no paths).
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
})  # fmt: skip
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RECORD_BLOBS = ("codes", "scales", "zeros", "mask", "values", "importance", "order", "code_counts")
_GRANULARITIES = ("token", "tensor")
MAX_CONFIG_INT = 1 << 31


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _int(value: object, what: str, low: int = 0, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        allowed = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{what} is {value!r}, expected {allowed}")
    return value


def _dict(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is {type(value).__name__}, expected an object")
    return value


def check_blobs(blobs: object, blob_area: int) -> dict:
    """Blob entries: allowed dtypes, sizes that match shapes, laid out back to back from offset 0.

    `blob_area` is the file size minus the blob area's start; the last blob (padded) must end there.
    """
    blobs = _dict(blobs, "blobs")
    for key, entry in blobs.items():
        entry = _dict(entry, f"blob {key!r}")
        _int(entry.get("offset"), f"offset of blob {key!r}")
        _int(entry.get("nbytes"), f"size of blob {key!r}")
    end = 0
    for key, entry in sorted(blobs.items(), key=lambda item: item[1]["offset"]):
        offset, nbytes = entry["offset"], entry["nbytes"]
        if offset != end:
            raise ValueError(f"blob {key!r} starts at {offset}, expected {end} (blobs must follow each other)")
        end = align(offset + nbytes)
        shape = entry.get("shape")
        if not isinstance(shape, list):
            raise ValueError(f"shape of blob {key!r} is not a list")
        for dim in shape:
            _int(dim, f"a dimension of blob {key!r}", 0, MAX_CONFIG_INT)
        count = math.prod(shape)
        dtype = entry.get("dtype")
        if not isinstance(dtype, str):
            raise ValueError(f"blob {key!r} has dtype {dtype!r}, not one this format stores")
        if dtype in TENSOR_DTYPES:
            expected = count * TENSOR_DTYPES[dtype].itemsize
        elif dtype in PACKED_DTYPES:
            expected = packed_nbytes(count, PACKED_DTYPES[dtype])
        elif (dtype == "bytes" and shape == []) or (dtype in ANS_DTYPES and len(shape) == 1 and nbytes % 4 == 0):
            expected = nbytes
        else:
            raise ValueError(f"blob {key!r} has dtype {dtype!r}, not one this format stores")
        if nbytes != expected:
            raise ValueError(f"blob {key!r} holds {nbytes} bytes, its {dtype} shape {shape} needs {expected}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise ValueError(f"blob {key!r} has no valid sha256")
    if end != blob_area:
        what = "trailing bytes after the last blob" if blob_area > end else "the last blob is cut short"
        raise ValueError(f"{what}: the blobs end at byte {end} of the blob area, the file has {blob_area}")
    return blobs


def _blob(blobs: dict, key: object, what: str, dtypes: tuple[str, ...]) -> str:
    if not isinstance(key, str) or key not in blobs:
        raise ValueError(f"{what} names blob {key!r}, which the header does not list")
    if blobs[key]["dtype"] not in dtypes:
        raise ValueError(f"{what} is stored as {blobs[key]['dtype']}, expected one of {', '.join(dtypes)}")
    return key


def check_record(entry: object, blobs: dict, what: str, alternate: bool = False) -> None:
    """One stored CompressedWeight: field types and ranges, and blobs of the dtypes it needs."""
    entry = _dict(entry, what)
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2):
        raise ValueError(f"{what}: shape is {shape!r}, expected [out, in]")
    out_f, in_f = (_int(d, f"{what}: a dimension", 1, MAX_CONFIG_INT) for d in shape)
    if not isinstance(entry.get("meta", {}), dict):
        raise ValueError(f"{what}: meta is not an object")
    if not isinstance(entry.get("symmetric"), bool):
        raise ValueError(f"{what}: symmetric is not true or false")
    if entry.get("values"):
        _int(entry.get("bits"), f"{what}: bits", 16, 16)
        _blob(blobs, entry["values"], f"{what}: values", ("float16",))
    elif not entry.get("codes") and not entry.get("code_planes"):  # a weight stored as its factors alone
        _int(entry.get("bits"), f"{what}: bits", 16, 16)
        if not entry.get("lowrank") or entry.get("mask") or entry.get("alternates") or entry.get("order"):
            raise ValueError(f"{what}: no codes or values, and not low-rank factors alone")
    else:
        bits = _int(entry.get("bits"), f"{what}: bits", 1, 8)
        _int(entry.get("group_size"), f"{what}: group_size", 1, in_f)
        scales_shape = entry.get("scales_shape")
        if not (isinstance(scales_shape, list) and len(scales_shape) == 2):
            raise ValueError(f"{what}: scales_shape is {scales_shape!r}")
        for dim in scales_shape:
            _int(dim, f"{what}: a scales dimension", 1, MAX_CONFIG_INT)
        _blob(blobs, entry.get("scales"), f"{what}: scales", ("float16", "float32"))  # float32: K-quants
        if blobs[entry["scales"]]["shape"] != scales_shape:
            raise ValueError(f"{what}: scales are stored as {blobs[entry['scales']]['shape']}, not {scales_shape}")
        if entry.get("zeros") is not None:
            _blob(blobs, entry["zeros"], f"{what}: zeros", ("float16", "float32", f"u{bits}"))
        planes = entry.get("code_planes")
        if planes is not None:
            if not isinstance(planes, list) or len(planes) != bits:
                raise ValueError(f"{what}: {bits}-bit codes need {bits} bit planes")
            for plane in planes:
                _blob(blobs, plane, f"{what}: a bit plane", ("u1",))
        elif entry.get("codes_encoding") == "ans":
            _blob(blobs, entry.get("codes"), f"{what}: codes", (f"ans{bits}",))
            _blob(blobs, entry.get("code_counts"), f"{what}: code counts", ("int32",))
            if blobs[entry["code_counts"]]["shape"] != [1 << bits]:
                raise ValueError(
                    f"{what}: code counts of shape {blobs[entry['code_counts']]['shape']}, not [{1 << bits}]"
                )
        elif entry.get("codes_encoding") is not None:
            raise ValueError(f"{what}: codes encoding {entry.get('codes_encoding')!r} is unknown")
        else:
            _blob(blobs, entry.get("codes"), f"{what}: codes", (f"u{bits}",))
    if entry.get("mask"):
        encoding = entry.get("mask_encoding")
        if encoding not in ("nm-rank", "bitmask"):
            raise ValueError(f"{what}: mask encoding {encoding!r} is unknown")
        _blob(blobs, entry["mask"], f"{what}: mask", tuple(PACKED_DTYPES) if encoding == "nm-rank" else ("u1",))
        nm = entry.get("nm")
        if encoding == "nm-rank" or nm is not None:
            if not (isinstance(nm, list) and len(nm) == 2):
                raise ValueError(f"{what}: N:M pattern {nm!r}")
            n, m = (_int(v, f"{what}: N:M", 1, 64) for v in nm)
            if n >= m or in_f % m:
                raise ValueError(f"{what}: N:M pattern {n}:{m} does not fit {in_f} columns")
    lowrank = entry.get("lowrank")
    if lowrank is not None:
        if not (isinstance(lowrank, list) and len(lowrank) == 2):
            raise ValueError(f"{what}: low-rank factors {lowrank!r}, expected two blob keys")
        for key in lowrank:
            _blob(blobs, key, f"{what}: a low-rank factor", ("float16",))
        a, b = (blobs[key]["shape"] for key in lowrank)
        rank = a[1] if len(a) == 2 else 0
        if not 1 <= rank <= min(out_f, in_f) or a != [out_f, rank] or b != [rank, in_f]:
            raise ValueError(f"{what}: low-rank factors of shapes {a} and {b} do not fit [{out_f}, {in_f}]")
    if entry.get("importance"):
        _blob(blobs, entry["importance"], f"{what}: importance", ("float16",))
    if entry.get("order"):
        _blob(blobs, entry["order"], f"{what}: order", tuple(PACKED_DTYPES))
    activation = entry.get("activation")
    if activation is not None:
        activation = _dict(activation, f"{what}: activation")
        _int(activation.get("bits"), f"{what}: activation bits", 2, 16)
        if activation.get("granularity") not in _GRANULARITIES:
            raise ValueError(f"{what}: activation granularity {activation.get('granularity')!r}")
        scale = activation.get("scale")
        if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"{what}: activation scale {scale!r}")
        if activation["granularity"] == "tensor" and scale is None:
            raise ValueError(f"{what}: a per-tensor activation grid needs its scale")
    alternates = entry.get("alternates", [])
    if not isinstance(alternates, list) or (alternate and alternates):
        raise ValueError(f"{what}: alternates must be a list of records (one level deep)")
    for i, alt in enumerate(alternates):
        check_record(alt, blobs, f"{what}: alternate {i}", alternate=True)
        if alt.get("shape") != [out_f, in_f]:
            raise ValueError(f"{what}: alternate {i} has another shape")


def check_header(header: object, blob_area: int) -> dict:
    """Every field the reader uses, checked; returns the header. Raises ValueError naming the field."""
    header = _dict(header, "the header")
    blobs = check_blobs(header.get("blobs"), blob_area)
    config = _dict(header.get("config"), "config")
    if not isinstance(config.get("model_type"), str):
        raise ValueError("config names no model_type")
    for name in ("linears", "embeddings", "dense", "aliases", "tokenizer_files"):
        _dict(header.get(name, {}), name)
    for name, entry in header.get("linears", {}).items():
        check_record(entry, blobs, f"linear {name!r}")
    for name, entry in header.get("embeddings", {}).items():
        check_record(entry, blobs, f"embedding {name!r}")
        if entry.get("activation") is not None or entry.get("alternates"):
            raise ValueError(f"embedding {name!r} carries fields only linears have")
    for key, blob in header.get("dense", {}).items():
        _blob(blobs, blob, f"dense tensor {key!r}", tuple(TENSOR_DTYPES))
    stored = set(header.get("dense", {})) | {f"{name}.weight" for name in header.get("embeddings", {})}
    for key, target in header.get("aliases", {}).items():
        if not isinstance(target, str) or target not in stored:
            raise ValueError(f"alias {key!r} points at {target!r}, which is not a stored tensor")
    for name, blob in header.get("tokenizer_files", {}).items():
        if name not in TOKENIZER_FILES:
            raise ValueError(f"tokenizer file name {name!r} is not one a tokenizer writes")
        _blob(blobs, blob, f"tokenizer file {name!r}", ("bytes",))
    if header.get("dense_dtype", "float16") not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dense_dtype {header.get('dense_dtype')!r}")
    _int(header.get("parameters"), "parameters", 1)
    _int(header.get("linear_parameters"), "linear_parameters", 0)
    for name in ("recipe", "source_model", "calibration", "train_recipe", "dial_setting"):
        if header.get(name) is not None:
            _dict(header[name], name)
    source = header.get("source_model") or {}
    for name in ("sha256", "path", "source"):
        if source.get(name) is not None and not isinstance(source[name], str):
            raise ValueError(f"source_model.{name} is not a string")
    return header


def check_config(values: dict, defaults: dict) -> None:
    """A stored model config (less its model_type) against its family's defaults: numbers in range,
    every field of the kind the family expects."""
    _check_config_numbers(values)
    _check_config_types(values, defaults)


def _check_config_numbers(value: object, where: str = "config") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _check_config_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for item in value:
            _check_config_numbers(item, where)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
        raise ValueError(f"{where} is {value}, out of range")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}")


def _check_config_types(values: dict, defaults: dict) -> None:
    """Fields the family's config has must keep their kind: a flag stays a flag, a number a number.

    A flag such as `return_dict` or `output_hidden_states` set to a list would build a model that
    fails (or answers differently) later, far from the file that caused it.
    """
    for key, value in values.items():
        default = defaults.get(key)
        if default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):  # numbers, or None, or a list of them (several eos ids)
            items = value if isinstance(value, list) else [value]
            ok = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in items)
        elif isinstance(default, str):
            ok = value is None or isinstance(value, str)
        else:
            ok = value is None or isinstance(value, type(default))
        if not ok:
            raise ValueError(f"config.{key} is {value!r}, expected a value like {default!r}")
