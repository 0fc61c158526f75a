"""KV-cache quantization on the reference model: quality, bytes, passkey retrieval, memory and speed.

Points (each saved before the next starts; rerunning skips finished points):

* `ppl <setting>`: token perplexity through the cache with chunked prefill (chunk 128) on
  WikiText-2 test (GPTQ rows), ctx 2048, first `--limit` windows, with the exact KL divergence and
  top-1 agreement against the same chunked pass with a full-precision cache, and the cache's bytes
  at the end of a 2048-token window (measured from its tensors) against float16's.
* `passkey <setting>`: passkey retrieval at 1k, 2k, 4k and 8k tokens (`--trials` seeded trials each).
* `speed <setting>`: prefill and decode tokens/s and KV bytes at 1k, 2k, 4k, 8k of context.

Settings: `fp` (transformers' cache) or `k<bits>[v<value bits>]-g<tokens per key group>[-w<window>][-o<outlier %>]
[-vg<channels per value group>][-s<sink tokens>][-pre][-rot][-kt]` (`-s4`: first 4 tokens kept in full
precision; `-pre`: keys quantized before RoPE; `-rot`: Hadamard-rotated
heads; `-kt`: keys quantized per token like values instead of per channel).

    .venv/bin/python benchmarks/kv_table.py [--points "ppl k4-g128" ...] [--limit 10]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from point_runner import table_main
from results_store import atomic_write

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "kv_table"
SETTINGS = [
    "fp",
    "k8-g128",
    "k4-g128",
    "k4-g64-pre",
    "k4-g64-s8-pre",
    "k4-g64-s8-pre-rot-kt",
    "k4-g128-s8-pre",
    "k3-g64-s8-pre",
    "k2-g64-w128-s8-pre",
    "k2-g32-w128-s8-pre",
]
BEST_4BIT = "k4-g64-s8-pre"
DEFAULT_POINTS = [
    *(f"ppl {s}" for s in SETTINGS),
    *(f"passkey {s}" for s in ("fp", "k8-g128", BEST_4BIT, "k2-g64-w128-s8-pre")),
    *(f"speed {s}" for s in ("fp", BEST_4BIT)),
]


def kv_config(setting: str):
    from compresslm.kv.cache import KVQuantConfig

    if setting == "fp":
        return None
    pattern = r"k(\d)(?:v(\d))?-g(\d+)(?:-w(\d+))?(?:-o(\d+(?:\.\d+)?))?(?:-vg(\d+))?(?:-s(\d+))?(-pre)?(-rot)?(-kt)?"
    match = re.fullmatch(pattern, setting)
    if not match:
        raise SystemExit(f"cannot read KV setting {setting!r}")
    bits, vbits, group, window, outliers, vgroup, sink, pre, rot, kt = match.groups()
    return KVQuantConfig(int(bits), int(group), int(vgroup or 64), int(window or 0), float(outliers or 0) / 100,
                         int(vbits) if vbits else None, pre_rope=bool(pre), rotate=bool(rot),
                         key_axis="token" if kt else "channel", sink=int(sink or 0))  # fmt: skip


def run_point(name: str, args: argparse.Namespace) -> dict:
    from compresslm.eval.kv_quality import kv_perplexity, passkey_accuracy
    from compresslm.eval.speed import measure_speed
    from compresslm.kv.cache import fp16_kv_bytes
    from compresslm.models.loading import load_model

    kind, setting = name.split(" ", 1)
    config = kv_config(setting)
    lm = load_model("smollm2-135m")
    if kind == "ppl":
        return {"point": name, **kv_perplexity(lm, config, ctx=2048, limit=args.limit, chunk=128, show_progress=False)}
    if kind == "passkey":
        return {"point": name, "results": [passkey_accuracy(lm, config, n, trials=args.trials)
                                           for n in (1024, 2048, 4096, 8192)]}  # fmt: skip
    rows = []
    for context in (1024, 2048, 4096, 8192):
        speed = measure_speed(lm, prompt_tokens=context, new_tokens=32, repeats=2, kv_config=config).to_dict()
        fp16 = fp16_kv_bytes(lm.model, context + 32)
        rows.append({"context": context, **speed["per_batch"]["1"], "kv_bytes_fp16": fp16,
                     "peak_rss_bytes": speed["peak_rss_bytes"], "protocol": speed["protocol"]})  # fmt: skip
    return {"point": name, "contexts": rows}


def write_markdown(rows: dict) -> None:
    lines = ["# KV-cache quantization of `smollm2-135m`", ""]
    ppl = [r for r in rows.values() if r["point"].startswith("ppl")]
    if ppl:
        p = ppl[0]["protocol"]
        base = next((r["ppl"] for r in ppl if r["point"] == "ppl fp"), None)
        lines += [
            f"Token perplexity through the cache: WikiText-2 {p['split']} (GPTQ rows), ctx {p['ctx']}, first "
            f"{p['windows']} windows, chunked prefill of {p['chunk']} tokens (later chunks read the quantized cache "
            "of earlier ones). KL and top-1 agreement: against the same chunked pass with a full-precision cache, "
            "full vocabulary. KV bytes: at the end of a 2048-token window, from the cache's tensors, metadata "
            "included, against a float16 cache.",
            "",
            "| setting | cache | ppl | Δ vs fp cache | KL mean | KL p99 | same top token | KV bytes | vs float16 |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ppl:
            setting = r["point"].split(" ", 1)[1]
            delta = f"{100 * (r['ppl'] / base - 1):+.2f} %" if base else ""
            kv = r["kv_bytes"]
            ratio = f"{r['kv_bytes_fp16'] / kv:.2f}x smaller" if kv else ""
            lines.append(
                f"| {setting} | {r['protocol']['kv_cache']} | {r['ppl']:.3f} | {delta} "
                f"| {r.get('kld_mean', 0):.5f} | {r.get('kld_p99', 0):.4f} | {100 * r.get('top1_agreement', 1):.2f} % "
                f"| {kv or r['kv_bytes_fp16']:,} | {ratio} |"
            )
        lines.append("")
    passkey = [r for r in rows.values() if r["point"].startswith("passkey")]
    if passkey:
        lengths = [x["length"] for x in passkey[0]["results"]]
        lines += ["## Passkey retrieval (greedy, seeded trials)", "",
                  "| setting | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
                  "|---" + "|---:" * len(lengths) + "|"]  # fmt: skip
        for r in passkey:
            cells = " | ".join(f"{100 * x['accuracy']:.0f} % of {x['trials']}" for x in r["results"])
            lines.append(f"| {r['point'].split(' ', 1)[1]} | {cells} |")
        single = [r["point"] for r in passkey if "chunk" not in r["results"][0]]
        note = "The prompt is prefilled in chunks of 128 tokens: the answer reads the key through the quantized cache"
        if single:
            note += f"; {', '.join(single)} ran with a single-shot prefill (the same for a full-precision cache)"
        lines += ["", note + ".", ""]
    speed = [r for r in rows.values() if r["point"].startswith("speed")]
    if speed:
        lines += ["## Memory and speed against context (batch 1, 32 decoded tokens, median of 2 after a warm-up)", "",
                  "| setting | context | prefill tok/s | decode tok/s | KV bytes | float16 KV bytes | peak RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in speed:
            for c in r["contexts"]:
                lines.append(
                    f"| {r['point'].split(' ', 1)[1]} | {c['context']} | {c['prefill_tokens_per_s']['median']:.0f} "
                    f"| {c['decode_tokens_per_s']['median']:.1f} | {c['kv_cache_bytes']:,} | {c['kv_bytes_fp16']:,} "
                    f"| {c['peak_rss_bytes'] / 2**20:.0f} |"
                )
        lines += ["", "On CPU the quantized cache is dequantized at every step (no fused kernel): it saves memory, "
                  "not time.", ""]  # fmt: skip
    lines += ["Command: `.venv/bin/python benchmarks/kv_table.py`. Shared 2-core machine: timings indicative only."]
    atomic_write(RESULTS.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    done = table_main(__file__, RESULTS, DEFAULT_POINTS, run_point, [("--limit", int, 10), ("--trials", int, 3)])
    if done and done[0]:
        write_markdown(done[0])


if __name__ == "__main__":
    main()
