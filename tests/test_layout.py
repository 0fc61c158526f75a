"""Layout discovery on real transformers classes, with no architecture table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compresslm.errors import UnsupportedArchitectureError
from compresslm.models.layout import discover_layout, parameter_counts
from compresslm.models.tiny import tiny_model

EXPECTED_ROLES = {
    "llama": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen2": {"q", "k", "v", "o", "gate", "up", "down"},
    "mistral": {"q", "k", "v", "o", "gate", "up", "down"},
    "gpt2": {"qkv", "o", "fc1", "fc2"},
    "opt": {"q", "k", "v", "o", "fc1", "fc2"},
}


def test_every_family_maps(family):
    model = tiny_model(family)
    layout = discover_layout(model)
    assert len(layout.blocks) == 2
    for block in layout.blocks:
        assert {i.role for i in block.linears} == EXPECTED_ROLES[family]
        assert len(block.norms) == 2
        for info in block.linears:
            assert info.group == ("attention" if info.role in {"q", "k", "v", "o", "qkv"} else "mlp")
            weight = info.module.weight
            expected = (
                (info.in_features, info.out_features) if info.transposed else (info.out_features, info.in_features)
            )
            assert tuple(weight.shape) == expected
    assert layout.final_norm is not None
    assert layout.hidden_size == 64
    assert layout.vocab_size == 259
    assert layout.tied_lm_head == (family != "qwen2")
    assert bool(layout.position_embeddings) == (family in {"gpt2", "opt"})
    assert layout.blocks[0].linear(next(iter(EXPECTED_ROLES[family]))) is not None


def test_gpt2_conv1d_is_transposed():
    layout = discover_layout(tiny_model("gpt2"))
    qkv = layout.blocks[0].linear("qkv")
    assert qkv.transposed and qkv.in_features == 64 and qkv.out_features == 192


def test_parameter_counts_add_up(family):
    model = tiny_model(family)
    counts = parameter_counts(model, discover_layout(model))
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert "other" not in counts
    assert ("lm_head" in counts) == (family == "qwen2")


def test_missing_role_lookup_names_the_roles():
    layout = discover_layout(tiny_model("gpt2"))
    with pytest.raises(KeyError, match="roles: qkv"):
        layout.blocks[0].linear("gate")


class _Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.first = nn.Linear(d, 3 * d)
        self.second = nn.Linear(d, d)


class _Block(nn.Module):
    def __init__(self, d: int, with_attention: bool = True):
        super().__init__()
        self.norm_a = nn.LayerNorm(d)
        if with_attention:
            self.mixer_attn = _Attention(d)
        self.grow = nn.Linear(d, 4 * d)
        self.shrink = nn.Linear(4 * d, d)


class _ToyLM(nn.Module):
    """A made-up family: unknown linear names, so roles must come from structure."""

    def __init__(self, with_attention: bool = True, with_head: bool = True, d: int = 8):
        super().__init__()
        self.embed = nn.Embedding(11, d)
        self.stack = nn.ModuleList([_Block(d, with_attention) for _ in range(3)])
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 11, bias=False) if with_head else None

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_unknown_names_get_structural_roles():
    layout = discover_layout(_ToyLM())
    roles = {i.local_name: i.role for i in layout.blocks[0].linears}
    assert roles == {
        "mixer_attn.first": "attn_in",
        "mixer_attn.second": "attn_out",
        "grow": "mlp_in",
        "shrink": "mlp_out",
    }
    assert layout.blocks_path == "stack"
    assert layout.final_norm == "final_norm"
    assert not layout.tied_lm_head


def test_no_blocks_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))
    with pytest.raises(UnsupportedArchitectureError, match="no decoder blocks found"):
        discover_layout(model)


def test_block_without_attention_is_a_clear_error():
    with pytest.raises(UnsupportedArchitectureError, match="no attention submodule"):
        discover_layout(_ToyLM(with_attention=False))


def test_model_without_head_is_a_clear_error():
    with pytest.raises(UnsupportedArchitectureError, match="no lm_head"):
        discover_layout(_ToyLM(with_head=False))


def test_tied_detection_follows_storage():
    model = _ToyLM()
    model.head.weight = model.embed.weight
    assert discover_layout(model).tied_lm_head
    model.head.weight = nn.Parameter(torch.zeros(11, 8))
    assert not discover_layout(model).tied_lm_head
