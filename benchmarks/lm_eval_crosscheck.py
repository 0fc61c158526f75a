"""Our task harness against lm-evaluation-harness on the same items of the same model.

The first `--limit` items of ARC-Easy (AI2's test file from the shared data folder) are scored by
compresslm's `arc_easy` and by lm-eval (0.4.x, in its own virtual environment, through
`compresslm lm-eval` with the local task examples/lm-eval/arc_easy_local.yaml, same prompt), on
float32 `smollm2-135m`. Agreement of acc and acc_norm checks our log-likelihood scoring.

    LMEVAL_PYTHON=/work/lmeval-venv/bin/python .venv/bin/python benchmarks/lm_eval_crosscheck.py [--limit 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from results_store import atomic_write

HERE = Path(__file__).parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "lm_eval_crosscheck"
LMEVAL_PYTHON = os.environ.get("LMEVAL_PYTHON", "/work/lmeval-venv/bin/python")


def ours(limit: int, data_dir: str) -> dict:
    from compresslm.eval.harness import evaluate_task
    from compresslm.eval.tasks import load_task
    from compresslm.models.loading import load_model

    task = load_task("arc_easy", data_dir)
    task.items = task.items[:limit]  # the first items, as lm-eval's --limit takes them
    result = evaluate_task(load_model("smollm2-135m"), task, show_progress=False)
    return {"acc": result.metrics["acc"], "acc_norm": result.metrics["acc_norm"], "n": result.n,
            "acc_stderr": result.metrics["acc_stderr"]}  # fmt: skip


def theirs(limit: int, data_dir: str, workdir: Path) -> dict:
    task_dir = workdir / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    yaml = (ROOT / "examples" / "lm-eval" / "arc_easy_local.yaml").read_text()
    data_file = Path(data_dir).resolve() / "arc_easy" / "ARC-Easy-Test.jsonl"
    yaml = yaml.replace("../shared/data/arc_easy/ARC-Easy-Test.jsonl", str(data_file))
    (task_dir / "arc_easy_local.yaml").write_text(yaml)
    cmd = [LMEVAL_PYTHON, "-m", "compresslm.cli", "lm-eval", "smollm2-135m", "--tasks", "arc_easy_local",
           "--include-path", str(task_dir), "--limit", str(limit), "--batch-size", "8", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit("lm-eval run failed")
    metrics = json.loads(proc.stdout)["lm_eval"]["arc_easy_local"]
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "n": limit,
            "acc_stderr": metrics["acc_stderr,none"], "version": json.loads(proc.stdout).get("versions")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        row = {"compresslm": ours(args.limit, args.data_dir), "lm-eval": theirs(args.limit, args.data_dir, Path(tmp))}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS.with_suffix(".json"), json.dumps(row, indent=2) + "\n")
    lines = [
        "# Task harness cross-check: compresslm vs lm-evaluation-harness",
        "",
        f"ARC-Easy test, first {args.limit} items (AI2's file), float32 `smollm2-135m`, same prompt "
        "(`Question: ...\\nAnswer:`, choices with a leading space), log-likelihood scoring.",
        "",
        "| harness | n | acc | acc_norm |",
        "|---|---:|---:|---:|",
    ]
    for name, r in row.items():
        lines.append(f"| {name} | {r['n']} | {r['acc']:.4f} ± {r['acc_stderr']:.4f} | {r['acc_norm']:.4f} |")
    lines += [
        "",
        f"Command: `LMEVAL_PYTHON=... .venv/bin/python benchmarks/lm_eval_crosscheck.py --limit {args.limit}`.",
    ]
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
