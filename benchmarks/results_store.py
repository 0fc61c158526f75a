"""Resumable benchmark results: finished points live in a JSON file rewritten atomically after each.

Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this folder is on
sys.path): a killed run leaves either the previous file or the new one, never half of one, and the
next run skips every point already there.
"""

from __future__ import annotations

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
