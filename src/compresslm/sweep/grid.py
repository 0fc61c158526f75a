"""Sweep grids: which compression settings to measure, and under which protocol, as validated data.

A grid is YAML (or a dict, or a built-in name: `smoke`, `default`, `full`):

```yaml
name: my-grid
protocol:                       # how every point is measured
  ppl: {corpus: wikitext2, ctx: 2048, limit: 40}
  kld: true                     # KL to the uncompressed model on the same windows
  tasks: [arc_easy, piqa]       # optional; needs a data directory
  task_limit: 500
  speed: false
calibration: {source: c4, samples: 128, length: 512, seed: 0}   # default for every point
points:                         # preset names, or mappings with a label, recipe and calibration
  - none                        # the uncompressed model (the reference line)
  - w4-g64-rtn
  - {label: w4-gptq-32win, recipe: w4-g64-gptq, calibration: {samples: 32}}
  - {label: budget-3.5, recipe: w4-g64-gptq, target_bits: 3.5}   # the budget solver picks per-layer widths
  - {label: budget-3.5-dense, recipe: w4-g64-gptq, target_bits: 3.5, budget_sparsity: []}   # ... and no pruning
  - {label: dial-3, recipe: dial, dial: "bits=3"}   # one setting of a dial artifact (built once per recipe)
  - {label: student-w4, recipe: w4-g64-gptq, model: students/healed}   # starts from another model (same tokenizer)
product:                        # optional: every combination of the axes, formatted into `recipe`
  recipe: "w{bits}-g{group}-{method}"
  bits: [4, 3]
  group: [64, 128]
  method: [rtn, gptq]
```

Everything is checked before any compute: unknown fields, recipes that do not parse, duplicate
labels. Calibration settings are a sweep axis like any other (samples, length, source, seed).
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from compresslm.errors import CompressLMError
from compresslm.recipe import CalibrationSettings, Recipe, RecipeError, load_recipe
from compresslm.sparse.masks import SparsityPattern

BASELINE = "none"


class GridError(CompressLMError):
    """A sweep grid that is malformed or names impossible settings."""


@dataclass
class Protocol:
    corpus: str = "wikitext2"
    ctx: int = 2048
    limit: int | None = 40
    kld: bool = True
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    speed: bool = False

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class SweepPoint:
    label: str
    recipe: Recipe | None  # None: the uncompressed model
    target_bits: float | None = None  # the budget solver chooses per-layer widths for this file size
    dial: dict | None = None  # a setting ({"bits": 3, "sparsity": 0.5}) of the dial artifact `recipe` makes
    budget_sparsity: list[str] | None = None  # the patterns the budget solver may use; None: its default
    model: str | None = None  # another model to start from (a pruned and healed student); None: the sweep's
    model_sha: str | None = None  # that model's fingerprint, set by the runner once it has loaded it

    @property
    def key(self) -> str:
        """What makes two points the same measurement (label aside), versioned: `Recipe.key` (the fields
        that differ from their defaults), the budget target or the dial setting."""
        key: dict = {"key_version": KEY_VERSION, "recipe": self.recipe.key() if self.recipe else None}
        if self.target_bits:
            key["target_bits"] = self.target_bits
            if self.budget_sparsity is not None:
                key["budget_sparsity"] = self.budget_sparsity
        elif self.dial:
            key["dial"] = self.dial
        if self.model is not None:
            if self.model_sha is None:
                raise GridError(f"point '{self.label}': its model has not been loaded, so it has no key yet")
            key["model"] = self.model_sha
        return json.dumps(key, sort_keys=True)


KEY_VERSION = 2


def upgrade_point_key(old: str) -> str | None:
    """The current key of a point stored under a key of compresslm 0.2 or earlier (the full JSON of its
    recipe: `null`, a recipe, or a recipe with `target_bits` or `dial`); None if it is current or unreadable."""
    try:
        data = json.loads(old)
    except json.JSONDecodeError:
        return None
    if isinstance(data, dict) and "key_version" in data:
        return None
    try:
        if data is None:
            return SweepPoint("", None).key
        if isinstance(data, dict) and "stages" in data:
            return SweepPoint("", Recipe.from_dict(data)).key
        if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
            recipe = Recipe.from_dict(data["recipe"])
            return SweepPoint("", recipe, data.get("target_bits"), data.get("dial"), data.get("budget_sparsity")).key
    except CompressLMError:
        return None
    return None


@dataclass
class Grid:
    name: str
    protocol: Protocol
    points: list[SweepPoint]
    description: str = ""


BUILTIN: dict[str, dict] = {
    "smoke": {
        "name": "smoke",
        "description": "three fast points on a reduced protocol, for quick checks",
        "protocol": {"ppl": {"corpus": "wikitext2", "ctx": 512, "limit": 4}, "kld": True},
        "calibration": {"samples": 8, "length": 256},
        "points": ["none", "w8-rtn", "w4-g64-rtn"],
    },
    "default": {
        "name": "default",
        "description": (
            "what `make demo` runs: RTN at 8/4 bits, AWQ scaling + GPTQ at 4 bits, GPTQ at 3 bits, Wanda at 50 %, "
            "2:4 SparseGPT + W4 GPTQ; reduced protocol (ctx 2048, first 4 windows; 8 x 512 calibration windows)"
        ),
        "protocol": {"ppl": {"corpus": "wikitext2", "ctx": 2048, "limit": 4}, "kld": True},
        "calibration": {"samples": 8, "length": 512},
        "points": [
            "none", "w8-rtn", "w4-g64-rtn", "w4-g64-gptq-awq", "w3-g64-gptq", "50%-wanda", "2:4-sparsegpt+w4-g64-gptq",
        ],
    },
    "full": {
        "name": "full",
        "description": (
            "the benchmark protocol of DESIGN.md (128 x 512 calibration windows; first 40 windows of 2048): RTN, GPTQ "
            "and AWQ at 8/4/3/2 bits, Wanda and SparseGPT at 50 % and 2:4 (SparseGPT also at 70 %), SparseGPT + W4 "
            "GPTQ at both, W3/W2 GPTQ with a 4-bit embedding, the budget solver at 3.5 (also without pruning) and 2.5 "
            "bits/param and the "
            "dial's settings (8/4/3 bits, 50 %/70 % at 8 bits, planned widths at 6 bits per weight) with SparseGPT + "
            "W8 GPTQ at 50 %/70 % (quantized after SparseGPT, as the dial's planes are): its sparse settings alone"
        ),
        "protocol": {"ppl": {"corpus": "wikitext2", "ctx": 2048, "limit": 40}, "kld": True},
        "calibration": {"samples": 128, "length": 512},
        # ordered so that a sweep cut short has measured what the dial and the budget solver are judged against
        "points": [
            "none",
            # the dial's settings from one artifact, then the dedicated compressions they are compared with
            *({"label": f"dial-{b}", "recipe": "dial", "dial": f"bits={b}"} for b in (8, 4, 3)),
            *({"label": f"dial-8-{r}%", "recipe": "dial", "dial": f"bits=8,sparsity=0.{r // 10}"} for r in (50, 70)),
            {"label": "dial-avg6", "recipe": "dial", "dial": "avg_bits=6"},  # widths planned per layer
            "w8-g64-gptq", "w4-g64-gptq", "w3-g64-gptq", "50%-sparsegpt", "70%-sparsegpt",
            # the dial's sparse settings compressed on their own, quantized as its pruned planes are (after SparseGPT)
            *({"label": f"{r}%-sparsegpt+w8-g64-gptq (after)", "recipe": {"name": f"{r}%-sparsegpt+w8-g64-gptq",
               "stages": [{"type": "prune", "method": "sparsegpt", "sparsity": f"{r}%", "grid_fit": "after"},
                          {"method": "gptq", "bits": 8, "group_size": 64}]}} for r in (50, 70)),
            # the budget solver, then the uniform points of the sizes it reaches (3.5 and 2.5 bits/param)
            {"label": "budget-3.5", "recipe": "w4-g64-gptq", "target_bits": 3.5},
            {"label": "budget-2.5", "recipe": "w4-g64-gptq", "target_bits": 2.5},
            {"label": "budget-3.5-dense", "recipe": "w4-g64-gptq", "target_bits": 3.5, "budget_sparsity": []},
            "w3-g64-gptq+emb4", "w2-g64-gptq+emb4",
        ],
        "product": [
            {"recipe": "w{bits}-g64-{method}", "bits": [4, 3, 2], "method": ["rtn", "awq"]},
            {"recipe": "w2-g64-gptq"},
            {"recipe": "w8-{method}", "method": ["rtn", "gptq", "awq"]},
            {"recipe": "{pattern}-{method}", "pattern": ["50%", "2:4"], "method": ["wanda"]},
            {"recipe": "2:4-sparsegpt"},
            {"recipe": "{pattern}-sparsegpt+w4-g64-gptq", "pattern": ["50%", "2:4"]},
        ],
    },
    "families": {
        "name": "families",
        "description": (
            "the benchmark protocol of DESIGN.md for the method families beyond quantization and pruning: "
            "low-rank factorization (SVD-LLM's whitening at 10-40 % of the parameters), low-rank correction of "
            "GPTQ's error (rank 8 and 32 at W4/W3/W2 g64), and rotations "
            "before W3/W2 GPTQ, with the plain GPTQ points they are compared with"
        ),
        "protocol": {"ppl": {"corpus": "wikitext2", "ctx": 2048, "limit": 40}, "kld": True},
        "calibration": {"samples": 128, "length": 512},
        "points": [
            "none", "w4-g64-gptq", "w3-g64-gptq", "w2-g64-gptq",
            *({"label": f"{r}%-whitened", "recipe": f"{r}%-whitened", "calibration": {"propagate": "original"}}
              for r in (10, 20, 30, 40)),
            "w4-g64-gptq+lqer8", "w3-g64-gptq+lqer8", "w2-g64-gptq+lqer8", "w3-g64-gptq+lqer32",
            "rot+w3-g64-gptq", "rot+w2-g64-gptq",
        ],
    },
}  # fmt: skip

_GRID_KEYS = ("name", "description", "protocol", "calibration", "points", "product")
_PROTOCOL_KEYS = ("ppl", "kld", "tasks", "task_limit", "speed")
_PPL_KEYS = ("corpus", "ctx", "limit")
_POINT_KEYS = ("label", "recipe", "calibration", "target_bits", "budget_sparsity", "dial", "model")


def _check_keys(where: str, data: dict, allowed: tuple) -> None:
    if not isinstance(data, dict):
        raise GridError(f"{where}: must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise GridError(f"{where}: unknown field '{key}'; allowed fields: {', '.join(allowed)}")


def _protocol(data: dict) -> Protocol:
    _check_keys("grid protocol", data, _PROTOCOL_KEYS)
    ppl = data.get("ppl") or {}
    _check_keys("grid protocol.ppl", ppl, _PPL_KEYS)
    protocol = Protocol(
        corpus=ppl.get("corpus", "wikitext2"), ctx=ppl.get("ctx", 2048), limit=ppl.get("limit", 40),
        kld=bool(data.get("kld", True)), tasks=list(data.get("tasks") or []), task_limit=data.get("task_limit"),
        speed=bool(data.get("speed", False)),
    )  # fmt: skip
    if not isinstance(protocol.ctx, int) or protocol.ctx < 2:
        raise GridError(f"grid protocol.ppl: ctx={protocol.ctx!r} is not allowed; use a window of at least 2 tokens")
    if protocol.limit is not None and (not isinstance(protocol.limit, int) or protocol.limit < 1):
        raise GridError(f"grid protocol.ppl: limit={protocol.limit!r} is not allowed; use a positive window count")
    if protocol.tasks:
        from compresslm.eval.tasks import ALL_TASKS

        unknown = [t for t in protocol.tasks if t not in ALL_TASKS]
        if unknown:
            raise GridError(f"grid protocol: unknown task(s) {', '.join(unknown)}; choose from {', '.join(ALL_TASKS)}")
    return protocol


def _expand_product(spec: dict, where: str) -> list[str]:
    if not isinstance(spec, dict) or "recipe" not in spec:
        raise GridError(f"{where}: a product needs a 'recipe' template and axes, e.g. recipe: 'w{{bits}}-gptq'")
    axes = {k: v for k, v in spec.items() if k != "recipe"}
    for axis, values in axes.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{where}: axis '{axis}' must be a non-empty list")
    names = []
    for combo in itertools.product(*axes.values()):
        try:
            names.append(spec["recipe"].format(**dict(zip(axes, combo, strict=True))))
        except (KeyError, IndexError) as exc:
            raise GridError(f"{where}: the template {spec['recipe']!r} uses {exc}, which is not an axis") from None
    return names


def _point(raw: str | dict, calibration: dict, where: str) -> SweepPoint:
    if isinstance(raw, str):
        raw = {"recipe": raw}
    _check_keys(where, raw, _POINT_KEYS)
    recipe_spec = raw.get("recipe")
    if recipe_spec is None:
        raise GridError(f"{where}: missing 'recipe'")
    label = str(raw.get("label") or (recipe_spec if isinstance(recipe_spec, str) else None) or "")
    if not label:
        raise GridError(f"{where}: a recipe given as a mapping needs a 'label'")
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise GridError(f"{where}: model={model!r} is not allowed; give a model name or a directory")
    if recipe_spec == BASELINE:
        return SweepPoint(label, None, model=model)
    try:
        recipe = copy.deepcopy(load_recipe(recipe_spec))
        settings = {**calibration, **(raw.get("calibration") or {})}
        _check_keys(f"{where}: calibration", settings, tuple(CalibrationSettings.__dataclass_fields__))
        for key, value in settings.items():
            setattr(recipe.calibration, key, value)
        recipe.validate()
    except RecipeError as exc:
        raise GridError(f"{where}: {exc}") from None
    target = raw.get("target_bits")
    if target is not None and (not isinstance(target, (int, float)) or target <= 0):
        raise GridError(f"{where}: target_bits={target!r} is not allowed; use a positive number of bits per parameter")
    dial = _dial_setting(raw.get("dial"), recipe, where) if raw.get("dial") is not None else None
    if dial is not None and target is not None:
        raise GridError(f"{where}: give target_bits or dial, not both")
    if dial is not None and model is not None:
        raise GridError(f"{where}: a dial setting starts from the sweep's model; give dial or model, not both")
    patterns = raw.get("budget_sparsity")
    if patterns is not None:
        if target is None:
            raise GridError(f"{where}: budget_sparsity belongs to a budget point (target_bits)")
        if not isinstance(patterns, list):
            raise GridError(f"{where}: budget_sparsity must be a list of patterns such as ['50%', '2:4'], or []")
        patterns = [str(p) for p in patterns]
        for pattern in patterns:
            try:
                SparsityPattern.parse(pattern)
            except CompressLMError as exc:
                raise GridError(f"{where}: budget_sparsity: {exc}") from None
    return SweepPoint(label, recipe, float(target) if target is not None else None, dial, patterns, model)


def _dial_setting(text: object, recipe: Recipe, where: str) -> dict:
    from compresslm.dial import parse_setting

    widths = next((s.dial_widths for s in recipe.stages if getattr(s, "nested_widths", None)), None)
    if not widths:
        raise GridError(f"{where}: dial settings need a dial recipe (nested widths, e.g. 'dial')")
    try:
        setting = parse_setting(str(text))
    except CompressLMError as exc:
        raise GridError(f"{where}: {exc}") from None
    if setting.get("bits", widths[-1]) not in widths or not 0 <= setting.get("sparsity", 0.0) < 1:
        raise GridError(f"{where}: dial setting {text!r} is outside the recipe's widths {widths} or sparsity [0, 1)")
    if setting.get("avg_bits", widths[-1]) < min(widths):
        raise GridError(f"{where}: dial avg_bits={setting['avg_bits']:g} is below the narrowest width {min(widths)}")
    return setting


def load_grid(spec: str | dict) -> Grid:
    """A Grid from a built-in name, a YAML/JSON file or a dict, fully validated."""
    if isinstance(spec, str):
        if spec in BUILTIN:
            data = BUILTIN[spec]
        else:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise GridError(f"grid '{spec}' is neither a built-in ({', '.join(BUILTIN)}) nor a file")
            import yaml

            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as exc:
                raise GridError(f"{path}: cannot parse grid: {str(exc).splitlines()[0]}") from None
            data = {"name": path.stem, **(data or {})}
    else:
        data = spec
    _check_keys("grid", data, _GRID_KEYS)
    calibration = data.get("calibration") or {}
    _check_keys("grid calibration", calibration, tuple(CalibrationSettings.__dataclass_fields__))
    raw_points = list(data.get("points") or [])
    products = data.get("product") or []
    for index, product in enumerate(products if isinstance(products, list) else [products], start=1):
        raw_points += _expand_product(product, f"grid product {index}")
    if not raw_points:
        raise GridError("grid has no points: give 'points' and/or 'product'")
    points = [_point(raw, calibration, f"grid point {i}") for i, raw in enumerate(raw_points, start=1)]
    labels = [p.label for p in points]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise GridError(f"grid has duplicate point labels: {', '.join(duplicates)}")
    return Grid(str(data.get("name", "custom")), _protocol(data.get("protocol") or {}), points,
                str(data.get("description", "")))  # fmt: skip
