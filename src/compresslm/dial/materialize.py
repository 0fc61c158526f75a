"""Writing one setting of a dial artifact as an ordinary container."""

from __future__ import annotations

import dataclasses
import os

from compresslm.dial.plan import plan_widths
from compresslm.dial.switch import DialReport, dial_layers, set_budget
from compresslm.errors import CompressLMError
from compresslm.models.assemble import load_compressed, save_compressed
from compresslm.runtime.linear import CompressedLinear


def _fixed(record, sparsity: float):
    meta = {k: v for k, v in record.meta.items() if k != "dial"}
    meta["dialed"] = {"widths": list(record.dial.widths), "bits": record.bits, "sparsity": sparsity}
    return dataclasses.replace(record, importance=None, order=None, alternates=(), meta=meta)


def materialize(
    artifact: str | os.PathLike,
    output: str | os.PathLike,
    bits: int | dict[str, int] | None = None,
    sparsity: float = 0.0,
    avg_bits: float | None = None,
) -> tuple[DialReport, dict]:
    """Write an ordinary container holding one setting of a dial artifact; returns the switch report and sizes.

    `bits` is a width or module path -> width; `avg_bits` instead lets `plan_widths` choose them.
    """
    if avg_bits is not None and bits is not None:
        raise CompressLMError("give either bits or avg_bits, not both")
    lm = load_compressed(artifact)
    if avg_bits is not None:
        bits = plan_widths(lm, avg_bits)
    report = set_budget(lm, bits, sparsity)
    header = lm.container
    nested = dial_layers(lm)
    linears = {  # a fixed setting: no calibration norms, no widths to dial further
        name: _fixed(m.compressed, sparsity) if name in nested else m.compressed
        for name, m in lm.model.named_modules()
        if isinstance(m, CompressedLinear)
    }
    embeddings = {k: v for k, v in lm.compressed.items() if k not in linears}
    metadata = {k: header[k] for k in ("recipe", "calibration", "source_model", "layers") if k in header}
    metadata["dial_setting"] = {"artifact": str(artifact), "bits": bits, "sparsity": sparsity, "avg_bits": avg_bits}
    summary = save_compressed(lm, linears, output, metadata, dense_dtype=header.get("dense_dtype", "float16"),
                             embeddings=embeddings)  # fmt: skip
    return report, summary
