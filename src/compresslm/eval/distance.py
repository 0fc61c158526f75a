"""How far a compressed model's next-token distributions are from the uncompressed model's.

Perplexity averages away damage that shows up token by token; llama.cpp's perplexity tool
reports KL divergence and "same top token" for that reason. On the same windows as perplexity:

* KL(reference ‖ model) per scored token, its mean (with a standard error over windows, since
  tokens within a window are correlated) and percentiles;
* top-1 agreement: the share of tokens where both models rank the same token first;
* Δp: the model's probability of the correct next token minus the reference's.

The reference's distributions are computed once and cached on disk, keyed by the reference
model's weight hash, the text's hash and the window protocol. They are stored compactly as the
top-k log-probabilities (k = 64 by default) with their token ids and the log-probability of the
correct token. KL is then computed over the reference's top-k tokens plus one bucket holding the
rest of the vocabulary: by the data-processing inequality this is a lower bound on the full-vocabulary
KL, equal to it when the reference puts no mass outside its top k; the protocol says so and
records the mean mass outside the top k, so the bound's slack is visible.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compresslm.data.corpora import Corpus
from compresslm.errors import CompressLMError, CorruptFileError, ProtocolError
from compresslm.eval.perplexity import eval_model, model_windows, prepare_windows
from compresslm.eval.stats import check_metric, mean_stderr
from compresslm.fileio import load_tensors, save_tensors
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import cache_root
from compresslm.progress import progress
from compresslm.versions import versions

CACHE_FORMAT = 1
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


@dataclass
class ReferenceLogits:
    """The reference model's top-k next-token log-probabilities on every scored token, in order."""

    top_logprobs: torch.Tensor  # float32 [tokens, k], descending
    top_ids: torch.Tensor  # int32 [tokens, k]
    target_logprob: torch.Tensor  # float32 [tokens]
    window_sizes: list[int]  # scored tokens per window
    protocol: dict

    @property
    def k(self) -> int:
        return self.top_ids.shape[1]


@dataclass
class DistanceResult:
    kld_mean: float
    kld_stderr: float  # over windows
    kld_percentiles: dict[str, float]
    kld_max: float
    top1_agreement: float
    top1_stderr: float
    delta_p_mean: float
    delta_p_percentiles: dict[str, float]
    ppl: float  # the model's token perplexity on the same windows
    nll: float
    window_nll: list[float]
    reference_ppl: float
    tokens: int
    windows: int
    protocol: dict = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def _cache_key(reference: LoadedModel, corpus: Corpus, ctx: int, stride: int, limit: int | None, k: int) -> str:
    identity = {"model": reference.fingerprint(), "text": corpus.sha256, "ctx": ctx, "stride": stride,
                "limit": limit, "k": k, "dtype": str(reference.dtype), "format": CACHE_FORMAT}  # fmt: skip
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


