"""Fuzz the readers of files from others: containers, safetensors model directories and GGUF files.

Every case is one damaged or forged file, loaded the way every command loads a model
(`load_model`). A case ends in one of:

* `error`: a one-line CompressLMError (what the CLI prints as `compresslm: error: ...`, exit 2);
* `same model`: it loads and computes the original logits under the original model hash
  (a damaged byte the format does not use, such as an unused metadata field);
* `other model, other hash`: it loads, computes something else, and its model hash says so
  (possible only where the format has no checksums, or for a forged header);
* `same logits, other hash`: it loads and the hash differs, but these probe tokens score the same;
* `SILENT`: it loads and computes something else under the original hash: a silently different model;
* `TRACEBACK`: any other exception, from the load or from a forward pass of what it loaded;
* `WROTE OUTSIDE`: a file appeared in a watched folder (the working directory, TMPDIR, HF_HOME,
  the cache, the folder holding the fuzzed file) and stayed after the case.

The goal is 0 SILENT, 0 TRACEBACK, 0 WROTE OUTSIDE. Cases, per part:

* `container`: three tiny-model containers (2:4 SparseGPT + W4 GPTQ + 8-bit embeddings + a KV
  cache stage; W8A8 SmoothQuant with static activation scales; a 3/4/8-bit dial artifact): every
  byte before the blob area flipped in turn, seeded random multi-byte mutations of header and
  blobs, truncations at every blob boundary (and one byte either side);
* `forged`: headers rewritten field by field with hostile values and a *valid* header checksum,
  as an attacker who knows the format would; plus a sample run through the real CLI (`info`) to
  check the one-line error and exit status 2;
* `safetensors`: a tiny model's HF directory with its model.safetensors mutated and truncated;
* `gguf`: the reference model's GGUF (98 MB, about 14 s a load) mutated in its metadata and
  tensor-data regions and truncated; fewer cases.

Run: `.venv/bin/python benchmarks/fuzz_container.py [--part container|forged|safetensors|gguf]`
(all parts by default; each part's row is recorded when it finishes, a rerun skips finished parts
unless --force). Output: benchmarks/results/fuzz_container.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from results_store import add_row, load_rows

RESULTS = Path(__file__).resolve().parent / "results" / "fuzz_container.json"
PARTS = ("container", "forged", "safetensors", "gguf")
CONTAINER_RECIPES = ("2:4-sparsegpt+w4-g16-gptq+emb8+kv4-g16", "w8a8-smoothquant-static", "dial-g16")


def _setup_environment(root: Path) -> dict[str, Path]:
    """Point every place a library might write at folders we watch; return them."""
    watched = {name: root / name for name in ("tmp", "hf_home", "cache", "cwd")}
    for path in watched.values():
        path.mkdir(parents=True, exist_ok=True)
    os.environ.update(TMPDIR=str(watched["tmp"]), HF_HOME=str(watched["hf_home"]), HF_HUB_OFFLINE="1",
                      COMPRESSLM_CACHE=str(watched["cache"]))  # fmt: skip
    tempfile.tempdir = str(watched["tmp"])
    os.chdir(watched["cwd"])
    return watched


def _snapshot(folders: list[Path]) -> set[str]:
    return {str(p) for folder in folders for p in folder.rglob("*")}


OUTCOMES = {(True, True): "same model", (False, False): "other model, other hash",
            (True, False): "same logits, other hash", (False, True): "SILENT"}  # fmt: skip


class Fuzzer:
    """Runs cases against one original file and tallies the outcomes."""

    def __init__(self, original_lm, watched: list[Path], probe_ids):
        self.reference_logits = _logits(original_lm, probe_ids)
        self.reference_hash = original_lm.fingerprint()
        self.probe_ids = probe_ids
        self.watched = watched
        self.outcomes: Counter = Counter()
        self.by_kind: dict[str, Counter] = {}
        self.messages: Counter = Counter()
        self.problems: list[dict] = []

    def case(self, kind: str, path: Path, what: str) -> str:
        from compresslm.errors import CompressLMError
        from compresslm.models.loading import load_model

        before = _snapshot(self.watched)
        try:
            lm = load_model(path, cache=False)
            logits = _logits(lm, self.probe_ids)
            same_logits = bool((logits == self.reference_logits).all()) if logits.shape == self.reference_logits.shape \
                else False  # fmt: skip
            same_hash = lm.fingerprint() == self.reference_hash
            outcome = OUTCOMES[(same_logits, same_hash)]
            del lm
        except CompressLMError as exc:
            outcome = "error"
            text = str(exc)
            if "\n" in text:
                outcome = "TRACEBACK"  # not one line: counted as a failure of the one-line rule
            self.messages[_message_class(text)] += 1
        except Exception:  # counting these is the point
            outcome = "TRACEBACK"
            self.problems.append({"kind": kind, "case": what, "traceback": traceback.format_exc()[-1500:]})
        new = _snapshot(self.watched) - before
        if new:
            outcome = "WROTE OUTSIDE"
            self.problems.append({"kind": kind, "case": what, "new_files": sorted(new)[:5]})
        if outcome == "SILENT":
            self.problems.append({"kind": kind, "case": what, "problem": "different logits under the same hash"})
        self.outcomes[outcome] += 1
        self.by_kind.setdefault(kind, Counter())[outcome] += 1
        return outcome


def _logits(lm, ids):
    import torch

    with torch.inference_mode():
        return lm.model(input_ids=ids.to(lm.device)).logits.float()


def _message_class(text: str) -> str:
    """A message with its paths and numbers stripped, to count the kinds of errors seen."""
    import re

    text = re.sub(r"/\S+", "FILE", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\d+", "N", text)
    return text[:110]


def _tiny_source(root: Path) -> Path:
    from compresslm.models.loading import save_model
    from compresslm.models.tiny import byte_tokenizer, tiny_model

    return save_model(tiny_model("llama"), byte_tokenizer(), root / "tiny-llama")


def _make_containers(root: Path) -> list[Path]:
    from compresslm.api import compress
    from compresslm.models.loading import load_model
    from compresslm.recipe import load_recipe

    paths = []
    source = _tiny_source(root)
    for i, name in enumerate(CONTAINER_RECIPES):
        recipe = load_recipe(name)
        recipe.calibration.samples, recipe.calibration.length, recipe.calibration.source = 4, 32, "wikitext2"
        path = root / f"c{i}.clm"
        compress(load_model(source), recipe, path, show_progress=False)
        paths.append(path)
    return paths


def part_container(root: Path, watched: list[Path], seed: int, mutations: int) -> dict:
    from compresslm.formats.container import read_header
    from compresslm.formats.header_check import align
    from compresslm.models.assemble import load_compressed

    rng = random.Random(seed)
    totals = Counter()
    details = {}
    for path in _make_containers(root / "made"):
        original = path.read_bytes()
        header, start = read_header(path)
        fuzzer = Fuzzer(load_compressed(path), [*watched, path.parent], _probe_ids())
        work = path.parent / "case.clm"

        def run(kind: str, data: bytes, what: str, fuzzer=fuzzer, work=work) -> None:
            work.write_bytes(data)
            fuzzer.case(kind, work, what)

        for i in range(start):  # every byte before the blob area: magic, length, checksum, header, padding
            data = bytearray(original)
            data[i] ^= 1 << rng.randrange(8)
            run("header byte flipped", bytes(data), f"byte {i}")
        for n in range(mutations):
            data = bytearray(original)
            region = (0, start) if n % 2 == 0 else (start, len(original))
            for _ in range(rng.randint(2, 16)):
                at = rng.randrange(*region)
                data[at] = rng.randrange(256)
            if n % 10 == 9:  # insert or delete a few bytes somewhere
                at = rng.randrange(len(data))
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9))) if n % 20 == 9 else b""
                if n % 20 == 19:
                    del data[at : at + rng.randint(1, 9)]
            run("header mutated" if n % 2 == 0 else "blobs mutated", bytes(data), f"mutation {n}")
        ends = sorted({start + align(b["offset"] + b["nbytes"]) for b in header["blobs"].values()}
                      | {start + b["offset"] for b in header["blobs"].values()})  # fmt: skip
        for end in ends:
            for cut in (end - 1, end, end + 1):
                if 0 < cut < len(original):
                    run("truncated", original[:cut], f"cut at {cut}")
        work.unlink(missing_ok=True)
        details[path.name] = {"header_bytes": start, "file_bytes": len(original), "blobs": len(header["blobs"]),
                              "outcomes": dict(fuzzer.outcomes),
                              "by_kind": {k: dict(v) for k, v in fuzzer.by_kind.items()},
                              "problems": fuzzer.problems[:10],
                              "messages": dict(fuzzer.messages.most_common(12))}  # fmt: skip
        totals.update(fuzzer.outcomes)
    return {"outcomes": dict(totals), "containers": details, "recipes": list(CONTAINER_RECIPES)}


_HOSTILE = [
    0,
    -1,
    1,
    3,
    7,
    17,
    2**31,
    2**63,
    -(2**40),
    1e308,
    -0.5,
    0.25,
    "",
    "x",
    "float17",
    "u9",
    "../../x",
    "/tmp/abs-path",
    None,
    True,
    False,
    [],
    {},
    [1, 2],
    [[]],
    {"a": 1},
    "model.layers.0.mlp.up_proj.weight",
]


def _paths(value, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def _forge(header: dict, rng: random.Random) -> tuple[dict, str]:
    """One hostile edit of a header: replace, delete or add a field somewhere in the tree."""
    import copy

    forged = copy.deepcopy(header)
    paths = [p for p, _ in _paths(forged) if p]
    path = rng.choice(paths)
    parent = forged
    for key in path[:-1]:
        parent = parent[key]
    action = rng.random()
    if action < 0.75:
        value = rng.choice(_HOSTILE)
        if isinstance(parent[path[-1]], (int, float)) and not isinstance(parent[path[-1]], bool) and rng.random() < 0.5:
            value = parent[path[-1]] + rng.choice([-1, 1, 2, 64, -64])  # a near miss is the hardest to see
        parent[path[-1]] = value
        what = f"set {'/'.join(map(str, path))} = {value!r}"[:160]
    elif action < 0.9 and isinstance(parent, dict):
        del parent[path[-1]]
        what = f"delete {'/'.join(map(str, path))}"
    else:
        if isinstance(parent, dict):
            parent[rng.choice(["../evil", "extra", "model.evil.weight"])] = rng.choice(_HOSTILE)
        elif isinstance(parent, list):
            parent.append(rng.choice(_HOSTILE))
        what = f"add beside {'/'.join(map(str, path))}"
    return forged, what


def part_forged(root: Path, watched: list[Path], seed: int, cases: int, cli_cases: int) -> dict:
    from compresslm.formats.container import encode_header, read_header
    from compresslm.models.assemble import load_compressed

    rng = random.Random(seed)
    totals, details = Counter(), {}
    cli = Counter()
    cli_problems = []
    for path in _make_containers(root / "made"):
        header, start = read_header(path)
        blob_area = path.read_bytes()[start:]
        fuzzer = Fuzzer(load_compressed(path), [*watched, path.parent], _probe_ids())
        work = path.parent / "forged.clm"
        for _ in range(cases):
            forged, what = _forge(header, rng)
            try:
                prefix = encode_header(forged)
            except (TypeError, ValueError):  # not JSON-able (cannot happen with _HOSTILE, kept for safety)
                continue
            work.write_bytes(prefix + blob_area)
            outcome = fuzzer.case("forged header", work, what)
            if outcome == "error" and cli[path.name] < cli_cases and rng.random() < 0.1:
                cli[path.name] += 1
                run = subprocess.run([sys.executable, "-m", "compresslm.cli", "info", str(work)], capture_output=True,
                                     text=True, check=False)  # fmt: skip
                lines = [line for line in run.stderr.splitlines() if line.strip()]
                if run.returncode != 2 or len(lines) != 1 or not lines[0].startswith("compresslm: error:"):
                    cli_problems.append({"case": what, "exit": run.returncode, "stderr": run.stderr[-800:]})
        work.unlink(missing_ok=True)
        details[path.name] = {"outcomes": dict(fuzzer.outcomes), "problems": fuzzer.problems[:10],
                              "messages": dict(fuzzer.messages.most_common(12))}  # fmt: skip
        totals.update(fuzzer.outcomes)
    return {"outcomes": dict(totals), "containers": details, "cli_checked": sum(cli.values()),
            "cli_problems": cli_problems}  # fmt: skip


def part_safetensors(root: Path, watched: list[Path], seed: int, mutations: int) -> dict:
    import shutil
    import struct

    from compresslm.models.loading import load_model

    rng = random.Random(seed)
    source = _tiny_source(root / "made")
    weights = source / "model.safetensors"
    original = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", original[:8])
    fuzzer = Fuzzer(load_model(source), watched, _probe_ids())
    work = root / "made" / "case"
    shutil.copytree(source, work)
    target = work / "model.safetensors"
    for n in range(mutations):
        data = bytearray(original)
        region = (0, 8 + header_len) if n % 2 == 0 else (8 + header_len, len(original))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(*region)] = rng.randrange(256)
        target.write_bytes(bytes(data))
        fuzzer.case("header mutated" if n % 2 == 0 else "data mutated", work, f"mutation {n}")
    for cut in sorted({rng.randrange(len(original)) for _ in range(40)} | {7, 8, 8 + header_len - 1, 8 + header_len}):
        target.write_bytes(original[:cut])
        fuzzer.case("truncated", work, f"cut at {cut}")
    shutil.rmtree(work)
    return {"outcomes": dict(fuzzer.outcomes), "by_kind": {k: dict(v) for k, v in fuzzer.by_kind.items()},
            "problems": fuzzer.problems[:10], "messages": dict(fuzzer.messages.most_common(12)),
            "file_bytes": len(original), "header_bytes": 8 + header_len}  # fmt: skip


def part_gguf(root: Path, watched: list[Path], seed: int, mutations: int) -> dict:
    from gguf import GGUFReader

    from compresslm.models import registry
    from compresslm.models.loading import load_model

    rng = random.Random(seed)
    source = registry.lookup("smollm2-135m").path()
    original = source.read_bytes()
    data_start = GGUFReader(str(source)).data_offset
    fuzzer = Fuzzer(load_model(source, cache=False), watched, _probe_ids(vocab=49152))
    work = root / "made" / "case.gguf"
    work.parent.mkdir(parents=True, exist_ok=True)
    for n in range(mutations):
        data = bytearray(original)
        region = (0, data_start) if n % 3 else (data_start, len(original))  # two in three in the metadata
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(*region)] = rng.randrange(256)
        work.write_bytes(bytes(data))
        fuzzer.case("metadata mutated" if n % 3 else "tensor data mutated", work, f"mutation {n}")
        print(f"  gguf case {n + 1}/{mutations}: {dict(fuzzer.outcomes)}", file=sys.stderr, flush=True)
    for cut in (16, data_start // 2, data_start, len(original) - 1):
        work.write_bytes(original[:cut])
        fuzzer.case("truncated", work, f"cut at {cut}")
    work.unlink(missing_ok=True)
    return {"outcomes": dict(fuzzer.outcomes), "by_kind": {k: dict(v) for k, v in fuzzer.by_kind.items()},
            "problems": fuzzer.problems[:10], "messages": dict(fuzzer.messages.most_common(12)),
            "file_bytes": len(original), "metadata_bytes": data_start}  # fmt: skip


def _probe_ids(vocab: int = 259):
    import torch

    return torch.randint(3, vocab, (1, 24), generator=torch.Generator().manual_seed(0))


def _environment() -> dict:
    import torch
    import transformers

    from compresslm import __version__

    commit = subprocess.run(["git", "-C", str(RESULTS.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()  # fmt: skip
    return {"compresslm": __version__, "commit": commit, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "torch_threads": torch.get_num_threads()}  # fmt: skip


BAD = ("SILENT", "TRACEBACK", "WROTE OUTSIDE")
COLUMNS = ("error", "same model", "same logits, other hash", "other model, other hash", *BAD)


def write_markdown(rows: dict, path: Path) -> None:
    lines = ["# Fuzzing the readers of untrusted files", "",
             "Made by `.venv/bin/python benchmarks/fuzz_container.py` (see its docstring for the cases and what",
             "each outcome means). Goal: 0 in the last three columns.", "",
             "| part | cases | " + " | ".join(COLUMNS) + " | seconds |",
             "|---|---:|" + "---:|" * len(COLUMNS) + "---:|"]  # fmt: skip
    for part in PARTS:
        if part not in rows:
            continue
        row = rows[part]
        counts = row["outcomes"]
        cells = " | ".join(str(counts.get(c, 0)) for c in COLUMNS)
        lines.append(f"| {part} | {sum(counts.values())} | {cells} | {row['seconds']:.0f} |")
    lines += ["", "Per container and kind of damage:", ""]
    for part in ("container", "forged"):
        for name, detail in rows.get(part, {}).get("containers", {}).items():
            kinds = detail.get("by_kind") or {"forged header": detail["outcomes"]}
            for kind, counts in kinds.items():
                recipe = CONTAINER_RECIPES[int(name[1])]
                tally = ", ".join(f"{k} {v}" for k, v in counts.items())
                lines.append(f"- {part} `{recipe}` ({name}), {kind}: {tally}")
    if "forged" in rows:
        forged = rows["forged"]
        lines += ["", f"Forged cases also run through `compresslm info` in a fresh process: {forged['cli_checked']}; "
                      f"not one line with exit 2: {len(forged['cli_problems'])}."]  # fmt: skip
    for part in ("safetensors", "gguf"):
        if part in rows:
            kinds = rows[part]["by_kind"]
            lines.append(f"- {part}: " + "; ".join(f"{k}: " + ", ".join(f"{o} {n}" for o, n in c.items())
                                                   for k, c in kinds.items()))  # fmt: skip
    lines += ["", "Notes:", "",
              "- `other model, other hash` in the safetensors and GGUF parts: those formats carry no checksums, so a",
              "  changed weight loads as a different model; compresslm's model hash (weights, config, activation",
              "  grids) changes with it, so the difference is never silent. A container refuses the same damage.",
              "- `same model`: the damage hit bytes the loader does not use (metadata it does not read).",
              "- A forged container header (valid checksum) that loads is a different but well-formed model; its",
              "  hash differs whenever its logits do. The tokenizer is not part of the hash.", ""]  # fmt: skip
    first = next(iter(rows.values()))
    env = first["environment"]
    runs: dict[tuple, list[str]] = {}  # parts may be rerun on their own: name each part's commit and date
    for part, row in rows.items():
        runs.setdefault((row["environment"]["commit"], row["date"]), []).append(part)
    when = "; ".join(f"{', '.join(parts)} at {commit} on {date}" for (commit, date), parts in runs.items())
    lines.append(f"Machine: {env['machine']}; torch {env['torch']}, transformers {env['transformers']}, "
                 f"Python {env['python']}, compresslm {env['compresslm']}. Runs: {when}; "
                 "one torch thread, nothing else running.")  # fmt: skip
    problems = [p for row in rows.values() for p in row.get("problems", [])]
    problems += [p for row in rows.values() for d in row.get("containers", {}).values() for p in d.get("problems", [])]
    if problems:
        lines += ["", "## Problems found", ""]
        for p in problems[:20]:
            last = p["traceback"].strip().splitlines()[-1] if "traceback" in p else json.dumps(p)[:300]
            lines.append(f"- {p['kind']}, {p['case']}: {last}")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS, action="append", help="parts to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mutations", type=int, default=1500, help="random mutations per container (default 1500)")
    parser.add_argument("--forged", type=int, default=700, help="forged headers per container (default 700)")
    parser.add_argument("--safetensors", type=int, default=400, help="safetensors mutations (default 400)")
    parser.add_argument("--gguf", type=int, default=24, help="GGUF mutations (default 24)")
    parser.add_argument("--force", action="store_true", help="rerun parts already recorded")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON results file (default: the published one)")
    args = parser.parse_args()
    results = args.results.resolve()
    if args.report:
        write_markdown(load_rows(results), results.with_suffix(".md"))
        return 0

    import torch

    torch.set_num_threads(1)
    done = load_rows(results)
    with tempfile.TemporaryDirectory(prefix="compresslm-fuzz-") as tmp:
        root = Path(tmp)
        watched_map = _setup_environment(root)
        watched = list(watched_map.values())
        for part in args.part or PARTS:
            if part in done and not args.force:
                print(f"{part}: recorded already (--force reruns it)", file=sys.stderr)
                continue
            started = time.perf_counter()
            print(f"{part}: running", file=sys.stderr, flush=True)
            if part == "container":
                row = part_container(root / part, watched, args.seed, args.mutations)
            elif part == "forged":
                row = part_forged(root / part, watched, args.seed, args.forged, cli_cases=10)
            elif part == "safetensors":
                row = part_safetensors(root / part, watched, args.seed, args.safetensors)
            else:
                row = part_gguf(root / part, watched, args.seed, args.gguf)
            row.update(seconds=time.perf_counter() - started, environment=_environment(), seed=args.seed,
                       date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv))  # fmt: skip
            done = add_row(results, part, row)
            print(f"{part}: {row['outcomes']} in {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    write_markdown(load_rows(results), results.with_suffix(".md"))
    bad = sum(row["outcomes"].get(k, 0) for row in load_rows(results).values() for k in BAD)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
