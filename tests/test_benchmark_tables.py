"""Every published table regenerates byte for byte from its committed JSON and the command that made it.

Each script runs with `--report` (rewrite the markdown from the JSON, measure nothing) in a copy of
`benchmarks/`, with the arguments its table names as its command; the rewritten markdown must equal
the committed one. A change to a table writer, a results file or a shared helper that would change a
published table fails here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIAL_ARTIFACT = "/work/sweep-full/containers/dial-ef33fe8ca178.clm"  # named in the table's command; not read

TABLES = {
    "quant_table": ["quant_table.py", "--points", "w3-g64-gptq+lqer8", "w4-g64-gptq+lqer8", "w2-g64-gptq+lqer8"],
    "quant_table_full": ["quant_table.py", "--limit", "148", "--results", "benchmarks/results/quant_table_full",
                         "--plans-from", "benchmarks/results/quant_table.json", "--points", "none",
                         "w4-g64-gptq-awq@4.6"],
    "prune_table": ["prune_table.py"],
    "dial_switch_cpu": ["dial_table.py", "--points", "switch", "--artifact", DIAL_ARTIFACT, "--results",
                        "benchmarks/results/dial_switch_cpu"],
    "eval_suite": ["eval_suite.py"],
    "kv_table": ["kv_table.py"],
    "train_table": ["train_table.py"],
    "fuzz_container": ["fuzz_container.py"],
    "families": ["families.py"],
    "lowrank_table": ["lowrank_table.py"],
}  # fmt: skip


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tables")
    shutil.copytree(ROOT / "benchmarks", root / "benchmarks")
    return root


@pytest.mark.parametrize("table", TABLES)
def test_a_published_table_regenerates_from_its_json(table, copy):
    script, *args = TABLES[table]
    written = copy / "benchmarks" / "results" / f"{table}.md"
    written.unlink()  # the table must be written anew, not left in place
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--report", *args], cwd=copy, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert written.read_text() == (ROOT / "benchmarks" / "results" / f"{table}.md").read_text()
