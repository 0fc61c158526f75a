"""Tiny randomly initialised models and a byte-level tokenizer, built in code with no network.

Tests (ours and users') need real transformers architectures that run in milliseconds. Each family
here is the genuine transformers class with a small config, so layout discovery, compression and
evaluation exercise the same code paths as on a full-size model.
"""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt")
# Every family the conformance matrix checks (tests/test_conformance.py); FAMILIES is the quick subset
# that the rest of the suite runs each test on.
CONFORMANCE_FAMILIES = (*FAMILIES, "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo2", "gpt_neox", "falcon",
                        "stablelm")  # fmt: skip
_SPECIALS = ("<unk>", "<s>", "</s>")


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus <unk>, <s>, </s>.

    Every text round-trips exactly; the vocabulary (259) is small enough for tiny models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for char in sorted(alphabet):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_config(family: str, vocab_size: int = 259, layers: int = 2):
    """A small config of the real transformers class for `family` (see FAMILIES)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    llama_like = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        **common,
    }
    if family == "llama":
        return LlamaConfig(**llama_like)
    if family == "qwen2":
        return Qwen2Config(**{**llama_like, "tie_word_embeddings": False})
    if family == "mistral":
        return MistralConfig(**{**llama_like, "sliding_window": None})
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=512, **common)
    if family in _LLAMA_LIKE:
        import transformers

        name, extra = _LLAMA_LIKE[family]
        return getattr(transformers, name)(**{**llama_like, "head_dim": 16, **extra})
    if family == "gpt_neox":
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             max_position_embeddings=512, rotary_pct=0.5, **common)  # fmt: skip
    if family == "falcon":
        from transformers import FalconConfig

        return FalconConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, **common)
    if family == "opt":
        return OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
            **common,
        )
    raise ValueError(f"unknown tiny family '{family}'; choose one of {', '.join(CONFORMANCE_FAMILIES)}")


# Families whose config takes the Llama-like fields: transformers config class, extra fields.
_LLAMA_LIKE = {
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": False}),
    "gemma": ("GemmaConfig", {}),
    "gemma2": ("Gemma2Config", {"query_pre_attn_scalar": 16, "sliding_window": 64}),
    "gemma3": ("Gemma3TextConfig", {"query_pre_attn_scalar": 16, "sliding_window": 64}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", {}),
    "stablelm": ("StableLmConfig", {}),
}


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2):
    """A randomly initialised causal LM of `family`, in eval mode, float32, deterministic by seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()
