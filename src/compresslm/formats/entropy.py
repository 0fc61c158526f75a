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
import torch

from compresslm.errors import MissingPackageError
from compresslm.formats.ans import INSTALL, ans_encode, require_constriction
from compresslm.formats.container import ContainerReader
from compresslm.formats.packing import pack_bits

ZSTD_LEVEL = 9  # level 19 gains little on packed codes and is an order of magnitude slower


def require_libraries():
    require_constriction()
    try:
        import zstandard
    except ImportError:
        raise MissingPackageError(INSTALL) from None
    return zstandard


def shannon_bits(counts: np.ndarray) -> float:
    """n·H(p): the order-0 bound, in bits, of symbols with these counts."""
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def _code_entries(header: dict) -> list[tuple[str, dict]]:
    entries = [(name, e) for name, e in header["linears"].items()]
    entries += [(name, e) for name, e in header.get("embeddings", {}).items()]
    return [(name, e) for name, e in entries if e.get("codes")]


def entropy_summary(path: str | os.PathLike) -> dict:
    """The codes' stored, Shannon-bound, ANS and zstd sizes, in total and per record, and the file's
    size with ANS-coded codes."""
    zstandard = require_libraries()
    reader = ContainerReader(path)
    try:
        header = reader.header
        blobs = header["blobs"]
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        records, totals = {}, {"stored": 0, "shannon": 0.0, "ans": 0, "zstd": 0, "codes": 0, "coded": 0}
        for name, entry in _code_entries(header):
            bits = entry["bits"]
            codes = reader.codes(entry).numpy()
            packed = pack_bits(torch.from_numpy(codes), bits)
            stored = sum(blobs[entry[key]]["nbytes"] for key in ("codes", "code_counts") if entry.get(key))
            counts = np.bincount(codes, minlength=1 << bits).astype(np.float64)
            row = {"bits": bits, "codes": codes.size, "stored": stored, "packed": len(packed),
                   "shannon": shannon_bits(counts) / 8, "ans": ans_encode(codes, counts).nbytes + 4 * len(counts),
                   "zstd": len(compressor.compress(packed))}  # fmt: skip
            records[name] = row
            for field in ("stored", "shannon", "ans", "zstd", "codes"):
                totals[field] += row[field]
            totals["coded"] += min(row["packed"], row["ans"])  # a coder keeps a record raw where that is smaller
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