@torch.inference_mode()
def reference_logits(
    reference: LoadedModel,
    corpus: str | Corpus = "wikitext2",
    *,
    split: str = "test",
    ctx: int = 2048,
    stride: int | None = None,
    limit: int | None = None,
    k: int = 64,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    show_progress: bool = True,
) -> ReferenceLogits:
    """The reference's top-k log-probabilities on the protocol's windows, from the cache when present."""
    stride = ctx if stride is None else stride
    if k < 1:
        raise ProtocolError(f"k must be at least 1, got {k}")
    corpus, ids, plan, available = prepare_windows(reference, corpus, split, ctx, stride, limit)
    key = _cache_key(reference, corpus, ctx, stride, limit, k)
    path = Path(cache_dir) if cache_dir else cache_root() / "reference-logits"
    path = path / f"{key}.safetensors"
    if path.exists():
        try:
            tensors, fields = load_tensors(path)
            if fields.get("key") == key:
                return ReferenceLogits(tensors["top_logprobs"], tensors["top_ids"], tensors["target_logprob"],
                                       [int(n) for n in fields["window_sizes"]], dict(fields["protocol"]))  # fmt: skip
        except (CompressLMError, KeyError, TypeError, ValueError):  # a damaged entry is recomputed, never trusted
            pass
    started = time.perf_counter()
    tops, top_ids, targets_lp, sizes = [], [], [], []
    bar = progress(len(plan), "reference logits", unit="win", enabled=show_progress)
    with eval_model(reference, None, device) as (model, target):
        for _, logits, targets in model_windows(reference, model, ids, plan, ctx, 1, target):
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            values, indices = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
            tops.append(values.cpu())
            top_ids.append(indices.to(torch.int32).cpu())
            targets_lp.append(logprobs.gather(1, targets[:, None]).squeeze(1).cpu())
            sizes.append(targets.numel())
            bar.update(1)
    bar.close()
    protocol = {
        **corpus.describe(),
        "ctx": ctx,
        "stride": stride,
        "windows": len(plan),
        "windows_available": available,
        "limit": limit,
        "tokens_scored": sum(sizes),
        "bos": "none",
        "reference_model": reference.describe(),
        "top_k": k,
        "cache_key": key,
        "versions": versions(),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    result = ReferenceLogits(torch.cat(tops), torch.cat(top_ids), torch.cat(targets_lp), sizes, protocol)
    tensors = {"top_logprobs": result.top_logprobs, "top_ids": result.top_ids, "target_logprob": result.target_logprob}
    save_tensors(path, tensors, {"key": key, "window_sizes": sizes, "protocol": protocol})
    return result


def token_kld(ref_top: torch.Tensor, model_logprobs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) per token over the reference's top-k tokens plus one 'rest' bucket."""
    model_top = model_logprobs.gather(1, top_ids.long())
    p_ref = ref_top.exp()
    rest_ref = (1.0 - p_ref.sum(dim=1)).clamp_min(0.0)
    rest_model = (1.0 - model_top.exp().sum(dim=1)).clamp_min(1e-30)
    kl = (p_ref * (ref_top - model_top)).sum(dim=1)
    rest = torch.where(rest_ref > 0, rest_ref * (rest_ref.clamp_min(1e-30).log() - rest_model.log()), 0.0)
    return (kl + rest).clamp_min(0.0)  # the coarsened KL is >= 0; clamp rounding noise only


def _percentiles(values: torch.Tensor) -> dict[str, float]:
    q = torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64)
    # torch.quantile has a size limit; sort once instead
    ordered = values.double().sort().values
    positions = (q * (ordered.numel() - 1)).round().long()
    return {f"p{p:g}": float(ordered[i]) for p, i in zip(PERCENTILES, positions, strict=True)}


@torch.inference_mode()
def distance(
    lm: LoadedModel,
    reference: ReferenceLogits,
    corpus: str | Corpus = "wikitext2",
    *,
    split: str = "test",
    dtype: str | None = None,
    device: str | None = None,
    show_progress: bool = True,
) -> DistanceResult:
    """KL divergence, top-1 agreement and Δp of `lm` against `reference`, on the reference's windows."""
    ref = reference.protocol
    corpus, ids, plan, _ = prepare_windows(lm, corpus, split, ref["ctx"], ref["stride"], ref["limit"])
    check_corpus(reference, corpus)
    started = time.perf_counter()
    kv_cache = getattr(lm, "kv_cache", None)
    with eval_model(lm, dtype, device) as (model, target):
        scored = model_windows(lm, model, ids, plan, ref["ctx"], 1, target, kv_cache)
        result = measure_distance(scored, len(plan), reference, show_progress)
    result.protocol.update(
        model=lm.describe(),
        **({"kv_cache": kv_cache.config.describe(), "kv_prefill_chunk": kv_cache.chunk} if kv_cache else {}),
        **({"streamed": "block by block from disk"} if lm.lazy is not None else {}),
        wall_time_s=round(time.perf_counter() - started, 3),
    )
    return result


def check_corpus(reference: ReferenceLogits, corpus: Corpus) -> None:
    """Refuse a text other than the one the reference logits were computed on."""
    if corpus.sha256 != reference.protocol["text_sha256"]:
        raise ProtocolError("the reference logits were computed on another text; recompute them for this corpus")


