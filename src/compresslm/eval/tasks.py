"""Zero- and few-shot task loaders, each reading its dataset's original file format.

Every loader turns a file into `Item`s: a context, the candidate continuations and the index of
the right one (multiple choice, scored by log-likelihood), or a prompt and a reference answer
(generation: GSM8K), or a context and a target word (LAMBADA). Prompts follow the
lm-evaluation-harness formats so that numbers are comparable. A malformed row is an error that
names the file and the line.

Data is found under a data directory (`--data-dir`, or `$COMPRESSLM_DATA`), laid out like the
project's shared data folder: `arc_easy/ARC-Easy-Test.jsonl`, `piqa/valid.jsonl` +
`valid-labels.lst`, `hellaswag/hellaswag_val_full.txt` (llama.cpp's text format), ... Each task
lists the paths it tries, first found wins; the file used and its sha256 go into the protocol.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compresslm.data.corpora import read_jsonl
from compresslm.errors import DataError


@dataclass
class Item:
    """One task example. `choices` (continuations) + `label` for multiple choice; `answer` for generation/cloze.

    `contexts`, when set, gives each choice its own context (WinoGrande's partial scoring: the
    option fills the blank in the context and the same remainder is scored for every option).
    """

    context: str
    choices: list[str] = field(default_factory=list)
    label: int | None = None
    answer: str | None = None
    id: str = ""
    contexts: list[str] | None = None

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) pairs to score, one per choice."""
        if self.contexts is not None:
            return list(zip(self.contexts, self.choices, strict=True))
        return [(self.context, choice) for choice in self.choices]


@dataclass
class TaskData:
    name: str
    kind: str  # "multiple_choice", "cloze" (lambada) or "generation" (gsm8k)
    items: list[Item]
    files: list[str]
    sha256: str
    note: str = ""


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    path = explicit or os.environ.get("COMPRESSLM_DATA")
    if not path:
        raise DataError("task data needs a data directory: pass --data-dir DIR or set COMPRESSLM_DATA")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    return root


def _find(root: Path, task: str, candidates: list[str]) -> Path:
    """The first candidate file found, under our folder name or under lm-evaluation-harness's name for it."""
    others = [alias for alias, name in ALIASES.items() if name == task]
    tried = [*candidates, *(f"{alias}/{c.partition('/')[2]}" for alias in others for c in candidates if "/" in c)]
    for relative in tried:
        if (root / relative).is_file():
            return root / relative
    raise DataError(f"{task}: none of {', '.join(tried)} found under {root}")


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    with path.open(encoding="utf-8") as handle:
        return read_jsonl(handle, str(path))


def _labels(path: Path, count: int) -> list[int]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != count:
        raise DataError(f"{path}: {len(lines)} labels for {count} examples")
    try:
        return [int(line) for line in lines]
    except ValueError as exc:
        raise DataError(f"{path}: labels must be integers ({exc})") from None


def _field(path: Path, number: int, row: dict, *keys: str):
    value = row
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            raise DataError(f"{path}, line {number}: missing field '{'.'.join(keys)}'")
        value = value[key]
    return value


def _arc_like(path: Path) -> list[Item]:
    """ARC and OpenBookQA: {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}."""
    items = []
    for number, row in _jsonl(path):
        stem = _field(path, number, row, "question", "stem")
        choices = _field(path, number, row, "question", "choices")
        labels = [str(c.get("label")) for c in choices]
        key = str(_field(path, number, row, "answerKey"))
        if key not in labels:
            raise DataError(f"{path}, line {number}: answerKey {key!r} is not one of the choice labels {labels}")
        items.append(Item(f"Question: {stem}\nAnswer:", [f" {c['text']}" for c in choices], labels.index(key),
                          id=str(row.get("id", number))))  # fmt: skip
    return items


def _openbookqa(path: Path) -> list[Item]:
    items = _arc_like(path)
    for item in items:  # lm-eval's openbookqa uses the bare question stem as context
        item.context = item.context.removeprefix("Question: ").removesuffix("\nAnswer:")
    return items


def _piqa(path: Path) -> list[Item]:
    rows = _jsonl(path)
    labels = _labels(path.with_name(path.stem + "-labels.lst"), len(rows))
    return [Item(f"Question: {_field(path, n, r, 'goal')}\nAnswer:",
                 [f" {_field(path, n, r, 'sol1')}", f" {_field(path, n, r, 'sol2')}"], label, id=str(n))
            for (n, r), label in zip(rows, labels, strict=True)]  # fmt: skip


