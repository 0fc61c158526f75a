"""GGUF export: a container's records as one file that llama.cpp loads with nothing else beside it.

A group-32 record is written without loss when a GGUF type decodes its grid to the same numbers:

* symmetric 8, 5 and 4 bits (zero point 128, 16, 8) are Q8_0, Q5_0 and Q4_0: `(code - zero) · d`;
* asymmetric 4 and 5 bits are Q4_1 and Q5_1, `code · d + m`, when `m = -zero · scale` is itself a
  float16 (llama.cpp stores m as one). Grids made with `offset_exact` (`gguf-q4_1-*` presets) choose
  their scales so that it always is; an ordinary asymmetric grid misses on some groups.

* a K-quant grid (`quant.grid.K_QUANTS`, the `gguf-q<2..6>_k-*` presets) is its type: each super-block's
  float16 d and integer sub-block scales sc are read back from the record's scales (float32), and for
  Q4_K, Q5_K and Q2_K its float16 dmin and integer minimums m from the offsets zero · scale (the grid
  keeps both on their lattices and says how); a record they do not reproduce exactly is refused.
  Q6_K and Q3_K then decode bit for bit; llama.cpp computes the others as d·sc·code − dmin·m, which
  equals our (code − zero) · scale up to float32 rounding.

Anything else (another group size, plain 2-bit grids, float zero points, low-rank terms) is refused with
the recipe that would fit, unless `requantize` is set: then the tensor is re-rounded onto the nearest
legacy type (or only its offsets are rounded to float16; a float weight with low-rank factors, or a
weight factorized outright, is written as its product in F16) and the added error is measured and
returned.
Tensors that stay dense keep their stored dtype (float32 for 1-D tensors, as llama.cpp expects);
a pruned weight's masked codes are its zero point, which decodes to exactly 0.

Tensors are written one at a time (their layout is planned from the header first), so a model
larger than memory exports with one tensor resident. The tokenizer (GPT-2 style byte-level BPE),
chat template and architecture metadata are taken from the container; llama, mistral and qwen2
families are mapped (others are refused by name).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compresslm.compressed import CompressedWeight, expand_groups
from compresslm.errors import CompressLMError
from compresslm.fileio import atomic_path
from compresslm.formats.container import ContainerReader
from compresslm.progress import progress
from compresslm.quant.grid import K_QUANTS, SUPER_BLOCK

GROUP = 32
# (bits, symmetric) of a group-32 grid -> the GGUF type that decodes it exactly
EXACT_TYPES = {(8, True): "Q8_0", (5, True): "Q5_0", (4, True): "Q4_0", (5, False): "Q5_1", (4, False): "Q4_1"}
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24,
                "Q6_K": 210, "Q5_K": 176, "Q4_K": 144, "Q3_K": 110, "Q2_K": 84}  # fmt: skip
_BLOCK_COLUMNS = {name.upper(): SUPER_BLOCK for name in K_QUANTS}  # the rest: GROUP
# config model_type -> (llama.cpp architecture, whether q/k rows are permuted to llama.cpp's rope layout)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
# llama.cpp's name for a tokenizer's pre-tokenizer, by family and vocabulary size (its converter finds it
# by hashing a test text; these are the families this project reads)
_PRE_TOKENIZERS = {("llama", 49152): "smollm", ("qwen2", 151936): "qwen2", ("llama", 128256): "llama-bpe"}


class ExportError(CompressLMError):
    """A container that cannot be written in the asked format as it is."""


@dataclass
class GGUFExport:
    """What an export wrote: the file, its bytes, tensor counts by GGUF type, and any requantization's error."""

    path: Path
    bytes_on_disk: int = 0
    types: dict[str, int] = field(default_factory=dict)
    requantized: dict[str, float] = field(default_factory=dict)  # tensor -> relative Frobenius error added
    exact: bool = True

    def to_dict(self) -> dict:
        worst = max(self.requantized.values(), default=0.0)
        return {
            "path": str(self.path),
            "format": "gguf",
            "bytes_on_disk": self.bytes_on_disk,
            "tensor_types": dict(sorted(self.types.items())),
            "exact": self.exact,
            "requantized_tensors": len(self.requantized),
            "requantize_max_relative_error": worst,
        }


def _ggml(name: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, name)