def measure_distance(scored, windows: int, reference: ReferenceLogits, show_progress: bool) -> DistanceResult:
    """The distance of a model whose scored windows `scored` yields (index, logits [n, vocab], targets [n]),
    in the reference's window order, from any runtime; the caller adds the model and timing to the protocol."""
    kls, agree, delta, nll = [], [], [], []
    window_kl, window_agree, window_nll = [], [], []
    offset = 0
    bar = progress(windows, "kl divergence", unit="win", enabled=show_progress)
    for index, logits, targets in scored:
        n = targets.numel()
        if index >= len(reference.window_sizes) or reference.window_sizes[index] != n:
            raise ProtocolError("the windows do not match the reference logits (different tokenizer or protocol)")
        sl = slice(offset, offset + n)
        offset += n
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        if logprobs.shape[-1] <= int(reference.top_ids[sl].max()):
            raise ProtocolError(f"the model has {logprobs.shape[-1]} tokens; the reference ranks higher token ids")
        kl = token_kld(reference.top_logprobs[sl], logprobs, reference.top_ids[sl])
        same = logprobs.argmax(dim=1) == reference.top_ids[sl, 0].long()
        target_lp = logprobs.gather(1, targets.cpu()[:, None]).squeeze(1)
        kls.append(kl)
        agree.append(same)
        delta.append(target_lp.exp() - reference.target_logprob[sl].exp())
        nll.append(-target_lp.double())
        window_nll.append(float(nll[-1].mean()))
        window_kl.append(float(kl.double().mean()))
        window_agree.append(float(same.double().mean()))
        bar.update(1)
    bar.close()
    if offset != reference.top_ids.shape[0]:
        raise CorruptFileError("the reference logits hold more tokens than the windows scored; recompute them")
    kl_all, agree_all, delta_all = torch.cat(kls), torch.cat(agree), torch.cat(delta)
    reference_nll = -reference.target_logprob.double().mean()
    check_metric("perplexity", float(torch.cat(nll).mean()), window_nll)
    check_metric("KL divergence", float(kl_all.double().mean()), window_kl)
    return DistanceResult(
        kld_mean=float(kl_all.double().mean()),
        kld_stderr=mean_stderr(window_kl),
        kld_percentiles=_percentiles(kl_all),
        kld_max=float(kl_all.max()),
        top1_agreement=float(agree_all.double().mean()),
        top1_stderr=mean_stderr(window_agree),
        delta_p_mean=float(delta_all.double().mean()),
        delta_p_percentiles=_percentiles(delta_all),
        ppl=math.exp(float(torch.cat(nll).mean())),
        nll=float(torch.cat(nll).mean()),
        window_nll=window_nll,
        reference_ppl=math.exp(float(reference_nll)),
        tokens=offset,
        windows=windows,
        protocol={**_protocol(reference), "versions": versions()},
    )


def reference_distance(reference: ReferenceLogits) -> DistanceResult:
    """The reference model against itself, read from its own pass: KL 0, top-1 agreement 1 and Δp 0 by
    definition, perplexity from the correct tokens' log-probabilities. A sweep's uncompressed point
    uses it rather than running the same windows through the same model a second time."""
    nll = -reference.target_logprob.double()
    window_nll = [float(chunk.mean()) for chunk in torch.split(nll, reference.window_sizes)]
    zeros = {f"p{p:g}": 0.0 for p in PERCENTILES}
    protocol = {
        **_protocol(reference),
        "model": reference.protocol["reference_model"],
        "measured": "from the reference pass (the reference model against itself)",
        "versions": versions(),
        "wall_time_s": 0.0,
    }
    check_metric("perplexity", float(nll.mean()), window_nll)
    return DistanceResult(
        kld_mean=0.0,
        kld_stderr=0.0,
        kld_percentiles=zeros,
        kld_max=0.0,
        top1_agreement=1.0,
        top1_stderr=0.0,
        delta_p_mean=0.0,
        delta_p_percentiles=dict(zeros),
        ppl=math.exp(float(nll.mean())),
        nll=float(nll.mean()),
        window_nll=window_nll,
        reference_ppl=math.exp(float(nll.mean())),
        tokens=int(nll.numel()),
        windows=len(reference.window_sizes),
        protocol=protocol,
    )


def _protocol(reference: ReferenceLogits) -> dict:
    """What a distance result says of how it was measured, from the reference's own protocol."""
    ref = reference.protocol
    return {
        "metric": "kl_divergence",
        "definition": (
            f"KL(reference || model) per scored token over the reference's top-{reference.k} tokens plus one bucket "
            "for the rest of the vocabulary (a lower bound on the full KL); top-1 agreement = same argmax token; "
            "delta_p = p_model(correct) - p_reference(correct); standard errors over windows; ppl = "
            "exp(mean NLL over the same scored tokens), text tokenized once, no special tokens"
        ),
        "reference_mass_outside_top_k": float((1.0 - reference.top_logprobs.exp().sum(dim=1)).clamp_min(0).mean()),
        **{key: ref[key] for key in ("dataset", "split", "text_sha256", "ctx", "stride", "windows", "limit", "bos")},
        "windows_available": ref["windows_available"],
        "reference_model": ref["reference_model"],
        "reference_cache_key": ref["cache_key"],
    }
