"""Pareto frontiers and the precision-elasticity table, as pure functions of result rows.

A point is on the frontier for (cost, loss) when no other point is at most as costly and at most
as lossy and strictly better in one of the two. Costs: bytes on disk, bits/param, peak memory,
or negated decode speed; losses: ppl, KL divergence, negated task accuracy.
"""

from __future__ import annotations

import math


def pareto(rows: list[dict], cost: str, loss: str) -> list[dict]:
    """The non-dominated rows for (cost, loss), both lower-is-better, sorted by cost."""
    usable = [r for r in rows if _finite(r.get(cost)) and _finite(r.get(loss))]
    front = []
    for row in usable:
        dominated = any(
            other[cost] <= row[cost]
            and other[loss] <= row[loss]
            and (other[cost] < row[cost] or other[loss] < row[loss])
            for other in usable
        )
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda r: (r[cost], r[loss]))


def size_frontier(rows: list[dict]) -> list[dict]:
    """What the terminal and the report list as the frontier: the uncompressed model first (the reference,
    when measured), then the compressed points on the bytes-on-disk vs ppl frontier, largest first."""
    base = [r for r in rows if r.get("family") == "uncompressed"][:1]
    return base + pareto([r for r in rows if r.get("family") != "uncompressed"], "bytes_on_disk", "ppl")[::-1]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def elasticity_table(
    rows: list[dict], budgets: list[float], cost: str = "linear_bits_per_param", loss: str = "ppl"
) -> tuple[list[str], dict[str, dict[float, dict]]]:
    """Per method family (rows) and budget (columns): the best point with cost <= budget.

    Returns (families, cells) where cells[family][budget] is the row chosen (or absent). The
    best cell of each column is the one with the lowest loss.
    """
    families = sorted({r["family"] for r in rows if r["family"] != "uncompressed"})
    cells: dict[str, dict[float, dict]] = {f: {} for f in families}
    for row in rows:
        if row["family"] == "uncompressed" or not (_finite(row.get(cost)) and _finite(row.get(loss))):
            continue
        for budget in budgets:
            if row[cost] <= budget + 1e-9:
                best = cells[row["family"]].get(budget)
                if best is None or row[loss] < best[loss]:
                    cells[row["family"]][budget] = row
    return families, cells
