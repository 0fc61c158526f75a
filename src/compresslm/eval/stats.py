"""Small statistics shared by every metric: error bars, and the rule that a metric is a finite number."""

from __future__ import annotations

import math

from compresslm.errors import ProtocolError


def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean: sample standard deviation (n − 1) over √n; NaN below two values."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1) / n)


def check_metric(name: str, value: float, window_values: list[float] | None = None) -> None:
    """A non-finite measurement is an error, never a number: say which window went wrong first."""
    if math.isfinite(value):
        return
    where = ""
    if window_values:
        first = next((i for i, v in enumerate(window_values) if not math.isfinite(v)), None)
        where = f" (first at window {first})" if first is not None else ""
    raise ProtocolError(f"{name} is not finite ({value}){where}: the model produces NaN or infinite logits")
