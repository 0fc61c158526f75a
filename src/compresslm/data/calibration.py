"""Calibration windows: N windows of L tokens from a corpus, reproducible from a seed.

The default follows the GPTQ/SparseGPT/Wanda code: pick a random document longer than L tokens
from the C4 train sample, then a random L-token window inside it. A source whose documents are all
shorter (or a plain text file, which is one document) is sampled from the concatenated token
stream instead; the protocol says which was used. `random.Random(seed)` drives the choice, so the
same seed gives the same windows on every platform.
"""

from __future__ import annotations

import gzip
import hashlib
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from compresslm.data.corpora import load_corpus, read_jsonl_texts, wikitext2_rows
from compresslm.errors import DataError


@dataclass
class CalibrationSet:
    """Token windows [n, length] and the label that says how they were drawn."""

    windows: torch.Tensor
    protocol: dict


def load_documents(source: str) -> tuple[list[str], str]:
    """Documents of a calibration source: `c4` (shipped sample), `wikitext2` (validation) or a path."""
    if source.lower() == "c4":
        raw = resources.files("compresslm.data").joinpath("c4", "c4_sample.jsonl.gz").read_bytes()
        return read_jsonl_texts(
            gzip.decompress(raw).decode("utf-8").splitlines(), "c4_sample.jsonl"
        ), "shipped:c4/c4_sample"
    if source.lower() in ("wikitext2", "wikitext2-validation"):
        raw = load_corpus("wikitext2", "validation", join="raw").text
        return [row for row in wikitext2_rows(raw) if row], "shipped:wikitext-2-raw/wiki.valid.raw"
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"no calibration source named '{source}' and no such file; use c4, wikitext2 or a path")
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from exc
    name = path.name.removesuffix(".gz")
    docs = read_jsonl_texts(text.splitlines(), str(path)) if name.endswith((".jsonl", ".json")) else [text]
    return docs, str(path.resolve())


def calibration_windows(
    tokenizer: object, source: str = "c4", n: int = 128, length: int = 512, seed: int = 0
) -> CalibrationSet:
    """Draw `n` windows of `length` tokens from `source` (see module docstring)."""
    if n < 1 or length < 2:
        raise DataError(f"need at least 1 window of at least 2 tokens, got n={n}, length={length}")
    docs, origin = load_documents(source)
    if not docs:
        raise DataError(f"calibration source {source} holds no documents")
    token_lists = tokenizer(docs, add_special_tokens=False).input_ids
    rng = random.Random(seed)
    eligible = [i for i, ids in enumerate(token_lists) if len(ids) > length]
    windows = []
    if eligible:
        sampling = "random window of a random document longer than length (GPTQ)"
        for _ in range(n):
            ids = token_lists[eligible[rng.randrange(len(eligible))]]
            start = rng.randrange(len(ids) - length)
            windows.append(ids[start : start + length])
    else:
        sampling = "random window of the concatenated documents"
        stream = [t for ids in token_lists for t in ids]
        if len(stream) < length:
            raise DataError(f"calibration source {source} has {len(stream)} tokens, fewer than one window of {length}")
        for _ in range(n):
            start = rng.randrange(len(stream) - length + 1)
            windows.append(stream[start : start + length])
    tensor = torch.tensor(windows, dtype=torch.long)
    digest = hashlib.sha256("\x00".join(docs).encode("utf-8")).hexdigest()
    protocol = {
        "source": source,
        "origin": origin,
        "documents": len(docs),
        "documents_sha256": digest,
        "windows": n,
        "length": length,
        "seed": seed,
        "sampling": sampling,
        "bos": "none",
        "windows_sha256": hashlib.sha256(tensor.numpy().tobytes()).hexdigest(),
    }
    return CalibrationSet(tensor, protocol)
