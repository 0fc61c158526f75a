"""Orthogonal rotations that spread outliers before quantization (the QuaRot idea).

A normalized Hadamard matrix H (H @ H.T = I, entries ±1/sqrt(n)) mixes every channel into every
other one, so a single large channel no longer sets the range of its whole group. Because H is
orthogonal, rotating both sides of a dot product leaves it unchanged, and H is its own inverse
(it is symmetric), so a quantizer can rotate, quantize, dequantize and rotate back.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from compresslm.errors import CompressLMError


@lru_cache(maxsize=16)
def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def hadamard_matrix(n: int) -> torch.Tensor:
    """The normalized n×n Sylvester Hadamard matrix (float32); n must be a power of two."""
    if n < 1 or n & (n - 1):
        raise CompressLMError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    return _hadamard(n).float()


def rotate_last(x: torch.Tensor) -> torch.Tensor:
    """x @ H along the last dimension, in float32 (self-inverse: rotating twice gives x up to rounding)."""
    return x.float() @ hadamard_matrix(x.shape[-1]).to(device=x.device)


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded random orthogonal n×n matrix that mixes every channel into every other one (float64).

    For n = 2^k·m (m odd): D·(H ⊗ R) with H the normalized 2^k Hadamard matrix, R a random m×m
    orthogonal matrix (QR of a Gaussian) and D random signs; for a power of two that is QuaRot's
    random Hadamard matrix D·H. The Kronecker product of orthogonal matrices is orthogonal, so any
    width works (576 = 64·9, 896 = 128·7), not only the sizes with a known Hadamard matrix.
    """
    if n < 1:
        raise CompressLMError(f"a rotation needs a positive size, got {n}")
    generator = torch.Generator().manual_seed(seed)
    power = n & -n  # the largest power of two dividing n
    odd = n // power
    h = _hadamard(power)
    if odd > 1:
        q, r = torch.linalg.qr(torch.randn(odd, odd, generator=generator, dtype=torch.float64))
        h = torch.kron(
            h, (q * torch.sign(torch.diagonal(r))).contiguous()
        )  # signs fixed so that the draw is Haar-uniform
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * h
