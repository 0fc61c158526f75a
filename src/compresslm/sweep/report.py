"""The sweep report: plots (PNG), a markdown summary and one self-contained HTML page.

For each (model, machine) in the results: quality against size with one line per method family,
the Pareto frontier highlighted and the uncompressed model as a reference line; the table of
every point; the frontier tables; the precision-elasticity table (best quality per method within
each budget, the best of each budget marked). Every figure and table states its protocol.
"""

from __future__ import annotations

import base64
import html
import io
import os
import textwrap
from pathlib import Path

from compresslm.sweep.frontier import elasticity_table, pareto, size_frontier

BUDGETS = [2.5, 3.5, 4.5, 5.5, 9.0]  # linear bits/param


def _protocol_line(rows: list[dict]) -> str:
    row = next((r for r in rows if "eval_protocol" in r), None)
    if row is None:
        return ""
    p = row["eval_protocol"]
    calib = next((r["calibration"] for r in rows if r.get("calibration")), None)
    text = f"{p.get('dataset')} {p.get('split')}, ctx {p.get('ctx')}, {p.get('windows')} windows"
    if calib:
        text += f"; calibration {calib.get('windows')} x {calib.get('length')} tokens of {calib.get('source')}"
    return text


def _png(fig) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


# what a plot's axes and titles call each measure
AXIS_NAMES = {
    "ppl": "perplexity",
    "kld_mean": "KL divergence to the uncompressed model (mean, nats)",
    "bits_per_param": "bits per parameter (whole file)",
    "linear_bits_per_param": "bits per weight of the linear layers",
}
SHORT_NAMES = {"ppl": "perplexity", "kld_mean": "KL divergence", "bits_per_param": "size",
               "linear_bits_per_param": "linear layers' bits"}  # fmt: skip


def _plain_ticks(axis) -> None:
    """Tick labels as plain numbers (20, 50, 1,000, 0.005), not 2×10¹, on a log axis too."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda value, _: ""))


def _plot(rows: list[dict], cost: str, loss: str, model: str, protocol: str) -> bytes | None:
    """One cost-vs-loss scatter: every family as a line, the frontier, the uncompressed model for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usable = [r for r in rows if r.get(cost) is not None and r.get(loss) is not None and r["family"] != "uncompressed"]
    if loss == "kld_mean":  # a log axis: the uncompressed model's 0 is the bottom of the scale, not a point
        usable = [r for r in usable if r[loss] > 0]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    families = sorted({r["family"] for r in usable})
    colors, markers = plt.get_cmap("tab10"), "osD^v"  # ten colors, then the same colors with other markers
    for i, fam in enumerate(families):
        members = sorted((r for r in usable if r["family"] == fam), key=lambda r: r[cost])
        xs, ys = [r[cost] for r in members], [r[loss] for r in members]
        if loss == "ppl" and all("ppl_low" in r for r in members):
            err = [[y - r["ppl_low"] for y, r in zip(ys, members, strict=True)],
                   [r["ppl_high"] - y for y, r in zip(ys, members, strict=True)]]  # fmt: skip
        elif loss == "kld_mean" and all("kld_stderr" in r for r in members):
            err = [r["kld_stderr"] for r in members]
        else:
            err = None
        ax.errorbar(xs, ys, yerr=err, marker=markers[i // 10 % len(markers)], capsize=3, label=fam, alpha=0.85,
                    color=colors(i % 10))  # fmt: skip
    front = pareto(usable, cost, loss)
    ax.plot([r[cost] for r in front], [r[loss] for r in front], color="black", linewidth=2.5, alpha=0.35,
            label="Pareto frontier", zorder=0)  # fmt: skip
    base = next((r for r in rows if r["family"] == "uncompressed" and r.get(loss)), None)
    if base is not None:
        ax.axhline(base[loss], color="gray", linestyle="--", label=f"uncompressed ({base[loss]:.4g})")
    if loss in ("ppl", "kld_mean"):
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis)
    ax.set_xlabel(AXIS_NAMES.get(cost, cost.replace("_", " ")))
    ax.set_ylabel(AXIS_NAMES.get(loss, loss.replace("_", " ")))
    if cost == "bits_per_param":  # the same axis in megabytes, from each point's own file size
        per_bit = [r["bytes_on_disk"] / r[cost] / 1e6 for r in usable if r.get("bytes_on_disk") and r[cost]]
        if per_bit:
            scale = sum(per_bit) / len(per_bit)
            top = ax.secondary_xaxis("top", functions=(lambda b: b * scale, lambda mb: mb / scale))
            top.set_xlabel("size on disk (MB)")
    title = f"{model}: {SHORT_NAMES.get(loss, loss)} against {SHORT_NAMES.get(cost, cost)}"
    ax.set_title(title, fontsize=11)
    fig.text(0.01, 0.01, textwrap.fill(" ".join(protocol.split()), 150), fontsize=7, color="dimgray")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.subplots_adjust(left=0.12, right=0.78, top=0.86, bottom=0.16)
    return _png(fig)


