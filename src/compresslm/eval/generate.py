"""Generation: a reply streamed as it is decoded, in PyTorch or llama.cpp, with its speed and memory.

Greedy decoding (the same reply every run, so two models or runtimes can be compared by reading).
The text goes to a callback piece by piece: each step decodes every generated token again and hands
on only what is new, so a character split over several tokens appears once complete. Time to the
first token (the prefill) and decode tokens/s are measured around the model's work; peak memory is
the process's peak resident set. `chat` wraps the prompt in the model's chat template.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compresslm.errors import CompressLMError
from compresslm.models.loaded import LoadedModel


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    first_token_seconds: float
    decode_tokens_per_second: float | None  # tokens after the first, per second (None for one token)
    peak_rss_bytes: int
    backend: str
    stopped: str  # "eos" or "max_new_tokens"

    def to_dict(self) -> dict:
        return asdict(self)


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _check(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise CompressLMError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


def chat_text(tokenizer: object, prompt: str) -> str:
    """The prompt as one user turn of the tokenizer's chat template, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise CompressLMError("this model's tokenizer has no chat template; drop --chat")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip


@torch.inference_mode()
def generate_torch(lm: LoadedModel, prompt: str, *, chat: bool = False, max_new_tokens: int = 128,
                   on_text: Callable[[str], None] = lambda _: None) -> Generation:  # fmt: skip
    """Greedy decoding with the model's KV cache; `on_text` receives the reply as it grows."""
    _check(max_new_tokens)
    tokenizer = lm.tokenizer
    if tokenizer is None:
        raise CompressLMError(f"{lm.source} has no tokenizer to read a prompt with")
    text = chat_text(tokenizer, prompt) if chat else prompt
    ids = tokenizer(text, add_special_tokens=not chat, return_tensors="pt").input_ids.to(lm.device)
    if ids.numel() == 0:
        raise CompressLMError("the prompt is empty")
    eos = set(_as_list(getattr(lm.model.generation_config, "eos_token_id", None)) or [tokenizer.eos_token_id])
    started = time.perf_counter()
    out = lm.model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    first = time.perf_counter() - started
    generated: list[int] = []
    shown = ""
    stopped = "max_new_tokens"
    decode_started = time.perf_counter()
    while True:
        if int(token) in eos:
            stopped = "eos"
            break
        generated.append(int(token))
        reply = tokenizer.decode(generated, skip_special_tokens=True)
        if len(reply) > len(shown) and not reply.endswith("\ufffd"):
            on_text(reply[len(shown) :])
            shown = reply
        if len(generated) == max_new_tokens:
            break
        out = lm.model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    decode = time.perf_counter() - decode_started
    reply = tokenizer.decode(generated, skip_special_tokens=True)
    if reply[len(shown) :]:
        on_text(reply[len(shown) :])
    steps = max(len(generated) - 1, 0)
    return Generation(reply, ids.shape[1], len(generated), first, steps / decode if steps and decode > 0 else None,
                      _peak_rss(), "torch", stopped)  # fmt: skip


def generate_llamacpp(path: str | Path, prompt: str, *, chat: bool = False, max_new_tokens: int = 128,
                      threads: int | None = None,
                      on_text: Callable[[str], None] = lambda _: None) -> Generation:  # fmt: skip
    """Greedy decoding of a GGUF file in llama.cpp (its own tokenizer and chat template)."""
    from compresslm.eval.llamacpp import LlamaCppModel

    _check(max_new_tokens)
    model = LlamaCppModel(path, ctx=max(2048, max_new_tokens + 1024), threads=threads, all_logits=False)
    llm = model.llm
    if chat:
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise CompressLMError(f"{path} carries no chat template; drop --chat")
        messages = [{"role": "user", "content": prompt}]
        stream = llm.create_chat_completion(messages, max_tokens=max_new_tokens, temperature=0.0, stream=True)
        # the first chunk names the role and the last says why it stopped: neither is a token
        pieces = (c["choices"][0]["delta"]["content"] for c in stream if "content" in c["choices"][0]["delta"])
    else:
        stream = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, stream=True)
        pieces = (chunk["choices"][0]["text"] for chunk in stream)
    started = time.perf_counter()
    first = None
    reply = ""
    tokens = 0
    try:
        for piece in pieces:
            if first is None:
                first = time.perf_counter() - started
                decode_started = time.perf_counter()
            tokens += 1
            if piece:
                reply += piece
                on_text(piece)
    except ValueError as exc:  # llama-cpp-python's refusal of a prompt longer than the context
        raise CompressLMError(f"llama.cpp: {str(exc).splitlines()[0]}") from None
    if first is None:
        raise CompressLMError("llama.cpp produced no tokens")
    decode = time.perf_counter() - decode_started
    prompt_tokens = llm.n_tokens - tokens
    steps = tokens - 1
    stopped = "max_new_tokens" if tokens >= max_new_tokens else "eos"
    return Generation(reply, prompt_tokens, tokens, first, steps / decode if steps and decode > 0 else None,
                      _peak_rss(), "llama.cpp", stopped)  # fmt: skip


def _as_list(value: object) -> list[int] | None:
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]
