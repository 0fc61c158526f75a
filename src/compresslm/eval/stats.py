"""Small statistics shared by every metric that carries an error bar."""

from __future__ import annotations

import math


def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean: sample standard deviation (n − 1) over √n; NaN below two values."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1) / n)
