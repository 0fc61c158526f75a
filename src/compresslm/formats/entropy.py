"""How many bytes a container's codes really need: the Shannon bound and two real coders.

A group-wise grid stores every code in `bits` bits, but codes are far from uniform (weights are
bell-shaped, so the middle codes are common): an entropy coder stores them in fewer. For every
record with packed codes (linears and quantized embeddings; a dial's bit planes are left as stored),
this reads the stored codes and measures

* the Shannon bound of an order-0 code (the codes' empirical entropy, per record);
* an ANS coder (the `constriction` library) with the record's code counts as its model, which
  decodes back to the same codes, plus the table a decoder needs (one uint32 count per code);
* zstd (the `zstandard` library, level 9) on the packed codes blob, a general-purpose coder.

Everything else (scales, zero points, masks, dense tensors, tokenizer, header) is counted at its
stored size, so `file_ans_bytes` is what the whole file would take with ANS-coded codes (each record
coded only where that is smaller than its packed codes).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from compresslm.errors import MissingPackageError
from compresslm.formats.container import ContainerReader
from compresslm.formats.packing import unpack_bits

INSTALL = "entropy-coded sizes need constriction and zstandard: pip install 'compresslm[entropy]'"
ZSTD_LEVEL = 9  # level 19 gains little on packed codes and is an order of magnitude slower


def require_libraries():
    try:
        import constriction
        import zstandard
    except ImportError:
        raise MissingPackageError(INSTALL) from None
    return constriction, zstandard


def shannon_bits(counts: np.ndarray) -> float:
    """n·H(p): the order-0 bound, in bits, of symbols with these counts."""
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def ans_encode(symbols: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`symbols` ANS-coded with a model made from `counts` alone (what a decoder is given): uint32 words."""
    constriction, _ = require_libraries()
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), model)
    return coder.get_compressed()


def ans_decode(words: np.ndarray, counts: np.ndarray, count: int) -> np.ndarray:
    constriction, _ = require_libraries()
    model = constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)
    return constriction.stream.stack.AnsCoder(words).decode(model, count)


def _code_entries(header: dict) -> list[tuple[str, dict]]:
    entries = [(name, e) for name, e in header["linears"].items()]
    entries += [(name, e) for name, e in header.get("embeddings", {}).items()]
    return [(name, e) for name, e in entries if e.get("codes")]


def entropy_summary(path: str | os.PathLike) -> dict:
    """The codes' stored, Shannon-bound, ANS and zstd sizes, in total and per record, and the file's
    size with ANS-coded codes."""
    _, zstandard = require_libraries()
    reader = ContainerReader(path)
    try:
        header = reader.header
        blobs = header["blobs"]
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        records, totals = {}, {"stored": 0, "shannon": 0.0, "ans": 0, "zstd": 0, "codes": 0, "coded": 0}
        for name, entry in _code_entries(header):
            bits, key = entry["bits"], entry["codes"]
            data = reader.blob(key)
            count = blobs[key]["shape"][0]
            codes = unpack_bits(data, bits, count).numpy()
            counts = np.bincount(codes, minlength=1 << bits).astype(np.float64)
            row = {"bits": bits, "codes": count, "stored": len(data), "shannon": shannon_bits(counts) / 8,
                   "ans": ans_encode(codes, counts).nbytes + 4 * len(counts),
                   "zstd": len(compressor.compress(data))}  # fmt: skip
            records[name] = row
            for field in ("stored", "shannon", "ans", "zstd", "codes"):
                totals[field] += row[field]
            totals["coded"] += min(row["stored"], row["ans"])  # a coder keeps a record raw where that is smaller
    finally:
        reader.close()
    size = Path(path).stat().st_size
    file_ans = size - totals["stored"] + totals["coded"]
    return {
        "bytes_on_disk": size,
        "codes_stored_bytes": totals["stored"],
        "codes_shannon_bytes": math.ceil(totals["shannon"]),
        "codes_ans_bytes": totals["ans"],
        "codes_zstd_bytes": totals["zstd"],
        "codes_bits_per_code": {
            "stored": 8 * totals["stored"] / max(totals["codes"], 1),
            "shannon": 8 * totals["shannon"] / max(totals["codes"], 1),
            "ans": 8 * totals["ans"] / max(totals["codes"], 1),
        },
        "file_ans_bytes": file_ans,
        "bits_per_param_ans": 8 * file_ans / header["parameters"],
        "records": records,
    }
