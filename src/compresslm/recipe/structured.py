"""Structured pruning stages: `prune_width` (MLP channels, attention heads, hidden channels) and
`prune_depth` (whole blocks). Both rebuild the model smaller before calibration.

Each removes the same share in every block, so the result is an ordinary config of its family (a
smaller `intermediate_size`, `num_attention_heads`, `hidden_size` or `num_hidden_layers`) that plain
transformers loads; it is saved as a Hugging Face directory (`compresslm shrink`) or quantized in the
same recipe (`mlp50+w4-g64-gptq`). Importance comes from a few calibration windows of the stage's
own (`samples` × `length` from `source`): activation energies from one forward pass, or with
`score: taylor` the first-order loss change from one backward pass (`sparse.structure`). The pruned
tensors are sliced from the model's state dict and loaded into a fresh model of the new config with
strict key and shape checks, so a family whose modules do not follow their config is refused, and
the model left as it was. Removing nothing gives back the same function.

Healing (distillation from the unpruned model) is a training run: `compresslm train DIR --recipe heal
--teacher MODEL`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from dataclasses import dataclass

import torch
from torch import nn

from compresslm.data.calibration import calibration_windows
from compresslm.errors import UnsupportedArchitectureError, reason_of
from compresslm.progress import progress
from compresslm.recipe.fields import RecipeError, choice, stage_dict
from compresslm.recipe.registry import register_stage
from compresslm.sparse.structure import (
    block_influence,
    channel_energy,
    channels_of_heads,
    head_steps,
    kept_heads,
    kept_width,
    lowest,
    per_head,
    top,
    top_heads,
)

READERS = ("q", "k", "v", "gate", "up", "fc1")
WRITERS = ("o", "down", "fc2")
MLP_IN, MLP_OUT = ("gate", "up", "fc1"), ("down", "fc2")
MLP_CONFIG_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")
BATCH = 4


class StructureError(UnsupportedArchitectureError):
    """A model whose structure a structured-pruning stage cannot remove."""


@dataclass
class _Importance:
    """Where the stage's importance windows come from (shared by both stages)."""

    score: str = "activation"
    samples: int = 32
    length: int = 512
    source: str = "c4"
    seed: int = 0

    def _check_calibration(self, where: str, scores: tuple[str, ...]) -> None:
        choice(where, "score", self.score, scores)
        if self.samples < 1 or self.length < 2:
            raise RecipeError(f"{where}: samples and length must be positive (length at least 2)")