def exact_type(entry: dict, blobs: dict) -> str | None:
    """The GGUF type that holds a header record's grid exactly, or None (from the header alone)."""
    if entry.get("lowrank"):
        return None
    if entry.get("values") is not None:
        return "F16"
    kquant = (entry.get("meta") or {}).get("kquant")
    if kquant in K_QUANTS:
        kind = K_QUANTS[kquant]
        fits = (entry["bits"], entry["group_size"], entry["symmetric"]) == (kind.bits, kind.group_size, kind.symmetric)
        zeros = None if entry.get("zeros") is None else blobs[entry["zeros"]]["dtype"]
        fits = fits and zeros == (None if kind.symmetric else "float32")
        fits = fits and (kind.symmetric or not entry.get("mask"))  # offsets leave no code at exactly zero
        return kquant.upper() if fits and entry["shape"][1] % SUPER_BLOCK == 0 else None
    float_zeros = entry.get("zeros") and blobs[entry["zeros"]]["dtype"] in ("float16", "float32")
    if float_zeros or entry["shape"][1] % GROUP:
        return None
    if entry["group_size"] != GROUP or entry.get("scales_shape") == [1, 1]:
        return None
    return EXACT_TYPES.get((entry["bits"], entry["symmetric"]))


def _fallback_type(entry: dict) -> str:
    """The legacy type a record is re-rounded onto when no type holds its grid (F16 for float weights with
    low-rank factors: their product)."""
    bits = entry.get("bits", 16)
    if bits == 16:
        return "F16"
    if bits >= 6:
        return "Q8_0"
    width = 5 if bits == 5 else 4
    return f"Q{width}_{0 if entry.get('symmetric') else 1}"


def _suggestion(entry: dict, kind: str) -> str:
    bits = entry.get("bits", 4)
    if bits == 16:
        return "GGUF holds no low-rank factors; their product can be written as F16"
    if kind == "embedding":
        return "recompress with +emb8-g32-sym for the embedding (Q8_0's grid)"
    if bits in (4, 5):
        return f"recompress with a preset such as gguf-q{bits}_1-gptq or w{bits}-g32-gptq-sym"
    if bits >= 7:
        return "recompress with w8-g32-rtn-sym"
    return f"recompress with a preset such as gguf-q{bits}_k-gptq"


# ---- block packing: each function returns [rows, blocks * block_bytes] uint8 ------------------------


