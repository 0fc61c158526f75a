"""Training-time compression: fake quantization with straight-through gradients, learned steps, masks.

`FakeQuantLinear` replaces an `nn.Linear` during training. Its forward uses

    ŵ = (clamp(round(w / s) + z, 0, 2^b − 1) − z) · s        (on the same group-wise grid as PTQ)

with the rounding's gradient passed straight through (STE) and the step s learnable per group
(LSQ: its gradient scaled by 1/√(n·q_max)), so the weights learn to sit where the grid helps
them. The bit width `b` can be changed between steps (randomized precision samples it per layer
per step; `bits = 16` switches quantization off), and a sparsity `mask` (1 = kept) multiplies the
weight (gradual pruning). The zero point is the asymmetric grid's, refitted from the current
weights whenever the width changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compresslm.compressed import expand_groups
from compresslm.quant.grid import Grid, fit_weight


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x forward, gradient multiplied by `factor` backward (LSQ's step-size gradient scaling)."""
    return x * factor + (x - x * factor).detach()


class FakeQuantLinear(nn.Module):
    """A linear layer trained through its own quantization grid (and optional sparsity mask).

    `widths` are the bit widths it may be switched to (one learnable step per group and width,
    created up front so an optimizer sees them all); `set_bits` picks the active one.
    """

    def __init__(
        self, linear: nn.Linear, widths: tuple[int, ...] = (4,), group_size: int = 64, learn_step: bool = True
    ):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = min(group_size, self.in_features)
        self.register_buffer("mask", None)
        self.log_steps = nn.ParameterDict()
        with torch.no_grad():
            for bits in widths:
                if bits < 16:
                    scale, zero = fit_weight(self.weight.float(), Grid(bits, "group", self.group_size))
                    self.log_steps[str(bits)] = nn.Parameter(scale.clamp_min(1e-8).log(), requires_grad=learn_step)
                    self.register_buffer(f"zero_{bits}", zero)
        self.bits = 16
        self.set_bits(max(widths))

    def set_bits(self, bits: int) -> None:
        """Switch the active width (16 = no quantization)."""
        if bits < 16 and str(bits) not in self.log_steps:
            raise ValueError(f"width {bits} was not among this layer's widths {sorted(self.log_steps)}")
        self.bits = bits

    def step_and_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_steps[str(self.bits)].exp(), getattr(self, f"zero_{self.bits}")

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight if self.mask is None else self.weight * self.mask
        if self.bits >= 16:
            return w
        q_max = (1 << self.bits) - 1
        step, zero = self.step_and_zero()
        step = scale_grad(step, 1.0 / math.sqrt(self.group_size * q_max))
        s = expand_groups(step, self.in_features, self.group_size)
        z = expand_groups(zero, self.in_features, self.group_size)
        codes = torch.clamp(round_ste(w / s) + z, 0, q_max)
        w_q = (codes - z) * s
        return w_q if self.mask is None else w_q * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        mask = f", {100 * (1 - float(self.mask.float().mean())):.0f}% masked" if self.mask is not None else ""
        return f"in={self.in_features}, out={self.out_features}, W{self.bits} g{self.group_size}{mask}"


def prune_schedule(step: int, total: int, target: float, kind: str = "cubic", start: float = 0.0) -> float:
    """Sparsity at `step` of `total` for gradual pruning from `start` to `target` (cubic, linear or cosine)."""
    if kind not in ("cubic", "linear", "cosine"):
        raise ValueError(f"unknown pruning schedule '{kind}'; choose cubic, linear or cosine")
    t = min(max(step / max(total, 1), 0.0), 1.0)
    if kind == "cubic":  # Zhu & Gupta 2017: fast early, slow late
        frac = 1.0 - (1.0 - t) ** 3
    elif kind == "linear":
        frac = t
    else:
        frac = 0.5 * (1.0 - math.cos(math.pi * t))
    return start + (target - start) * frac


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """1.0 where a weight is kept: the largest |w| per row (or N of every M)."""
    from compresslm.sparse.masks import SparsityPattern, select_mask

    pattern = SparsityPattern(n=nm[0], m=nm[1]) if nm else SparsityPattern(ratio=sparsity)
    return select_mask(weight.detach().abs(), pattern).to(weight.dtype)
