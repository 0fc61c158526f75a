"""Discover a causal LM's structure from its module tree.

Compression walks decoder blocks and the linear layers inside them; evaluation needs the embedding
and the head; later stages fold scales into norms. None of that should depend on a table of
architectures. We find:

* the decoder blocks: the longest `nn.ModuleList` of identical modules that contain linear layers;
* in each block, the attention submodule (a child whose name says attention) and every linear
  layer (`nn.Linear`, or the transposed `Conv1D` of GPT-2), split into an attention and an MLP group;
* each linear's role: a canonical name (q, k, v, o, qkv, gate, up, down, fc1, fc2, ...) from the
  naming conventions shared across families, or a structural role (attn_in, attn_out, mlp_in,
  mlp_out) from its shape and position when the name is new to us;
* norms, token and position embeddings, the final norm, the lm_head and whether it is tied.

A model we cannot map raises :class:`UnsupportedArchitectureError` that names what was missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from compresslm.errors import UnsupportedArchitectureError

# Names that mean the same thing across families (last component of the module path).
_ATTENTION_ROLES = {
    "q_proj": "q", "query": "q", "wq": "q", "q": "q",
    "k_proj": "k", "key": "k", "wk": "k", "k": "k",
    "v_proj": "v", "value": "v", "wv": "v", "v": "v",
    "o_proj": "o", "out_proj": "o", "wo": "o", "dense": "o", "c_proj": "o", "o": "o",
    "c_attn": "qkv", "qkv_proj": "qkv", "query_key_value": "qkv", "wqkv": "qkv", "w_pack": "qkv",
}  # fmt: skip
_MLP_ROLES = {
    "gate_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up",
    "down_proj": "down", "w2": "down", "c_proj": "fc2",
    "fc1": "fc1", "c_fc": "fc1", "fc_in": "fc1", "dense_h_to_4h": "fc1",
    "fc2": "fc2", "fc_out": "fc2", "dense_4h_to_h": "fc2",
    "gate_up_proj": "gate_up",
}  # fmt: skip
_ATTENTION_HINTS = ("attn", "attention")


def is_linear(module: nn.Module) -> bool:
    """True for layers computing x @ W (+ b): `nn.Linear`, transformers' transposed `Conv1D`, and our
    `CompressedLinear` (matched by name to keep this module free of runtime imports)."""
    if isinstance(module, nn.Linear) or type(module).__name__ == "CompressedLinear":
        return True
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def is_norm(module: nn.Module) -> bool:
    """True for LayerNorm / RMSNorm style modules (any class whose name ends in 'Norm')."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.lower().endswith("norm")


@dataclass
class LinearInfo:
    """One linear layer inside a decoder block."""

    name: str  # full module path, e.g. "model.layers.0.self_attn.q_proj"
    local_name: str  # path inside its block, e.g. "self_attn.q_proj"
    role: str  # canonical (q, k, v, o, qkv, gate, up, down, fc1, fc2) or structural (attn_in, ...)
    group: str  # "attention" or "mlp"
    in_features: int
    out_features: int
    transposed: bool  # weight stored as [in, out] (GPT-2 Conv1D) instead of [out, in]
    has_bias: bool
    module: nn.Module = field(repr=False, compare=False)


@dataclass
class BlockInfo:
    """One decoder block: its linears by role, its attention submodule and its norms."""

    index: int
    name: str
    attention: str  # path of the attention submodule, relative to the block
    linears: list[LinearInfo]
    norms: list[str]  # full paths, in registration order
    module: nn.Module = field(repr=False, compare=False)

    def linear(self, role: str) -> LinearInfo:
        for info in self.linears:
            if info.role == role:
                return info
        roles = ", ".join(i.role for i in self.linears)
        raise KeyError(f"block {self.index} has no linear with role '{role}' (roles: {roles})")