def _blocks(record: CompressedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [rows, blocks, 32] (masked weights set to their zero point), scales and zeros [rows, blocks]."""
    out_f, in_f = record.shape
    codes = record.codes
    zeros = record.zeros
    if record.mask is not None:
        codes = torch.where(record.mask, codes, expand_groups(zeros, in_f, GROUP))
    return (
        codes.numpy().reshape(out_f, in_f // GROUP, GROUP),
        record.scales.numpy(),
        zeros.numpy(),
    )


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values.astype(np.float16)).view(np.uint8).reshape(*values.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """ggml's 4-bit layout: byte j holds element j in its low nibble and element j + 16 in its high one."""
    return ((codes[..., :16] & 0x0F) | ((codes[..., 16:] & 0x0F) << 4)).astype(np.uint8)


def _high_bits(codes: np.ndarray) -> np.ndarray:
    """ggml's fifth bits: bit j of a little-endian uint32 is the fifth bit of element j."""
    bits = ((codes >> 4) & 1).astype(np.uint32)
    word = (bits << np.arange(GROUP, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
    return word.astype("<u4").view(np.uint8).reshape(*codes.shape[:-1], 4)


def _offsets(scales: np.ndarray, zeros: np.ndarray, rounded: bool) -> np.ndarray | None:
    """m = -zero · scale as float16, or None when some group's offset is not a float16 (and not `rounded`)."""
    exact = -(zeros.astype(np.float32) * scales.astype(np.float32))
    m = exact.astype(np.float16)
    if not rounded and not np.array_equal(m.astype(np.float32), exact):
        return None
    return m


def _lattice(values: np.ndarray, top: int, low: int) -> tuple[np.ndarray, np.ndarray]:
    """Each super-block's float16 step [rows, blocks] and integers in [low, top] [rows, blocks, subs] nearest
    to `values` [rows, blocks, subs] (the caller checks that they reproduce the record).

    `quant.grid` gives each super-block's value largest in magnitude ±top, so the step is that magnitude
    over the top integer, rounded to float16 (exact for scales; offsets arrive with float32 rounding).
    Symmetric types' scales are signed (low = -top), as llama.cpp's own quantizer makes them.
    """
    step = (np.abs(values).max(axis=2) / np.float32(top)).astype(np.float16).astype(np.float32)
    n = np.rint(values / np.maximum(step, np.float32(2.0**-24))[..., None])
    return step, np.clip(n, low, top).astype(np.int64)


def _kquant_params(record: CompressedWeight, kind) -> tuple[np.ndarray, ...] | None:
    """(d, sc, dmin, m) of every super-block of a K-quant record ([rows, blocks] and [rows, blocks, subs];
    dmin and m None for symmetric types), or None when they do not give back the record's scales and
    zero points exactly (a record that a K-quant grid did not make)."""
    out_f, in_f = record.shape
    blocks = in_f // SUPER_BLOCK
    scales = record.scales.numpy().astype(np.float32).reshape(out_f, blocks, -1)
    d, sc = _lattice(scales, kind.max_scale, -kind.max_scale if kind.symmetric else 1)
    if not (d > 0).all() or not np.array_equal(d[..., None] * sc.astype(np.float32), scales):
        return None
    if kind.symmetric:
        return d, sc, None, None
    zeros = record.zeros.numpy().reshape(out_f, blocks, -1)
    dmin, m = _lattice(zeros * scales, kind.max_min, 0)
    if not np.array_equal((dmin[..., None] * m.astype(np.float32)) / scales, zeros):
        return None
    return d, sc, dmin, m


def _fields(values: np.ndarray, width: int) -> np.ndarray:
    """Bytes holding `values` [..., k, n] as k fields of `width` bits, field i at bit width·i of byte j."""
    shifts = (np.arange(values.shape[-2], dtype=np.uint8) * width)[:, None]
    return (values.astype(np.uint8) << shifts).sum(axis=-2, dtype=np.uint8)


def _scales_and_mins_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit minimums."""
    low = (sc[..., :4] | ((sc[..., 4:] >> 4) << 6)).astype(np.uint8)
    mid = (m[..., :4] | ((m[..., 4:] >> 4) << 6)).astype(np.uint8)
    high = ((sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)).astype(np.uint8)
    return np.concatenate([low, mid, high], axis=-1)


def _pack_kquant(record: CompressedWeight, gguf_type: str) -> np.ndarray | None:
    """K-quant super-blocks of a K-quant record (None when its scales or offsets are not on the lattice)."""
    kind = K_QUANTS[gguf_type.lower()]
    out_f, in_f = record.shape
    codes = record.codes
    if record.mask is not None:  # masked weights decode to exactly 0 at the zero point
        if not kind.symmetric:
            return None
        codes = torch.where(record.mask, codes, torch.full_like(codes, 1 << (kind.bits - 1)))
    blocks = in_f // SUPER_BLOCK
    u = codes.numpy().astype(np.uint8).reshape(out_f, blocks, SUPER_BLOCK)
    found = _kquant_params(record, kind)
    if found is None:
        return None
    d, sc, dmin, m = found
    if gguf_type in ("Q4_K", "Q5_K"):  # d, dmin, 6-bit scales and minimums (12), [qh (32)], qs (128)
        pairs = u.reshape(out_f, blocks, 4, 2, 32)
        qs = ((pairs[..., 0, :] & 0x0F) | ((pairs[..., 1, :] & 0x0F) << 4)).reshape(out_f, blocks, 128)
        parts = [_f16_bytes(d), _f16_bytes(dmin), _scales_and_mins_6bit(sc, m)]
        if gguf_type == "Q5_K":
            parts.append(_fields(((u >> 4) & 1).reshape(out_f, blocks, 8, 32), 1))
        parts.append(qs)
        return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(out_f, -1))
    if gguf_type == "Q2_K":  # 4-bit scale | 4-bit minimum (16), qs (64), d, dmin
        qs = _fields(u.reshape(out_f, blocks, 2, 4, 32), 2).reshape(out_f, blocks, 64)
        parts = [(sc | (m << 4)).astype(np.uint8), qs]
        parts += [_f16_bytes(d), _f16_bytes(dmin)]
        return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(out_f, -1))
    if gguf_type == "Q6_K":  # ql (128), qh (64), int8 scales (16), d
        halves = u.reshape(out_f, blocks, 2, 128)
        ql = (halves[..., :64] & 0x0F) | ((halves[..., 64:] & 0x0F) << 4)
        qh = _fields((halves.reshape(out_f, blocks, 2, 4, 32) >> 4) & 3, 2)
        parts = [ql.reshape(out_f, blocks, 128), qh.reshape(out_f, blocks, 64), sc.astype(np.int8).view(np.uint8)]
    else:  # Q3_K: hmask (32), qs (64), 6-bit scales + 32 (12), d
        hmask = _fields((u >> 2).reshape(out_f, blocks, 8, 32), 1)
        qs = _fields((u & 3).reshape(out_f, blocks, 2, 4, 32), 2).reshape(out_f, blocks, 64)
        v = (sc + 32).astype(np.uint8)
        lscales = (v[..., :8] & 0x0F) | ((v[..., 8:] & 0x0F) << 4)
        hscales = _fields((v.reshape(out_f, blocks, 4, 4) >> 4) & 3, 2)
        parts = [hmask, qs, lscales, hscales]
    parts.append(_f16_bytes(d))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(out_f, -1))


def pack(record: CompressedWeight, gguf_type: str, round_offsets: bool = False) -> np.ndarray | None:
    """The record's bytes as GGUF blocks of `gguf_type` (one of EXACT_TYPES' values or a K-quant), or None
    when an asymmetric grid's offsets are not float16 values (unless `round_offsets`) or a K-quant
    record's scales are not on its super-blocks' lattice."""
    if gguf_type in _BLOCK_COLUMNS:
        return _pack_kquant(record, gguf_type)
    codes, scales, zeros = _blocks(record)
    d = _f16_bytes(scales)
    if gguf_type in ("Q4_1", "Q5_1"):
        m = _offsets(scales, zeros, round_offsets)
        if m is None:
            return None
        parts = [d, _f16_bytes(m)]
    else:
        expected = 1 << (record.bits - 1)
        if not (zeros == expected).all():
            raise ExportError(f"a symmetric record's zero point is not {expected}")
        parts = [d]
    if gguf_type == "Q8_0":
        parts.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if gguf_type in ("Q5_0", "Q5_1"):
            parts.append(_high_bits(codes))
        parts.append(_nibbles(codes))
    rows = codes.shape[0]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1))


def dequantize_gguf(data: np.ndarray, gguf_type: str) -> torch.Tensor:
    """Decode GGUF blocks with the `gguf` package's own decoder (an implementation independent of ours)."""
    from gguf.quants import dequantize

    if gguf_type in ("F16", "F32"):  # stored as numbers; BF16 arrives as bytes and is decoded below
        return torch.from_numpy(np.asarray(data, dtype=np.float32).copy())
    return torch.from_numpy(dequantize(data, _ggml(gguf_type)).astype(np.float32))


# ---- names and metadata -----------------------------------------------------------------------------


def _permute_rows(tensor: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order of q/k projections -> llama.cpp's interleaved pairs (rows only)."""
    rows = tensor.shape[0]
    return tensor.reshape(heads, 2, rows // heads // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)


class _Layout:
    """The family's architecture name, tensor names and which rows are permuted, from the header's config."""

    def __init__(self, config: dict) -> None:
        import gguf

        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise ExportError(f"GGUF export knows the families {known}; this model is {model_type!r}")
        self.arch, self.permute = ARCHITECTURES[model_type]
        self.config = config
        self.layers = int(config["num_hidden_layers"])
        arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch)
        self.names = gguf.get_tensor_name_map(arch_enum, self.layers)
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)

    def name(self, key: str) -> str:
        mapped = self.names.get_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ExportError(f"no GGUF name for tensor {key!r} of a {self.arch} model")
        return mapped

    def rows_permuted(self, key: str, tensor: np.ndarray) -> np.ndarray:
        if self.permute and ".self_attn.q_proj." in key:
            return _permute_rows(tensor, self.heads)
        if self.permute and ".self_attn.k_proj." in key:
            return _permute_rows(tensor, self.kv_heads)
        return tensor

    def write_metadata(self, writer, name: str) -> None:
        config = self.config
        rope = config.get("rope_parameters") or {}
        if isinstance(config.get("rope_scaling"), dict):
            rope = {**config["rope_scaling"], **rope}
        if rope.get("rope_type", "default") != "default":
            raise ExportError(f"GGUF export writes default RoPE only; this model uses {rope.get('rope_type')!r}")
        if config.get("sliding_window") and config.get("use_sliding_window", self.arch != "qwen2"):
            raise ExportError("GGUF export does not write sliding-window attention yet")
        hidden = int(config["hidden_size"])
        head_dim = int(config.get("head_dim") or hidden // self.heads)
        theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        writer.add_name(name)
        writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(self.layers)
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(self.heads)
        writer.add_head_count_kv(self.kv_heads)
        writer.add_rope_freq_base(float(theta))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_rope_dimension_count(head_dim)
        if head_dim * self.heads != hidden:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(int(config["vocab_size"]))


def _write_tokenizer(writer, files: dict[str, bytes], config: dict) -> None:
    """Tokens, types, merges, special ids and chat template of a byte-level BPE tokenizer."""
    import gguf

    if "tokenizer.json" not in files:
        raise ExportError("GGUF export needs the container's tokenizer.json (the container stores no tokenizer)")
    data = json.loads(files["tokenizer.json"])
    model = data.get("model") or {}
    decoder = data.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ExportError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style); "
            f"this one is {model.get('type')} with a {decoder.get('type')} decoder"
        )
    vocab_size = int(config["vocab_size"])
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in model["vocab"].items():
        if 0 <= index < vocab_size:
            tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for added in data.get("added_tokens") or []:
        index = added["id"]
        if 0 <= index < vocab_size:
            tokens[index] = added["content"]
            types[index] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    tokens = [text if text is not None else f"[PAD{i}]" for i, text in enumerate(tokens)]
    writer.add_tokenizer_model("gpt2")
    family = (config.get("model_type"), vocab_size)
    writer.add_tokenizer_pre(_PRE_TOKENIZERS.get(family, "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in files.items():  # names were allow-listed when the container was read
            (Path(tmp) / name).write_bytes(blob)
        special = gguf.SpecialVocab(Path(tmp), load_merges=bool(model.get("merges")), n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if not special.merges:
        # llama.cpp requires the key; a vocabulary of single bytes has no merges, so one merge of two
        # tokens that do not form a token of the vocabulary keeps its tokenization unchanged
        writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [_unused_merge(model["vocab"])], gguf.GGUFValueType.ARRAY)


def _unused_merge(vocab: dict[str, int]) -> str:
    for left in ("Ā", "ā", "Ă"):
        if left + left not in vocab:
            return f"{left} {left}"
    raise ExportError("no merge can be written for this tokenizer")


# ---- the export -------------------------------------------------------------------------------------


@dataclass
class _Planned:
    key: str  # the model's tensor name
    gguf_name: str
    kind: str  # "linear", "embedding" or "dense"
    source: str  # header name (record) or dense key
    gguf_type: str
    shape: tuple[int, ...]  # numpy shape of the tensor (rows first)
    exact: bool


def _plan(header: dict, layout: _Layout, requantize: bool) -> list[_Planned]:
    plan = []
    refused = []
    records = [("linear", n, e) for n, e in header["linears"].items()]
    records += [("embedding", n, e) for n, e in header.get("embeddings", {}).items()]
    for kind, name, entry in records:
        key = f"{name}.weight"
        gguf_type = exact_type(entry, header["blobs"])
        exact = gguf_type is not None
        if not exact:
            if not requantize:
                refused.append((kind, name, entry))
                continue
            gguf_type = _fallback_type(entry)
        plan.append(_Planned(key, layout.name(key), kind, name, gguf_type, tuple(entry["shape"]), exact))
    if refused:
        kind, name, entry = refused[0]
        grid = entry.get("meta", {}).get("grid") or f"W{entry.get('bits')} g{entry.get('group_size')}"
        raise ExportError(
            f"{len(refused)} tensors are on grids no GGUF type holds ({name}: {grid}); "
            f"{_suggestion(entry, kind)}, or export with --requantize to re-round them (the added error is measured)"
        )
    blobs = header["blobs"]
    for key, blob in header["dense"].items():
        stored = blobs[blob]
        shape = tuple(stored["shape"])
        dtype = {"float16": "F16", "bfloat16": "BF16"}.get(stored["dtype"], "F32")
        plan.append(_Planned(key, layout.name(key), "dense", key, "F32" if len(shape) == 1 else dtype, shape, True))
    return plan


def _byte_shape(item: _Planned) -> tuple[int, ...]:
    """The tensor's shape in bytes (the last dimension packed), as the GGUF writer plans quantized tensors."""
    *rows, cols = item.shape
    if item.gguf_type in _BLOCK_BYTES:
        return (*rows, cols // _BLOCK_COLUMNS.get(item.gguf_type, GROUP) * _BLOCK_BYTES[item.gguf_type])
    return (*rows, cols * (4 if item.gguf_type == "F32" else 2))


def _numpy_dense(tensor: torch.Tensor, gguf_type: str) -> np.ndarray:
    if gguf_type == "BF16":
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint8).reshape(*tensor.shape[:-1], -1)
    return tensor.to(torch.float16 if gguf_type == "F16" else torch.float32).numpy()


def _tensor_data(reader: ContainerReader, item: _Planned, requantize: bool, errors: dict) -> np.ndarray:
    """The planned tensor's GGUF bytes (or float array), rows in the model's order."""
    if item.kind == "dense":
        return _numpy_dense(reader.dense(item.source), item.gguf_type)
    record = reader.linear(item.source) if item.kind == "linear" else reader.embedding(item.source)
    if not record.quantized:  # float16 values (exact), or a product with low-rank factors rounded to float16
        data = record.dequantize(torch.float16)
        if record.lowrank is not None:
            weight = record.dequantize()
            errors[item.source] = float((data.float() - weight).norm() / weight.norm().clamp_min(1e-30))
        return data.numpy()
    data = pack(record, item.gguf_type) if item.exact else None
    if data is not None:
        return data
    if item.gguf_type in _BLOCK_COLUMNS:
        raise ExportError(
            f"{item.source}: its scales are not {item.gguf_type}'s (a float16 per 256 columns times small integers); "
            "the record was not made by a K-quant grid"
        )
    if item.exact and not requantize:
        raise ExportError(
            f"{item.source}: some groups' offsets (-zero x scale) are not float16 values, which "
            f"{item.gguf_type} stores; recompress with a gguf-q{record.bits}_1-* preset, "
            "or export with --requantize to round them (the added error is measured)"
        )
    weight = record.dequantize()
    if item.exact:  # the grid fits the type; only the offsets are rounded
        data = pack(record, item.gguf_type, round_offsets=True)
    else:
        from gguf.quants import quantize

        data = quantize(weight.numpy(), _ggml(item.gguf_type))
    decoded = dequantize_gguf(data, item.gguf_type)
    errors[item.source] = float((decoded - weight).norm() / weight.norm().clamp_min(1e-30))
    return data


def export_gguf(container: str | os.PathLike, output: str | os.PathLike, requantize: bool = False,
                show_progress: bool = True) -> GGUFExport:  # fmt: skip
    """Write `container` as a GGUF file at `output` (atomically; an existing file is refused by the caller).

    Raises ExportError (before anything is written) when a record's grid is not a GGUF type and
    `requantize` is off, or when the family, RoPE or tokenizer cannot be expressed.
    """
    import gguf

    reader = ContainerReader(container)
    try:
        header = reader.header
        config = dict(header["config"])
        layout = _Layout(config)
        plan = _plan(header, layout, requantize)
        files = reader.tokenizer_files()
        result = GGUFExport(Path(output))
        with atomic_path(output) as tmp:
            writer = gguf.GGUFWriter(tmp, layout.arch)
            layout.write_metadata(writer, Path(container).stem)
            _write_tokenizer(writer, files, config)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for item in plan:
                shape = _byte_shape(item)
                nbytes = int(np.prod(shape))
                writer.add_tensor_info(item.gguf_name, shape, np.dtype(np.uint8), nbytes, _ggml(item.gguf_type))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            bar = progress(len(plan), "export gguf", unit="tensor", enabled=show_progress)
            for item in plan:
                data = layout.rows_permuted(item.key, _tensor_data(reader, item, requantize, result.requantized))
                writer.write_tensor_data(np.ascontiguousarray(data).view(np.uint8))
                result.types[item.gguf_type] = result.types.get(item.gguf_type, 0) + 1
                bar.update(1)
            bar.close()
            writer.close()
        result.exact = not result.requantized
        result.bytes_on_disk = Path(output).stat().st_size
        return result
    finally:
        reader.close()
