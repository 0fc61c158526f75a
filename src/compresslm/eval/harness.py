"""Scoring tasks by log-likelihood (and GSM8K by greedy generation), with error bars and calibration.

Multiple choice: each choice's continuation is scored as Σ log p(continuation tokens | context);
`acc` picks the highest sum, `acc_norm` the highest sum per character of the choice text (the
lm-evaluation-harness convention: the length without the leading space). Standard errors are
the sample standard deviation of the per-item 0/1 outcomes over √n. `ece` is the expected
calibration error of the model's choice probabilities (softmax of the choice log-likelihoods), in
10 equal-width confidence bins: compression can damage calibration before accuracy.

Tokenization follows lm-evaluation-harness: context + continuation are encoded together and the
continuation is what lies beyond the encoded context (trailing spaces of the context move to
the continuation); no BOS is added (an empty context is preceded by the end-of-text token);
sequences longer than the model's positions are cut from the left.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from compresslm.errors import ProtocolError
from compresslm.eval.stats import mean_stderr
from compresslm.eval.tasks import TaskData, gsm8k_answer
from compresslm.models.forward import streamed_logits
from compresslm.models.loaded import LoadedModel
from compresslm.progress import progress
from compresslm.versions import versions


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    n: int
    protocol: dict = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = 10) -> float:
    total = len(confidences)
    if not total:
        return float("nan")
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            confidence = sum(confidences[i] for i in members) / len(members)
            ece += len(members) / total * abs(accuracy - confidence)
    return ece


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(stripped, add_special_tokens=False).input_ids if stripped else []
    cont = whole[len(ctx) :]
    if not cont:
        raise ProtocolError(f"empty continuation after tokenization for {continuation!r}")
    if not ctx:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ProtocolError("an empty context needs an end-of-text token to condition on")
        ctx = [eos]
    return ctx, cont


def _max_length(lm: LoadedModel) -> int:
    config = lm.model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


@torch.inference_mode()
def loglikelihoods(
    lm: LoadedModel, requests: list[tuple[str, str]], batch_size: int = 8, show_progress: bool = False
) -> list[tuple[float, bool, int]]:
    """(Σ log p(continuation | context), is the continuation the greedy choice, its token count) per request.

    Requests whose continuation is one token and whose contexts are equal (MMLU's " A"/" B"/...)
    share one forward pass of the context. A model loaded lazily is scored block by block
    (`models.forward.streamed_logits`): every batch's hidden states are held, one block's weights.
    """
    encoded = [_encode_pair(lm.tokenizer, c, x) for c, x in requests]
    limit = _max_length(lm)
    sequences: dict[tuple[int, ...], list[int]] = {}  # input tokens -> requests read from it
    for index, (ctx, cont) in enumerate(encoded):
        seq = (ctx + cont)[-(limit + 1) :][:-1]
        sequences.setdefault(tuple(seq), []).append(index)
    unique = sorted(sequences, key=len, reverse=True)
    results: list[tuple[float, bool, int] | None] = [None] * len(encoded)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    chunks = [unique[start : start + batch_size] for start in range(0, len(unique), batch_size)]
    padded = [_padded(chunk, pad) for chunk in chunks]
    if lm.lazy is not None:  # read block by block: every batch through each block before the next is read
        batch_logits = streamed_logits(lm, padded, show_progress)
    else:
        batch_logits = (lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
                        .logits for ids, mask in padded)  # fmt: skip
    bar = progress(len(encoded), "loglikelihood", unit="req", enabled=show_progress)
    for chunk, logits in zip(chunks, batch_logits, strict=True):
        for row, seq in enumerate(chunk):
            for index in sequences[seq]:
                cont = encoded[index][1]
                n = len(cont)
                window = F.log_softmax(logits[row, len(seq) - n : len(seq)].float(), dim=-1).cpu()
                target = torch.tensor(cont)
                total = float(window.gather(1, target[:, None]).sum())
                results[index] = (total, bool((window.argmax(dim=-1) == target).all()), n)
                bar.update(1)
    bar.close()
    return results  # type: ignore[return-value]


def _padded(chunk: list[tuple[int, ...]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the right to the longest sequence, and their attention mask."""
    ids = torch.full((len(chunk), len(chunk[0])), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)
    for row, seq in enumerate(chunk):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def _subset(task: TaskData, limit: int | None, seed: int) -> list:
    items = task.items
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise ProtocolError(f"limit must be at least 1 item, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def _multiple_choice(lm: LoadedModel, items: list, batch_size: int, show_progress: bool) -> dict[str, float]:
    requests = [pair for item in items for pair in item.requests()]
    scores = loglikelihoods(lm, requests, batch_size, show_progress)
    acc, acc_norm, confidences, correct = [], [], [], []
    position = 0
    for item in items:
        k = len(item.choices)
        lls = [scores[position + j][0] for j in range(k)]
        position += k
        lengths = [max(len(c.lstrip(" ")), 1) for c in item.choices]  # characters of the choice, as lm-eval
        pick = max(range(k), key=lambda j: lls[j])
        pick_norm = max(range(k), key=lambda j: lls[j] / lengths[j])
        probs = torch.softmax(torch.tensor(lls, dtype=torch.float64), dim=0)
        acc.append(float(pick == item.label))
        acc_norm.append(float(pick_norm == item.label))
        confidences.append(float(probs.max()))
        correct.append(pick == item.label)
    return {
        "acc": sum(acc) / len(acc),
        "acc_stderr": mean_stderr(acc),
        "acc_norm": sum(acc_norm) / len(acc_norm),
        "acc_norm_stderr": mean_stderr(acc_norm),
        "ece": expected_calibration_error(confidences, correct),
    }


def _cloze(lm: LoadedModel, items: list, batch_size: int, show_progress: bool) -> dict[str, float]:
    scores = loglikelihoods(lm, [(item.context, item.answer) for item in items], batch_size, show_progress)
    hits = [float(greedy) for _, greedy, _ in scores]
    return {
        "acc": sum(hits) / len(hits),
        "acc_stderr": mean_stderr(hits),
        "ppl": math.exp(-sum(ll for ll, _, _ in scores) / len(scores)),  # per word, as lm-eval's lambada
    }


@torch.inference_mode()
def _generation(lm: LoadedModel, items: list, max_new_tokens: int, show_progress: bool) -> dict[str, float]:
    tokenizer = lm.tokenizer
    limit = _max_length(lm)
    hits = []
    bar = progress(len(items), "generate", unit="item", enabled=show_progress)
    for item in items:
        ids = tokenizer(item.context, add_special_tokens=False, return_tensors="pt").input_ids
        ids = ids[:, -(limit - max_new_tokens) :].to(lm.device)
        out = lm.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )  # fmt: skip
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        for stop in ("\n\nQuestion:", "Question:", "\n\n\n"):
            text = text.split(stop)[0]
        hits.append(float(gsm8k_answer(text) == item.answer))
        bar.update(1)
    bar.close()
    return {"exact_match": sum(hits) / len(hits), "exact_match_stderr": mean_stderr(hits)}


def evaluate_task(
    lm: LoadedModel,
    task: TaskData,
    *,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    show_progress: bool = True,
) -> TaskResult:
    """Score `lm` on `task` (optionally a seeded random subset of `limit` items)."""
    started = time.perf_counter()
    if task.kind == "generation" and lm.lazy is not None:
        raise ProtocolError(f"{task.name} generates text, which needs the whole model in memory; load it without "
                            "streaming")  # fmt: skip
    items = _subset(task, limit, seed)
    if task.kind == "multiple_choice":
        metrics = _multiple_choice(lm, items, batch_size, show_progress)
    elif task.kind == "cloze":
        metrics = _cloze(lm, items, batch_size, show_progress)
    else:
        metrics = _generation(lm, items, max_new_tokens, show_progress)
    protocol = {
        "task": task.name,
        "kind": task.kind,
        "files": task.files,
        "data_sha256": task.sha256,
        "items": len(items),
        "items_available": len(task.items),
        "subset": None if len(items) == len(task.items) else {"limit": limit, "seed": seed, "sampling": "random"},
        "scoring": {
            "multiple_choice": "sum log-likelihood of each choice; acc_norm per character; ece over choice softmax",
            "cloze": "last word: greedy exact match and exp(-mean log-likelihood of the word)",
            "generation": f"greedy, up to {max_new_tokens} new tokens; exact match of the final number",
        }[task.kind],
        "bos": "none",
        **({"streamed": "block by block from disk (the same logits as the whole model)"} if lm.lazy else {}),
        "note": task.note,
        "model": lm.describe(),
        "versions": versions(),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    return TaskResult(task.name, metrics, len(items), protocol)
