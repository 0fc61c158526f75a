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
    return (h / n**0.5).float()


def hadamard_matrix(n: int) -> torch.Tensor:
    """The normalized n×n Sylvester Hadamard matrix (float32); n must be a power of two."""
    if n < 1 or n & (n - 1):
        raise CompressLMError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    return _hadamard(n).clone()


def rotate_last(x: torch.Tensor) -> torch.Tensor:
    """x @ H along the last dimension, in float32 (self-inverse: rotating twice gives x up to rounding)."""
    return x.float() @ hadamard_matrix(x.shape[-1]).to(device=x.device)
