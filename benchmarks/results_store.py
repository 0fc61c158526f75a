"""Resumable benchmark results: finished points live in a JSON file rewritten atomically after each.

Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this folder is on
sys.path): a killed run leaves either the previous file or the new one, never half of one, and the
next run skips every point already there. Two queues may share one file: `add_row` merges under
a lock, so neither overwrites the other's rows.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def load_rows(path: Path) -> dict:
    """The finished points recorded so far (none if the file does not exist yet)."""
    return json.loads(path.read_text()) if path.exists() else {}


def save_rows(path: Path, rows: dict) -> None:
    atomic_write(path, json.dumps(rows, indent=2) + "\n")


def add_row(path: Path, name: str, row: dict) -> dict:
    """Record one finished point, keeping rows another process wrote meanwhile; returns all rows."""
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = load_rows(path)
        rows[name] = row
        save_rows(path, rows)
    return rows
