"""The `rotate` stage: an orthogonal rotation of the residual stream folded into the weights (QuaRot).

The model computes the same function in float afterwards, but every weight that reads from the
residual stream (q, k, v, gate, up, lm_head) now sees inputs mixed by a random orthogonal Q, so no
single outlier channel sets the range of a quantization group, of an activation's per-token scale,
or of the calibration Hessian's diagonal. Steps, on the whole float model before calibration:

1. each RMS norm's weight g is folded into the columns of the linears that read its output (W·diag(g),
   or diag(1 + g) for norms that compute x̂·(1 + g)), and the norm is left neutral; a tied lm_head
   is untied first (the final norm's weight folds into the head, not into the embedding);
2. the embedding's rows become E·Q, readers W·Q, writers into the residual (o, down) Qᵀ·W and their
   biases b·Q; an RMS norm with a neutral weight commutes with Q (‖xQ‖ = ‖x‖);
3. with `heads`, each attention head's values are rotated by a Hadamard matrix of the head size
   (v rows Hᵀ·W_v per head, o columns W_o·H per head), which attention's weighted sums carry through.

Which norm feeds which linear is read from one probe forward (a linear reads a norm when its input
is that norm's output), and the rotated model must give the original's logits on the probe to
float tolerance; otherwise the model is restored and the stage refused, naming what did not fit.
Families with LayerNorm (mean subtraction), norms after the attention or MLP output, or fused
projections are refused that way, before any compute on calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compresslm.errors import UnsupportedArchitectureError
from compresslm.quant.rotation import hadamard_matrix, random_orthogonal
from compresslm.recipe.fields import RecipeError, stage_dict
from compresslm.recipe.registry import register_stage

READERS = ("q", "k", "v", "gate", "up")
WRITERS = ("o", "down")
TOLERANCE = 1e-4  # relative change of the probe's logits that still counts as the same function in float32


class RotationError(UnsupportedArchitectureError):
    """A model the rotation cannot be folded into exactly."""


@dataclass
class RotateStage:
    seed: int = 0
    heads: bool = True
    type: str = "rotate"

    def validate(self, where: str) -> None:
        if self.seed < 0:
            raise RecipeError(f"{where}: seed={self.seed} is not allowed; use a non-negative integer")

    def to_dict(self) -> dict:
        return stage_dict(self)


def _probe(lm) -> torch.Tensor:
    return torch.randint(0, lm.layout.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One tensor passed on (or an equal copy of it)."""
    return a is b or (a.shape == b.shape and torch.equal(a, b))


def _norm_inputs(lm, ids: torch.Tensor) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """linear name -> the norm whose output it reads (exactly), from one forward; and the norms' outputs."""
    modules = dict(lm.model.named_modules())
    norms = [name for block in lm.layout.blocks for name in block.norms]
    if lm.layout.final_norm:
        norms.append(lm.layout.final_norm)
    readers = [info.name for info in lm.layout.linears() if info.role in READERS] + [lm.layout.lm_head]
    writers = [info.name for info in lm.layout.linears() if info.role in WRITERS]
    outputs, inputs, written, normed, hooks = {}, {}, {}, {}, []

    def keep(store: dict, name: str, value: torch.Tensor) -> None:  # a hook that returns None changes nothing
        store.setdefault(name, value)

    for name in norms:
        hooks.append(modules[name].register_forward_hook(lambda m, a, out, n=name: keep(outputs, n, out)))
        hooks.append(modules[name].register_forward_hook(lambda m, a, out, n=name: keep(normed, n, a[0])))
    for name in readers:
        hooks.append(modules[name].register_forward_hook(lambda m, a, out, n=name: keep(inputs, n, a[0])))
    for name in writers:
        hooks.append(modules[name].register_forward_hook(lambda m, a, out, n=name: keep(written, n, out)))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    for writer, output in written.items():
        norm = next((n for n, x in normed.items() if _same(x, output)), None)
        if norm is not None:
            raise RotationError(f"{norm} normalizes {writer}'s output before the residual sum; a norm there does not "
                                "commute with the rotation")  # fmt: skip
    fed: dict[str, str] = {}
    for reader in readers:
        source = next((n for n in norms if n in outputs and reader in inputs and _same(outputs[n], inputs[reader])),
                      None)  # fmt: skip
        if source is None:
            raise RotationError(f"{reader} does not read a norm's output directly; the rotation needs pre-norm blocks")
        fed[reader] = source
    return fed, outputs


def _norm_offset(module: nn.Module, hidden: int) -> float:
    """0 for a norm computing x̂·g, 1 for x̂·(1 + g); refused for anything that is not an RMS norm."""
    weight = getattr(module, "weight", None)
    if getattr(module, "bias", None) is not None or weight is None or tuple(weight.shape) != (hidden,):
        raise RotationError(f"{type(module).__name__} is not an RMS norm with a weight of size {hidden}")
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(3)) * 2.0 + 0.5
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)) or 0.0)
    with torch.no_grad():
        out = module(x.to(weight.dtype)).double()
    base = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    g = weight.detach().double()
    for offset in (0.0, 1.0):
        if torch.allclose(out, base * (g + offset), rtol=1e-3, atol=1e-5):
            return offset
    raise RotationError(f"{type(module).__name__} is not an RMS norm (it subtracts the mean or scales otherwise)")