def _fmt(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else ""


def _points_table(rows: list[dict], speed: bool = False, ordered: bool = False, entropy: bool = False) -> list[str]:
    """Rows as a markdown table, largest bits/param first (or in the given order when `ordered`); `entropy` adds
    the entropy-coded file's bytes and bits/param."""
    extra = " decode tok/s | peak RSS MiB |" if speed else ""
    extra += " entropy-coded bytes | bits/param entropy-coded |" if entropy else ""
    lines = [
        "| point | family | ppl | KL mean | top-1 | bits/param | linear bits/param | pruned | bytes on disk "
        "| compress s |" + extra,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if speed else "")
        + ("---:|---:|" if entropy else ""),
    ]
    for r in rows if ordered else sorted(rows, key=lambda r: -r["bits_per_param"]):
        top1 = f"{100 * r['top1_agreement']:.1f} %" if "top1_agreement" in r else ""
        cells = ""
        if speed:
            rss = r.get("peak_rss_bytes")
            cells = f" {_fmt(r.get('decode_tokens_per_s'), 1)} | {_fmt(rss / 2**20 if rss else None, 0)} |"
        if entropy:
            cells += f" {r['ans_bytes']:,} | {_fmt(r.get('bits_per_param_ans'))} |"
        lines.append(
            f"| {r['label']} | {r['family']} | {_fmt(r.get('ppl'))} | {_fmt(r.get('kld_mean'), 4)} | {top1} "
            f"| {_fmt(r['bits_per_param'])} | {_fmt(r['linear_bits_per_param'])} "
            f"| {100 * r.get('linear_sparsity', 0.0):.0f} % | {r['bytes_on_disk']:,} "
            f"| {_fmt(r.get('compress_seconds'), 0)} |" + cells
        )
    return lines


def _elasticity(rows: list[dict]) -> list[str]:
    families, cells = elasticity_table(rows, BUDGETS)
    if not families:
        return []
    best = {b: min((cells[f][b]["ppl"] for f in families if b in cells[f]), default=None) for b in BUDGETS}
    lines = ["| method | " + " | ".join(f"≤ {b:g} bits" for b in BUDGETS) + " |", "|---" + "|---:" * len(BUDGETS) + "|"]
    for fam in families:
        cols = []
        for b in BUDGETS:
            row = cells[fam].get(b)
            if row is None:
                cols.append("")
            else:
                mark = "**" if row["ppl"] == best[b] else ""
                cols.append(f"{mark}{row['ppl']:.2f}{mark} ({row['label']})")
        lines.append(f"| {fam} | " + " | ".join(cols) + " |")
    return lines


_NOT_UNIFORM = ("uncompressed", "budget solver", "dial", "dial sparse")