@dataclass
class PruneWidthStage(_Importance):
    mlp: float = 0.0  # share of MLP channels removed in every block
    heads: float = 0.0  # share of query heads removed in every block (the same number per key/value group)
    hidden: float = 0.0  # share of hidden (residual-stream) channels removed everywhere
    type: str = "prune_width"

    def validate(self, where: str) -> None:
        for name in ("mlp", "heads", "hidden"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise RecipeError(f"{where}: {name}={value} is not allowed; give the share removed, 0 to <1")
        if not (self.mlp or self.heads or self.hidden):
            raise RecipeError(f"{where}: mlp, heads and hidden are all 0; a width stage must remove something")
        self._check_calibration(where, ("activation", "taylor"))

    def check_model(self, lm) -> None:
        """Refuse a model this stage cannot shrink, before any stage of the recipe computes."""
        _check_width(lm, self)
        shapes = {name: torch.empty(tensor.shape, device="meta") for name, tensor in lm.model.state_dict().items()}
        config = copy.deepcopy(lm.model.config)
        _cut_width(lm, self, shapes, config, None)  # the first channels of each kind: the shapes, no compute
        _check_config(lm, config, shapes)

    def to_dict(self) -> dict:
        return stage_dict(self)


@dataclass
class PruneDepthStage(_Importance):
    layers: int = 1  # how many whole blocks are removed
    score: str = "cosine"
    type: str = "prune_depth"

    def validate(self, where: str) -> None:
        if self.layers < 1:
            raise RecipeError(f"{where}: layers={self.layers} is not allowed; give how many blocks to remove (>= 1)")
        self._check_calibration(where, ("cosine", "taylor"))

    def check_model(self, lm) -> None:
        """Refuse a model this stage cannot shrink, before any stage of the recipe computes."""
        n = len(lm.layout.blocks)
        _check_resident(lm)
        if self.layers >= n:
            raise StructureError(f"layers={self.layers}: the model has {n} blocks; at least one must remain")
        _check_config(lm, *_cut_depth(lm, list(range(self.layers)), meta=True))  # any blocks: the same shapes

    def to_dict(self) -> dict:
        return stage_dict(self)


# ---------------------------------------------------------------- what is where


def _text(config):
    """The config that holds the decoder's sizes (a multimodal config's text part)."""
    text = getattr(config, "get_text_config", lambda: None)()
    return text if text is not None else config


def _mlp_field(lm) -> str:
    config = _text(lm.model.config)
    for name in MLP_CONFIG_FIELDS:
        if getattr(config, name, None):
            return name
    raise StructureError(f"{type(config).__name__} names no MLP width ({', '.join(MLP_CONFIG_FIELDS)})")


def _linear(block, roles: tuple[str, ...]) -> list:
    return [info for info in block.linears if info.role in roles]


def _check_resident(lm) -> None:
    if getattr(lm, "lazy", None) is not None:
        raise StructureError("structured pruning needs the whole model in memory; compress without --stream")


def _check_width(lm, stage: PruneWidthStage) -> None:
    """Refuse what the stage cannot remove before any compute."""
    layout = lm.layout
    _check_resident(lm)
    if any(info.transposed for info in layout.linears()):
        raise StructureError(f"{layout.model_class}: width pruning supports nn.Linear layers (not Conv1D)")
    for block in layout.blocks:
        roles = {info.role for info in block.linears}
        if stage.mlp and not (len(_linear(block, MLP_OUT)) == 1 and _linear(block, MLP_IN)):
            raise StructureError(f"{layout.model_class}: block {block.index} has linears {sorted(roles)}; pruning "
                                 "MLP channels needs separate input (gate/up or fc1) and down projections")  # fmt: skip
        if (stage.heads or stage.hidden) and not {"q", "k", "v", "o"} <= roles:
            raise StructureError(f"{layout.model_class}: block {block.index} has linears {sorted(roles)}; pruning "
                                 "heads or hidden channels needs separate q, k, v and o projections")  # fmt: skip
    if stage.mlp:
        _mlp_field(lm)
        width = _linear(layout.blocks[0], MLP_OUT)[0].in_features
        if kept_width(width, stage.mlp) == width:
            raise StructureError(f"mlp={stage.mlp} removes none of {width} channels (kept widths are rounded to "
                                 "multiples of 32); give a larger share")  # fmt: skip
    if stage.hidden and kept_width(layout.hidden_size, stage.hidden) == layout.hidden_size:
        raise StructureError(
            f"hidden={stage.hidden} removes none of {layout.hidden_size} channels; give a larger share"
        )
    if stage.heads:
        if not layout.num_heads or not layout.head_dim:
            raise StructureError(f"{layout.model_class}: the number of heads and their size were not found")
        kv = layout.num_kv_heads or layout.num_heads
        if kv != layout.num_heads and kept_heads(layout.num_heads, kv, stage.heads) == layout.num_heads:
            raise StructureError(f"heads={stage.heads}: {layout.num_heads} heads in {kv} key/value groups leave "
                                 "no smaller valid count")  # fmt: skip


# ---------------------------------------------------------------- importance


@contextlib.contextmanager
def _hooks(hooks: list):
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _windows(lm, stage: _Importance) -> list[torch.Tensor]:
    windows = calibration_windows(lm.tokenizer, stage.source, stage.samples, stage.length, stage.seed).windows
    return [windows[i : i + BATCH] for i in range(0, len(windows), BATCH)]


def _each(batches: list[torch.Tensor], label: str):
    with progress(len(batches), label, unit="batch") as bar:
        for batch in batches:
            yield batch
            bar.update(1)


def _activation_stats(lm, stage: _Importance, depth: bool) -> dict[str, torch.Tensor | list[float]]:
    """Per-channel input energy of every o and down projection and every norm, or each block's influence."""
    layout, sums, hooks = lm.layout, {}, []
    influence = [[0.0, 0] for _ in layout.blocks]

    def add_sq(name: str, x: torch.Tensor) -> None:
        x = x.detach().double().flatten(0, -2)
        sums[name] = sums.get(name, 0) + x.pow(2).sum(0)

    def add_turn(index: int, inputs: torch.Tensor, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        total, count = block_influence(inputs, out)
        influence[index][0] += total
        influence[index][1] += count

    if depth:
        for block in layout.blocks:
            hooks.append(block.module.register_forward_hook(
                lambda m, a, kw, out, i=block.index: add_turn(i, a[0] if a else kw["hidden_states"], out),
                with_kwargs=True))  # fmt: skip
    else:
        for block in layout.blocks:
            for info in _linear(block, ("o", *MLP_OUT)):
                hooks.append(info.module.register_forward_pre_hook(lambda m, a, n=info.name: add_sq(n, a[0])))
        for name in _residual_norms(lm):
            module = lm.model.get_submodule(name)
            if getattr(module, "weight", None) is not None and module.weight.shape == (layout.hidden_size,):
                hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: add_sq(n, a[0])))
    batches = _windows(lm, stage)
    with _hooks(hooks), torch.no_grad():
        for batch in _each(batches, "importance"):
            lm.model(input_ids=batch.to(lm.device), use_cache=False)
    if depth:
        return {"influence": [total / max(count, 1) for total, count in influence]}
    return sums