def _untie(lm) -> bool:
    """Give a tied lm_head its own weight (the final norm folds into it, not into the embedding)."""
    if not lm.layout.tied_lm_head:
        return False
    head = lm.model.get_submodule(lm.layout.lm_head)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    lm.model.config.tie_word_embeddings = False
    text = getattr(lm.model.config, "get_text_config", lambda: None)()
    if text is not None:
        text.tie_word_embeddings = False
    return True


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _rotate_heads(lm, block) -> None:
    """Values rotated per head by a Hadamard matrix (or a random orthogonal one), undone in o's columns."""
    d = lm.layout.head_dim
    h = (hadamard_matrix(d).double() if d & (d - 1) == 0 else random_orthogonal(d, 1)).double()
    v, o = block.linear("v").module, block.linear("o").module
    w_v = v.weight.detach().double()
    _set(v.weight, (h.T @ w_v.reshape(-1, d, w_v.shape[1])).reshape(w_v.shape))
    if v.bias is not None:
        _set(v.bias, (v.bias.detach().double().reshape(-1, d) @ h).reshape(-1))
    w_o = o.weight.detach().double()
    _set(o.weight, (w_o.reshape(w_o.shape[0], -1, d) @ h).reshape(w_o.shape))


def _fold_and_rotate(lm, stage: RotateStage, fed: dict[str, str]) -> dict:
    layout, modules = lm.layout, dict(lm.model.named_modules())
    hidden = layout.hidden_size
    for block in layout.blocks:
        roles = {info.role for info in block.linears}
        if not {"q", "k", "v", "o", "down"} <= roles or not {"up"} <= roles or roles - {*READERS, *WRITERS}:
            raise RotationError(f"block {block.index} has linears {sorted(roles)}; the rotation needs separate "
                                "q, k, v, o, (gate,) up and down projections")  # fmt: skip
    untied = _untie(lm)
    readers_of: dict[str, list[str]] = {}
    for reader, norm in fed.items():
        readers_of.setdefault(norm, []).append(reader)
    for norm, readers in readers_of.items():
        module = modules[norm]
        offset = _norm_offset(module, hidden)
        scale = module.weight.detach().double() + offset
        for reader in readers:
            weight = lm.model.get_submodule(reader).weight
            _set(weight, weight.detach().double() * scale)
        _set(module.weight, torch.full_like(module.weight, 1.0 - offset))
    q = random_orthogonal(hidden, stage.seed)
    embed = lm.model.get_submodule(layout.token_embedding).weight
    _set(embed, embed.detach().double() @ q)
    for info in layout.linears():
        weight = info.module.weight
        if info.role in READERS:
            _set(weight, weight.detach().double() @ q)
        else:
            _set(weight, q.T @ weight.detach().double())
            if info.module.bias is not None:
                _set(info.module.bias, info.module.bias.detach().double() @ q)
    head = lm.model.get_submodule(layout.lm_head).weight
    _set(head, head.detach().double() @ q)
    if stage.heads:
        for block in layout.blocks:
            _rotate_heads(lm, block)
    return {"rotation": "random orthogonal (Hadamard ⊗ random, random signs)", "seed": stage.seed,
            "hidden_size": hidden, "heads": stage.heads, "folded_norms": len(readers_of),
            "untied_lm_head": untied}  # fmt: skip


def rotate(stage: RotateStage, lm) -> dict:
    """Fold the norms and rotate the residual stream (and the heads' values) of `lm` in place."""
    layout = lm.layout
    if getattr(lm, "lazy", None) is not None:
        raise RotationError("the rotation needs the whole model in memory; compress without --stream")
    if any(info.transposed for info in layout.linears()) or layout.position_embeddings:
        raise RotationError(f"cannot rotate {layout.model_class}: the rotation supports nn.Linear layers and rotary "
                            "positions only")  # fmt: skip
    ids = _probe(lm)
    with torch.no_grad():
        before = lm.model(input_ids=ids).logits.double()
    saved = {key: value.clone() for key, value in lm.model.state_dict(keep_vars=False).items()}
    tied = layout.tied_lm_head
    try:
        fed, _ = _norm_inputs(lm, ids)
        facts = _fold_and_rotate(lm, stage, fed)
        with torch.no_grad():
            after = lm.model(input_ids=ids).logits.double()
        change = float((after - before).norm() / before.norm().clamp_min(1e-30))
        if not change < TOLERANCE:
            raise RotationError(f"the rotated model's logits moved by {change:.2g} (relative), not a float rounding")
    except RotationError as exc:
        _restore(lm, saved, tied)
        raise RotationError(f"cannot rotate {layout.model_class}: {exc}") from None
    return {**facts, "logits_change": change}


def _restore(lm, saved: dict, tied: bool) -> None:
    if tied:
        embed = lm.model.get_submodule(lm.layout.token_embedding)
        lm.model.get_submodule(lm.layout.lm_head).weight = embed.weight
        lm.model.config.tie_word_embeddings = True
    lm.model.load_state_dict(saved)


register_stage("rotate", RotateStage, "model", rotate)
