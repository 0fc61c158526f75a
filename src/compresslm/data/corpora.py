"""Evaluation corpora as exact text, with the hash and the rule that built the text.

Perplexity depends on every byte of the evaluated text, so a :class:`Corpus` carries the sha256
of the final string and the rule that joined its rows. WikiText-2 follows the GPTQ/SparseGPT
reference code, which is what papers report: the Hugging Face `wikitext-2-raw-v1` rows (one per
line of the raw file, whitespace-only lines as empty rows) joined with "\\n\\n".
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from compresslm.errors import DataError

WIKITEXT2_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "valid": "wiki.valid.raw"}
CORPORA = ("wikitext2",)


@dataclass(frozen=True)
class Corpus:
    """A text to score and how it was made."""

    name: str
    split: str | None
    text: str
    source: str  # "shipped:<file>" or a path
    join: str  # how rows became the text: "gptq-rows" (rows joined by \n\n), "raw", "jsonl-text"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        return {"dataset": self.name, "split": self.split, "source": self.source, "join": self.join,
                "text_sha256": self.sha256, "characters": len(self.text)}  # fmt: skip


def read_jsonl(lines, source: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank JSON line; a malformed line is an error naming file and line."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{source}, line {number}: expected a JSON object")
        rows.append((number, record))
    return rows


def read_jsonl_texts(lines: list[str], source: str) -> list[str]:
    """The "text" field of every non-blank JSON line."""
    texts = []
    for number, record in read_jsonl(lines, source):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{source}, line {number}: expected an object with a string 'text' field")
        texts.append(record["text"])
    return texts


def wikitext2_rows(raw: str) -> list[str]:
    """The rows of Hugging Face's wikitext-2-raw-v1: each line keeps its newline; blank lines are ''."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def _shipped_wikitext(split: str) -> tuple[str, str]:
    if split not in WIKITEXT2_FILES:
        raise DataError(f"unknown wikitext2 split '{split}'; choose test or validation")
    filename = WIKITEXT2_FILES[split]
    data_dir = os.environ.get("COMPRESSLM_DATA")
    if data_dir and (Path(data_dir) / "wikitext-2-raw" / filename).is_file():
        path = Path(data_dir) / "wikitext-2-raw" / filename
        return path.read_text(encoding="utf-8"), str(path)
    resource = resources.files("compresslm.data").joinpath("wikitext-2-raw", filename)
    return resource.read_text(encoding="utf-8"), f"shipped:wikitext-2-raw/{filename}"


def check_corpus(name_or_path: str) -> None:
    """Fail now, before a model loads, on a corpus that is neither a known name nor an existing file."""
    if (
        name_or_path.lower() not in ("wikitext2", "wikitext-2", "wikitext2-raw")
        and not Path(name_or_path).expanduser().is_file()
    ):
        raise DataError(f"no corpus named '{name_or_path}' and no such file; known corpora: {', '.join(CORPORA)}")


def load_corpus(name_or_path: str, split: str = "test", *, join: str | None = None) -> Corpus:
    """Load `wikitext2` (shipped) or any UTF-8 text file / JSONL file by path.

    `join` overrides how rows become the text: "gptq-rows" (default for wikitext2) or "raw" (the
    file as one string). A JSONL file's "text" fields are joined with "\\n\\n".
    """
    if name_or_path.lower() in ("wikitext2", "wikitext-2", "wikitext2-raw"):
        raw, source = _shipped_wikitext(split)
        join = join or "gptq-rows"
        if join == "gptq-rows":
            text = "\n\n".join(wikitext2_rows(raw))
        elif join == "raw":
            text = raw
        else:
            raise DataError(f"unknown join rule '{join}'; choose gptq-rows or raw")
        return Corpus("wikitext2", split, text, source, join)

    check_corpus(name_or_path)
    path = Path(name_or_path).expanduser()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from exc
    if path.suffix.lower() in (".jsonl", ".json"):
        text, rule = "\n\n".join(read_jsonl_texts(raw.splitlines(), str(path))), "jsonl-text"
    else:
        text, rule = raw, "raw"
    if not text.strip():
        raise DataError(f"{path} holds no text")
    return Corpus(path.stem, None, text, str(path.resolve()), rule)
