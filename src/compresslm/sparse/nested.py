"""Nested sparsity with weight updates: one order and one set of values for many sparsity ratios.

A keep order alone (Wanda's score, `quant.nested.nested_rank`) gives every ratio as a prefix but
makes no weight updates, and pruning without updates is far from SparseGPT (Wanda-order masks
against SparseGPT's layer error: `benchmarks/results/nested_sparse_layer.md`). `nested_sparsegpt`
runs SparseGPT's column sweep once for several ratios at once: one error-feedback state per ratio,
one order per row within each block of columns (chosen adaptively, as SparseGPT chooses its masks,
from the saliency of all states weighted by `priorities`), and one stored value per weight: the
priority-weighted mean of what each ratio that keeps the weight wants it to be, quantized on the
given grid. Every ratio in [0, 1) is then a prefix of the order: each block row keeps its first
round((1 - s) * columns) weights. The values are tuned for the listed ratios; ratios between them
get values tuned for their neighbours, and the sparse values no longer serve the dense model (keep
its own codes)."""

from __future__ import annotations

import dataclasses

import torch

from compresslm.compressed import CompressedWeight, DialMeta
from compresslm.errors import CompressLMError
from compresslm.quant.gptq import factor_hessian
from compresslm.quant.grid import Grid, check_weight, fit_rows, quantize_codes, to_compressed
from compresslm.quant.nested import nested_mask, nested_rank, slice_record, sparse_plane


def check_levels(levels: list[float] | tuple[float, ...], priorities: list[float] | tuple[float, ...]) -> None:
    """Increasing ratios in (0, 1), one non-negative priority each (not all zero): a clear error otherwise."""
    levels, priorities = list(levels), list(priorities)
    if not levels or any(not 0.0 < s < 1.0 for s in levels) or levels != sorted(set(levels)):
        raise CompressLMError(f"nested sparsity levels must be increasing ratios in (0, 1), got {levels}")
    if len(priorities) != len(levels) or any(p < 0 for p in priorities) or not any(priorities):
        raise CompressLMError(f"priorities {priorities} must be one non-negative weight per level {levels}")


def kept_in_block(columns: int, sparsity: float) -> int:
    """Weights each row of a block of `columns` keeps at `sparsity`."""
    return round((1.0 - sparsity) * columns)


