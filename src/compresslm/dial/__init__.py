"""The dial: one nested artifact, many budgets, switched without re-compressing.

`compresslm compress MODEL --recipe dial -o ARTIFACT` quantizes every linear once with nested
widths (4 bits are the top of the 8-bit codes, 3 bits have codes of their own; `dial-shared` nests
all three in one code; see `compresslm.quant.nested`) and stores each input channel's calibration
norm. From that artifact:

* `set_budget(lm, bits=3, sparsity=0.5)` switches a loaded model in place (no disk, no calibration);
  `bits` may also map module paths to widths (per-layer budgets, e.g. the budget solver's);
* `materialize(ARTIFACT, OUT, bits=..., sparsity=...)` writes an ordinary container of that setting,
  which reloads to exactly the model `set_budget` gives;
* `compresslm eval ARTIFACT --dial bits=3,sparsity=0.5` evaluates a setting directly;
* `plan_widths(lm, avg_bits)` picks a width per layer for a size between the artifact's widths,
  from the artifact alone (`compresslm dial ARTIFACT --avg-bits 5 -o OUT`, `--dial avg_bits=5`).

Sparse settings at the width of the sparse planes (the `dial` preset's 8 bits): a ratio pruned on
its own (`separate_sparsity`, the preset's 50 and 70 %) is exactly the SparseGPT + GPTQ model a
dedicated run makes; other ratios at or above the nested-sparse plane's lowest level take that
plane's values and keep order, tuned by SparseGPT's sweep for its ratios (`sparse.nested`). Every
other sparse setting comes from one fixed order of the weights (Wanda's score), without weight
updates: expect Wanda's quality there, not SparseGPT's. Within the nested plane, and within the
fixed order, a higher sparsity keeps a subset of the weights a lower one keeps; the separately
pruned ratios each have a mask of their own.

The package: `switch` (settings, in place), `plan` (widths for a size), `materialize` (one setting as
a container). The typed metadata of a dial record is `compressed.DialMeta`; its storage (bit planes,
alternates) is the container's; `runtime.CompressedLinear.dial` switches one layer.
"""

from compresslm.dial.materialize import materialize
from compresslm.dial.plan import apply_setting, plan_widths
from compresslm.dial.switch import DialReport, dial_layers, parse_setting, set_budget

__all__ = ["DialReport", "apply_setting", "dial_layers", "materialize", "parse_setting", "plan_widths", "set_budget"]
