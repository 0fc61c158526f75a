"""Nested ("dial") quantization: one set of codes from which every bit width in a list is a prefix.

A dial weight may also carry `alternates`: widths quantized on their own (GPTQ at that width),
because one shared code cannot serve every width well (below); `slice_record` picks whichever
holds the width asked for, and `with_alternates` attaches them.

The grid is a mid-rise uniform quantizer per group: a group with range [lo, hi] has, at width b,
step s_b = (hi - lo) / 2^b and levels lo + s_b (c + 1/2) for codes c in [0, 2^b). Each level's
cell at width b is exactly the union of its two cells at width b + 1, so the b-bit code of a
weight is its top-width code shifted right: widths are bit-plane prefixes of one code, and every
level sits at the centre of its children. In `CompressedWeight` terms the width-b weight is
(codes_b - z_b) * s_b with a float zero point z_b = -lo / s_b - 1/2 (stored as float16); a narrower
width's scale is the top width's times a power of two (exact) and its zero point follows from
the top width's (`width_grid`).

Calibration chooses one code per weight for all widths at once (`nested_quantize`): with a
Hessian, one GPTQ sweep keeps an error-feedback state per width and picks the top-width code whose
prefixes best serve every width's target, weighted by `priorities`; without, the same choice is
made on the weights themselves (rounding).
"""

from __future__ import annotations

import dataclasses

import torch

from compresslm.compressed import CompressedWeight, DialMeta, expand_groups, num_groups
from compresslm.errors import CompressLMError
from compresslm.quant.gptq import GPTQOptions, factor_hessian
from compresslm.quant.grid import check_weight

_MIN_SCALE = 2.0**-18  # float16 keeps a few bits of it, and 2^6 times it stays finite


