"""SmoothQuant (Xiao et al., 2022) and simulated activation quantization, as pure functions.

SmoothQuant migrates activation outliers into the weights: per input channel j,
s_j = max|X_j|^α / max|W_:,j|^(1−α); X becomes X/s (folded into the producer) and W becomes W·s,
so W8A8 can quantize both. Activation quantization here is *simulated* (quantize-dequantize in
float): PyTorch has no int8 GEMM on this CPU path, so it measures accuracy, not speed, and every
result that uses it says so.
"""

from __future__ import annotations

import torch


def smoothquant_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """Per-input-channel smoothing factors for linears [out, in] that share one input."""
    w_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    a = act_max.float().clamp(min=1e-5)
    s = a.pow(alpha) / w_max.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-5)


def fake_quantize_activations(
    x: torch.Tensor, bits: int, granularity: str = "token", scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric quantize-dequantize of activations: per token (dynamic) or per tensor (static `scale`)."""
    qmax = (1 << (bits - 1)) - 1
    if granularity == "token":
        step = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
    else:
        if scale is None:
            raise ValueError("per-tensor activation quantization needs a calibrated scale")
        step = scale.to(x.dtype)
    return torch.clamp(torch.round(x / step), -qmax - 1, qmax) * step
