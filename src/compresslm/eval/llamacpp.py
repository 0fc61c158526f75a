"""llama.cpp as an evaluation runtime: any GGUF file scored on the PyTorch path's windows and protocol.

The text is tokenized by the Hugging Face tokenizer of the GGUF (transformers reads it from the
file), or by a tokenizer given explicitly (`tokenizer_from`, e.g. the container it was exported
from), so the token ids, windows and scored positions are exactly those of `eval.perplexity`; only
the forward pass is llama.cpp's (llama-cpp-python). Its logits come back in float32 and go through
the same NLL code. llama.cpp's own messages are captured, so a file it refuses ends in one line
with its reason.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np
import torch

from compresslm.errors import CompressLMError
from compresslm.eval.distance import DistanceResult, ReferenceLogits, check_corpus, measure_distance
from compresslm.eval.perplexity import PerplexityResult, accumulate_nll, perplexity_result, token_windows

INSTALL = (
    "the llama.cpp backend needs llama-cpp-python: pip install 'compresslm[llama-cpp]' "
    "(it compiles llama.cpp, about 6-7 minutes on two cores)"
)


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise CompressLMError(INSTALL) from None
    return llama_cpp


class _CapturedLog:
    """llama.cpp's log lines while loading (kept for the error message), instead of its stderr."""

    def __init__(self, llama_cpp) -> None:
        self.lines: list[str] = []
        self._lib = llama_cpp

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                self.lines.append(text.decode("utf-8", "replace").strip())

        self._callback = callback  # held: ctypes calls it for as long as llama.cpp may log

    def __enter__(self) -> _CapturedLog:
        self._lib.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        pass  # left installed: llama.cpp logs later too, and the callback stays referenced by the model

    def reason(self) -> str:
        """The first error llama.cpp logged (the most specific; later ones say that loading failed)."""
        errors = [line for line in self.lines if line]
        return errors[0] if errors else "no reason given"


KV_TYPES = {"f16": 1, "f32": 0}  # ggml type ids; quantized caches need llama.cpp's flash attention, not offered


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp with a context of `ctx` tokens; for scoring (`all_logits`), every
    position's logits are kept. `kv_type`: the KV cache's type, llama.cpp's default float16 or float32 as
    the PyTorch path keeps it (so that a comparison of the two runtimes differs only in the weights'
    matrix products)."""

    def __init__(
        self, path: str | Path, ctx: int, threads: int | None = None, all_logits: bool = True, kv_type: str = "f16"
    ) -> None:
        llama_cpp = require_llama_cpp()
        if kv_type not in KV_TYPES:
            raise CompressLMError(f"unknown llama.cpp KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise CompressLMError(f"{path}: no such GGUF file")
        self.threads = threads or torch.get_num_threads()
        self.kv_type = kv_type
        self.log = _CapturedLog(llama_cpp)
        with self.log:
            try:
                self.llm = llama_cpp.Llama(
                    model_path=str(self.path), n_ctx=ctx, n_batch=min(ctx, 512), logits_all=all_logits,
                    n_threads=self.threads, n_threads_batch=self.threads, verbose=False,
                    type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type],
                )  # fmt: skip
            except (ValueError, RuntimeError):
                raise CompressLMError(f"llama.cpp refused {path}: {self.log.reason()}") from None
        self.vocab = self.llm.n_vocab()
        arch = self.llm.metadata.get("general.architecture")
        self.max_positions = int(self.llm.metadata.get(f"{arch}.context_length", 0)) or None

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """[len(tokens), vocab] float32 logits of one sequence, from a fresh context."""
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[: len(tokens)], dtype=np.float32))

    def token_windows(self, tokenizer: object, corpus: str, split: str, ctx: int, stride: int, limit: int | None):
        """`eval.perplexity.token_windows` for this model, refusing ids beyond its vocabulary."""
        text, ids, plan, available = token_windows(tokenizer, self.max_positions, corpus, split, ctx, stride, limit)
        if int(ids.max()) >= self.vocab:
            top = int(ids.max())
            raise CompressLMError(f"the tokenizer makes ids up to {top}; {self.path} has {self.vocab} tokens")
        return text, ids, plan, available

    def scored_windows(self, ids: torch.Tensor, plan: list[tuple[int, int]], ctx: int):
        """`eval.perplexity.scored_windows` through llama.cpp: (index, logits [scored, vocab], targets)."""
        for index, (start, first_scored) in enumerate(plan):
            window = ids[start : start + ctx]
            logits = self.logits(window.tolist())
            yield index, logits[first_scored - 1 : ctx - 1], window[first_scored:ctx]

    def describe(self) -> dict:
        import llama_cpp

        return {
            "source": str(self.path),
            "kind": "gguf",
            "bytes_on_disk": self.path.stat().st_size,
            "runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
            "threads": self.threads,
            "kv_cache": "f16 (llama.cpp's default)" if self.kv_type == "f16" else self.kv_type,
            "activations": "rounded to 8 bits for quantized matrix products (llama.cpp's CPU kernels)",
        }


def gguf_tokenizer(path: Path) -> object:
    """The Hugging Face tokenizer transformers builds from a GGUF file's tokenizer metadata."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # transformers' GGUF reader raises anything on a file it cannot read
        raise CompressLMError(f"cannot read a tokenizer from {path}: {str(exc).strip().splitlines()[0]}") from None