def _budget_vs_uniform(rows: list[dict]) -> list[str]:
    """Each budget-solver point against every uniform point of equal or larger file: which it beats on ppl."""
    solved = [r for r in rows if r["family"] == "budget solver" and r.get("ppl") is not None]
    uniform = [r for r in rows if r["family"] not in _NOT_UNIFORM and r.get("ppl") is not None]
    if not solved:
        return []
    lines = ["| budget point | bytes on disk | ppl | uniform points as large or larger | beaten | not beaten (ppl) "
             "| smaller uniform points that beat it |", "|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for row in sorted(solved, key=lambda r: r["bytes_on_disk"]):
        larger = [u for u in uniform if u["bytes_on_disk"] >= row["bytes_on_disk"]]
        lost = sorted((u for u in larger if u["ppl"] <= row["ppl"]), key=lambda u: u["ppl"])
        dominated = [u for u in uniform if u["bytes_on_disk"] < row["bytes_on_disk"] and u["ppl"] <= row["ppl"]]
        names = ", ".join(f"{u['label']} ({u['ppl']:.2f})" for u in lost) or "none"
        smaller = ", ".join(f"{u['label']} ({u['ppl']:.2f})" for u in dominated) or "none (it is on the frontier)"
        lines.append(f"| {row['label']} | {row['bytes_on_disk']:,} | {row['ppl']:.2f} | {len(larger)} "
                     f"| {len(larger) - len(lost)} | {names} | {smaller} |")  # fmt: skip
    return lines


def _dedicated_for(dial_row: dict, rows: list[dict]) -> list[tuple[str, dict]]:
    """The uniform points that compress to a dial row's setting on their own, as (kind, row), the
    same setting first.

    Dense settings: GPTQ at the dial's width and group ("same"). Sparse ones: SparseGPT at the ratio
    with GPTQ at the dial's width and group, its grids fitted as the dial's pruned planes are ("same"),
    then SparseGPT alone at the ratio ("float16"), whichever the sweep has.
    """
    setting = dial_row.get("dial") or {}
    nested = next((st for st in dial_row["recipe"]["stages"] if st.get("nested_widths")), {})
    group, fit = nested.get("group_size"), nested.get("separate_sparsity_fit", "after")
    sparsity, bits = setting.get("sparsity", 0.0), setting.get("bits")

    def is_gptq(st: dict) -> bool:
        return (st["type"] == "quantize" and st["method"] == "gptq" and st["bits"] == bits
                and st["granularity"] == "group" and st["group_size"] == group and not st["awq_scale"]
                and not st["nested_widths"])  # fmt: skip

    def is_sparsegpt(st: dict) -> bool:
        return st["type"] == "prune" and st["method"] == "sparsegpt" and str(st["sparsity"]) == f"{100 * sparsity:g}%"

    same, fp16 = [], []
    for row in rows:
        stages = (row.get("recipe") or {}).get("stages", [])
        if row["family"] in _NOT_UNIFORM or row.get("ppl") is None or not stages:
            continue
        if not sparsity:
            if len(stages) == 1 and is_gptq(stages[0]):
                same.append(row)
        elif len(stages) == 2 and is_sparsegpt(stages[0]) and is_gptq(stages[1]):
            if stages[0].get("grid_fit", "current") == fit:
                same.append(row)
        elif len(stages) == 1 and is_sparsegpt(stages[0]):
            fp16.append(row)
    return [("same", row) for row in same[:1]] + [("float16", row) for row in fp16[:1]]


def _dial_plot(rows: list[dict], title: str, protocol: str) -> bytes | None:
    """The dial's curve beside the dedicated compressions: ppl by width (dense) and by sparsity (sparse)."""
    dials = [r for r in rows if r["family"] in ("dial", "dial sparse") and r.get("ppl") is not None]
    if not dials:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=110)
    for ax, sparse in zip(axes, (False, True), strict=True):
        members = [r for r in dials if bool(r["dial"].get("sparsity")) == sparse]
        if not members:
            ax.set_visible(False)
            continue
        # dense settings by the bits they keep (planned mixed widths fall between the uniform ones)
        key = (lambda r: r["dial"]["sparsity"]) if sparse else (lambda r: r["linear_bits_per_param"])
        members.sort(key=key)
        pairs = [(key(r), r, _dedicated_for(r, rows)) for r in members]
        ax.plot([x for x, _, _ in pairs], [r["ppl"] for _, r, _ in pairs], marker="o", label="dial (one artifact)")
        # the dedicated compressions: the same setting, and (sparse) SparseGPT with float16 values
        for label, wanted, marker in (("dedicated, same setting", "same", "s"), ("SparseGPT, float16", "float16", "^")):
            matched = [(x if sparse else ref["linear_bits_per_param"], ref) for x, _, refs in pairs
                       for kind, ref in refs if kind == wanted]  # fmt: skip
            if matched:
                ax.plot([x for x, _ in matched], [ref["ppl"] for _, ref in matched], marker=marker, linestyle="--",
                        label=label if sparse else "dedicated (GPTQ)")  # fmt: skip
        ax.set_xlabel("sparsity (at the dial's width)" if sparse else "linear bits/param (scales included)")
        ax.set_ylabel("ppl")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(" ".join(title.split()), fontsize=11)
    fig.text(0.01, 0.01, textwrap.fill(" ".join(protocol.split()), 140), fontsize=7, color="dimgray")
    fig.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=0.2, wspace=0.3)
    return _png(fig)


