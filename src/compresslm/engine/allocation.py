"""Layer-wise sparsity allocation: OWL (outlier-weighted layer-wise sparsity, Yin et al., 2023).

Blocks whose Wanda scores |W|·‖x‖ hold more outliers (scores above `threshold` × the block's mean)
are pruned less. The block ratios are spread linearly over target ± λ by their outlier share and
then shifted so that the parameter-weighted mean is the target exactly: the global ratio is kept.
"""

from __future__ import annotations

import torch

from compresslm.sparse.prune import scores


def outlier_share(weights_and_hessians: list[tuple[torch.Tensor, torch.Tensor]], threshold: float) -> float:
    """Share of a block's Wanda scores above `threshold` × their mean."""
    flat = torch.cat([scores("wanda", w, h).reshape(-1) for w, h in weights_and_hessians])
    return float((flat > threshold * flat.mean()).float().mean())


def owl_ratios(shares: list[float], params: list[int], target: float, lam: float) -> list[float]:
    """Per-block sparsity ratios from outlier shares: more outliers, lower ratio; weighted mean = target."""
    low, high = min(shares), max(shares)
    spread = [(s - low) / (high - low) * 2 * lam if high > low else 0.0 for s in shares]
    total = sum(params)
    mean = sum(p * s for p, s in zip(params, spread, strict=True)) / total
    ratios = [target + (mean - s) for s in spread]  # above-average outliers: below-target sparsity
    return [min(max(r, 0.0), 0.99) for r in ratios]
