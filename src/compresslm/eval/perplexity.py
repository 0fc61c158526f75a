"""Token-level perplexity under a labelled protocol.

The default protocol is the one of the GPTQ/SparseGPT reference code, which is what papers report:
the corpus text is tokenized once with no BOS or other special tokens added, cut into
non-overlapping windows of `ctx` tokens (the remainder is dropped), and perplexity is
exp(mean NLL over every predicted token), i.e. `ctx - 1` tokens per window.

With `stride < ctx` the windows overlap (sliding window): the first window scores its `ctx - 1`
predicted tokens and each later window scores only its last `stride` tokens, each with up to
`ctx - 1` tokens of context. The protocol records which was used.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from compresslm.data.corpora import Corpus, load_corpus
from compresslm.errors import ProtocolError
from compresslm.eval.stats import check_metric
from compresslm.models.forward import streamed_logits
from compresslm.models.loaded import DTYPES, LoadedModel
from compresslm.progress import progress
from compresslm.versions import versions


@dataclass
class PerplexityResult:
    """A perplexity with everything needed to reproduce or compare it."""

    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int
    window_nll: list[float] = field(repr=False)  # mean NLL of each window, in order
    protocol: dict = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_corpus(tokenizer: object, corpus: Corpus) -> torch.Tensor:
    """Token ids of the whole corpus text as one 1-D tensor, with no special tokens added."""
    ids = tokenizer(corpus.text, add_special_tokens=False, return_tensors="pt").input_ids
    return ids.reshape(-1)


def window_plan(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position inside the window) for every full window."""
    if ctx < 2:
        raise ProtocolError(f"ctx must be at least 2 tokens, got {ctx}")
    if not 0 < stride <= ctx:
        raise ProtocolError(f"stride must be between 1 and ctx ({ctx}), got {stride}")
    if n_tokens < ctx:
        raise ProtocolError(f"the text has {n_tokens} tokens, fewer than one window of ctx={ctx}")
    plan = []
    for start in range(0, n_tokens - ctx + 1, stride):
        first_scored = 1 if start == 0 else max(1, ctx - stride)
        plan.append((start, first_scored))
    return plan


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


@contextlib.contextmanager
def eval_model(lm: LoadedModel, dtype: str | None, device: str | None):
    """The model to evaluate (a cast copy when `dtype` differs) on `device`; moved back afterwards."""
    if lm.lazy is not None:  # read block by block: its dtype and device were chosen when it was loaded
        if dtype is not None and DTYPES.get(dtype) != lm.dtype:
            raise ProtocolError(
                f"a streamed model evaluates in the dtype it was loaded in ({lm.dtype}); load it as {dtype}"
            )
        yield lm.model, lm.device
        return
    model = lm.model
    if dtype is not None and DTYPES.get(dtype, None) != lm.dtype:
        if dtype not in DTYPES:
            raise ProtocolError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
        model = copy.deepcopy(model).to(DTYPES[dtype])
    original_device = lm.device
    target = torch.device(device) if device is not None else original_device
    model.to(target)
    try:
        yield model, target
    finally:
        if device is not None:
            lm.model.to(original_device)


def _kv_protocol(kv_cache) -> dict:
    if kv_cache is None:
        return {}
    return {"kv_cache": kv_cache.config.describe(), "kv_prefill_chunk": kv_cache.chunk}


def _forward(model: torch.nn.Module, inputs: torch.Tensor, kv_cache) -> torch.Tensor:
    """Logits of a batch: one pass, or, with a KV-cache stage, chunked prefill through that cache."""
    if kv_cache is None:
        return model(input_ids=inputs, use_cache=False).logits
    from compresslm.kv.cache import make_cache

    cache = make_cache(model, kv_cache.config)
    chunks = [model(input_ids=inputs[:, s : s + kv_cache.chunk], past_key_values=cache, use_cache=True).logits
              for s in range(0, inputs.shape[1], kv_cache.chunk)]  # fmt: skip
    return torch.cat(chunks, dim=1)


def scored_windows(
    model: torch.nn.Module,
    ids: torch.Tensor,
    plan: list[tuple[int, int]],
    ctx: int,
    batch_size: int,
    device,
    kv_cache=None,
):
    """For each window of `plan`, in order: (index, logits [scored, vocab], next-token targets [scored]).

    The logits are those that predict each scored token; every metric computed per token
    (perplexity, KL divergence to a reference, top-1 agreement) reads the same positions. With a
    `kv_cache` stage (`recipe.KVCacheStage`) each window is prefilled in chunks through that cache.
    """
    for first in range(0, len(plan), batch_size):
        batch = plan[first : first + batch_size]
        inputs = torch.stack([ids[s : s + ctx] for s, _ in batch]).to(device)
        logits = _forward(model, inputs, kv_cache)
        for row, (_, first_scored) in enumerate(batch):
            yield first + row, logits[row, first_scored - 1 : ctx - 1], inputs[row, first_scored:ctx]


def streamed_windows(
    lm: LoadedModel, ids: torch.Tensor, plan: list[tuple[int, int]], ctx: int, batch_size: int, show_progress: bool
):
    """`scored_windows` for a model read block by block (`models.forward.streamed_logits`): the logits are
    the same as the whole model's on the same batches."""
    windows = torch.stack([ids[s : s + ctx] for s, _ in plan])
    chunks = [(windows[first : first + batch_size], None) for first in range(0, len(plan), batch_size)]
    for number, logits in enumerate(streamed_logits(lm, chunks, show_progress)):
        first = number * batch_size
        inputs = chunks[number][0].to(logits.device)
        for row, (_, first_scored) in enumerate(plan[first : first + batch_size]):
            yield first + row, logits[row, first_scored - 1 : ctx - 1], inputs[row, first_scored:ctx]