def _dial_vs_dedicated(rows: list[dict]) -> list[str]:
    """Each dial setting beside the dedicated compression of the same setting in the sweep."""
    dials = [r for r in rows if r["family"] in ("dial", "dial sparse") and r.get("ppl") is not None]
    if not dials:
        return []
    lines = ["| dial point | setting | ppl | dedicated point | ppl | dial / dedicated | setting bytes "
             "| dedicated bytes |", "|---|---|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    matched = {}
    for row in dials:
        refs = _dedicated_for(row, rows)
        setting = ", ".join(f"{k}={v}" for k, v in row["dial"].items())
        if not refs:
            lines.append(f"| {row['label']} | {setting} | {row['ppl']:.3f} | – | | | {row['bytes_on_disk']:,} | |")
            continue
        first = refs[0][1]
        matched[first["label"]] = first["bytes_on_disk"]  # one container per setting in the size sum
        for _, ref in refs:
            ratio = row["ppl"] / ref["ppl"]
            lines.append(f"| {row['label']} | {setting} | {row['ppl']:.3f} | {ref['label']} | {ref['ppl']:.3f} "
                         f"| {ratio:.3f} | {row['bytes_on_disk']:,} | {ref['bytes_on_disk']:,} |")  # fmt: skip
    artifact = max(r.get("artifact_bytes", 0) for r in dials)
    if matched and artifact:
        total = sum(matched.values())
        lines += ["", f"The dial artifact ({artifact:,} bytes) against the {len(matched)} dedicated containers above "
                  f"together ({total:,} bytes): {artifact / total:.2f}x."]  # fmt: skip
    return lines


def write_report(
    rows: list[dict], out_dir: str | os.PathLike, title: str = "compresslm sweep", failed: list[dict] | None = None
) -> Path:
    """Write report.md, report.html and the PNG plots into `out_dir`; return the HTML path.

    `failed`: points that could not be measured (`ResultStore.failures`), listed with their errors.
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("model", row["model_sha"][:12]), row["machine"]), []).append(row)
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for index, ((model, machine), members) in enumerate(groups.items(), start=1):
        protocol = _protocol_line(members)
        md += [f"## {model} on {machine}", "", f"Protocol: {protocol}. Sizes are measured from the written files.", ""]
        body += [
            f"<h2>{html.escape(model)} on {html.escape(machine)}</h2>",
            f"<p>Protocol: {html.escape(protocol)}</p>",
        ]
        superseded = sum(r.get("superseded", 0) for r in members)
        if superseded:  # the database keeps them; say so rather than silently dropping them
            note = (f"{superseded} earlier measurement(s) of points re-measured since (same label, changed recipe) "
                    "are left out; `compresslm report --all` shows every row.")  # fmt: skip
            md += [note, ""]
            body.append(f"<p>{html.escape(note)}</p>")
        for cost, loss, name in (("bits_per_param", "ppl", "ppl_vs_bits"), ("linear_bits_per_param", "ppl",
                                  "ppl_vs_linear_bits"), ("bits_per_param", "kld_mean", "kld_vs_bits")):  # fmt: skip
            png = _plot(members, cost, loss, model, protocol)
            if png is None:
                continue
            file = f"{index}_{name}.png"
            (out / file).write_bytes(png)
            alt = f"{SHORT_NAMES[loss]} against {SHORT_NAMES[cost]}"
            md += [f"![{alt}]({file})", ""]
            body.append(f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
        png = _dial_plot(members, f"{model}: the dial against dedicated compressions", protocol)
        if png is not None:
            file = f"{index}_dial_vs_dedicated.png"
            (out / file).write_bytes(png)
            md += [f"![dial vs dedicated]({file})", ""]
            body.append(f'<img alt="dial vs dedicated" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
        front = size_frontier(members)  # the same list the terminal prints
        timed_any = any("decode_tokens_per_s" in r for r in members)
        coded = [r for r in members if "ans_bytes" in r]
        tables = [("All points", _points_table(members, speed=timed_any)),
                  ("Pareto frontier: bytes on disk vs ppl (the uncompressed model first, for reference)",
                   _points_table(front, ordered=True)),
                  ("Precision elasticity: best ppl within each linear-bits budget (best per column in bold)",
                   _elasticity(members)),
                  ("Budget solver against every uniform setting of equal or larger size (ppl)",
                   _budget_vs_uniform(members)),
                  ("The dial's settings against dedicated compressions in the same sweep",
                   _dial_vs_dedicated(members))]  # fmt: skip
        if any("kld_mean" in r for r in members):
            tables.insert(2, ("Pareto frontier: bits/param vs KL", _points_table(pareto(
                [r for r in members if r["family"] != "uncompressed"], "bits_per_param", "kld_mean"))))  # fmt: skip
        if coded:  # the same frontier with every container's codes entropy-coded (formats.entropy)
            tables.insert(2, ("Pareto frontier: entropy-coded bytes (codes ANS-coded) vs ppl",
                              _points_table(pareto(coded, "ans_bytes", "ppl"), entropy=True)))  # fmt: skip
        if timed_any:  # speed and memory frontiers, where measured
            timed = [{**r, "decode_ms_per_token": 1000.0 / r["decode_tokens_per_s"]} for r in members
                     if r.get("decode_tokens_per_s")]  # fmt: skip
            tables.insert(2, ("Pareto frontier: decode time per token (batch 1) vs ppl",
                              _points_table(pareto(timed, "decode_ms_per_token", "ppl"), speed=True)))  # fmt: skip
            tables.insert(3, ("Pareto frontier: peak memory (RSS) vs ppl",
                              _points_table(pareto(timed, "peak_rss_bytes", "ppl"), speed=True)))  # fmt: skip
        for heading, table in tables:
            if not table:
                continue
            md += [f"### {heading}", "", *table, ""]
            body += [f"<h3>{html.escape(heading)}</h3>", _html_table(table)]
    if failed:  # said, not silently dropped
        table = ["| point | why it was not measured |", "|---|---|"]
        table += [f"| {f['label']} | {f['error'].replace('|', '/')} |" for f in failed]
        md += ["## Points not measured", "", *table, ""]
        body += ["<h2>Points not measured</h2>", _html_table(table)]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    page = out / "report.html"
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}"
    )
    head = f"<head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
    page.write_text(f"<!doctype html><html>{head}<body>{''.join(body)}</body></html>\n", encoding="utf-8")
    return page


def _html_table(lines: list[str]) -> str:
    """A markdown table (header, rule, rows) as HTML."""

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells(lines[0]))
    rows = []
    for line in lines[2:]:
        tds = []
        for c in cells(line):
            text = html.escape(c.replace("**", ""))
            tds.append(f"<td><b>{text}</b></td>" if c.startswith("**") else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"
