"""Structured pruning's arithmetic: importance scores per channel, head and block, and which to keep.

Pure tensor functions; walking a model and rebuilding it smaller is `recipe.structured`'s job.
Whole channels, heads and blocks are removed (not masked), so the result is an ordinary, smaller
dense model that every runtime runs faster without a sparse kernel.

* An MLP channel j (a row of gate/up, a column of down) is scored by the output energy it adds:
  E[a_j²]·‖W_down[:, j]‖², with a_j the down projection's input over the calibration tokens.
* An attention head by the same sum over its columns of the output projection.
* A hidden (residual-stream) channel by its energy E[h_c²] summed over every norm's input.
* A block by how much it changes the residual stream: 1 − the mean cosine between its input and
  output hidden states (a block that barely turns the stream is the cheapest to drop).
* `taylor` scores replace the activation ones by the first-order change of the loss when the
  structure is removed: |Σ w·∂L/∂w| over the structure's weights, from one backward pass.

Kept counts are rounded to a multiple of 32 where the width is a multiple of 32 and at least 256
(GGUF's block types need rows of whole 32-blocks), and heads are kept evenly across the key/value
groups so grouped-query attention stays valid: each group keeps the same number of its query heads.
"""

from __future__ import annotations

import torch

ALIGN = 32


def channel_energy(input_sq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """E[x_j²]·‖W[:, j]‖² per input channel j of a layer with weight [out, in] (its output energy share)."""
    return input_sq.double() * weight.detach().double().pow(2).sum(0)


def per_head(scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel scores [heads·head_dim] summed per head."""
    return scores.reshape(-1, head_dim).sum(1)


def kept_width(width: int, ratio: float, align: int = ALIGN) -> int:
    """How many of `width` channels remain after removing `ratio` of them: rounded to a multiple of
    `align` when `width` is one and at least 8 such blocks wide (else to 1), at least one step; equal
    to `width` when the ratio is too small to remove one step."""
    step = align if width % align == 0 and width >= 8 * align else 1
    return min(width, max(step, round(width * (1.0 - ratio) / step) * step))


def head_steps(heads: int, kv_heads: int) -> list[int]:
    """The head counts that keep grouped-query attention valid: the same number per key/value group."""
    per_group = heads // kv_heads
    return [kv_heads * k for k in range(1, per_group + 1)]


def kept_heads(heads: int, kv_heads: int, ratio: float) -> int:
    """The valid head count nearest to removing `ratio` of `heads` (fewer than `heads`), or `heads`
    when no valid count is smaller."""
    smaller = [n for n in head_steps(heads, kv_heads) if n < heads]
    if not smaller:
        return heads
    return min(smaller, key=lambda n: (abs(n - heads * (1.0 - ratio)), -n))


def top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in their original order (ties go to the lower index)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def top_heads(scores: torch.Tensor, kv_heads: int, keep: int) -> torch.Tensor:
    """The `keep` best query heads, the same number from each key/value group (heads of a group are
    consecutive), in their original order."""
    heads = scores.numel()
    group, per_group = heads // kv_heads, keep // kv_heads
    chosen = [g * group + int(i) for g in range(kv_heads) for i in top(scores[g * group : (g + 1) * group], per_group)]
    return torch.tensor(sorted(chosen), dtype=torch.long)


def channels_of_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The channel indices [h·d, (h+1)·d) of each head in `heads`."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def block_influence(inputs: torch.Tensor, outputs: torch.Tensor) -> tuple[float, int]:
    """Σ over tokens of (1 − cos(h_in, h_out)) and the token count, for a batch of hidden states [..., d]."""
    a, b = inputs.detach().double().flatten(0, -2), outputs.detach().double().flatten(0, -2)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float((1.0 - cos).sum()), cos.numel()


def lowest(scores: list[float], n: int) -> list[int]:
    """Indices of the `n` lowest scores, ascending by index (ties go to the later block)."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:n])
