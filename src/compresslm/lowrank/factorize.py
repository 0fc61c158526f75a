"""Low-rank factorization of a weight: W ≈ A·B with A [out, r] and B [r, in], stored instead of W.

Three ways to choose the factors, each the best rank-r factors for a different error:

* `svd`: the truncated SVD of W, best for the weight error ‖W − AB‖.
* `asvd` (ASVD): the truncated SVD of W·S with S = diag(s_j), s_j the input channel's calibration
  RMS to the power α, then B = B'·S⁻¹: channels that carry large activations are kept more
  faithfully. The RMS comes from the diagonal of XᵀX (ASVD's paper uses the mean |x_j|; the two
  order channels alike on the activations seen here, and XᵀX is what the engine accumulates).
* `whitened` (SVD-LLM's truncation-aware whitening): the truncated SVD of W·S with S the Cholesky
  factor of XᵀX, so the truncation minimizes the layer's output error on the calibration inputs and
  the loss left is exactly the dropped singular values (`lowrank.compensation.fit_lowrank`).

A factored layer of rank r holds r·(out + in) parameters instead of out·in: it saves parameters
(and time: the runtime multiplies by the two factors in turn) only when r < out·in / (out + in).
"""

from __future__ import annotations

import math

import torch

from compresslm.compressed import CompressedWeight
from compresslm.errors import CompressLMError
from compresslm.lowrank.compensation import fit_lowrank, whitening

METHODS = ("svd", "asvd", "whitened")


def rank_for_ratio(shape: tuple[int, int], ratio: float) -> int:
    """The largest rank whose factors remove at least `ratio` of the layer's parameters (0 when none does)."""
    out_f, in_f = shape
    return min(math.floor((1.0 - ratio) * out_f * in_f / (out_f + in_f)), out_f, in_f)


def asvd_scale(hessian: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's column scales: each input channel's calibration RMS to the power α (from XᵀX's diagonal, up to a
    constant that the factors absorb), floored so that a silent channel does not divide by zero."""
    diag = torch.diagonal(hessian).double().clamp_min(0)
    return diag.pow(alpha / 2).clamp_min(float(diag.max()) ** (alpha / 2) * 1e-6 + 1e-30)


def output_error_share(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W − W')·X‖² / ‖W·X‖² on the calibration inputs (XᵀX = `hessian`): the output error left."""
    weight, hessian = weight.double(), hessian.double()
    delta = weight - approx.double()
    total = float(((weight @ hessian) * weight).sum())
    return float(((delta @ hessian) * delta).sum()) / total if total > 0 else 0.0


def factorize(
    weight: torch.Tensor,
    rank: int,
    method: str = "whitened",
    hessian: torch.Tensor | None = None,
    alpha: float = 0.5,
    damp: float = 0.01,
) -> CompressedWeight:
    """`weight` [out, in] as rank-`rank` float16 factors chosen by `method` (`asvd` and `whitened` need XᵀX)."""
    if method not in METHODS:
        raise CompressLMError(f"low-rank method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if method != "svd" and hessian is None:
        raise CompressLMError(f"the {method} factorization needs the layer's calibration statistics (XᵀX)")
    weight = weight.detach().float()
    if method == "whitened":
        fit = fit_lowrank(weight, rank, hessian, damp)
        left, right = fit.left, fit.right
    elif method == "asvd":
        scale = asvd_scale(hessian, alpha)
        fit = fit_lowrank(weight.double() * scale, rank)
        left, right = fit.left, (fit.right.double() / scale).float()
    else:
        fit = fit_lowrank(weight, rank)
        left, right = fit.left, fit.right
    record = CompressedWeight.factored(left, right)
    facts: dict = {"method": method, "rank": rank, "damp_used": fit.damp_used}
    if method == "asvd":
        facts["alpha"] = alpha
    if hessian is not None:  # what the stored (float16) factors leave of the layer's output
        facts["output_error_left"] = output_error_share(weight, record.dequantize(), hessian)
    record.meta = {"lowrank": facts}
    return record


def truncations(
    weight: torch.Tensor,
    ranks: list[int],
    method: str = "whitened",
    hessian: torch.Tensor | None = None,
    alpha: float = 0.5,
    damp: float = 0.01,
) -> dict[int, torch.Tensor]:
    """The weight `factorize` would leave at each of `ranks` (float32, the product of float16 factors), from
    one decomposition: what the budget solver compares when it chooses each layer's rank."""
    if method not in METHODS or (method != "svd" and hessian is None):
        raise CompressLMError(f"the {method} factorization needs the layer's calibration statistics (XᵀX)")
    weight = weight.detach().float()
    factor, scale = None, None
    target = weight.double()
    if method == "whitened":
        factor, _ = whitening(hessian.double(), damp)
        target = target @ factor
    elif method == "asvd":
        scale = asvd_scale(hessian, alpha)
        target = target * scale
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    approximations = {}
    for rank in ranks:
        root = s[:rank].sqrt()
        left, right = u[:, :rank] * root, root[:, None] * vh[:rank]
        if factor is not None:
            right = torch.linalg.solve_triangular(factor, right, upper=False, left=False)
        elif scale is not None:  # rounded as `factorize` rounds it: to float32 before the scale is undone
            right = right.float().double() / scale
        approximations[rank] = left.float().half().float() @ right.float().half().float()
    return approximations
