"""`CompressedLinear`: a linear layer whose weight is a CompressedWeight.

On CPU there is no low-bit matmul kernel in PyTorch, so the weight is dequantized (exactly, see
`CompressedWeight.dequantize`) before the matmul. Two ways to hold it:

* packed (`float_weight=False`, what a loaded container gets by default): the record stays in memory
  with its codes packed several to a byte (`runtime.packed`), and each forward dequantizes it, so a
  W4 layer's resident weight is close to its size on disk and a model too large for memory as float
  can still be evaluated; each forward pays the dequantization;
* float (`float_weight=True`, the speed option, and what the calibration pass uses): the dequantized
  weight is cached in the compute dtype, as large as the float layer.

A factored weight (`CompressedWeight.factored`, W = A·B) is never multiplied out: each forward runs
x·Bᵀ then ·Aᵀ, so removing parameters by factorization saves time as well as bytes.

A sparse weight is dequantized as the masked dense weight either way, so sparsity saves bytes on
disk but no time on CPU. Because dequantization is deterministic, both ways compute the same bits,
and a model rebuilt from a container computes bit for bit what it computed right after compression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compresslm.compressed import CompressedWeight
from compresslm.errors import CompressLMError
from compresslm.quant.smoothquant import fake_quantize_activations
from compresslm.runtime.packed import PackedRecord, record_memory
from compresslm.sparse.nested import dial_setting


class CompressedLinear(nn.Module):
    """y = q(x) · dequantize(W)ᵀ + b, with W held as a CompressedWeight.

    `q` is the identity unless activation quantization is set (`set_activation_quantization`), in
    which case inputs are quantized and dequantized in float: a simulation of W8A8-style
    kernels, labelled as such wherever it is reported.
    """

    def __init__(self, weight: CompressedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 float_weight: bool = True):  # fmt: skip
        super().__init__()
        self._record: CompressedWeight | None = weight
        self._packed: PackedRecord | None = None
        self.compute_dtype = dtype
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False) if bias is not None else None
        cache = float_weight and not weight.is_factored
        self.register_buffer("weight", weight.dequantize(dtype) if cache else None, persistent=False)
        if not float_weight and PackedRecord.holds(weight):
            self._packed = PackedRecord(weight)
            for name, tensor in self._packed.tensors().items():
                self.register_buffer(name, tensor, persistent=False)
            self._record = None
        self.act_bits = 0
        self.act_granularity = "token"
        self.register_buffer("act_scale", None, persistent=False)
        self.sparse_weight: torch.Tensor | None = None
        self.kernel = "dense matmul of the dequantized weight"
        dial = weight.dial
        # a nested (dial) record at its widest width, unpruned: every narrower width and sparsity can be taken
        self.nested = weight if dial and weight.bits == max(dial.widths) and weight.mask is None else None
        self.rank: torch.Tensor | None = None  # a dial layer's keep order (see quant.nested.nested_rank)

    def _apply(self, fn, recurse: bool = True):
        """Move or cast like any module; the dtype a packed weight is dequantized to follows the cast."""
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(fn, recurse)

    @property
    def compressed(self) -> CompressedWeight | None:
        """The layer's record (rebuilt exactly from its packed form when it is held packed)."""
        if self._packed is None:
            return self._record
        return self._packed.record({name: getattr(self, name) for name in self._packed.tensors()})

    @compressed.setter
    def compressed(self, record: CompressedWeight | None) -> None:
        if self._packed is not None:
            for name in self._packed.tensors():
                setattr(self, name, None)
            self._packed = None
        self._record = record

    @property
    def holds_weight(self) -> bool:
        """Whether the layer holds its weight in any form (a lazily read layer that was released does not)."""
        return self.weight is not None or self._packed is not None or self._record is not None

    @property
    def packed(self) -> bool:
        """Whether the weight is held packed and dequantized at each forward (no float copy)."""
        return self.weight is None

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight: the cached float copy, or the record dequantized now."""
        if self.weight is not None:
            return self.weight if dtype is None else self.weight.to(dtype)
        return self.compressed.dequantize(dtype or self.compute_dtype)

    def weight_nbytes(self) -> int:
        """Bytes this layer's weight takes in memory: the float copy, or the packed record's tensors."""
        if self.weight is not None:
            return self.weight.numel() * self.weight.element_size()
        if self._packed is not None:
            return PackedRecord.nbytes({name: getattr(self, name) for name in self._packed.tensors()})
        return record_memory(self._record)

    def dial(self, bits: int | None = None, sparsity: float = 0.0) -> None:
        """Switch a nested weight, in place, to one of its widths and a nested sparsity (see compresslm.dial);
        which record serves a setting is `sparse.nested.dial_setting`'s to say."""
        if self.nested is None:
            raise CompressLMError(f"{self.extra_repr()}: not a dial layer (it was not quantized with nested widths)")
        record, self.rank = dial_setting(self.nested, bits or self.nested.bits, sparsity, self.rank)
        self.compressed = record
        if self.weight is not None:
            self.weight = record.dequantize(self.weight.dtype).to(self.weight.device)

    def use_sparse_kernel(self) -> str:
        """Run a 2:4 weight through PyTorch's semi-structured sparse kernel where one exists.

        That kernel needs CUDA, a float16/bfloat16 weight and 2:4 sparsity; anywhere else the layer
        keeps the dense matmul of the masked weight (same outputs, no speed-up) and says why.
        Returns the kernel used. The CUDA path has not been measured on this project's machines.
        """
        record = self.compressed
        if record.nm != (2, 4):
            reason = "the weight is not 2:4 sparse"
        elif self.weight is None:
            reason = "the weight is held packed (load it with float weights for this kernel)"
        elif self.weight.device.type != "cuda":
            reason = f"no semi-structured sparse kernel on {self.weight.device.type}"
        elif self.weight.dtype not in (torch.float16, torch.bfloat16):
            reason = f"the sparse kernel needs float16 or bfloat16, not {self.weight.dtype}"
        else:
            try:
                from torch.sparse import to_sparse_semi_structured

                self.sparse_weight = to_sparse_semi_structured(self.weight)
                self.kernel = "torch semi-structured 2:4 sparse (CUDA)"
                return self.kernel
            except (RuntimeError, ValueError) as exc:  # unsupported GPU or shape
                reason = f"the semi-structured kernel refused this weight: {str(exc).splitlines()[0]}"
        self.sparse_weight = None
        self.kernel = f"dense matmul of the masked weight ({reason}; no speed-up)"
        return self.kernel

    def set_activation_quantization(self, bits: int, granularity: str, scale: torch.Tensor | None = None) -> None:
        """Simulate `bits`-bit symmetric input quantization, per token (dynamic) or per tensor (static)."""
        if granularity == "tensor":
            if scale is None:
                raise ValueError("static per-tensor activation quantization needs a scale")
            scale = scale.detach().float().reshape(()).clone()
        self.act_bits, self.act_granularity, self.act_scale = bits, granularity, scale

    def activation_config(self) -> dict | None:
        if not self.act_bits:
            return None
        scale = None if self.act_scale is None else float(self.act_scale)
        return {"bits": self.act_bits, "granularity": self.act_granularity, "scale": scale, "simulated": True}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = fake_quantize_activations(x, self.act_bits, self.act_granularity, self.act_scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.sparse_weight is not None and x.dtype == self.sparse_weight.dtype:
            return F.linear(x, self.sparse_weight, bias)
        if self.weight is None:  # packed: dequantized for this forward only; factors: two thin matmuls
            record = self.compressed
            if record.is_factored:
                left, right = record.lowrank
                return F.linear(F.linear(x, right.to(x.device, x.dtype)), left.to(x.device, x.dtype), bias)
            return F.linear(x, record.dequantize(x.dtype), bias)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        w = self.compressed
        if w.quantized:
            kind = "per-tensor" if w.per_tensor else f"g{w.group_size}"
            weight = f"W{w.bits} {kind} {'sym' if w.symmetric else 'asym'}"
        elif w.is_factored:
            weight = f"rank {w.lowrank[0].shape[1]} float16 factors"
        else:
            weight = "float16"
        if w.mask is not None:
            weight += f", {w.nm[0]}:{w.nm[1]} sparse" if w.nm else f", {100 * w.sparsity:.1f}% sparse"
        act = f", A{self.act_bits} per-{self.act_granularity} (simulated)" if self.act_bits else ""
        held = ", packed" if self.weight is None else ""
        return f"in={self.in_features}, out={self.out_features}, {weight}{act}{held}, bias={self.bias is not None}"


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path `name` for `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def dense_weight(module: nn.Module, transposed: bool) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or a transposed (GPT-2 Conv1D) layer."""
    weight = module.weight.detach()
    return weight.T if transposed else weight
