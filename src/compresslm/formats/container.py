"""The `.clm` container: one file holding a compressed model, its tokenizer and its provenance.

Layout (format 2)::

    b"CLM2" | u64 little-endian header length | sha256 of the header | header (UTF-8 JSON)
    | zero padding to 64 | blobs, each zero-padded to 64 | end of file

The header holds the model config, the recipe, the calibration protocol, versions, the per-layer
report, and for every blob its offset (from the start of the blob area, 64-byte aligned), size,
dtype, shape and sha256. Compressed linears are stored as bit-packed codes, float16 scales and
bit-packed zero points (none for symmetric grids, whose zero point is fixed). Tensors that stay
dense are stored in the recipe's `dense_dtype`; a tied lm_head is stored once. A sparse weight stores
only its kept codes (or float16 values, when not quantized) plus its mask: an N:M mask as the rank
of each group's pattern (2:4: 3 bits per 4 weights), any other mask as a bitmask.

This module only reads and writes records, tensors and bytes; `models.assemble` gathers them from a
model and builds a model from them. Writes are atomic (temporary file + rename), and every record
written is checked against `sizes.record_nbytes`, the count the planners use. A container may come
from someone else, so reading treats it as data: the header's checksum is checked before it is
parsed, every field is checked (`header_check`: dtypes from an allow-list, sizes against shapes, no
trailing bytes, tokenizer files by plain allow-listed names only) and every blob's checksum is
checked before any record is built. Any failure is one `FILE is corrupt: reason` error; nothing is
half-loaded and nothing is written. Format 1 (no header checksum) is refused with a message to
recompress.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from compresslm.compressed import CompressedWeight, DialMeta, InvalidCompressedWeight, expand_groups
from compresslm.errors import CompressLMError, CorruptFileError, reason_of
from compresslm.fileio import atomic_path, temp_sibling
from compresslm.formats.ans import ans_decode, ans_encode
from compresslm.formats.header_check import TENSOR_DTYPES, TOKENIZER_FILES, align, check_header
from compresslm.formats.packing import decode_nm, encode_nm, nm_index_bits, pack_bits, packed_nbytes, unpack_bits
from compresslm.formats.sizes import mask_encoding, record_nbytes
from compresslm.quant.nested import width_grid
from compresslm.versions import versions

MAGIC = b"CLM2"
OLD_MAGIC = b"CLM1"
FORMAT_VERSION = 2
ENTROPY_FORMAT_VERSION = 3  # a file with ANS-coded codes: older readers refuse it by its version
_PREFIX = len(MAGIC) + 8 + 32  # magic, header length, header sha256
_MAX_HEADER = 1 << 30


def _tensor_bytes(tensor: torch.Tensor) -> memoryview | bytes:
    """The tensor's bytes, without a copy where it is already contiguous on the CPU (an embedding is large)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""