def llamacpp_perplexity(
    path: str | Path,
    corpus: str = "wikitext2",
    *,
    split: str = "test",
    ctx: int = 2048,
    stride: int | None = None,
    limit: int | None = None,
    threads: int | None = None,
    tokenizer: object | None = None,
    kv_type: str = "f16",
    show_progress: bool = True,
) -> PerplexityResult:
    """Token perplexity of a GGUF file run by llama.cpp, on the windows `eval.perplexity` would score."""
    started = time.perf_counter()
    stride = ctx if stride is None else stride
    model = LlamaCppModel(path, ctx, threads, kv_type=kv_type)
    tokenizer = gguf_tokenizer(model.path) if tokenizer is None else tokenizer
    corpus, ids, plan, available = model.token_windows(tokenizer, corpus, split, ctx, stride, limit)
    window_nll, total_nll, total_tokens = accumulate_nll(model.scored_windows(ids, plan, ctx), len(plan), show_progress)
    runtime = {
        "batch_size": 1,
        "eval_dtype": "llama.cpp (weights as stored in the GGUF)",
        "device": "cpu",
        "backend": "llama.cpp",
        "model": model.describe(),
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
    }
    return perplexity_result(window_nll, total_nll, total_tokens, corpus, ids, plan, available,
                             ctx, stride, limit, runtime, started)  # fmt: skip


def llamacpp_distance(
    path: str | Path,
    reference: ReferenceLogits,
    corpus: str = "wikitext2",
    *,
    split: str = "test",
    threads: int | None = None,
    tokenizer: object | None = None,
    kv_type: str = "f16",
    show_progress: bool = True,
) -> DistanceResult:
    """KL divergence, top-1 agreement and perplexity of a GGUF file run by llama.cpp against `reference`
    (`eval.distance.reference_logits` of the uncompressed model), on the reference's windows: tokenize with
    the reference's tokenizer (or one that makes the same ids) so that the windows match."""
    started = time.perf_counter()
    ref = reference.protocol
    model = LlamaCppModel(path, ref["ctx"], threads, kv_type=kv_type)
    tokenizer = gguf_tokenizer(model.path) if tokenizer is None else tokenizer
    text, ids, plan, _ = model.token_windows(tokenizer, corpus, split, ref["ctx"], ref["stride"], ref["limit"])
    check_corpus(reference, text)
    result = measure_distance(model.scored_windows(ids, plan, ref["ctx"]), len(plan), reference, show_progress)
    result.protocol.update(model=model.describe(), backend="llama.cpp",
                           wall_time_s=round(time.perf_counter() - started, 3))  # fmt: skip
    return result


def llamacpp_speed(path: str | Path, *, prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 5,
                   warmup: int = 1, seed: int = 0, threads: int | None = None) -> dict:  # fmt: skip
    """`eval.speed.measure_speed`'s workload in llama.cpp, batch 1: random prompt ids, one prefill, then
    `new_tokens` greedy steps, each reading only the last position's logits; medians over `repeats`."""
    import statistics

    llama_cpp = require_llama_cpp()
    model = LlamaCppModel(path, prompt_tokens + new_tokens + 8, threads, all_logits=False)
    llm, vocab = model.llm, model.vocab
    prompt = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()

    def last_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    prefill, decode = [], []
    for run in range(warmup + repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = last_token()
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = last_token()
        t2 = time.perf_counter()
        if run >= warmup:
            prefill.append(prompt_tokens / (t1 - t0))
            decode.append(new_tokens / (t2 - t1))

    def summary(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}

    return {"prefill_tokens_per_s": summary(prefill), "decode_tokens_per_s": summary(decode),
            "model": model.describe(), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}  # fmt: skip
