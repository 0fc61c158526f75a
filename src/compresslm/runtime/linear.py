"""`CompressedLinear`: a linear layer whose weight is a CompressedWeight.

On CPU there is no low-bit matmul kernel in PyTorch, so the weight is dequantized once (exactly,
see `CompressedWeight.dequantize`) and cached in the compute dtype; the packed record stays the
source of truth for saving. Because dequantization is deterministic, a model rebuilt from a
container computes bit for bit what the model computed right after compression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compresslm.compressed import CompressedWeight


class CompressedLinear(nn.Module):
    """y = x · dequantize(W)ᵀ + b, with W held as a CompressedWeight."""

    def __init__(self, weight: CompressedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.compressed = weight
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False) if bias is not None else None
        self.register_buffer("weight", weight.dequantize(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        w = self.compressed
        kind = "per-tensor" if w.per_tensor else f"g{w.group_size}"
        sym = "sym" if w.symmetric else "asym"
        return f"in={self.in_features}, out={self.out_features}, W{w.bits} {kind} {sym}, bias={self.bias is not None}"


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def dense_weight(module: nn.Module, transposed: bool) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or a transposed (GPT-2 Conv1D) layer."""
    weight = module.weight.detach()
    return weight.T if transposed else weight
