"""Quality under a quantized KV cache: chunked-prefill perplexity, KL to the full-precision cache, passkey.

Perplexity with a quantized cache must make later tokens read the *quantized* cache of earlier
ones, so each window is fed through the model in chunks of `chunk` tokens with the cache carried
from chunk to chunk; a token attends to earlier chunks through the cache and to its own chunk in
full precision (as a token being decoded attends to itself). The same chunked pass with
transformers' full-precision cache is the reference: the KL divergence between the two is exact
(full vocabulary), token by token. The chunk size, the cache settings and the windows are in the
protocol; chunk = 1 is token-by-token decoding.

The passkey test hides "The pass key is NNNNN" at a random depth of WikiText filler text of a given
length and asks for it back (greedy decoding); accuracy is over seeded trials. The prompt is
prefilled in chunks too, so the question and the answer read the key through the quantized cache
(a single-shot prefill would let the first answer token attend to the key in full precision).
"""

from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F

from compresslm.data.corpora import load_corpus
from compresslm.eval.perplexity import eval_model, prepare_windows
from compresslm.eval.stats import check_metric
from compresslm.kv.cache import KVQuantConfig, fp16_kv_bytes, make_cache
from compresslm.models.loaded import LoadedModel
from compresslm.progress import progress
from compresslm.versions import versions


def _prefill(model, ids: torch.Tensor, chunk: int, cache):
    """Feed `ids` through `model` in chunks of `chunk` tokens, carrying `cache`; yield each chunk's output."""
    for start in range(0, ids.shape[1], chunk):
        yield model(input_ids=ids[:, start : start + chunk], past_key_values=cache, use_cache=True)


def _chunked_logits(model, ids: torch.Tensor, chunk: int, config: KVQuantConfig | None):
    cache = make_cache(model, config)
    parts = [out.logits.float() for out in _prefill(model, ids, chunk, cache)]
    return torch.cat(parts, dim=1), cache


@torch.inference_mode()
def kv_perplexity(
    lm: LoadedModel,
    config: KVQuantConfig | None,
    corpus: str = "wikitext2",
    *,
    ctx: int = 2048,
    limit: int | None = None,
    chunk: int = 128,
    device: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Token perplexity through the (quantized) cache, and KL / top-1 agreement against the fp cache."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 token, got {chunk}")
    started = time.perf_counter()
    corpus_obj, ids, plan, available = prepare_windows(lm, corpus, "test", ctx, ctx, limit)
    nll = reference_nll = 0.0
    kls, agree, count = [], 0, 0
    kv_bytes = None
    bar = progress(len(plan), "kv perplexity", unit="win", enabled=show_progress)
    with eval_model(lm, None, device) as (model, target):
        for start, _ in plan:
            window = ids[start : start + ctx][None].to(target)
            labels = window[0, 1:]
            logits, cache = _chunked_logits(model, window, chunk, config)
            logprobs = F.log_softmax(logits[0, :-1], dim=-1)
            nll -= float(logprobs.gather(1, labels[:, None]).sum())
            if config is not None:
                kv_bytes = cache.nbytes()
                ref_logits, _ = _chunked_logits(model, window, chunk, None)
                ref = F.log_softmax(ref_logits[0, :-1], dim=-1)
                reference_nll -= float(ref.gather(1, labels[:, None]).sum())
                kls.append((ref.exp() * (ref - logprobs)).sum(dim=-1).double())
                agree += int((ref.argmax(-1) == logprobs.argmax(-1)).sum())
            count += labels.numel()
            bar.update(1)
    bar.close()
    check_metric("perplexity through the KV cache", nll / count)
    result = {
        "ppl": math.exp(nll / count),
        "tokens": count,
        "kv_bytes": kv_bytes,
        "kv_bytes_fp16": fp16_kv_bytes(lm.model, ctx),
        "protocol": {
            "metric": "token perplexity through the KV cache, chunked prefill",
            **corpus_obj.describe(),
            "ctx": ctx,
            "chunk": chunk,
            "windows": len(plan),
            "windows_available": available,
            "kv_cache": config.describe() if config else "full precision (transformers DynamicCache)",
            "kv_config": config.to_dict() if config else None,
            "kv_bytes_at": f"end of a {ctx}-token window, batch 1, measured from the cache's tensors",
            "model": lm.describe(),
            "versions": versions(),
            "wall_time_s": round(time.perf_counter() - started, 3),
        },
    }
    if config is not None:
        kl = torch.cat(kls)
        result.update({"reference_ppl": math.exp(reference_nll / count), "kld_mean": float(kl.mean()),
                       "kld_p99": float(kl.sort().values[int(0.99 * (kl.numel() - 1))]),
                       "top1_agreement": agree / count})  # fmt: skip
    return result


def passkey_prompt(tokenizer, length: int, depth: float, key: int, filler: str) -> tuple[torch.Tensor, str]:
    """A prompt of about `length` tokens with the key sentence at relative `depth` (0 = start, 1 = end)."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    budget = length - len(tokenizer(needle + question, add_special_tokens=False).input_ids)
    filler_ids = tokenizer(filler, add_special_tokens=False).input_ids[: max(budget, 0)]
    cut = int(depth * len(filler_ids))
    text = tokenizer.decode(filler_ids[:cut]) + needle + tokenizer.decode(filler_ids[cut:]) + question
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids, str(key)


@torch.inference_mode()
def passkey_accuracy(
    lm: LoadedModel, config: KVQuantConfig | None, length: int, trials: int = 5, seed: int = 0, chunk: int = 128
) -> dict:
    """Share of trials where greedy decoding returns the hidden pass key, at about `length` tokens."""
    rng = random.Random(seed)
    filler = load_corpus("wikitext2", "test").text
    hits = []
    for _ in range(trials):
        offset = rng.randrange(0, len(filler) // 2)
        ids, key = passkey_prompt(lm.tokenizer, length, rng.random(), rng.randrange(10000, 99999),
                                  filler[offset : offset + 12 * length])  # fmt: skip
        ids = ids.to(lm.device)
        cache = make_cache(lm.model, config)
        for _ in _prefill(lm.model, ids[:, :-1], chunk, cache):  # all but the last token: generate feeds that one
            pass
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                past_key_values=cache, pad_token_id=lm.tokenizer.eos_token_id)  # fmt: skip
        answer = lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        hits.append(key in answer)
    return {"length": length, "trials": trials, "accuracy": sum(hits) / len(hits), "seed": seed, "chunk": chunk}
