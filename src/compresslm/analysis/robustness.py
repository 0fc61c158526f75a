"""Robustness to corrupted storage: seeded bit flips in a compressed model's stored bits, by part.

A container's checksums catch corruption when the file is read; this asks what an undetected flip
would do (memory errors, a format without checksums, a copy whose checksums were recomputed).
Each part is flipped in the form the container stores it:

* `codes`: the packed codes (kept codes only, `bits` bits each), as `formats.packing.pack_bits` lays them out;
* `scales`: the float16 scales' bits (float32 on K-quant grids);
* `zeros`: packed integer zero points (asymmetric grids; symmetric grids store none), or float16 ones;
* `masks`: bitmask-stored masks (N:M masks are stored as pattern indices and are left alone);
* `dense`: every tensor that is not a compressed linear (embedding, norms, biases), in float16.

Every bit of a part flips independently with probability `rate` (the number of flips is drawn from a
binomial, their positions uniformly without replacement, all from one seeded generator), so a run is
reproducible and its flips are counted exactly. The corrupted weights are set as each layer's float
weight, without validation: a flipped scale may be infinite, as it would be in memory.

`protect=True` applies range checks a loader could make without the original: per layer, a scale
that is not finite or exceeds 100x the layer's median |scale| is replaced by that median, and a
non-finite dense value by 0. They change nothing in an uncorrupted model whose scales are within
that range (checked by the tests on tiny models, and reported per run as `protected_values`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compresslm.compressed import CompressedWeight, expand_groups
from compresslm.errors import CompressLMError
from compresslm.formats.packing import pack_bits, unpack_bits
from compresslm.models.loaded import LoadedModel

PARTS = ("codes", "scales", "zeros", "masks", "dense")
SCALE_LIMIT = 100.0  # x the layer's median |scale|: larger is taken for a flipped exponent bit


@dataclass
class Corruption:
    part: str
    rate: float
    seed: int
    bits: int  # bits of the part that could flip
    flips: int  # bits that did
    protected_values: int = 0  # values the range checks replaced


def flip_bits(data: np.ndarray, rate: float, generator: np.random.Generator) -> tuple[np.ndarray, int]:
    """`data` (uint8) with each of its bits flipped with probability `rate`; and how many flipped."""
    total = data.size * 8
    flips = int(generator.binomial(total, rate)) if total else 0
    out = data.copy()
    if flips:
        positions = generator.choice(total, size=flips, replace=False)
        np.bitwise_xor.at(out, positions // 8, (1 << (positions % 8)).astype(np.uint8))
    return out, flips


def _packed_flip(values: torch.Tensor, bits: int, rate: float, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    data = np.frombuffer(pack_bits(values, bits), dtype=np.uint8)
    flipped, flips = flip_bits(data, rate, rng)
    return unpack_bits(flipped.tobytes(), bits, values.numel()).reshape(values.shape), flips


def _half_flip(values: torch.Tensor, rate: float, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    return _float_flip(values.detach().to(torch.float16), rate, rng)


def _float_flip(values: torch.Tensor, rate: float, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    """Bits of a float tensor flipped at `rate`, in its own dtype."""
    data = values.detach().contiguous().view(torch.uint8).numpy()
    flipped, flips = flip_bits(data.reshape(-1), rate, rng)
    return torch.from_numpy(flipped).view(values.dtype).reshape(values.shape), flips


def _protect_scales(scales: torch.Tensor) -> tuple[torch.Tensor, int]:
    magnitude = scales.float().abs()
    finite = torch.isfinite(magnitude)
    median = magnitude[finite].median() if bool(finite.any()) else torch.tensor(1.0)
    bad = ~finite | (magnitude > SCALE_LIMIT * median)
    return torch.where(bad, median.to(scales.dtype), scales), int(bad.sum())


def _weight(record: CompressedWeight, codes, scales, zeros, mask) -> torch.Tensor:
    """(codes − zeros)·scales (masked), from raw fields that may hold any value: no record is built."""
    in_f = record.in_features
    if not record.per_tensor:
        scales = expand_groups(scales.float(), in_f, record.group_size)
        zeros = expand_groups(zeros.float(), in_f, record.group_size)
    weight = (codes.float() - zeros.float()) * scales.float()
    if mask is not None:
        weight = weight * mask
    if record.lowrank is not None:
        a, b = record.lowrank
        weight = weight + a.float() @ b.float()
    return weight


def _corrupt_record(record: CompressedWeight, part: str, rate: float, rng, protect: bool) -> tuple:
    """The corrupted dense weight of one record, the bits that could flip, the flips and the protected values."""
    codes, scales, zeros, mask = record.codes, record.scales, record.zeros, record.mask
    bits = flips = protected = 0
    if part == "codes":
        kept = codes[mask] if mask is not None else codes.reshape(-1)
        new, flips = _packed_flip(kept, record.bits, rate, rng)
        bits = len(pack_bits(kept, record.bits)) * 8
        codes = codes.clone()
        if mask is not None:
            codes[mask] = new
        else:
            codes = new.reshape(codes.shape)
    elif part == "scales":  # as stored: float16, or float32 on K-quant grids
        scales, flips = _float_flip(scales, rate, rng)
        bits = scales.numel() * 8 * scales.element_size()
    elif part == "zeros" and (zeros.is_floating_point() or not record.symmetric):
        if zeros.is_floating_point():
            zeros, flips = _float_flip(zeros, rate, rng)
            bits = zeros.numel() * 8 * zeros.element_size()
        else:
            zeros, flips = _packed_flip(zeros, record.bits, rate, rng)
            bits = len(pack_bits(zeros, record.bits)) * 8
    elif part == "masks" and mask is not None and record.nm is None:
        mask, flips = _packed_flip(mask.to(torch.uint8), 1, rate, rng)
        mask = mask.bool()
        bits = len(pack_bits(record.mask.to(torch.uint8), 1)) * 8
    if protect:
        scales, protected = _protect_scales(scales)
    return _weight(record, codes, scales, zeros, mask), bits, flips, protected


def corrupt(lm: LoadedModel, part: str, rate: float, seed: int = 0, protect: bool = False) -> Corruption:
    """Flip bits of `part` in every compressed layer (or the dense tensors) of `lm`, in place."""
    if part not in PARTS:
        raise CompressLMError(f"part {part!r} is not one of {', '.join(PARTS)}")
    if not 0 <= rate <= 1:
        raise CompressLMError(f"a flip rate is a probability in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    result = Corruption(part, rate, seed, 0, 0)
    compressed = {name: m for name, m in lm.model.named_modules() if type(m).__name__ == "CompressedLinear"}
    if not compressed:
        raise CompressLMError("the model has no compressed layers: load a container")
    if part == "dense":
        inside = {f"{name}.{p}" for name, m in compressed.items() for p, _ in m.named_parameters(recurse=False)}
        with torch.no_grad():
            for name, param in lm.model.named_parameters():
                if name in inside or not param.is_floating_point():
                    continue
                new, flips = _half_flip(param, rate, rng)
                if protect:
                    bad = ~torch.isfinite(new)
                    new = new.masked_fill(bad, 0.0)
                    result.protected_values += int(bad.sum())
                param.copy_(new.to(param.dtype))
                result.bits += param.numel() * 16
                result.flips += flips
        return result
    for module in compressed.values():
        record = module.compressed
        if record is None or not record.quantized:
            continue
        weight, bits, flips, protected = _corrupt_record(record, part, rate, rng, protect)
        module.weight = weight.to(module.compute_dtype)  # taken as the layer's float weight, unvalidated
        result.bits += bits
        result.flips += flips
        result.protected_values += protected
    return result


def robustness_rows(
    container: str,
    parts: tuple[str, ...] = PARTS,
    rates: tuple[float, ...] = (1e-7, 1e-6, 1e-5, 1e-4),
    seeds: tuple[int, ...] = (0, 1, 2),
    corpus: str = "wikitext2",
    ctx: int = 512,
    limit: int | None = 8,
    protect: bool = False,
    show_progress: bool = True,
) -> list[dict]:
    """Perplexity and KL to the uncorrupted container for every (part, rate, seed), each on a fresh load."""
    import math

    from compresslm.eval.distance import distance, reference_logits
    from compresslm.models.loading import load_model
    from compresslm.progress import progress

    for part in parts:
        if part not in PARTS:
            raise CompressLMError(f"part {part!r} is not one of {', '.join(PARTS)}")
    if any(not 0 <= rate <= 1 for rate in rates):
        raise CompressLMError(f"flip rates are probabilities in [0, 1], got {list(rates)}")
    reference = reference_logits(load_model(container), corpus, ctx=ctx, limit=limit, show_progress=False)
    rows = []
    bar = progress(len(parts) * len(rates) * len(seeds), "bit flips", unit="run", enabled=show_progress)
    for part in parts:
        for rate in rates:
            for seed in seeds:
                lm = load_model(container)
                hit = corrupt(lm, part, rate, seed, protect)
                result = distance(lm, reference, corpus, show_progress=False)
                finite = math.isfinite(result.ppl)
                rows.append({"part": part, "rate": rate, "seed": seed, "bits": hit.bits, "flips": hit.flips,
                             "protected_values": hit.protected_values, "protect": protect,
                             "ppl": result.ppl if finite else None, "kld_mean": result.kld_mean if finite else None,
                             "reference_ppl": result.reference_ppl, "eval_protocol": result.protocol})  # fmt: skip
                bar.update(1)
    bar.close()
    return rows
