"""Bit allocation under a size budget: a multiple-choice knapsack solved by Lagrangian relaxation.

Each layer has options (bits it costs, error it causes). For a price λ on bits, every layer
independently takes the option minimising error + λ·bits; bisection on λ finds the smallest
price whose choice fits the budget. This is optimal for the relaxed problem and, because layers
are many and small against the budget, within one option step of the integer optimum; whatever
budget is left after bisection is then spent greedily on the upgrades that buy the most error
reduction per bit.
"""

from __future__ import annotations

from compresslm.errors import CompressLMError


def _choose(options: dict[str, list[tuple[float, float]]], lam: float) -> dict[str, int]:
    return {name: min(range(len(opts)), key=lambda i: opts[i][1] + lam * opts[i][0]) for name, opts in options.items()}


def _cost(options: dict[str, list[tuple[float, float]]], choice: dict[str, int]) -> float:
    return sum(options[name][i][0] for name, i in choice.items())


def allocate(options: dict[str, list[tuple[float, float]]], budget: float) -> dict[str, int]:
    """Index of the chosen (cost, error) option per layer, with total cost <= budget."""
    cheapest = {name: min(range(len(opts)), key=lambda i: opts[i][0]) for name, opts in options.items()}
    if _cost(options, cheapest) > budget:
        raise CompressLMError(
            f"the budget is below the smallest possible size ({_cost(options, cheapest):,.0f} > {budget:,.0f} bits)"
        )
    lo, hi = 0.0, 1.0
    while _cost(options, _choose(options, hi)) > budget:
        hi *= 2.0
        if hi > 1e30:
            return cheapest
    for _ in range(100):
        mid = (lo + hi) / 2
        if _cost(options, _choose(options, mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = _choose(options, hi)
    spare = budget - _cost(options, choice)
    while True:  # spend what is left on the best error reduction per extra bit
        best, best_gain = None, 0.0
        for name, i in choice.items():
            for j, (cost, error) in enumerate(options[name]):
                extra = cost - options[name][i][0]
                if 0 < extra <= spare and error < options[name][i][1]:
                    gain = (options[name][i][1] - error) / extra
                    if gain > best_gain:
                        best, best_gain = (name, j), gain
        if best is None:
            return choice
        spare -= options[best[0]][best[1]][0] - options[best[0]][choice[best[0]]][0]
        choice[best[0]] = best[1]
