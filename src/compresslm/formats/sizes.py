"""The bytes a weight record takes in a container: one count for the writer and for every planner.

The container writer checks each record it writes against `record_nbytes`, so a planner that asks
`planned_nbytes` before compressing (the budget solver, training's bit penalty) or `record_nbytes`
of a record in memory (the dial's width planner) gets the number the file will hold. A record's
own blobs are its float16 low-rank factors (if any; a factored weight has nothing else), its packed
codes (or float16 values when unquantized), float16 scales (float32 on K-quant grids), zero points
(packed integers; float16 on nested grids; none on symmetric grids) and its mask (an N:M mask as
each group's pattern rank, any other as a bitmask). A dial's importance, keep order and alternates
are blobs of their own, counted apart. `aligned` adds each blob's padding (the file's size);
without it, the count that bits per weight are reported in.
"""

from __future__ import annotations

from compresslm.compressed import CompressedWeight, num_groups
from compresslm.formats.header_check import align
from compresslm.formats.packing import nm_index_bits, packed_nbytes
from compresslm.quant.grid import Grid
from compresslm.sparse.masks import SparsityPattern


def mask_encoding(nm: tuple[int, int] | None) -> str:
    """How a mask is stored: `nm-rank` for N:M patterns whose rank fits a byte, else `bitmask`."""
    return "nm-rank" if nm is not None and nm_index_bits(*nm) <= 8 else "bitmask"


def _blob_sizes(
    shape: tuple[int, int],
    bits: int | None,
    scales: int,
    *,
    symmetric: bool,
    kept: int | None = None,
    nm: tuple[int, int] | None = None,
    zero_bytes: int = 0,
    scale_bytes: int = 2,
    planes: bool = False,
    rank: int = 0,
) -> list[int]:
    """Sizes of a record's own blobs; `bits` None: float16 values; `kept` None: no mask; `rank`: low-rank factors."""
    out_f, in_f = shape
    stored = out_f * in_f if kept is None else kept
    sizes = [2 * out_f * rank, 2 * rank * in_f] if rank else []
    if kept is not None:
        if mask_encoding(nm) == "nm-rank":
            sizes.append(packed_nbytes(out_f * in_f // nm[1], nm_index_bits(*nm)))
        else:
            sizes.append(packed_nbytes(out_f * in_f, 1))
    if bits is None:
        return [*sizes, 2 * stored]
    if planes:  # a dial's nested widths: one bit plane per bit, most significant first
        sizes += [packed_nbytes(stored, 1)] * bits
    else:
        sizes.append(packed_nbytes(stored, bits))
    sizes.append(scale_bytes * scales)
    if zero_bytes:  # float zero points, stored as they are
        sizes.append(zero_bytes * scales)
    elif not symmetric:
        sizes.append(packed_nbytes(scales, bits))
    return sizes


def _total(sizes: list[int], aligned: bool) -> int:
    return sum(align(size) if aligned else size for size in sizes)


def planned_nbytes(
    shape: tuple[int, int], grid: Grid, pattern: SparsityPattern | None = None, aligned: bool = True, rank: int = 0
) -> int:
    """Bytes a weight of `shape` will take quantized on `grid` (pruned to `pattern`, row scope; with
    float16 low-rank factors of `rank`)."""
    out_f, in_f = shape
    grid = grid.for_width(in_f)
    scales = 1 if grid.granularity == "tensor" else out_f * num_groups(in_f, grid.group_size_for(in_f))
    kept, nm = None, None
    if pattern is not None and pattern.is_nm:
        kept, nm = out_f * in_f * pattern.n // pattern.m, (pattern.n, pattern.m)
    elif pattern is not None:
        kept = out_f * (in_f - round(pattern.ratio * in_f))
    zero_bytes = 4 if grid.kquant and not grid.symmetric else 0  # float32 zero points (quant.grid)
    sizes = _blob_sizes(shape, grid.bits, scales, symmetric=grid.symmetric, kept=kept, nm=nm, rank=rank,
                        zero_bytes=zero_bytes, scale_bytes=4 if grid.kquant else 2)  # fmt: skip
    return _total(sizes, aligned)


def record_nbytes(record: CompressedWeight, aligned: bool = True) -> int:
    """Bytes of `record`'s own blobs as the container stores them (importance, order, alternates apart)."""
    kept = int(record.mask.sum()) if record.mask is not None else None
    rank = record.lowrank[0].shape[1] if record.lowrank is not None else 0
    if record.is_factored:
        return _total([2 * record.out_features * rank, 2 * rank * record.in_features], aligned)
    if not record.quantized:
        return _total(_blob_sizes(record.shape, None, 0, symmetric=True, kept=kept, nm=record.nm, rank=rank), aligned)
    zero_bytes = record.zeros.element_size() if record.zeros.is_floating_point() else 0
    sizes = _blob_sizes(
        record.shape, record.bits, record.scales.numel(), symmetric=record.symmetric, kept=kept, nm=record.nm,
        zero_bytes=zero_bytes, scale_bytes=record.scales.element_size(),
        planes=record.dial is not None and kept is None, rank=rank,
    )  # fmt: skip
    return _total(sizes, aligned)