def model_windows(lm: LoadedModel, model: torch.nn.Module, ids: torch.Tensor, plan: list[tuple[int, int]], ctx: int,
                  batch_size: int, device, kv_cache=None, show_progress: bool = False):  # fmt: skip
    """`scored_windows` of `model` (`lm`'s, as `eval_model` gives it), or `streamed_windows` where `lm` is read
    block by block; every metric computed per token reads the windows through here."""
    if lm.lazy is None:
        return scored_windows(model, ids, plan, ctx, batch_size, device, kv_cache)
    if kv_cache is not None:
        raise ProtocolError("a quantized KV cache is not evaluated block by block yet; load the model whole")
    return streamed_windows(lm, ids, plan, ctx, batch_size, show_progress)


def prepare_windows(lm: LoadedModel, corpus: str | Corpus, split: str, ctx: int, stride: int, limit: int | None):
    """(corpus, token ids, window plan, windows available) with the protocol's checks."""
    return token_windows(lm.tokenizer, _max_positions(lm.model), corpus, split, ctx, stride, limit)


def token_windows(tokenizer: object, max_positions: int | None, corpus: str | Corpus, split: str, ctx: int,
                  stride: int, limit: int | None):  # fmt: skip
    """`prepare_windows` for any runtime: the tokenizer and the model's positions are all it needs."""
    if limit is not None and limit < 1:
        raise ProtocolError(f"limit must be at least 1 window, got {limit}")
    if max_positions is not None and ctx > max_positions:
        raise ProtocolError(f"ctx={ctx} exceeds the model's {max_positions} positions")
    if isinstance(corpus, str):
        corpus = load_corpus(corpus, split)
    ids = tokenize_corpus(tokenizer, corpus)
    plan = window_plan(ids.numel(), ctx, stride)
    available = len(plan)
    return corpus, ids, plan[:limit] if limit is not None else plan, available


@torch.inference_mode()
def perplexity(
    lm: LoadedModel,
    corpus: str | Corpus = "wikitext2",
    *,
    split: str = "test",
    ctx: int = 2048,
    stride: int | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    dtype: str | None = None,
    device: str | None = None,
    show_progress: bool = True,
) -> PerplexityResult:
    """Measure token-level perplexity of `lm` on `corpus` (a name such as wikitext2, or a path).

    `limit` scores only the first N windows; `dtype` evaluates a cast copy of the model (the
    loaded model is left untouched); `device` runs on that device (e.g. "cuda").
    """
    started = time.perf_counter()
    stride = ctx if stride is None else stride
    if batch_size < 1:
        raise ProtocolError(f"batch_size must be at least 1, got {batch_size}")
    corpus, ids, plan, available = prepare_windows(lm, corpus, split, ctx, stride, limit)

    kv_cache = getattr(lm, "kv_cache", None)
    with eval_model(lm, dtype, device) as (model, target):
        scored = model_windows(lm, model, ids, plan, ctx, batch_size, target, kv_cache, show_progress)
        window_nll, total_nll, total_tokens = accumulate_nll(scored, len(plan), show_progress)
        eval_dtype = str(lm.dtype if lm.lazy is not None else next(model.parameters()).dtype).removeprefix("torch.")
    runtime = {
        "batch_size": batch_size,
        "eval_dtype": eval_dtype,
        **_kv_protocol(kv_cache),
        "device": str(target),
        **({"streamed": "block by block from disk"} if lm.lazy is not None else {}),
        "model": lm.describe(),
        "tokenizer": getattr(lm.tokenizer, "name_or_path", None) or type(lm.tokenizer).__name__,
    }
    return perplexity_result(window_nll, total_nll, total_tokens, corpus, ids, plan, available,
                             ctx, stride, limit, runtime, started)  # fmt: skip


def accumulate_nll(scored, windows: int, show_progress: bool) -> tuple[list[float], float, int]:
    """Per-window mean NLL, total NLL and tokens scored, from (index, logits, targets) of each window."""
    window_nll: list[float] = []
    total_nll = 0.0
    total_tokens = 0
    bar = progress(windows, "perplexity", unit="win", enabled=show_progress)
    for _, logits, targets in scored:
        # Flattened (tokens, vocab) layout: far faster on CPU than (batch, vocab, tokens), ~10x in a one-off timing.
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        row_sum = losses.double().sum().item()
        window_nll.append(row_sum / targets.numel())
        total_nll += row_sum
        total_tokens += targets.numel()
        bar.update(1)
        bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    bar.close()
    return window_nll, total_nll, total_tokens


def perplexity_result(window_nll: list[float], total_nll: float, total_tokens: int, corpus: Corpus,
                      ids: torch.Tensor, plan: list, available: int, ctx: int, stride: int, limit: int | None,
                      runtime: dict, started: float) -> PerplexityResult:  # fmt: skip
    """The result with its protocol: the windows' definition, then how and where they were run (`runtime`)."""
    nll = total_nll / total_tokens
    protocol = {
        "metric": "token_perplexity",
        "definition": "exp(mean NLL over all predicted tokens); text tokenized once, no special tokens",
        **corpus.describe(),
        "ctx": ctx,
        "stride": stride,
        "windowing": "non-overlapping" if stride == ctx else "sliding",
        "windows": len(plan),
        "windows_available": available,
        "limit": limit,
        "tokens_in_text": ids.numel(),
        "tokens_scored": total_tokens,
        "bos": "none",
        **runtime,
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    check_metric("perplexity", nll, window_nll)
    return PerplexityResult(math.exp(nll), nll, total_tokens, len(plan), window_nll, protocol)
