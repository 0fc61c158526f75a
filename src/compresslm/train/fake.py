"""Training-time compression: fake quantization with straight-through gradients, learned steps, masks.

`FakeQuantLinear` replaces an `nn.Linear` during training. Its forward uses

    ŵ = (clamp(round(w / s) + z, 0, 2^b − 1) − z) · s        (on the same group-wise grid as PTQ)

with the rounding's gradient passed straight through (STE) and the step s learnable per group
(LSQ: its gradient scaled by 1/√(n·q_max)), so the weights learn to sit where the grid helps
them. The bit width `b` can be changed between steps (randomized precision samples it per layer
per step; `bits = 16` switches quantization off), and a sparsity `mask` (1 = kept) multiplies the
weight (gradual pruning). The zero point is the asymmetric grid's, refitted from the current
weights whenever the width changes.

Two variants: `dynamic_nm` re-chooses an N:M mask from the current magnitudes at every forward and
passes the gradient straight through to the pruned weights too (SR-STE, Zhou et al. 2021: pruned
weights can grow back; the trainer adds a decay pulling them to zero), a continuous route to
2:4; `lora_rank` freezes the weight and trains a low-rank update B·A through the grid (QLoRA-style
cheap QAT: far fewer trained parameters), merged into the weight when training ends.

`learn_widths` makes the width itself a trained choice (the rate term): each layer holds logits over
its `widths`; while `mixing`, its weight is the softmax-weighted mixture of the weight quantized at
every width (each through its own STE grid), and `expected_bits` is the same mixture of the bits
each width's record takes in the container (codes, float16 scales, packed zero points), so a
penalty on it is differentiable in the logits (in the spirit of DNAS mixed precision, Wu et al.
2018). `fix_width` ends the mixing at the most probable width, which is then trained as plain QAT.

`act_bits` also quantizes the layer's inputs, symmetric per tensor, with a learned clipping range
α (initialised from the first batch's max |x|; its gradient flows through the step α/q_max, as
LSQ learns steps, so clipped inputs pull α out and rounding error pulls it in).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from compresslm.compressed import expand_groups
from compresslm.formats.sizes import planned_nbytes
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
        self,
        linear: nn.Linear,
        widths: tuple[int, ...] = (4,),
        group_size: int = 64,
        learn_step: bool = True,
        dynamic_nm: tuple[int, int] | None = None,
        lora_rank: int = 0,
        act_bits: int = 0,
        learn_widths: bool = False,
    ):
        super().__init__()
        self.widths = tuple(sorted(widths, reverse=True))
        if learn_widths and (len(self.widths) < 2 or self.widths[0] >= 16):
            raise ValueError(f"learned widths need two or more quantized widths, not {self.widths}")
        self.width_logits = nn.Parameter(torch.zeros(len(self.widths))) if learn_widths else None
        self.mixing = learn_widths
        self.act_bits = act_bits
        self.log_clip = nn.Parameter(torch.zeros(())) if act_bits else None
        self.register_buffer("clip_ready", torch.tensor(False))
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=lora_rank == 0)
        self.dynamic_nm = dynamic_nm
        self.lora_a = self.lora_b = None
        if lora_rank:
            generator = torch.Generator().manual_seed(linear.in_features * 7919 + linear.out_features)
            a = torch.randn(lora_rank, linear.in_features, generator=generator) / math.sqrt(linear.in_features)
            self.lora_a = nn.Parameter(a.to(self.weight.device, self.weight.dtype))  # drawn on the CPU: reproducible
            w = self.weight
            self.lora_b = nn.Parameter(torch.zeros(linear.out_features, lora_rank, dtype=w.dtype, device=w.device))
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

    def step_and_zero(self, bits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        bits = self.bits if bits is None else bits
        return self.log_steps[str(bits)].exp(), getattr(self, f"zero_{bits}")

    def width_probs(self) -> torch.Tensor:
        """The learned distribution over `widths` (learn_widths only)."""
        return torch.softmax(self.width_logits, dim=0)

    def fix_width(self) -> None:
        """Stop mixing: from now on the layer trains (and exports) at its most probable width."""
        self.mixing = False
        self.set_bits(self.widths[int(torch.argmax(self.width_logits.detach()))])

    def record_bits(self, bits: int) -> int:
        """Bits this layer's weight takes at `bits` in the container (codes, scales, zero points), as
        `linear_bits_per_param` counts them."""
        shape = (self.out_features, self.in_features)
        return 8 * planned_nbytes(shape, Grid(bits, "group", self.group_size), aligned=False)

    def expected_bits(self) -> torch.Tensor:
        """The record's bits at the active width, or their expectation under `width_probs` while mixing
        (differentiable in the logits: the rate term)."""
        if not self.mixing:
            return torch.tensor(float(self.record_bits(self.bits)), device=self.weight.device)
        costs = torch.tensor([float(self.record_bits(b)) for b in self.widths], device=self.weight.device)
        return (self.width_probs() * costs).sum()

    def dense_weight(self) -> torch.Tensor:
        """The float weight the grid sees: the weight plus any low-rank update."""
        if self.lora_a is None:
            return self.weight
        return self.weight + self.lora_b @ self.lora_a

    def refresh_dynamic_mask(self) -> None:
        """Re-choose the N:M mask from the current magnitudes (dynamic_nm only)."""
        if self.dynamic_nm is not None:
            self.mask = magnitude_mask(self.dense_weight(), 0.0, self.dynamic_nm)

    def pruned_decay(self) -> torch.Tensor:
        """½‖(1 − mask) ⊙ w‖²: SR-STE's pull of the currently pruned weights towards zero."""
        if self.mask is None or self.dynamic_nm is None:
            return torch.zeros((), device=self.weight.device)
        return 0.5 * ((1 - self.mask) * self.dense_weight()).pow(2).sum()

    def _masked(self, w: torch.Tensor) -> torch.Tensor:
        """w times the mask; a dynamic mask passes the gradient straight through to the pruned weights."""
        if self.mask is None:
            return w
        return w + (w * self.mask - w).detach() if self.dynamic_nm is not None else w * self.mask

    def quantized_weight(self) -> torch.Tensor:
        w = self._masked(self.dense_weight())
        if self.mixing:
            if torch.is_grad_enabled():  # recompute in backward: keeping every width's grid costs memory
                return checkpoint(self._mixture, w, use_reentrant=False)
            return self._mixture(w)
        return w if self.bits >= 16 else self._quantized_at(w, self.bits)

    def _mixture(self, w: torch.Tensor) -> torch.Tensor:
        """The width_probs-weighted sum of w quantized at every width. Autograd would keep about six
        weight-sized tensors per width for the backward (30 per layer at five widths: some 13 GB of
        float32 for the reference model's linears), so while training it is recomputed in the backward."""
        probs = self.width_probs().to(w.dtype)
        return sum(p * self._quantized_at(w, b) for p, b in zip(probs, self.widths, strict=True))

    def _quantized_at(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        q_max = (1 << bits) - 1
        step, zero = self.step_and_zero(bits)
        step = scale_grad(step, 1.0 / math.sqrt(self.group_size * q_max))
        s = expand_groups(step, self.in_features, self.group_size)
        z = expand_groups(zero, self.in_features, self.group_size)
        codes = torch.clamp(round_ste(w / s) + z, 0, q_max)
        return self._masked((codes - z) * s)

    def activation_step(self) -> torch.Tensor:
        """The learned input step α / q_max (act_bits only)."""
        return self.log_clip.exp() / ((1 << (self.act_bits - 1)) - 1)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clip_ready:  # first batch: the clip starts at the largest |x| seen
            with torch.no_grad():
                self.log_clip.copy_(x.detach().abs().amax().clamp_min(1e-5).log())
                self.clip_ready.fill_(True)
        q_max = (1 << (self.act_bits - 1)) - 1
        step = scale_grad(self.activation_step(), 1.0 / math.sqrt(x[..., 0].numel() * q_max)).to(x.dtype)
        return torch.clamp(round_ste(x / step), -q_max - 1, q_max) * step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = self.quantize_input(x)
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        mask = f", {100 * (1 - float(self.mask.float().mean())):.0f}% masked" if self.mask is not None else ""
        if self.dynamic_nm is not None:
            mask += f" (dynamic {self.dynamic_nm[0]}:{self.dynamic_nm[1]})"
        lora = f", LoRA rank {self.lora_a.shape[0]}" if self.lora_a is not None else ""
        act = f", A{self.act_bits} learned clip" if self.act_bits else ""
        width = f"W{self.bits}"
        if self.mixing:
            probs = ", ".join(f"W{b} {p:.2f}" for b, p in zip(self.widths, self.width_probs().tolist(), strict=True))
            width = f"mixing ({probs})"
        return f"in={self.in_features}, out={self.out_features}, {width} g{self.group_size}{mask}{lora}{act}"


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