def check_widths(widths: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Sorted, distinct widths in 2..8 (at least two): a clear error otherwise."""
    ordered = tuple(sorted({int(w) for w in widths}))
    if len(ordered) < 2 or len(ordered) != len(widths) or not all(2 <= w <= 8 for w in ordered):
        raise CompressLMError(f"nested widths must be at least two distinct bit widths in 2..8, got {list(widths)}")
    return ordered


def nested_range(weight: torch.Tensor, group_size: int, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-width float16 scales and float zero points [out, groups] of each group's [min, max] range."""
    out_f, in_f = weight.shape
    n = num_groups(in_f, group_size)
    pad = n * group_size - in_f
    w = weight.float()
    if pad:  # pad the short last group with its own first column (changes neither min nor max)
        w = torch.cat([w, w[:, -in_f % group_size :][:, :1].expand(out_f, pad)], dim=1)
    groups = w.reshape(out_f, n, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / (1 << top)).clamp_min(_MIN_SCALE).half()
    zero = (-lo / scale.float() - 0.5).half()
    return scale, zero


def width_grid(scales: torch.Tensor, zeros: torch.Tensor, top: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points (float16) of width `bits` from the top width's: s·2^(top-b), (z+½)/2^(top-b) - ½."""
    factor = float(1 << (top - bits))
    return (scales.float() * factor).half(), ((zeros.float() + 0.5) / factor - 0.5).half()


def slice_record(record: CompressedWeight, bits: int) -> CompressedWeight:
    """The width-`bits` weight of a nested record: codes shifted right, its grid derived (exact)."""
    dial = record.dial
    if dial is None:
        raise CompressLMError("this weight was not quantized nested (no dial widths); it has one width only")
    if bits not in dial.widths:
        raise CompressLMError(f"{bits} bits is not one of this weight's nested widths {list(dial.widths)}")
    for alt in record.alternates:  # a width stored as its own codes
        if alt.order is None and bits in alt.dial.widths:
            return slice_record(alt, bits)
    if bits not in dial.chain_widths:
        raise CompressLMError(f"{bits} bits is listed as a dial width but neither the chain nor an alternate holds it")
    if bits == record.bits:
        return record
    scales, zeros = width_grid(record.scales, record.zeros, record.bits, bits)
    return CompressedWeight(
        shape=record.shape, bits=bits, group_size=record.group_size, symmetric=False,
        codes=record.codes >> (record.bits - bits), scales=scales, zeros=zeros, mask=record.mask, nm=record.nm,
        meta=dataclasses.replace(dial, active=bits).with_meta(record.meta),
    )  # fmt: skip


def with_alternates(record: CompressedWeight, alternates: list[CompressedWeight]) -> CompressedWeight:
    """`record` (a nested chain) carrying `alternates` as further dial planes.

    A single-width record adds a width outside the chain; a nested-sparse record
    (`sparse.nested.nested_sparsegpt`) serves sparse settings at its width; a pruned record whose
    `dial.sparsity` names its ratio serves exactly that ratio at its width. The chain's own widths
    stay in `dial.chain`; `dial.widths` lists every dense width (see `compressed.DialMeta`).
    """
    dial = record.dial
    chain = list(dial.chain_widths)
    marked, ratios = [], []
    for alt in alternates:
        if alt.shape != record.shape:
            raise CompressLMError(f"an alternate of a {record.shape} dial weight has shape {alt.shape}")
        if alt.mask is not None:  # one ratio, pruned on its own
            ratio = alt.dial.sparsity if alt.dial is not None else None
            if alt.order is not None or alt.nm is not None or not isinstance(ratio, float) or not 0 < ratio < 1:
                raise CompressLMError("a pruned alternate must be unstructured and name its ratio in meta['dial']")
            ratios.append(ratio)
            alt = dataclasses.replace(alt, meta=DialMeta(active=alt.bits, sparsity=ratio).with_meta(alt.meta))
        elif (alt.bits in chain) != (alt.order is not None):
            raise CompressLMError(
                f"an alternate {alt.bits}-bit weight must be outside {chain} unless it holds a nested sparsity order"
            )
        elif alt.order is None:
            alt = dataclasses.replace(alt, meta=DialMeta(widths=(alt.bits,), active=alt.bits).with_meta(alt.meta))
        marked.append(alt)
    dense = [alt.bits for alt in marked if alt.order is None and alt.mask is None]
    widths = sorted({*chain, *dense})
    planes = [alt for alt in marked if alt.order is not None]
    if len(widths) != len(chain) + len(dense) or len(planes) > 1 or len(set(ratios)) != len(ratios):
        raise CompressLMError(
            f"alternate widths {[a.bits for a in alternates]} repeat a width, a sparse plane or a pruned ratio"
        )
    meta = dataclasses.replace(dial, widths=tuple(widths), chain=tuple(chain)).with_meta(record.meta)
    return dataclasses.replace(record, alternates=tuple(marked), meta=meta)


def sparse_plane(record: CompressedWeight, bits: int, sparsity: float) -> CompressedWeight | None:
    """The alternate of a dial record that serves `sparsity` at `bits`, or None.

    A ratio pruned on its own (its record has a mask) serves exactly that ratio. A nested-sparse
    plane serves ratios from its lowest level up: below it, its values (tuned for the levels)
    lose to the dense codes pruned by the fixed order (at 20 % sparsity, 6x to 21x its layer error
    on four of the reference model's layers: `benchmarks/results/nested_sparse_layer.md`), so those
    settings keep the fixed order.
    """
    at_width = [alt for alt in record.alternates if alt.bits == bits]
    exact = [alt for alt in at_width if alt.mask is not None and abs(alt.dial.sparsity - sparsity) < 1e-9]
    nested = [alt for alt in at_width if alt.order is not None and sparsity >= min(alt.dial.levels)]
    return next(iter(exact + nested), None)


def default_priorities(widths: tuple[int, ...]) -> tuple[float, ...]:
    """Weights of each width's error in the joint choice: the narrowest 0.5, an 8-bit top 0.01, others 1.

    Measured on a synthetic layer (`benchmarks/nested_layer.py`, group 32): with 3/4 bits, equal
    weights leave the narrowest width 1.16x and the next 1.21x the error of dedicated GPTQ; (0.5, 1)
    gives 1.27x and 1.10x. An 8-bit top width weighted 0.01 (its steps are 32x finer, so a unit of
    its error is tiny) keeps its error under a tenth of the 4-bit width's while costing 3/4 bits little.
    """
    return tuple(0.5 if i == 0 else 0.01 if (w == widths[-1] and w >= 6) else 1.0 for i, w in enumerate(widths))


def nested_quantize(
    weight: torch.Tensor,
    widths: tuple[int, ...],
    group_size: int,
    hessian: torch.Tensor | None = None,
    options: GPTQOptions | None = None,
    priorities: tuple[float, ...] | None = None,
) -> CompressedWeight:
    """Quantize `weight` [out, in] so that each width in `widths` is a prefix of the widest codes.

    Columns are swept once. For each, every top-width code is scored by the sum over widths of
    `priorities[b]` times the squared distance, in that width's steps, between the width's target
    and the level its prefix of the code selects; the best code is kept. With a `hessian` each
    width keeps its own GPTQ state: its target is the weight updated by *its own* earlier errors
    (optimal brain surgeon updates through the inverse Hessian's Cholesky factor), so every width
    is compensated as GPTQ would compensate it alone, as far as the shared code allows. Without,
    targets are the weights themselves (rounding). Returns the widest width's record, with
    `meta["dial"]` listing the widths.
    """
    widths = check_widths(widths)
    priorities = tuple(priorities) if priorities is not None else default_priorities(widths)
    if len(priorities) != len(widths) or not all(p >= 0 for p in priorities) or not any(priorities):
        raise CompressLMError(f"priorities {list(priorities)} must be one non-negative weight per width {widths}")
    check_weight(weight)
    out_f, in_f = weight.shape
    if not 1 <= group_size <= in_f:
        raise CompressLMError(f"group_size must be in 1..{in_f}, got {group_size}")
    top = widths[-1]
    w = weight.detach().float()
    scales, zeros = nested_range(w, group_size, top)
    meta: dict = {"algorithm": "nested-gptq" if hessian is not None else "nested-rtn", "grid": "mid-rise asym"}
    if hessian is not None:
        options = options or GPTQOptions(act_order=True)
        factor, lam, retries = _prepare(hessian, in_f, options)
        meta.update(damp=options.damp, damp_used=lam, damp_retries=retries, act_order=options.act_order)
        codes = _joint_sweep(w, scales, zeros, widths, priorities, group_size, factor, options.block_size)
    else:
        codes = _joint_round(w, scales, zeros, widths, priorities, group_size)
    meta = DialMeta(widths=tuple(widths), priorities=tuple(priorities), active=top).with_meta(meta)
    return CompressedWeight(
        shape=(out_f, in_f), bits=top, group_size=group_size, symmetric=False,
        codes=codes.to(torch.uint8), scales=scales, zeros=zeros, meta=meta,
    )  # fmt: skip


def _prepare(hessian: torch.Tensor, in_f: int, options: GPTQOptions) -> tuple[dict, float, int]:
    if hessian.shape != (in_f, in_f):
        raise CompressLMError(f"nested GPTQ: Hessian shape {tuple(hessian.shape)} does not match {in_f} columns")
    if not torch.isfinite(hessian).all():
        raise CompressLMError("nested GPTQ: the Hessian contains NaN or infinite values")
    factor = factor_hessian(hessian, options.damp, options.max_damp_retries, options.act_order)
    perm = factor.perm if factor.perm is not None else torch.arange(in_f, device=hessian.device)
    return {"perm": perm, "hinv": factor.hinv, "dead": factor.dead}, factor.damp_used, factor.retries


def _width_grids(
    scales: torch.Tensor, zeros: torch.Tensor, widths: tuple[int, ...], in_f: int, group_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each width's scales and zero points per column [out, in]."""
    grids = []
    for bits in widths:
        s, z = width_grid(scales, zeros, widths[-1], bits)
        grids.append((expand_groups(s.float(), in_f, group_size), expand_groups(z.float(), in_f, group_size)))
    return grids


def _best_codes(targets: list[torch.Tensor], widths: tuple[int, ...], priorities: tuple[float, ...]) -> torch.Tensor:
    """The top-width code minimising Σ_b priority_b · (target_b − prefix_b(code))², for targets in each width's steps.

    Exact without scoring all 2^top codes: fix the code's prefix at the second-widest width (one
    bucket of 2^(top − b2) codes); every narrower prefix is then fixed too, so inside the bucket
    only the top width's term varies, and it is least at the bucket's code nearest the top
    target (the lower one on a tie, as a full argmin picks). So one candidate per bucket is
    scored, 2^b2 instead of 2^top (16 instead of 256 for a 4/8 chain), and ties between buckets
    go to the lower code, as before.
    """
    top = widths[-1]
    if len(widths) < 2:
        return torch.clamp(torch.ceil(targets[0] - 0.5), 0, (1 << top) - 1).long()
    shift = top - widths[-2]
    base = torch.arange(1 << widths[-2], device=targets[0].device) << shift  # each bucket's first code
    if priorities[-1]:
        nearest = torch.ceil(targets[-1] - 0.5)[..., None]  # round half down: the lower code on a tie
        candidates = torch.minimum(torch.maximum(nearest, base), base + (1 << shift) - 1).long()
    else:  # the top width does not count: every code of a bucket ties, the first wins
        candidates = base.expand(*targets[0].shape, -1)
    cost = torch.zeros(candidates.shape, device=targets[0].device)
    for target, bits, weight in zip(targets, widths, priorities, strict=True):
        if weight:
            cost += weight * (target[..., None] - (candidates >> (top - bits))) ** 2
    return candidates.gather(-1, cost.argmin(dim=-1, keepdim=True)).squeeze(-1)


def _joint_round(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    widths: tuple[int, ...],
    priorities: tuple[float, ...],
    group_size: int,
    rows_per_chunk: int = 16,
) -> torch.Tensor:
    """Without a Hessian each weight's code is chosen on its own: the sweep's choice, all columns at once."""
    out_f, in_f = w.shape
    grids = _width_grids(scales, zeros, widths, in_f, group_size)
    codes = torch.empty(out_f, in_f, dtype=torch.long, device=w.device)
    for r1 in range(0, out_f, rows_per_chunk):  # [rows, in, buckets] costs, a chunk of rows at a time
        r2 = min(r1 + rows_per_chunk, out_f)
        codes[r1:r2] = _best_codes([w[r1:r2] / s[r1:r2] + z[r1:r2] for s, z in grids], widths, priorities)
    return codes


def _joint_sweep(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    widths: tuple[int, ...],
    priorities: tuple[float, ...],
    group_size: int,
    factor: dict,
    block_size: int,
) -> torch.Tensor:
    """The column sweep: one shared top-width code per weight, one error-feedback state per width."""
    perm, hinv = factor["perm"], factor["hinv"]
    out_f, in_f = w.shape
    top = widths[-1]
    start = w.masked_fill(factor["dead"][None, :], 0.0)[:, perm]
    grids = _width_grids(scales, zeros, widths, in_f, group_size)
    grids = [(s[:, perm], z[:, perm]) for s, z in grids]
    states = [start.clone() for _ in widths]
    codes = torch.zeros(out_f, in_f, dtype=torch.long, device=w.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        n = i2 - i1
        blocks = torch.stack([state[:, i1:i2] for state in states])  # every width's block, [widths, out, n]
        # each column's errors so far, [widths, n, out]; a column's current value is computed when it is
        # reached (its start value minus the earlier errors times the factor), not updated after every column
        errors = torch.zeros(len(widths), n, out_f, device=w.device)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(n):
            col = i1 + i
            current = blocks[:, :, i] - torch.matmul(hinv1[:i, i], errors[:, :i]) if i else blocks[:, :, i]
            # each width's target in its own steps, then the shared code that serves them best
            targets = [c / s[:, col] + z[:, col] for c, (s, z) in zip(current, grids, strict=True)]
            code = _best_codes(targets, widths, priorities)
            codes[:, col] = code
            levels = [
                ((code >> (top - bits)) - z[:, col]) * s[:, col] for (s, z), bits in zip(grids, widths, strict=True)
            ]
            errors[:, i] = (current - torch.stack(levels)) / hinv1[i, i]
        for state, err in zip(states, errors, strict=True):
            state[:, i2:] -= err.T @ hinv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)]


def kept_per_row(in_features: int, sparsity: float) -> int:
    """Weights a row of `in_features` keeps at `sparsity`; an error for a ratio outside [0, 1) or none kept."""
    if not 0.0 <= sparsity < 1.0:
        raise CompressLMError(f"sparsity must be in [0, 1), got {sparsity}")
    keep = round((1.0 - sparsity) * in_features)
    if keep < 1:
        raise CompressLMError(f"sparsity {sparsity} leaves no weight in rows of {in_features}")
    return keep


def nested_rank(record: CompressedWeight) -> torch.Tensor:
    """Each weight's position in its row's keep order (0 = kept longest), as int16 where rows allow.

    The order is Wanda's score |W_ij|·‖x_j‖ on the widest width's weights (‖x_j‖ from
    `record.importance`; plain magnitude without it), sorted stably per row. Computed once per
    layer and kept by `CompressedLinear`, it turns every later sparsity switch into one comparison.
    """
    out_f, in_f = record.shape
    score = record.dequantize().abs()
    if record.importance is not None:
        score = score * record.importance.float()[None, :]
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    dtype = torch.int16 if in_f <= torch.iinfo(torch.int16).max else torch.int32
    rank = torch.empty(out_f, in_f, dtype=dtype, device=order.device)
    rank.scatter_(1, order, torch.arange(in_f, dtype=dtype, device=order.device).expand(out_f, in_f))
    return rank


def nested_mask(record: CompressedWeight, sparsity: float, rank: torch.Tensor | None = None) -> torch.Tensor | None:
    """Keep-mask for `sparsity` from one fixed order of the weights (None at sparsity 0).

    The weights kept at a higher sparsity are always a subset of those kept at a lower one: each
    row keeps its `kept_per_row` first weights of `nested_rank`'s order (pass `rank` to reuse it).
    """
    keep = kept_per_row(record.shape[1], sparsity)
    if keep >= record.shape[1]:
        return None
    return (rank if rank is not None else nested_rank(record)) < keep