def _taylor(lm, stage: _Importance) -> dict[str, torch.Tensor]:
    """w·∂L/∂w summed over the calibration windows, for every parameter (the language-modelling loss)."""
    model = lm.model
    was = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            for batch in _each(_windows(lm, stage), "importance (taylor)"):
                batch = batch.to(lm.device)
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        return {name: (p.detach() * p.grad).double() for name, p in model.named_parameters() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            p.requires_grad_(was[name])


def _taylor_axis(taylor: dict, params: list[tuple[str, int]], size: int) -> torch.Tensor:
    """Signed Σ w·g per channel of an axis shared by `params` (name, dim)."""
    total = torch.zeros(size, dtype=torch.float64)
    for name, dim in params:
        if name in taylor:
            t = taylor[name]
            total += t.sum(dim=[d for d in range(t.dim()) if d != dim]) if t.dim() > 1 else t
    return total


# ---------------------------------------------------------------- axes: which tensor dims share a channel


def _mlp_axis(block) -> list[tuple[str, int]]:
    params = []
    for info in _linear(block, MLP_IN):
        params += [(f"{info.name}.weight", 0)] + ([(f"{info.name}.bias", 0)] if info.has_bias else [])
    down = _linear(block, MLP_OUT)[0]
    return [*params, (f"{down.name}.weight", 1)]


def _head_axis(lm, block, with_kv: bool) -> list[tuple[str, int]]:
    """Rows of q (and, without grouped queries, of k and v), columns of o, and per-channel norms of the
    projected queries (and keys) such as OLMo 2's q_norm over all heads."""
    roles = ("q", "k", "v") if with_kv else ("q",)
    params = []
    for role in roles:
        info = block.linear(role)
        params += [(f"{info.name}.weight", 0)] + ([(f"{info.name}.bias", 0)] if info.has_bias else [])
    width = lm.layout.num_heads * lm.layout.head_dim
    attention = f"{block.name}.{block.attention}" if block.attention else block.name
    linears = {info.name for info in block.linears}
    for name, tensor in lm.model.get_submodule(attention).named_parameters():
        module, _, _ = f"{attention}.{name}".rpartition(".")
        leaf = module.rpartition(".")[2]
        per_channel = tensor.dim() == 1 and tensor.numel() == width
        if module not in linears and per_channel and leaf[:2] in [f"{r}_" for r in roles]:
            params.append((f"{attention}.{name}", 0))
    o = block.linear("o")
    return [*params, (f"{o.name}.weight", 1)]


def _residual_norms(lm) -> list[str]:
    """The norms that read the residual stream (not those inside attention, such as q_norm)."""
    layout, names = lm.layout, []
    for block in layout.blocks:
        inner = f"{block.name}.{block.attention}." if block.attention else None
        names += [n for n in block.norms if inner is None or not n.startswith(inner)]
    return names + ([layout.final_norm] if layout.final_norm else [])


def _hidden_axis(lm) -> list[tuple[str, int]]:
    layout, params = lm.layout, []
    params.append((f"{layout.token_embedding}.weight", 1))
    params += [(f"{name}.weight", 1) for name in layout.position_embeddings]
    params.append((f"{layout.lm_head}.weight", 1))  # a tied head is in the state dict too
    for name in _residual_norms(lm):
        module = lm.model.get_submodule(name)
        for part in ("weight", "bias"):
            tensor = getattr(module, part, None)
            if tensor is not None and tuple(tensor.shape) == (layout.hidden_size,):
                params.append((f"{name}.{part}", 0))
    for info in layout.linears():
        if info.role in READERS:
            params.append((f"{info.name}.weight", 1))
        elif info.role in WRITERS:
            params += [(f"{info.name}.weight", 0)] + ([(f"{info.name}.bias", 0)] if info.has_bias else [])
    return params


# ---------------------------------------------------------------- the rebuild


def _rebuild(lm, config, state: dict[str, torch.Tensor]) -> None:
    """A fresh model of `config` holding `state` (strict), in place of lm.model."""
    old = lm.model
    dtype, device = next(old.parameters()).dtype, next(old.parameters()).device
    try:
        with _no_init():
            new = type(old)(config)
        new.to(dtype)
        new.load_state_dict(state, strict=True)
        new.tie_weights()  # a fresh model built without initialisation has not tied its head yet
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [reason_of(exc)]
        raise StructureError(f"{type(old).__name__} does not follow its pruned config: {lines[0]}") from None
    if getattr(old, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(old.generation_config)
    lm.model = new.to(device).eval()


def _no_init():
    """Skip random initialisation of the fresh model (its weights are all overwritten)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):  # transformers 5, 4
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(module).no_init_weights()
    return contextlib.nullcontext()


def _slice(state: dict, params: list[tuple[str, int]], keep: torch.Tensor) -> None:
    for name, dim in params:
        if name in state:
            state[name] = state[name].index_select(dim, keep).contiguous()


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prune_width(stage: PruneWidthStage, lm) -> dict:
    """Remove the stage's share of MLP channels, heads and hidden channels from every block of `lm`."""
    stage.check_model(lm)
    before = _parameters(lm.model)
    scores = _taylor(lm, stage) if stage.score == "taylor" else _activation_stats(lm, stage, depth=False)
    state = {name: tensor.detach().clone() for name, tensor in lm.model.state_dict().items()}
    config = copy.deepcopy(lm.model.config)
    facts = {"score": stage.score, "calibration": f"{stage.samples} x {stage.length} tokens of {stage.source}",
             **_cut_width(lm, stage, state, config, scores)}  # fmt: skip
    _rebuild(lm, config, state)
    facts["parameters"] = {"from": before, "to": _parameters(lm.model)}
    return facts


def _cut_width(lm, stage: PruneWidthStage, state: dict, config, scores: dict | None) -> dict:
    """Slice `state` and shrink `config` as the stage says; the channels kept are the best by `scores`,
    or (scores None) the first ones, which gives the shapes without any compute."""
    layout = lm.layout
    text = _text(config)
    taylor = stage.score == "taylor"
    facts = {}
    if stage.mlp:
        width = _linear(layout.blocks[0], MLP_OUT)[0].in_features
        keep = kept_width(width, stage.mlp)
        for block in layout.blocks:
            down, axis = _linear(block, MLP_OUT)[0], _mlp_axis(block)
            if scores is None:
                chosen = torch.arange(keep)
            elif taylor:
                chosen = top(_taylor_axis(scores, axis, width).abs(), keep)
            else:
                chosen = top(channel_energy(scores[down.name], down.module.weight), keep)
            _slice(state, axis, chosen)
        setattr(text, _mlp_field(lm), keep)
        facts["mlp"] = {"from": width, "to": keep}
    if stage.heads:
        heads, d = layout.num_heads, layout.head_dim
        grouped = bool(layout.num_kv_heads) and layout.num_kv_heads != heads  # else keys and values go too
        groups = layout.num_kv_heads if grouped else heads
        keep = kept_heads(heads, groups, stage.heads) if grouped else min(heads - 1, kept_width(heads, stage.heads, 1))
        for block in layout.blocks:
            o, axis = block.linear("o"), _head_axis(lm, block, not grouped)
            if scores is None:
                chosen = torch.arange(keep)
            else:
                if taylor:
                    score = per_head(_taylor_axis(scores, axis, heads * d), d).abs()
                else:
                    score = per_head(channel_energy(scores[o.name], o.module.weight), d)
                chosen = top_heads(score, groups, keep) if grouped else top(score, keep)
            _slice(state, axis, channels_of_heads(chosen, d))
        text.num_attention_heads, text.head_dim = keep, d
        if not grouped and getattr(text, "num_key_value_heads", None):
            text.num_key_value_heads = keep
        valid = head_steps(heads, groups) if grouped else list(range(1, heads + 1))
        facts["heads"] = {"from": heads, "to": keep, "kv_heads": groups if grouped else keep, "valid_counts": valid}
    if stage.hidden:
        width = layout.hidden_size
        keep = kept_width(width, stage.hidden)
        axis = _hidden_axis(lm)
        if scores is None:
            chosen = torch.arange(keep)
        elif taylor:
            chosen = top(_taylor_axis(scores, axis, width).abs(), keep)
        else:
            writers = _writer_names(lm)
            chosen = top(sum(v for name, v in scores.items() if v.numel() == width and name not in writers), keep)
        _slice(state, axis, chosen)
        if layout.head_dim:
            text.head_dim = layout.head_dim
        if getattr(text, "word_embed_proj_dim", None) == width:  # OPT: no projection around the blocks
            text.word_embed_proj_dim = keep
        text.hidden_size = keep
        facts["hidden"] = {"from": width, "to": keep}
    return facts


def _check_config(lm, config, shapes: dict[str, torch.Tensor]) -> None:
    """Refuse, before any compute, a family whose modules do not follow the smaller config: a model of
    `config` built on the meta device must have exactly the tensors `shapes` holds."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in type(lm.model)(copy.deepcopy(config)).state_dict().items()}
    for name in sorted(set(expected) | set(shapes)):
        want, have = expected.get(name), tuple(shapes[name].shape) if name in shapes else None
        if want != have:
            raise StructureError(f"{type(lm.model).__name__} does not follow its pruned config: {name} would be "
                                 f"{have} but the config builds {want}")  # fmt: skip


def _writer_names(lm) -> set[str]:
    return {info.name for info in lm.layout.linears() if info.role in ("o", *MLP_OUT)}


def prune_depth(stage: PruneDepthStage, lm) -> dict:
    """Remove the stage's number of least important blocks from `lm`."""
    stage.check_model(lm)
    layout, n = lm.layout, len(lm.layout.blocks)
    before = _parameters(lm.model)
    if stage.score == "taylor":
        taylor = _taylor(lm, stage)
        scores = [abs(sum(float(t.sum()) for name, t in taylor.items() if name.startswith(f"{b.name}.")))
                  for b in layout.blocks]  # fmt: skip
    else:
        scores = _activation_stats(lm, stage, depth=True)["influence"]
    dropped = lowest(scores, stage.layers)
    config, state = _cut_depth(lm, dropped)
    _rebuild(lm, config, state)
    return {"score": stage.score, "scores": [round(s, 6) for s in scores], "removed_blocks": dropped,
            "layers": {"from": n, "to": n - len(dropped)},
            "parameters": {"from": before, "to": _parameters(lm.model)}}  # fmt: skip


def _cut_depth(lm, dropped: list[int], meta: bool = False) -> tuple[object, dict]:
    """The config and state dict without the `dropped` blocks (later blocks renumbered); with `meta`,
    the tensors are shapes only."""
    layout = lm.layout
    n = len(layout.blocks)
    kept = [b.index for b in layout.blocks if b.index not in dropped]
    renumber = {old: new for new, old in enumerate(kept)}
    prefix, state = f"{layout.blocks_path}.", {}
    for name, tensor in lm.model.state_dict().items():
        value = torch.empty(tensor.shape, device="meta") if meta else tensor.detach().clone()
        if not name.startswith(prefix):
            state[name] = value
            continue
        index, rest = name[len(prefix) :].split(".", 1)
        if int(index) in renumber:
            state[f"{prefix}{renumber[int(index)]}.{rest}"] = value
    config = copy.deepcopy(lm.model.config)
    text = _text(config)
    text.num_hidden_layers = len(kept)
    if isinstance(getattr(text, "layer_types", None), list) and len(text.layer_types) == n:
        text.layer_types = [text.layer_types[i] for i in kept]
    return config, state


register_stage("prune_width", PruneWidthStage, "model", prune_width)
register_stage("prune_depth", PruneDepthStage, "model", prune_depth)
