"""Per-block calibration statistics, gathered by hooks during one forward pass per batch.

For every distinct input tensor of a block's linears we accumulate the Hessian 2/n·XᵀX (GPTQ's
objective and every layer's reconstruction error), the mean |x| per channel (AWQ's saliency) and
the max |x| per channel (SmoothQuant, static activation ranges), and we note which norm produced
that tensor (where input scales are folded).

q/k/v (and gate/up) read the very same tensor; accumulating once for all of them halves the cost.
Sharing is detected, not assumed: linears whose pre-hooks see the same tensor (storage, shape,
strides) within one forward pass share one accumulator, and a norm whose forward output is that
tensor is recorded as its producer. The collector holds a reference to every tensor it has seen
during a pass: otherwise a freed activation's memory could be reused by a later tensor of the same
shape, and two unrelated inputs would look identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class InputStatistics:
    """Running 2/n·XᵀX and mean |x| of one input tensor's rows (float32).

    The Hessian is formed in place of the running sum the first time it is asked for, and every later
    ask returns that same tensor: a block's Hessians are a large share of its memory (the widest is
    in² floats), and the linears that read one input (q, k, v) then share one Hessian object, whose
    factorization GPTQ reuses. After that the sum is gone (`xtx` is None) and no rows can be added.
    """

    def __init__(self, in_features: int, device: torch.device):
        self.xtx: torch.Tensor | None = torch.zeros(in_features, in_features, device=device)
        self.abs_sum = torch.zeros(in_features, device=device)
        self.abs_max = torch.zeros(in_features, device=device)
        self.rows = 0
        self._hessian: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, xtx: torch.Tensor, abs_sum: torch.Tensor, abs_max: torch.Tensor, rows: int):
        """Statistics accumulated elsewhere (read back from the statistics cache)."""
        stats = cls.__new__(cls)
        stats.xtx, stats.abs_sum, stats.abs_max, stats.rows = xtx, abs_sum, abs_max, rows
        stats._hessian = None
        return stats

    def add(self, inputs: torch.Tensor) -> None:
        if self.xtx is None:
            raise RuntimeError("rows added after the Hessian was formed")
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        edges = _symmetric_edges(x.shape[1])
        for a in range(len(edges) - 1):  # XᵀX is symmetric: the blocks on and above the diagonal, mirrored later
            for b in range(a, len(edges) - 1):
                rows, cols = slice(edges[a], edges[a + 1]), slice(edges[b], edges[b + 1])
                self.xtx[rows, cols].addmm_(x[:, rows].T, x[:, cols])
        magnitude = x.abs()
        self.abs_sum += magnitude.sum(dim=0)
        torch.maximum(self.abs_max, magnitude.amax(dim=0), out=self.abs_max)
        self.rows += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self._hessian is None:
            xtx, edges = self.xtx, _symmetric_edges(self.xtx.shape[0])
            for a in range(1, len(edges) - 1):  # the blocks below the diagonal from those above it
                above = xtx[: edges[a], edges[a] : edges[a + 1]]
                xtx[edges[a] : edges[a + 1], : edges[a]] = above.T
            self._hessian, self.xtx = xtx.mul_(2.0 / max(self.rows, 1)), None
        return self._hessian

    @property
    def act_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    @property
    def act_max(self) -> torch.Tensor:
        return self.abs_max


def _symmetric_edges(width: int) -> list[int]:
    """Where XᵀX is cut into blocks of columns, of which only those on and above the diagonal are computed:
    four bands from 512 columns on (ten of sixteen products), one below. The mirrored matrix is the full
    product's at about two thirds of its work (bit for bit with the MKL kernels measured here, where a full
    product is exactly symmetric and its blocks are exactly the products of the bands)."""
    bands = 4 if width >= 512 else 1
    return [width * i // bands for i in range(bands + 1)]


def _key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), x.stride())


@dataclass
class BlockStatistics:
    """Statistics of one block: per owner (the first linear reading an input) and who shares it."""

    stats: dict[str, InputStatistics] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # linear name -> owner linear name
    producer: dict[str, str] = field(default_factory=dict)  # owner -> norm module name

    def hessian(self, name: str) -> torch.Tensor:
        return self.stats[self.owner[name]].hessian

    def groups(self) -> dict[str, list[str]]:
        """Owner -> every linear reading that input, in first-seen order."""
        out: dict[str, list[str]] = {}
        for name, owner in self.owner.items():
            out.setdefault(owner, []).append(name)
        return out


class StatisticsCollector:
    """Installs the hooks on a block's linears and norms; call `new_pass()` before each batch."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result = BlockStatistics()
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._norm_outputs: dict[tuple, tuple[str, torch.Tensor]] = {}

    def new_pass(self) -> None:
        self._seen = {}
        self._norm_outputs = {}

    def linear_hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = _key(x)
            first, _ = self._seen.setdefault(key, (name, x))
            self.result.owner.setdefault(name, first)
            if first != name:
                return
            if key in self._norm_outputs:
                self.result.producer.setdefault(name, self._norm_outputs[key][0])
            if name not in self.result.stats:
                self.result.stats[name] = InputStatistics(x.shape[-1], self.device)
            self.result.stats[name].add(x)

        return pre_hook

    def norm_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if torch.is_tensor(output):
                self._norm_outputs[_key(output)] = (name, output)

        return hook