def nested_sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    levels: tuple[float, ...],
    priorities: tuple[float, ...],
    grid: Grid,
    block_size: int = 128,
    damp: float = 0.01,
) -> CompressedWeight:
    """Quantized values and a per-block keep order serving every ratio in `levels` (see the module doc).

    Returns a record without a mask: `order` holds each weight's position in its row's keep
    order within its block of `block_size` columns (0 = kept longest) and `meta["dial"]` the
    levels; `order_mask` turns a ratio into a mask.
    """
    check_levels(levels, priorities)
    check_weight(weight)
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f) or not torch.isfinite(hessian).all():
        raise CompressLMError(f"nested sparsegpt needs a finite {in_f} x {in_f} Hessian")
    g = grid.group_size_for(in_f)
    block = g * max(1, block_size // g)  # groups never straddle a block
    if grid.granularity != "group" or block > 256:
        raise CompressLMError(
            f"nested sparsegpt needs a group-wise grid whose groups fit blocks of at most 256 columns (got {grid})"
        )
    factor = factor_hessian(hessian, damp, 5)
    hinv, lam, retries = factor.hinv, factor.damp_used, factor.retries
    start = weight.detach().float().masked_fill(factor.dead[None, :], 0.0)
    states = [start.clone() for _ in levels]
    n_groups = -(-in_f // g)
    scales = torch.zeros(out_f, n_groups, device=start.device)
    zeros = torch.zeros(out_f, n_groups, device=start.device)
    codes = torch.zeros_like(start)
    order = torch.zeros(out_f, in_f, dtype=torch.uint8, device=start.device)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        n = i2 - i1
        hinv1 = hinv[i1:i2, i1:i2]
        d2 = torch.diag(hinv1).pow(2)[None, :]
        blocks = torch.stack([state[:, i1:i2] for state in states])  # every level's block, [levels, out, n]
        # each column's errors so far, [levels, n, out]: a column's current value is its value at the block's
        # start minus the earlier errors times the inverse Hessian's factor, computed when it is reached
        # (one product per column instead of updating the rest of the block after every column: ~10x faster)
        errors = torch.zeros(len(levels), n, out_f, device=start.device)
        saliency = sum(p * b.pow(2) for p, b in zip(priorities, blocks, strict=True)) / d2
        ranked = saliency.argsort(dim=1, descending=True, stable=True)
        position = torch.empty_like(ranked)
        position.scatter_(1, ranked, torch.arange(n, device=start.device).expand(out_f, n))
        order[:, i1:i2] = position.to(torch.uint8)
        keeps = torch.stack([position < kept_in_block(n, s) for s in levels])
        for i in range(n):
            col = i1 + i
            if col % g == 0:  # fit the group's grid on the least sparse state's weights as they stand now
                group = blocks[0][:, i : i + g] - errors[0, :i].T @ hinv1[:i, i : i + g]
                scales[:, col // g], zeros[:, col // g] = fit_rows(group, grid)
            current = blocks[:, :, i] - torch.matmul(hinv1[:i, i], errors[:, :i]) if i else blocks[:, :, i]
            wanted = sum(p * k[:, i] * c for p, k, c in zip(priorities, keeps, current, strict=True))
            weight_sum = sum(p * k[:, i].float() for p, k in zip(priorities, keeps, strict=True))
            value = torch.where(weight_sum > 0, wanted / weight_sum.clamp_min(1e-30), current[0])
            s, z = scales[:, col // g], zeros[:, col // g]
            code = quantize_codes(value, s, z, grid.maxq)
            codes[:, col] = code
            value = (code - z) * s
            errors[:, i] = (current - value[None, :] * keeps[:, :, i]) / hinv1[i, i]
        for state, err in zip(states, errors, strict=True):
            state[:, i2:] -= err.T @ hinv[i1:i2, i2:]
    meta = {
        "algorithm": "nested-sparsegpt", "grid": grid.describe(), "damp": damp, "damp_used": lam,
        "damp_retries": retries,
        "dial": DialMeta(widths=(grid.bits,), active=grid.bits, sparse=True, levels=tuple(levels),
                         priorities=tuple(priorities), order_block=block).to_dict(),
    }  # fmt: skip
    return dataclasses.replace(to_compressed(codes, scales, zeros, grid, meta), order=order.cpu())


def kept_per_column(in_features: int, block: int, sparsity: float) -> torch.Tensor:
    """For each column, how many weights its block's rows keep at `sparsity`; an error if a block keeps none."""
    if not 0.0 <= sparsity < 1.0:
        raise CompressLMError(f"sparsity must be in [0, 1), got {sparsity}")
    keep = torch.empty(in_features, dtype=torch.int16)
    for i1 in range(0, in_features, block):
        n = min(block, in_features - i1)
        keep[i1 : i1 + n] = kept_in_block(n, sparsity)
        if kept_in_block(n, sparsity) < 1:
            raise CompressLMError(f"sparsity {sparsity} leaves no weight in blocks of {n} columns")
    return keep


def order_mask(record: CompressedWeight, sparsity: float) -> torch.Tensor | None:
    """Keep-mask for `sparsity` from a nested-sparse record's order (None at sparsity 0)."""
    if record.order is None:
        raise CompressLMError("this weight holds no nested sparsity order")
    keep = kept_per_column(record.shape[1], record.dial.order_block, sparsity)
    if sparsity == 0.0:
        return None
    # the order is uint8 (ranks < 128 within a block) and so is every count kept: compare without widening
    return record.order < keep.to(device=record.order.device, dtype=torch.uint8)[None, :]


def dial_setting(
    nested: CompressedWeight, bits: int, sparsity: float = 0.0, rank: torch.Tensor | None = None
) -> tuple[CompressedWeight, torch.Tensor | None]:
    """The record a dial weight serves at `bits` and `sparsity`, and the keep order used (for reuse).

    Sparsity comes from a ratio pruned on its own where the record holds one, else from the
    nested-sparse plane at or above its lowest level, else from one fixed order of the widest
    width's weights (`nested_rank`, computed on the first sparse setting and returned for reuse).
    """
    record = slice_record(nested, bits)
    plane = sparse_plane(nested, record.bits, sparsity) if sparsity > 0 else None
    if plane is not None and plane.mask is not None:  # this ratio, pruned on its own
        record, mask = plane, plane.mask
    elif plane is not None:  # values updated for nested sparsity, with their own order
        record, mask = plane, order_mask(plane, sparsity)
    else:
        if sparsity > 0 and rank is None:
            rank = nested_rank(nested)
        mask = nested_mask(nested, sparsity, rank)
    if mask is not None:
        record = dataclasses.replace(record, mask=mask, nm=None)
    return record, rank
