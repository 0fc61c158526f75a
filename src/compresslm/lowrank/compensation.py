"""Low-rank compensation of a compressed weight's error: W ≈ Q + L·R (LQER/QERA-style).

The error E = W − Q that quantization or pruning left is approximated by rank-r factors chosen for
the layer's *output*, not for the weights: with the calibration Gram matrix H = XᵀX (damped and
factored as H = S·Sᵀ), the output error of any correction is ‖(E − L·R)·S‖²_F = tr((E − LR) H (E − LR)ᵀ),
so the truncated SVD of E·S gives the best rank-r factors for it (the whitening of SVD-LLM), and the
loss left is exactly the sum of the dropped squared singular values. Without H (`hessian=None`) the
plain truncated SVD of E minimizes the weight error instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compresslm.errors import CompressLMError


@dataclass
class LowRankFit:
    left: torch.Tensor  # L [out, r], float32
    right: torch.Tensor  # R [r, in], float32
    kept_loss: float  # ‖(E − L·R)·S‖²: the output error left (weight error without whitening)
    total_loss: float  # ‖E·S‖²: the output error before the correction
    damp_used: float  # λ added to H's diagonal (0 without whitening)


def whitening(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """The lower Cholesky factor S of H + λI (λ = `damp` × mean diagonal, raised tenfold on failure)."""
    mean_diag = torch.mean(torch.diag(hessian)).item()
    lam = damp * mean_diag if mean_diag > 0 else damp
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(7):
        factor, info = torch.linalg.cholesky_ex(hessian + lam * eye)
        if int(info) == 0:
            return factor, lam
        lam *= 10.0
    raise CompressLMError(f"the calibration Gram matrix is not positive definite even with damping {lam / 10:.3g}")


def fit_lowrank(error: torch.Tensor, rank: int, hessian: torch.Tensor | None = None, damp: float = 0.01) -> LowRankFit:
    """Rank-`rank` factors L, R minimizing the output error of `error` − L·R (the weight error without H).

    The singular values are split evenly between the factors (L = U·√Σ, R = √Σ·Vᵀ·S⁻¹), so neither
    factor's range dwarfs the other's when they are stored in float16.
    """
    out_f, in_f = error.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise CompressLMError(f"rank {rank} is not allowed for a [{out_f}, {in_f}] weight; use 1 to {min(out_f, in_f)}")
    error = error.double()
    if hessian is None:
        target, factor, lam = error, None, 0.0
    else:
        factor, lam = whitening(hessian.double(), damp)
        target = error @ factor
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    left = u[:, :rank] * root
    right = root[:, None] * vh[:rank]
    if factor is not None:  # R·S = √Σ·Vᵀ, so R = √Σ·Vᵀ·S⁻¹ (a triangular solve, not an inverse)
        right = torch.linalg.solve_triangular(factor, right, upper=False, left=False)
    squared = s.pow(2)
    return LowRankFit(left.float(), right.float(), float(squared[rank:].sum()), float(squared.sum()), lam)