def _hellaswag(path: Path) -> list[Item]:
    """llama.cpp's text format: per task a context line, the label line, then four ending lines."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings per task)")
    items = []
    for start in range(0, len(lines), 6):
        label = lines[start + 1].strip()
        if label not in {"0", "1", "2", "3"}:
            raise DataError(f"{path}, line {start + 2}: label must be 0-3, got {label!r}")
        items.append(Item(lines[start], [f" {e}" for e in lines[start + 2 : start + 6]], int(label), id=str(start + 1)))
    return items


def _winogrande(path: Path) -> list[Item]:
    """Partial scoring: the option fills the blank in the context; only the text after it is scored."""
    rows = _jsonl(path)
    labels_path = path.with_name(path.stem + "-labels.lst")
    labels = _labels(labels_path, len(rows)) if labels_path.exists() else None
    items = []
    for index, (number, row) in enumerate(rows):
        sentence = _field(path, number, row, "sentence")
        if sentence.count("_") != 1:
            raise DataError(f"{path}, line {number}: the sentence must contain exactly one blank '_'")
        before, after = sentence.split("_")
        answer = labels[index] if labels else int(_field(path, number, row, "answer"))
        options = [_field(path, number, row, "option1"), _field(path, number, row, "option2")]
        if answer not in (1, 2):
            raise DataError(f"{path}, line {number}: the answer must be 1 or 2, got {answer}")
        rest = " " + after.strip()
        items.append(Item("", [rest, rest], answer - 1, id=str(number), contexts=[before + o for o in options]))
    return items


def _boolq(path: Path) -> list[Item]:
    items = []
    for number, row in _jsonl(path):
        label = row.get("label", row.get("answer"))  # SuperGLUE: "true"/"false" (or 1/0); original: true/false
        label = {"true": True, "false": False, 1: True, 0: False}.get(label, label)
        if not isinstance(label, bool):
            raise DataError(f"{path}, line {number}: expected a 'label' (true/false) or a boolean 'answer'")
        context = f"{_field(path, number, row, 'passage')}\nQuestion: {_field(path, number, row, 'question')}?\nAnswer:"
        items.append(Item(context, [" no", " yes"], int(label), id=str(number)))
    return items


def _lambada(path: Path) -> list[Item]:
    items = []
    for number, row in _jsonl(path):
        text = _field(path, number, row, "text")
        context, _, word = text.rstrip().rpartition(" ")
        if not context or not word:
            raise DataError(f"{path}, line {number}: the text needs a context and a last word")
        items.append(Item(context, answer=" " + word, id=str(number)))
    return items


def _mmlu_rows(path: Path) -> list[tuple[str, list[str], int]]:
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        for number, record in enumerate(csv.reader(handle), start=1):
            if len(record) != 6 or record[5].strip() not in "ABCD" or not record[5].strip():
                raise DataError(f"{path}, line {number}: expected question, 4 choices and an answer letter A-D")
            rows.append((record[0], record[1:5], "ABCD".index(record[5].strip())))
    return rows


def _mmlu_block(question: str, choices: list[str]) -> str:
    return (
        question.strip() + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices, strict=True)) + "\nAnswer:"
    )


def mmlu_items(root: Path, shots: int) -> tuple[list[Item], list[Path]]:
    """Every subject's eval split (test, else val) with `shots` examples from its dev split."""
    base = root / "mmlu"
    split = next((s for s in ("test", "val") if (base / s).is_dir()), None)
    if split is None:
        raise DataError(f"mmlu: neither {base / 'test'} nor {base / 'val'} found")
    items, files = [], []
    for path in sorted((base / split).glob(f"*_{split}.csv")):
        subject = path.name.removesuffix(f"_{split}.csv")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if shots:
            dev = base / "dev" / f"{subject}_dev.csv"
            if not dev.exists():
                raise DataError(f"mmlu: {shots}-shot needs {dev}")
            files.append(dev)
            examples = _mmlu_rows(dev)[:shots]
            header += "".join(f"{_mmlu_block(q, c)} {'ABCD'[a]}\n\n" for q, c, a in examples)
        files.append(path)
        for number, (question, choices, answer) in enumerate(_mmlu_rows(path), start=1):
            items.append(Item(header + _mmlu_block(question, choices), [" A", " B", " C", " D"], answer,
                              id=f"{subject}:{number}"))  # fmt: skip
    if not items:
        raise DataError(f"mmlu: no *_{split}.csv files in {base / split}")
    return items, files


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gsm8k_answer(text: str) -> str | None:
    """The final number: after '####' when present, else the last number in the text."""
    tail = text.split("####")[-1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    return value.replace(",", "").rstrip(".").removesuffix(".0") or None


def gsm8k_items(root: Path, shots: int) -> tuple[list[Item], list[Path]]:
    test = _find(root, "gsm8k", ["gsm8k/test.jsonl"])
    files = [test]
    prefix = ""
    if shots:
        train = _find(root, "gsm8k", ["gsm8k/train.jsonl"])
        files.append(train)
        for number, row in _jsonl(train)[:shots]:
            question, answer = _field(train, number, row, "question"), _field(train, number, row, "answer")
            prefix += f"Question: {question}\nAnswer: {answer}\n\n"
    items = []
    for number, row in _jsonl(test):
        answer = gsm8k_answer(_field(test, number, row, "answer"))
        if answer is None:
            raise DataError(f"{test}, line {number}: the answer has no final number")
        items.append(Item(f"{prefix}Question: {_field(test, number, row, 'question')}\nAnswer:", answer=answer,
                          id=str(number)))  # fmt: skip
    return items, files


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    candidates: list[str]
    loader: Callable[[Path], list[Item]]


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("multiple_choice", ["arc_easy/ARC-Easy-Test.jsonl"], _arc_like),
    "arc_challenge": TaskSpec(
        "multiple_choice",
        ["arc_challenge/ARC-Challenge-Test.jsonl", "samples/arc_challenge_test.head5.jsonl"],
        _arc_like,
    ),
    "piqa": TaskSpec("multiple_choice", ["piqa/valid.jsonl"], _piqa),
    "hellaswag": TaskSpec("multiple_choice", ["hellaswag/hellaswag_val_full.txt"], _hellaswag),
    "winogrande": TaskSpec("multiple_choice", ["winogrande/dev.jsonl"], _winogrande),
    "boolq": TaskSpec("multiple_choice", ["boolq/superglue/val.jsonl", "boolq/dev.jsonl"], _boolq),
    "openbookqa": TaskSpec(
        "multiple_choice", ["openbookqa/test.jsonl", "samples/openbookqa_test.head5.jsonl"], _openbookqa
    ),
    "lambada": TaskSpec("cloze", ["lambada/lambada_test.jsonl", "samples/lambada_openai.head5.jsonl"], _lambada),
}
SPECIAL = ("mmlu", "mmlu_5shot", "gsm8k")
ALL_TASKS = (*TASKS, *SPECIAL)
# lm-evaluation-harness's names for the same data, as its users type them (the others are the same names)
ALIASES = {"lambada_openai": "lambada"}


def canonical_task(name: str) -> str:
    """Our name for a task given by our name or by lm-evaluation-harness's."""
    return ALIASES.get(name, name)


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_task(name: str, root: str | os.PathLike | None = None, gsm8k_shots: int = 8) -> TaskData:
    """Load task `name` (see ALL_TASKS, or lm-evaluation-harness's name, see ALIASES) from the data directory."""
    name = canonical_task(name)
    base = data_dir(root)
    if name in TASKS:
        spec = TASKS[name]
        path = _find(base, name, spec.candidates)
        items = spec.loader(path)
        note = "a 5-row format sample: the full file is not in this data directory" if "samples/" in str(path) else ""
        return TaskData(name, spec.kind, items, [str(path)], _sha256([path]), note)
    if name in ("mmlu", "mmlu_5shot"):
        items, files = mmlu_items(base, 5 if name == "mmlu_5shot" else 0)
        return TaskData(name, "multiple_choice", items, [str(f) for f in files], _sha256(files))
    if name == "gsm8k":
        items, files = gsm8k_items(base, gsm8k_shots)
        return TaskData(name, "generation", items, [str(f) for f in files], _sha256(files))
    raise DataError(f"unknown task '{name}'; choose from {', '.join(ALL_TASKS)}")