class _BlobWriter:
    """Appends blobs to an open file as they come, each zero-padded to 64, and indexes them."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.index: dict[str, dict] = {}
        self.offset = 0

    def add(self, key: str, data: bytes | memoryview, dtype: str, shape: list[int]) -> str:
        self.index[key] = {
            "offset": self.offset,
            "nbytes": len(data),
            "dtype": dtype,
            "shape": shape,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        padding = align(len(data)) - len(data)
        self.handle.write(data)
        self.handle.write(b"\0" * padding)
        self.offset += len(data) + padding
        return key


# What building records and tensors from a damaged file raises (each is reported as the file being corrupt).
_DAMAGE = (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError,
           InvalidCompressedWeight)  # fmt: skip

_RECORD_BLOBS = ("codes", "scales", "zeros", "mask", "values", "importance", "order", "code_counts")


def _write_mask(writer: _BlobWriter, name: str, record: CompressedWeight) -> dict:
    if mask_encoding(record.nm) == "nm-rank":
        n, m = record.nm
        bits = nm_index_bits(n, m)
        index = torch.from_numpy(encode_nm(record.mask, n, m).astype(np.uint8))
        key = writer.add(f"{name}.mask", pack_bits(index, bits), f"u{bits}", [index.numel()])
        return {"mask": key, "mask_encoding": "nm-rank", "nm": [n, m]}
    key = writer.add(f"{name}.mask", pack_bits(record.mask.to(torch.uint8), 1), "u1", list(record.shape))
    return {"mask": key, "mask_encoding": "bitmask", "nm": list(record.nm) if record.nm else None}


def _write_record(writer: _BlobWriter, name: str, record: CompressedWeight, entropy: bool = False) -> dict:
    """Store one CompressedWeight and check that its own blobs take what `sizes.record_nbytes` says (with
    `entropy`, ANS-coded codes take what they take instead of their packed size)."""
    entry = _write_blobs(writer, name, record, entropy)
    keys = [entry[key] for key in ("codes", "scales", "zeros", "mask", "values", "code_counts") if entry.get(key)]
    keys += entry.get("code_planes", []) + entry.get("lowrank", [])
    written = sum(writer.index[key]["nbytes"] for key in keys)
    expected = record_nbytes(record, aligned=False)
    if entry.get("codes_encoding") == "ans":
        coded = writer.index[entry["codes"]]
        expected += coded["nbytes"] + writer.index[entry["code_counts"]]["nbytes"]
        expected -= packed_nbytes(coded["shape"][0], record.bits)
    if written != expected:
        raise AssertionError(f"{name}: wrote {written} bytes where formats.sizes counts {expected}")
    return entry


def _ans_codes(codes: torch.Tensor, bits: int) -> tuple[bytes, bytes] | None:
    """Codes ANS-coded (words, and the int32 counts a decoder needs), or None when that is not smaller."""
    flat = codes.reshape(-1).numpy()
    counts = np.bincount(flat, minlength=1 << bits).astype(np.int32)
    words = ans_encode(flat, counts).tobytes()
    return (words, counts.tobytes()) if len(words) + counts.nbytes < packed_nbytes(flat.size, bits) else None


def _write_blobs(writer: _BlobWriter, name: str, record: CompressedWeight, entropy: bool = False) -> dict:
    """Store one CompressedWeight: packed codes, float16 scales (K-quants: float32), packed zero points
    (asymmetric only).

    With a mask, only the kept codes (or values) are stored, followed by the mask itself.
    """
    entry = {
        "bits": record.bits,
        "group_size": record.group_size,
        "symmetric": record.symmetric,
        "shape": list(record.shape),
        "scales_shape": None,
        "codes": None,
        "scales": None,
        "zeros": None,
        "mask": None,
        "values": None,
        "meta": record.meta,
    }
    if record.importance is not None:
        imp = record.importance
        entry["importance"] = writer.add(f"{name}.importance", _tensor_bytes(imp), "float16", list(imp.shape))
    if record.order is not None:  # a nested-sparse keep order: positions within blocks of columns
        bits = max(1, (record.dial.order_block - 1).bit_length())
        entry["order"] = writer.add(f"{name}.order", pack_bits(record.order, bits), f"u{bits}", list(record.shape))
    if record.lowrank is not None:  # float16 factors A [out, r] and B [r, in]
        entry["lowrank"] = [
            writer.add(f"{name}.lowrank.{side}", _tensor_bytes(factor), "float16", list(factor.shape))
            for side, factor in zip("ab", record.lowrank, strict=True)
        ]
    if record.is_factored:  # the factors are the whole weight
        return entry
    kept = record.mask
    if kept is not None:
        entry.update(_write_mask(writer, name, record))
        entry["sparsity"] = record.sparsity
    if not record.quantized:
        values = record.values if kept is None else record.values[kept]
        entry["values"] = writer.add(f"{name}.values", _tensor_bytes(values), "float16", [values.numel()])
        return entry
    codes = record.codes if kept is None else record.codes[kept]
    if record.dial is not None and kept is None:  # nested widths: bit planes, most significant first
        planes = [(codes >> (record.bits - 1 - p)) & 1 for p in range(record.bits)]
        entry["code_planes"] = [
            writer.add(f"{name}.codes.plane{p}", pack_bits(plane, 1), "u1", [codes.numel()])
            for p, plane in enumerate(planes)
        ]
    elif entropy and (coded := _ans_codes(codes, record.bits)) is not None:
        words, counts = coded
        entry["codes"] = writer.add(f"{name}.codes", words, f"ans{record.bits}", [codes.numel()])
        entry["code_counts"] = writer.add(f"{name}.code_counts", counts, "int32", [1 << record.bits])
        entry["codes_encoding"] = "ans"
    else:
        entry["codes"] = writer.add(f"{name}.codes", pack_bits(codes, record.bits), f"u{record.bits}", [codes.numel()])
    entry["scales_shape"] = list(record.scales.shape)
    dtype = str(record.scales.dtype).removeprefix("torch.")  # float32: a K-quant's d · sc (quant.grid)
    entry["scales"] = writer.add(f"{name}.scales", _tensor_bytes(record.scales), dtype, list(record.scales.shape))
    if record.zeros.is_floating_point():  # float zero points (nested grids: float16; K-quants: float32)
        dtype = str(record.zeros.dtype).removeprefix("torch.")
        entry["zeros"] = writer.add(f"{name}.zeros", _tensor_bytes(record.zeros), dtype, list(record.zeros.shape))
    elif not record.symmetric:
        entry["zeros"] = writer.add(
            f"{name}.zeros", pack_bits(record.zeros, record.bits), f"u{record.bits}", list(record.zeros.shape)
        )
    if record.alternates:  # a dial's separately stored widths, each a record of its own
        entry["alternates"] = [_write_record(writer, _alternate_name(name, alt), alt, entropy)
                               for alt in record.alternates]  # fmt: skip
    return entry


def _ans_coded(*groups: dict) -> bool:
    """Whether any entry (or alternate) holds ANS-coded codes."""
    entries = [entry for group in groups for entry in group.values()]
    while entries:
        entry = entries.pop()
        if entry.get("codes_encoding") == "ans":
            return True
        entries += entry.get("alternates", [])
    return False


def _alternate_name(name: str, alt: CompressedWeight) -> str:
    """A dial alternate's blob prefix: its width, and a pruned ratio's per mille (`.w8.s500`)."""
    ratio = alt.dial.sparsity if alt.mask is not None else None
    return f"{name}.w{alt.bits}" + (f".s{round(ratio * 1000)}" if ratio is not None else "")


class ContainerWriter:
    """A container written in one pass: compressed linears as they come, everything else at the end.

    A model streamed block by block hands each block's records over and forgets them, so no more
    than one block's records are ever held. Blobs go to a temporary spill file beside the target
    as they arrive; `finish` writes the header, then the spill's bytes, to the target atomically,
    so a failure at any point (a full disk included) leaves any existing file at the target as it
    was. Blobs are laid out in the order: linears, embeddings, dense tensors, tokenizer files.
    """

    def __init__(self, path: str | os.PathLike, spill: Path | None = None, entropy: bool = False) -> None:
        """`spill`: where to keep the blobs written so far (a journal's, kept by `abort` so a run can resume);
        by default a temporary file beside the target. `entropy`: store each record's codes ANS-coded where
        that is smaller (format version 3)."""
        self.entropy = entropy
        self.target = Path(path).expanduser()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._keep_spill = spill is not None
        self._spill_path = spill or temp_sibling(self.target)
        try:
            self._spill = self._spill_path.open("r+b" if self._spill_path.exists() else "w+b")
        except OSError as exc:
            raise CompressLMError(f"cannot write {self.target}: {exc.strerror or exc}") from None
        self._blobs = _BlobWriter(self._spill)
        self.linears: dict[str, dict] = {}
        self.linear_parameters = 0

    def state(self) -> dict:
        """What was written so far, after making it durable: `restore` continues from here."""
        self._guarded(self._flush)
        return {"offset": self._blobs.offset, "blobs": self._blobs.index, "linears": self.linears,
                "linear_parameters": self.linear_parameters}  # fmt: skip

    def restore(self, state: dict) -> None:
        """Continue after `state` (a killed run's last durable point): later bytes of the spill are dropped."""
        self._spill.truncate(state["offset"])
        self._spill.seek(state["offset"])
        self._blobs.offset, self._blobs.index = state["offset"], dict(state["blobs"])
        self.linears, self.linear_parameters = dict(state["linears"]), state["linear_parameters"]

    def _flush(self) -> None:
        self._spill.flush()
        os.fsync(self._spill.fileno())

    def add_linear(self, name: str, record: CompressedWeight, activation: dict | None = None) -> None:
        """Store one compressed linear (and its simulated activation grid, or None)."""
        entry = self._guarded(_write_record, self._blobs, name, record, self.entropy)
        entry["activation"] = activation
        self.linears[name] = entry
        self.linear_parameters += record.out_features * record.in_features

    def finish(
        self,
        *,
        config: dict,
        embeddings: dict[str, CompressedWeight],
        dense: dict[str, torch.Tensor],
        aliases: dict[str, str],
        tokenizer_files: dict[str, bytes],
        parameters: int,
        dense_dtype: str,
        metadata: dict | None = None,
    ) -> dict:
        """Write the rest and the header, move the file into place and return its summary.

        `dense` tensors are written as given (the caller stores them in `dense_dtype`), in their order;
        `aliases` name tensors stored under another key (a tied lm_head).
        """
        try:
            embedding_entries = {name: self._guarded(_write_record, self._blobs, name, record, self.entropy)
                                 for name, record in embeddings.items()}  # fmt: skip
            dense_entries = {}
            for key, tensor in dense.items():
                dtype = str(tensor.dtype).removeprefix("torch.")
                dense_entries[key] = self._guarded(self._blobs.add, f"dense/{key}", _tensor_bytes(tensor), dtype,
                                                   list(tensor.shape))  # fmt: skip
            tokenizer_entries = {}
            for name, data in tokenizer_files.items():
                if name not in TOKENIZER_FILES:  # readers accept only these names: fail now, not at load
                    raise CompressLMError(
                        f"the tokenizer writes {name}, which containers do not store "
                        f"(they hold {', '.join(sorted(TOKENIZER_FILES))})"
                    )
                tokenizer_entries[name] = self._guarded(self._blobs.add, f"tokenizer/{name}", data, "bytes", [])
            header = {
                "format": "compresslm-container",
                "format_version": ENTROPY_FORMAT_VERSION
                if _ans_coded(self.linears, embedding_entries)
                else FORMAT_VERSION,
                "config": config,
                "linears": self.linears,
                "embeddings": embedding_entries,
                "dense": dense_entries,
                "aliases": aliases,
                "tokenizer_files": tokenizer_entries,
                "blobs": self._blobs.index,
                "parameters": parameters,
                "linear_parameters": self.linear_parameters,
                "dense_dtype": dense_dtype,
                "versions": versions(),
                **(metadata or {}),
            }
            with atomic_path(self.target) as tmp, tmp.open("wb") as handle:
                handle.write(encode_header(header))
                self._spill.flush()
                self._spill.seek(0)
                shutil.copyfileobj(self._spill, handle, 1 << 24)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise CompressLMError(f"cannot write {self.target}: {exc.strerror or exc}") from None
        finally:
            self.abort()
        return container_summary(self.target)

    def abort(self) -> None:
        """Close the spill and drop it (unless a journal keeps it); the target is left as it was."""
        with contextlib.suppress(OSError):  # closing flushes, and the write that failed fails again
            self._spill.close()
        if not self._keep_spill:
            self._spill_path.unlink(missing_ok=True)

    def _guarded(self, write, *args):
        try:
            return write(*args)
        except OSError as exc:
            self.abort()
            raise CompressLMError(f"cannot write {self.target}: {exc.strerror or exc}") from None


def encode_header(header: dict) -> bytes:
    """Everything before the blob area: magic, header length, the header's sha256, the header, padding."""
    raw = json.dumps(header, default=_json_default, allow_nan=False).encode("utf-8")
    prefix = MAGIC + struct.pack("<Q", len(raw)) + hashlib.sha256(raw).digest() + raw
    return prefix + b"\0" * (align(len(prefix)) - len(prefix))


def _json_default(value: object) -> object:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a container header")


def is_container(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as handle:
        return handle.read(4) in (MAGIC, OLD_MAGIC)


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The checked header and the absolute offset of the blob area; raises CorruptFileError on damage.

    The header's sha256 is checked before it is parsed, then every field (`header_check`), and the
    file must end exactly where its last blob does.
    """
    p = Path(path)
    size = p.stat().st_size
    with p.open("rb") as handle:
        head = handle.read(_PREFIX)
        if head[:4] == OLD_MAGIC:
            raise CorruptFileError(
                f"{p} is a container of format 1 (compresslm 0.1, no header checksum), which this version no longer "
                "reads; compress the model again"
            )
        if len(head) < 12 or head[:4] != MAGIC:
            raise CorruptFileError(f"{p} is not a compresslm container (bad magic {head[:4]!r})")
        if len(head) < _PREFIX:
            raise CorruptFileError(f"{p} is corrupt: truncated inside its header")
        (length,) = struct.unpack("<Q", head[4:12])
        if length > min(size - _PREFIX, _MAX_HEADER):
            raise CorruptFileError(f"{p} is corrupt: truncated, or a header length of {length} bytes")
        raw = handle.read(length)
        start = align(_PREFIX + length)
        padding = handle.read(start - _PREFIX - length)
    if hashlib.sha256(raw).digest() != head[12:_PREFIX]:
        raise CorruptFileError(f"{p} is corrupt: the header checksum does not match")
    if padding.strip(b"\0") or start > size:
        raise CorruptFileError(f"{p} is corrupt: the header padding is damaged or cut short")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(f"{p} is corrupt: the header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != "compresslm-container":
        raise CorruptFileError(f"{p} header does not describe a compresslm container")
    if header.get("format_version") not in (FORMAT_VERSION, ENTROPY_FORMAT_VERSION):
        raise CorruptFileError(
            f"{p} uses container format {header.get('format_version')!r}; this compresslm reads formats "
            f"{FORMAT_VERSION} and {ENTROPY_FORMAT_VERSION}"
        )
    try:
        check_header(header, size - start)
    except ValueError as exc:
        raise CorruptFileError(f"{p} is corrupt: {exc}") from None
    return header, start


class _BlobReader:
    """Reads blobs by key, checking each one's sha256; `verify_all` checks everything up front."""

    def __init__(self, path: Path, header: dict, start: int):
        self.path, self.header, self.start = path, header, start
        self.handle = path.open("rb")
        self._verified: dict[str, bytes] = {}
        self.bytes_read = 0

    def verify_all(self, skip: set[str] = frozenset()) -> None:
        """Read and check every blob (but `skip`) before anything is built; later reads take the checked bytes."""
        for key in self.header["blobs"]:
            if key not in skip:
                self._verified[key] = self.read(key)

    def read(self, key: str) -> bytes:
        if key in self._verified:
            return self._verified.pop(key)
        entry = self.header["blobs"][key]
        self.handle.seek(self.start + entry["offset"])
        padded = self.handle.read(align(entry["nbytes"]))
        data = padded[: entry["nbytes"]]
        self.bytes_read += len(data)
        if len(data) != entry["nbytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CorruptFileError(f"{self.path} is corrupt: checksum mismatch in tensor '{key}'")
        if padded[entry["nbytes"] :].strip(b"\0"):
            raise CorruptFileError(f"{self.path} is corrupt: the padding after tensor '{key}' is damaged")
        return data

    def dtype(self, key: str) -> str:
        return self.header["blobs"][key]["dtype"]

    def tensor(self, key: str) -> torch.Tensor:
        entry = self.header["blobs"][key]
        dtype = TENSOR_DTYPES[entry["dtype"]]  # header_check allowed only these
        raw = bytearray(self.read(key))
        return (
            torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(entry["shape"]).clone()
            if raw
            else (torch.empty(entry["shape"], dtype=dtype))
        )

    def close(self) -> None:
        self.handle.close()


def _read_mask(reader: _BlobReader, entry: dict) -> tuple[torch.Tensor | None, tuple[int, int] | None]:
    if not entry.get("mask"):
        return None, None
    shape = tuple(entry["shape"])
    nm = tuple(entry["nm"]) if entry.get("nm") else None
    if entry["mask_encoding"] == "nm-rank":
        n, m = nm
        count = shape[0] * shape[1] // m
        index = unpack_bits(reader.read(entry["mask"]), nm_index_bits(n, m), count).numpy()
        if int(index.max(initial=0)) >= math.comb(m, n):
            raise CorruptFileError(f"{reader.path}: the N:M mask of a weight names an impossible pattern")
        return decode_nm(index, n, m).reshape(shape), nm
    mask = unpack_bits(reader.read(entry["mask"]), 1, shape[0] * shape[1]).reshape(shape).bool()
    return mask, nm


def _scatter_kept(kept: torch.Tensor, mask: torch.Tensor | None, fill: torch.Tensor, what: str) -> torch.Tensor:
    """Place the stored kept entries back into a full [out, in] tensor (pruned entries from `fill`)."""
    if mask is None:
        return kept.reshape(fill.shape)
    if kept.numel() != int(mask.sum()):
        raise CorruptFileError(f"{what}: {kept.numel()} stored entries for {int(mask.sum())} kept weights")
    full = fill.clone()
    full[mask] = kept
    return full


def _record(reader: _BlobReader, entry: dict, dial_bits: int | None = None) -> CompressedWeight:
    if dial_bits is not None and entry.get("code_planes"):
        alt = _alternate_for(entry, dial_bits)
        if alt is None:
            return _nested_record(reader, entry, dial_bits)
        record = _record(reader, alt)
        importance = reader.tensor(entry["importance"]) if entry.get("importance") else None
        return replace(record, importance=importance)
    record = _plain_record(reader, entry)
    if entry.get("alternates"):
        record = replace(record, alternates=tuple(_record(reader, alt) for alt in entry["alternates"]))
    return record


def _alternate_for(entry: dict, bits: int) -> dict | None:
    """The stored alternate of a dial entry that holds width `bits` (None: the shared chain holds it)."""
    alternates = entry.get("alternates", [])
    return next((alt for alt in alternates if not alt.get("order") and bits in DialMeta.of(alt["meta"]).widths), None)


def _plain_record(reader: _BlobReader, entry: dict) -> CompressedWeight:
    out_f, in_f = entry["shape"]
    mask, nm = _read_mask(reader, entry)
    stored = out_f * in_f if mask is None else int(mask.sum())
    if entry.get("values"):
        values = reader.tensor(entry["values"])
        full = _scatter_kept(values, mask, torch.zeros(out_f, in_f, dtype=torch.float16), str(reader.path))
        record = CompressedWeight.unquantized(full, mask, nm, entry.get("meta", {}))
        return replace(record, lowrank=_read_lowrank(reader, entry))
    if not entry.get("codes") and not entry.get("code_planes"):  # factors alone (the header check saw them)
        return CompressedWeight.factored(*_read_lowrank(reader, entry), entry.get("meta", {}))
    codes = _read_codes(reader, entry, stored)
    scales = reader.tensor(entry["scales"])
    if entry["zeros"] is None:
        zeros = torch.full(tuple(entry["scales_shape"]), 1 << (entry["bits"] - 1), dtype=torch.uint8)
    elif reader.dtype(entry["zeros"]) in ("float16", "float32"):
        zeros = reader.tensor(entry["zeros"])
    else:
        count = int(np.prod(entry["scales_shape"]))
        zeros = unpack_bits(reader.read(entry["zeros"]), entry["bits"], count).reshape(entry["scales_shape"])
    fill = (
        zeros.expand(out_f, in_f) if tuple(zeros.shape) == (1, 1) else expand_groups(zeros, in_f, entry["group_size"])
    )
    if fill.dtype != torch.uint8:  # pruned codes of a float-zero grid: any code, the mask zeroes them
        fill = torch.zeros(out_f, in_f, dtype=torch.uint8)
    codes = _scatter_kept(codes, mask, fill.contiguous(), str(reader.path))
    importance = reader.tensor(entry["importance"]) if entry.get("importance") else None
    order = None
    if entry.get("order"):
        bits = int(reader.dtype(entry["order"])[1:])
        order = unpack_bits(reader.read(entry["order"]), bits, out_f * in_f).reshape(out_f, in_f)
    return CompressedWeight(
        shape=(out_f, in_f), bits=entry["bits"], group_size=entry["group_size"], symmetric=entry["symmetric"],
        codes=codes, scales=scales, zeros=zeros, mask=mask, nm=nm, meta=entry.get("meta", {}), importance=importance,
        order=order, lowrank=_read_lowrank(reader, entry),
    )  # fmt: skip


def _read_codes(reader: _BlobReader, entry: dict, stored: int) -> torch.Tensor:
    """A record's stored codes: bit planes, packed, or ANS-coded (decoded with the counts stored beside them)."""
    if entry.get("code_planes"):
        return _read_planes(reader, entry["code_planes"], stored)
    if entry.get("codes_encoding") == "ans":
        counts = np.frombuffer(reader.read(entry["code_counts"]), dtype=np.int32)
        if (counts < 0).any() or int(counts.sum()) != stored:
            raise ValueError(f"the code counts of {entry['codes']} do not add up to its {stored} codes")
        words = np.frombuffer(reader.read(entry["codes"]), dtype=np.uint32)
        return torch.from_numpy(ans_decode(words, counts, stored).astype(np.uint8))
    return unpack_bits(reader.read(entry["codes"]), entry["bits"], stored)


def _read_lowrank(reader: _BlobReader, entry: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not entry.get("lowrank"):
        return None
    a, b = (reader.tensor(key) for key in entry["lowrank"])
    return a, b


def _read_planes(reader: _BlobReader, keys: list[str], count: int) -> torch.Tensor:
    """`count` codes of len(keys) bits from their bit planes, most significant first."""
    codes = torch.zeros(count, dtype=torch.uint8)
    for p, key in enumerate(keys):
        codes |= unpack_bits(reader.read(key), 1, count) << (len(keys) - 1 - p)
    return codes


def _nested_record(reader: _BlobReader, entry: dict, bits: int) -> CompressedWeight:
    """A dial artifact's weight at width `bits`, built from its first `bits` bit planes only."""
    dial = DialMeta.of(entry["meta"])
    chain = dial.chain_widths
    if bits not in chain:
        raise CompressLMError(f"{bits} bits is not a width of this artifact; it has {list(dial.widths)}")
    out_f, in_f = entry["shape"]
    codes = _read_planes(reader, entry["code_planes"][:bits], out_f * in_f)
    scales, zeros = width_grid(reader.tensor(entry["scales"]), reader.tensor(entry["zeros"]), entry["bits"], bits)
    importance = reader.tensor(entry["importance"]) if entry.get("importance") else None
    narrower = tuple(w for w in chain if w <= bits)
    meta = replace(dial, widths=narrower, chain=narrower).with_meta(entry["meta"])
    return CompressedWeight(
        shape=(out_f, in_f), bits=bits, group_size=entry["group_size"], symmetric=False,
        codes=codes.reshape(out_f, in_f), scales=scales, zeros=zeros, meta=meta, importance=importance,
    )  # fmt: skip


def _entry_keys(entry: dict) -> list[str]:
    """Every blob of one stored record (its alternates apart)."""
    return (
        [entry[key] for key in _RECORD_BLOBS if entry.get(key)]
        + entry.get("code_planes", [])
        + entry.get("lowrank", [])
    )


def _unread_blobs(header: dict, dial_bits: int | None) -> set[str]:
    """Blobs a load at width `dial_bits` does not need: deeper bit planes, the other widths' records and
    the nested-sparse plane (a load at one width serves dense settings and the Wanda order only)."""
    if dial_bits is None:
        return set()
    unread = set()
    for entry in header["linears"].values():
        if not entry.get("code_planes"):
            continue
        chosen = _alternate_for(entry, dial_bits)
        for alt in entry.get("alternates", []):
            if alt is not chosen:
                unread.update(_entry_keys(alt))
        if chosen is None:
            unread.update(entry["code_planes"][dial_bits:])
        else:
            unread.update(key for key in _entry_keys(entry) if key != entry.get("importance"))
    return unread


@dataclass
class ContainerContents:
    """What a container holds, checked: its header, records, dense tensors and tokenizer file bytes."""

    header: dict
    linears: dict[str, CompressedWeight]
    activations: dict[str, dict | None]
    embeddings: dict[str, CompressedWeight]
    dense: dict[str, torch.Tensor]
    tokenizer_files: dict[str, bytes]
    bytes_read: int


def read_container(path: str | os.PathLike, dial_bits: int | None = None) -> ContainerContents:
    """Read a `.clm` file's records and tensors, checking the header and every checksum first.

    `dial_bits` reads a dial artifact at that width, reading only the bit planes it needs (and
    verifying only what it reads). Any damage raises one CorruptFileError; nothing is built here.
    """
    p = Path(path).expanduser()
    header, start = read_header(p)
    if dial_bits is not None and not any(e.get("code_planes") for e in header["linears"].values()):
        raise CompressLMError(f"{p} is not a dial artifact (no nested widths); load it without a dial width")
    reader = _BlobReader(p, header, start)
    try:
        reader.verify_all(_unread_blobs(header, dial_bits))  # nothing is read from a corrupt or truncated file
        linears = {name: _record(reader, entry, dial_bits) for name, entry in header["linears"].items()}
        activations = {name: entry.get("activation") for name, entry in header["linears"].items()}
        embeddings = {name: _record(reader, entry) for name, entry in header.get("embeddings", {}).items()}
        dense = {key: reader.tensor(blob) for key, blob in header["dense"].items()}
        tokenizer_files = {}
        for name, blob in header["tokenizer_files"].items():
            if name not in TOKENIZER_FILES:  # checked with the header; never a path
                raise ValueError(f"tokenizer file name {name!r}")
            tokenizer_files[name] = reader.read(blob)
    except _DAMAGE as exc:
        reason = reason_of(exc)
        raise CorruptFileError(f"{p} is corrupt: {reason}") from None
    finally:
        reader.close()
    return ContainerContents(header, linears, activations, embeddings, dense, tokenizer_files, reader.bytes_read)


class ContainerReader:
    """A container read piece by piece (a model streamed block by block): one record or tensor at a time.

    The header is checked whole when the reader opens; each blob is checked against its checksum
    when it is read, so damage in a later block is reported when that block is reached (as one
    CorruptFileError naming the tensor), and nothing built from it is used.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.header, start = read_header(self.path)
        self._reader = _BlobReader(self.path, self.header, start)

    def linear(self, name: str) -> CompressedWeight:
        return self._guarded(_record, self._reader, self.header["linears"][name])

    def embedding(self, name: str) -> CompressedWeight:
        return self._guarded(_record, self._reader, self.header["embeddings"][name])

    def dense(self, key: str) -> torch.Tensor:
        return self._guarded(self._reader.tensor, self.header["dense"][key])

    def blob(self, key: str) -> bytes:
        """One blob's bytes as stored (checked against its checksum)."""
        return self._guarded(self._reader.read, key)

    def codes(self, entry: dict) -> torch.Tensor:
        """A header entry's stored codes (its kept codes, packed or ANS-coded), unpacked to uint8."""
        return self._guarded(_read_codes, self._reader, entry, self.header["blobs"][entry["codes"]]["shape"][0])

    def tokenizer_files(self) -> dict[str, bytes]:
        files = {}
        for name, blob in self.header["tokenizer_files"].items():
            if name not in TOKENIZER_FILES:  # checked with the header; never a path
                raise CorruptFileError(f"{self.path} is corrupt: tokenizer file name {name!r}")
            files[name] = self._guarded(self._reader.read, blob)
        return files

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    def close(self) -> None:
        self._reader.close()

    def _guarded(self, read, *args):
        try:
            return read(*args)
        except _DAMAGE as exc:
            reason = reason_of(exc)
            raise CorruptFileError(f"{self.path} is corrupt: {reason}") from None


def container_summary(path: str | os.PathLike) -> dict:
    """Sizes measured from the file: bytes on disk, bits per parameter overall and for the linears."""
    p = Path(path)
    header, _ = read_header(p)
    size = p.stat().st_size

    def record_bytes(entry: dict) -> int:
        own = sum(header["blobs"][key]["nbytes"] for key in _entry_keys(entry))
        return own + sum(record_bytes(alt) for alt in entry.get("alternates", []))

    linear_bytes = sum(record_bytes(entry) for entry in header["linears"].values())
    embedding_bytes = sum(record_bytes(entry) for entry in header.get("embeddings", {}).values())
    embedding_params = sum(entry["shape"][0] * entry["shape"][1] for entry in header.get("embeddings", {}).values())
    return {
        "path": str(p),
        "bytes_on_disk": size,
        "parameters": header["parameters"],
        "bits_per_param": 8 * size / header["parameters"],
        "linear_parameters": header["linear_parameters"],
        "linear_bits_per_param": 8 * linear_bytes / max(header["linear_parameters"], 1),
        "embedding_bits_per_param": 8 * embedding_bytes / embedding_params if embedding_params else None,
        "linear_sparsity": sum(
            e.get("sparsity", 0.0) * e["shape"][0] * e["shape"][1] for e in header["linears"].values()
        )
        / max(header["linear_parameters"], 1),
        "recipe": header.get("recipe"),
    }


# the header fields a writer sets itself; everything else is the source's metadata, carried over
_WRITER_FIELDS = ("format", "format_version", "config", "linears", "embeddings", "dense", "aliases",
                  "tokenizer_files", "blobs", "parameters", "linear_parameters", "dense_dtype", "versions")  # fmt: skip


def rewrite_container(source: str | os.PathLike, target: str | os.PathLike, entropy: bool = True) -> dict:
    """Write `source`'s records, tensors and metadata again at `target`, with each record's codes ANS-coded
    where that is smaller (`entropy`); loading the result gives the same records bit for bit."""
    contents = read_container(source)
    header = contents.header
    writer = ContainerWriter(target, entropy=entropy)
    try:
        for name, record in contents.linears.items():
            writer.add_linear(name, record, contents.activations[name])
    except BaseException:
        writer.abort()
        raise
    metadata = {key: value for key, value in header.items() if key not in _WRITER_FIELDS}
    metadata["rewritten"] = {"entropy_coded": entropy, "source_versions": header.get("versions")}
    return writer.finish(config=header["config"], embeddings=contents.embeddings, dense=contents.dense,
                         aliases=header["aliases"], tokenizer_files=contents.tokenizer_files,
                         parameters=header["parameters"], dense_dtype=header["dense_dtype"],
                         metadata=metadata)  # fmt: skip
