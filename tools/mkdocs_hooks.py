"""mkdocs hook: the pages that are generated from the code and the committed results, before each build.

* `reference/cli.md`: every command and option of `compresslm`, read from its argparse parser;
* `reference/recipes.md`: every registered stage with its fields and defaults, and the preset patterns;
* `results/`: the committed benchmark tables (`benchmarks/results/`), with their plots;
* `examples/`: the example grids and configs the guides link to.

Generated pages are not committed (`.gitignore`), so they cannot go stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _options(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for action in parser._actions:  # argparse keeps no public list of a parser's arguments
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        name = ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.dest}`"
        default = (
            "" if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings else action.default
        )
        meaning = action.help or ""
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            meaning += f" (one of: {', '.join(map(str, action.choices))})"
        rows.append(f"| {name} | {_cell(f'`{default}`' if default != '' else '')} | {_cell(meaning)} |")
    return rows


def cli_reference() -> str:
    from compresslm.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    lines = ["# Command-line reference", "", "Generated from `compresslm`'s own parser at each docs build.", ""]
    lines += ["| command | what it does |", "|---|---|"]
    lines += [f"| [`{name}`](#{name}) | {_cell(helps.get(name, ''))} |" for name in commands.choices]
    for name, sub in commands.choices.items():
        usage = sub.format_usage().removeprefix("usage: ").strip()
        lines += ["", f"## {name}", "", helps.get(name, "") or "", "", "```text", usage, "```", "", *_options(sub)]
    return "\n".join(lines) + "\n"


def recipe_reference() -> str:
    from compresslm.recipe import STAGES, presets

    lines = ["# Recipe reference", "", "Generated from the registered stages at each docs build. A recipe is a list of",
             "stages (YAML, JSON or a Python dict); each stage names its `type` (a quantize stage may omit it) and",
             "the fields below, whose values are checked before any compute.", ""]  # fmt: skip
    for name, kind in STAGES.items():
        doc = inspect.cleandoc(kind.options.__doc__ or "")
        if not doc or doc.startswith(kind.options.__name__ + "("):  # no docstring of its own: its module's first part
            doc = inspect.cleandoc(sys.modules[kind.options.__module__].__doc__ or "").split("\n\n")[0]
        lines += [f"## `{name}`", "", f"Role: `{kind.role}`.", "", doc, ""]
        lines += ["| field | default |", "|---|---|"]
        for field in dataclasses.fields(kind.options):
            if field.name == "type":
                continue
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                default = "(required)"
            lines.append(f"| `{field.name}` | `{_cell(default)}` |")
        lines.append("")
    lines += [
        "## Presets",
        "",
        inspect.cleandoc(presets.__doc__ or ""),
        "",
        inspect.cleandoc(presets.preset_dict.__doc__),
        "",
    ]
    return "\n".join(lines)


def results_index() -> str:
    """Every committed table, by its title, with the script that writes it."""
    lines = ["# All benchmark tables", "", "Each table is written by a script in `benchmarks/` (named in the table's",
             "footer, with the machine and versions) from results committed beside it.", ""]  # fmt: skip
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.md")):
        relative = path.relative_to(ROOT / "benchmarks" / "results").as_posix()
        title = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")),
                     relative)  # fmt: skip
        lines.append(f"- [{title}]({relative}) (`{relative}`)")
    return "\n".join(lines) + "\n"


def _copy_tree(source: Path, target: Path, suffixes: tuple[str, ...]) -> None:
    if target.exists():
        shutil.rmtree(target)
    for path in source.rglob("*"):
        if path.is_file() and path.suffix in suffixes:
            out = target / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)


def generate() -> None:
    (DOCS / "reference").mkdir(exist_ok=True)
    (DOCS / "reference" / "cli.md").write_text(cli_reference())
    (DOCS / "reference" / "recipes.md").write_text(recipe_reference())
    _copy_tree(ROOT / "benchmarks" / "results", DOCS / "results", (".md", ".png", ".json"))
    (DOCS / "results" / "index.md").write_text(results_index())
    _copy_tree(ROOT / "examples", DOCS / "examples", (".yaml", ".yml", ".json", ".md"))


def on_pre_build(config) -> None:  # mkdocs calls this before it collects the pages
    generate()
