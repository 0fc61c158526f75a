"""The conformance matrix in CI: every family x method cell on a tiny model (see compresslm.conformance)."""

from __future__ import annotations

import pytest

from compresslm.conformance import KNOWN_UNSUPPORTED, METHODS, markdown, run_cell
from compresslm.models.tiny import CONFORMANCE_FAMILIES


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", CONFORMANCE_FAMILIES)
def test_cell(family, method, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSLM_CACHE", str(tmp_path / "cache"))
    cell = run_cell(family, method, tmp_path)
    known = KNOWN_UNSUPPORTED.get((family, method))
    if known is None:
        assert cell.status == "ok", cell.detail
    else:  # refused with its reason, not broken
        assert cell.status == "unsupported" and known in cell.detail, cell.detail


def test_the_guide_table_is_the_matrix():
    """The guide's family table is `python -m compresslm.conformance`'s output (regenerate it when cells change)."""
    from pathlib import Path

    from compresslm.conformance import Cell

    cells = [Cell(f, m, "unsupported" if (f, m) in KNOWN_UNSUPPORTED else "ok", KNOWN_UNSUPPORTED.get((f, m), ""), 0.0)
             for f in CONFORMANCE_FAMILIES for m in METHODS]  # fmt: skip
    table = markdown(cells).split("\n\n")[0]
    guide = (Path(__file__).parents[1] / "docs" / "guide" / "models.md").read_text()
    assert table in guide