@dataclass
class ModelLayout:
    """The discovered structure of a causal LM; every walker in compresslm reads this."""

    model_type: str
    model_class: str
    blocks_path: str
    blocks: list[BlockInfo]
    token_embedding: str
    position_embeddings: list[str]
    final_norm: str | None
    lm_head: str
    tied_lm_head: bool
    hidden_size: int
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    vocab_size: int

    def linears(self) -> Iterator[LinearInfo]:
        """All linear layers of all blocks, in order."""
        for block in self.blocks:
            yield from block.linears

    def summary(self) -> dict:
        """A JSON-friendly description (no modules)."""
        first = self.blocks[0]
        return {
            "model_type": self.model_type,
            "model_class": self.model_class,
            "blocks_path": self.blocks_path,
            "num_blocks": len(self.blocks),
            "block_linears": {i.local_name: i.role for i in first.linears},
            "block_norms": [n.removeprefix(first.name + ".") for n in first.norms],
            "attention": first.attention,
            "token_embedding": self.token_embedding,
            "position_embeddings": self.position_embeddings,
            "final_norm": self.final_norm,
            "lm_head": self.lm_head,
            "tied_lm_head": self.tied_lm_head,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
        }


def _contains_linear(module: nn.Module) -> bool:
    return any(is_linear(m) for m in module.modules())


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    candidates: list[tuple[int, int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not _contains_linear(module[0]):
            continue
        params = sum(p.numel() for p in module.parameters())
        candidates.append((len(module), params, name, module))
    if not candidates:
        raise UnsupportedArchitectureError(
            f"cannot map {type(model).__name__}: no decoder blocks found "
            "(expected an nn.ModuleList of identical layers that contain linear layers)"
        )
    _, _, name, blocks = max(candidates, key=lambda c: (c[1], c[0]))
    return name, blocks


def _attention_child(block: nn.Module, block_name: str) -> str:
    for name, module in block.named_modules():
        if not name:
            continue
        last = name.rsplit(".", 1)[-1].lower()
        if any(h in last for h in _ATTENTION_HINTS) and _contains_linear(module) and not is_linear(module):
            return name
    raise UnsupportedArchitectureError(
        f"cannot map block '{block_name}' ({type(block).__name__}): no attention submodule found "
        "(expected a child whose name contains 'attn' or 'attention' holding linear layers)"
    )


def _weight_shape(module: nn.Module) -> tuple[int, int, bool]:
    """Return (in_features, out_features, transposed) for a linear-like module."""
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1], True  # Conv1D stores [in, out]
    return module.in_features, module.out_features, False  # a packed CompressedLinear has no weight tensor


def _assign_roles(infos: list[LinearInfo], hidden: int) -> None:
    """Fill `role` from names, falling back to structure (shape and order) for unknown names."""
    for group, table, prefix in (("attention", _ATTENTION_ROLES, "attn"), ("mlp", _MLP_ROLES, "mlp")):
        members = [i for i in infos if i.group == group]
        named = {i.local_name: table.get(i.local_name.rsplit(".", 1)[-1].lower()) for i in members}
        roles = [r for r in named.values() if r]
        if all(named.values()) and len(set(roles)) == len(roles):
            for info in members:
                info.role = named[info.local_name]
            continue
        # Structural fallback: the last linear that writes the hidden size is the output projection.
        outputs = [i for i in members if i.out_features == hidden]
        out = outputs[-1] if outputs else None
        for info in members:
            info.role = f"{prefix}_out" if info is out else f"{prefix}_in"


def _config_int(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def discover_layout(model: nn.Module) -> ModelLayout:
    """Map a causal LM's module tree to a :class:`ModelLayout`, or raise naming what is missing."""
    names = {id(m): n for n, m in model.named_modules()}
    blocks_path, blocks = _find_blocks(model)

    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embed = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if embed is None or id(embed) not in names:
        raise UnsupportedArchitectureError(
            f"cannot map {type(model).__name__}: no token embedding found (get_input_embeddings())"
        )
    if head is None or id(head) not in names:
        raise UnsupportedArchitectureError(
            f"cannot map {type(model).__name__}: no lm_head found (get_output_embeddings()); "
            "is this a causal language model?"
        )

    config = getattr(model, "config", None)
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model") or embed.weight.shape[1]
    num_heads = _config_int(config, "num_attention_heads", "n_head")
    num_kv = _config_int(config, "num_key_value_heads") or num_heads
    head_dim = _config_int(config, "head_dim") or (hidden // num_heads if num_heads else None)

    block_infos: list[BlockInfo] = []
    for index, block in enumerate(blocks):
        block_name = f"{blocks_path}.{index}"
        attention = _attention_child(block, block_name)
        linears: list[LinearInfo] = []
        norms: list[str] = []
        for local, module in block.named_modules():
            if is_norm(module):
                norms.append(f"{block_name}.{local}")
            if not is_linear(module):
                continue
            in_f, out_f, transposed = _weight_shape(module)
            group = "attention" if local.startswith(attention + ".") else "mlp"
            linears.append(
                LinearInfo(
                    name=f"{block_name}.{local}",
                    local_name=local,
                    role="",
                    group=group,
                    in_features=in_f,
                    out_features=out_f,
                    transposed=transposed,
                    has_bias=getattr(module, "bias", None) is not None,
                    module=module,
                )
            )
        if not any(i.group == "mlp" for i in linears):
            raise UnsupportedArchitectureError(
                f"cannot map block '{block_name}' ({type(block).__name__}): no MLP linear layers found "
                "outside the attention submodule"
            )
        _assign_roles(linears, hidden)
        block_infos.append(BlockInfo(index, block_name, attention, linears, norms, block))

    in_blocks = {id(m) for b in blocks for m in b.modules()}
    outside = [(n, m) for n, m in model.named_modules() if id(m) not in in_blocks]
    final_norms = [n for n, m in outside if is_norm(m)]
    positions = [n for n, m in outside if isinstance(m, nn.Embedding) and m is not embed]
    tied = _same_storage(embed.weight, head.weight)

    return ModelLayout(
        model_type=str(getattr(config, "model_type", type(model).__name__)),
        model_class=type(model).__name__,
        blocks_path=blocks_path,
        blocks=block_infos,
        token_embedding=names[id(embed)],
        position_embeddings=positions,
        final_norm=final_norms[-1] if final_norms else None,
        lm_head=names[id(head)],
        tied_lm_head=tied,
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        vocab_size=embed.weight.shape[0],
    )


def _same_storage(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """One tensor under two names (meta tensors, which have no storage, only by identity)."""
    if a is b:
        return True
    if a is None or b is None:  # a packed compressed head holds no weight tensor
        return False
    return not (a.is_meta or b.is_meta) and a.shape == b.shape and a.data_ptr() == b.data_ptr()


def count_parameters(model: nn.Module) -> int:
    """Every parameter once, compressed linears included (their weight lives in a record, not a parameter)."""
    compressed = sum(m.out_features * m.in_features for m in model.modules() if hasattr(m, "compressed"))
    return sum(p.numel() for p in model.parameters()) + compressed


def embedding_share(model: nn.Module, layout: ModelLayout) -> float:
    """The share of the model's parameters held by the token embedding and an untied lm_head."""
    counts = parameter_counts(model, layout)
    return (counts.get("embedding", 0) + counts.get("lm_head", 0)) / max(count_parameters(model), 1)


def parameter_counts(model: nn.Module, layout: ModelLayout) -> dict[str, int]:
    """Count parameters by role, counting a tied lm_head once (under the embedding)."""
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for info in layout.linears():
        key = f"linear.{info.role}"
        for p in info.module.parameters(recurse=False):
            seen.add(id(p))
            counts[key] = counts.get(key, 0) + p.numel()
        if hasattr(info.module, "compressed"):  # a compressed linear's weight is a record, not a parameter
            counts[key] = counts.get(key, 0) + info.module.out_features * info.module.in_features
    modules = dict(model.named_modules())
    embed = modules[layout.token_embedding]
    head = modules[layout.lm_head]
    for key, module in (("embedding", embed), ("lm_head", head)):
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                counts[key] = counts.get(key, 0) + p.numel()
        if hasattr(module, "compressed") and id(module) not in seen:  # a compressed head: its weight is a record
            seen.add(id(module))
            counts[key] = counts.get(key, 0) + module.out_features * module.in_features
    for name in layout.position_embeddings:
        for p in modules[name].parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                counts["position_embedding"] = counts.get("position_embedding", 0) + p.numel()
    for module in model.modules():
        if is_norm(module):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    counts["norm"] = counts.get("norm", 0) + p.numel()
    other = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    if other:
        counts["other"] = other
    counts["total"] = sum(v for k, v in counts.items())
    return counts
