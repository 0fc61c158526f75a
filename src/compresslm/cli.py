"""The `compresslm` command.

Human-readable output and progress bars go to stderr; `--json` prints exactly one JSON object on
stdout, so `compresslm eval ... --json | jq .ppl` works. Errors the user can fix print one line
(`compresslm: error: ...`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from compresslm import __version__
from compresslm.errors import CompressLMError
from compresslm.fileio import check_writable_dir, check_writable_file


def _print(message: str = "") -> None:
    print(message, file=sys.stderr)


def _emit_json(payload: dict) -> None:
    """One JSON object on stdout; a value that is not a finite number (an error bar of one window) is null.

    Every object says how much memory the command took at its peak (`peak_rss_bytes`, this process's
    maximum resident set size so far).
    """
    payload = {**payload, "peak_rss_bytes": peak_rss_bytes()}
    sys.stdout.write(json.dumps(_finite_json(payload), indent=2, sort_keys=False, allow_nan=False) + "\n")
    sys.stdout.flush()


def peak_rss_bytes() -> int:
    """The most memory this process has held resident so far (Linux reports kibibytes, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _finite_json(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def cmd_info(args: argparse.Namespace) -> int:
    from compresslm.models.layout import parameter_counts
    from compresslm.models.loading import load_model

    if args.entropy:  # what --entropy needs is checked before the model loads
        from compresslm.formats.container import is_container
        from compresslm.formats.entropy import require_libraries

        if not is_container(args.model):
            raise CompressLMError(f"--entropy measures a container's codes; {args.model} is not a container")
        require_libraries()
    lm = load_model(args.model, dtype=args.dtype)
    counts = parameter_counts(lm.model, lm.layout)
    tensor_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    file_bytes = None
    if lm.path and os.path.isfile(lm.path):
        file_bytes = os.path.getsize(lm.path)
    info = {
        "model": lm.describe(),
        "layout": lm.layout.summary(),
        "parameters": counts,
        "bytes_in_memory": tensor_bytes,
        "source_file_bytes": file_bytes,
    }
    if lm.kind == "container":
        from compresslm.formats.container import container_summary

        info["container"] = container_summary(lm.path)
        if args.entropy:
            from compresslm.formats.entropy import entropy_summary

            info["entropy"] = entropy_summary(lm.path)
    if args.json:
        _emit_json(info)
        return 0
    summary = info["layout"]
    _print(f"model        {lm.source} ({lm.kind})")
    if lm.path:
        _print(f"path         {lm.path}")
    _print(f"architecture {summary['model_class']} (model_type {summary['model_type']})")
    _print(
        f"blocks       {summary['num_blocks']} x {summary['blocks_path']}, hidden {summary['hidden_size']}, "
        f"heads {summary['num_heads']} (kv {summary['num_kv_heads']}), head_dim {summary['head_dim']}, "
        f"vocab {summary['vocab_size']}"
    )
    _print("linears      " + ", ".join(f"{k} ({v})" for k, v in summary["block_linears"].items()))
    tied = f"tied to {summary['token_embedding']}" if summary["tied_lm_head"] else "untied"
    _print(f"lm_head      {summary['lm_head']} ({tied})")
    _print(f"dtype        {info['model']['dtype']}")
    _print("parameters")
    for key, value in counts.items():
        share = 100.0 * value / counts["total"]
        _print(f"  {key:<20} {value:>14,}  {share:5.1f} %  ({_format_count(value)})")
    _print(
        f"bytes        {_format_bytes(tensor_bytes)} in memory"
        + (f", {_format_bytes(file_bytes)} source file" if file_bytes else "")
    )
    _print(f"sha256       {info['model']['sha256']}")
    if "container" in info:
        c = info["container"]
        _print(
            f"container    {_format_bytes(c['bytes_on_disk'])} on disk, {c['bits_per_param']:.3f} bits/param, "
            f"{c['linear_bits_per_param']:.3f} bits/param in compressed linears, "
            + (f"{100 * c['linear_sparsity']:.1f} % pruned, " if c.get("linear_sparsity") else "")
            + f"recipe {_recipe_name(lm.container)}"
        )
    if "entropy" in info:
        e = info["entropy"]
        per = e["codes_bits_per_code"]
        _print(
            f"codes        {_format_bytes(e['codes_stored_bytes'])} packed ({per['stored']:.3f} bits/code); "
            f"Shannon bound {_format_bytes(e['codes_shannon_bytes'])} ({per['shannon']:.3f}), "
            f"ANS {_format_bytes(e['codes_ans_bytes'])} ({per['ans']:.3f}), zstd {_format_bytes(e['codes_zstd_bytes'])}"
        )
        _print(
            f"entropy-coded file {_format_bytes(e['file_ans_bytes'])}, {e['bits_per_param_ans']:.3f} bits/param "
            "(codes ANS-coded, everything else as stored)"
        )
    return 0


def _recipe_name(header: dict) -> str:
    """The recipe a container was made with: a compression recipe's name, or a training run's."""
    recipe = header.get("recipe") or header.get("train_recipe") or {}
    name = recipe.get("name") if isinstance(recipe, dict) else None
    return str(name) if name else "not recorded"


def _budget_sparsity(text: str | None) -> tuple[str, ...] | None:
    """--budget-sparsity: None (the solver's default), () for 'none', else the listed patterns, checked."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    from compresslm.sparse.masks import SparsityPattern

    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    for pattern in patterns:
        SparsityPattern.parse(pattern)  # a clear error for '60 percent'
    return patterns


def cmd_compress(args: argparse.Namespace) -> int:
    from compresslm.api import compress, parse_size
    from compresslm.engine import distributed
    from compresslm.engine.stats_cache import default_cache_dir
    from compresslm.recipe import load_recipe

    recipe = load_recipe(args.recipe)  # validated before the model is even loaded
    overrides = {"source": args.calib, "samples": args.calib_samples, "length": args.calib_len, "seed": args.seed,
                 "propagate": args.propagate}  # fmt: skip
    for key, value in overrides.items():
        if value is not None:
            setattr(recipe.calibration, key, value)
    recipe.validate()
    check_writable_file(args.output)  # before any compute: a bad path fails now, not after calibration
    if args.nproc < 1:
        raise CompressLMError(f"--nproc {args.nproc}: give at least 1 process")
    if args.nproc > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        targets = (args.target_bits, args.target_size, args.target_linear_bits)
        distributed.check_split(recipe, args.stream, any(targets))
    if args.nproc > 1:
        return _spawn_ranks(args.nproc)
    distributed.init_from_environment(args.device)
    target_bytes = parse_size(args.target_size, "--target-size") if args.target_size else None
    if sum(t is not None for t in (args.target_bits, target_bytes, args.target_linear_bits)) > 1:
        raise CompressLMError("give one of --target-bits, --target-size and --target-linear-bits")
    target = None
    if any(t is not None for t in (args.target_bits, target_bytes, args.target_linear_bits)):
        from compresslm.engine.budget import BudgetTarget

        target = BudgetTarget(args.target_bits, target_bytes, args.target_linear_bits, args.sensitivity,
                              _budget_sparsity(args.budget_sparsity), args.budget_estimate)  # fmt: skip
    if distributed.rank() == 0:  # the other ranks of a split compression stay quiet
        _print(f"compressing {args.model} with recipe '{recipe.name}'" + (f" to {target.describe()}" if target else ""))
    _lm, result, summary = compress(args.model, recipe, args.output, device=args.device, show_progress=not args.quiet,
                                    stats_cache=args.stats_cache or default_cache_dir(), target=target,
                                    stream=args.stream)  # fmt: skip
    if summary is None:  # a rank other than 0 of a split compression: rank 0 writes and reports
        return 0
    if result.info.get("resumed_at_block"):
        _print(f"resumed a killed run of the same compression at block {result.info['resumed_at_block']}")
    if result.plan is not None:
        plan, counts = result.plan, {}
        for choice in plan.choices.values():  # 4, or 4+50% (4 bits, 50 % sparse)
            counts[f"{choice} bits"] = counts.get(f"{choice} bits", 0) + 1
        _print(f"budget {plan.budget_bytes:,} B: predicted {plan.predicted_bytes:,} B; layers by choice: "
               + ", ".join(f"{c} x{n}" for c, n in sorted(counts.items(), reverse=True)))  # fmt: skip
        recipe = result.recipe
    errors = [layer.relative_error for layer in result.layers if layer.relative_error is not None]
    payload = {
        "model": args.model,
        "output": str(args.output),
        "recipe": recipe.to_dict(),
        "calibration": result.calibration,
        "compression_seconds": result.seconds,
        **(
            {"embedding_left_dense": result.info["embedding_left_dense"]}
            if "embedding_left_dense" in result.info
            else {}
        ),
        **{k: v for k, v in summary.items() if k not in ("path", "recipe")},
        "layers": [
            {
                "name": layer.name,
                "role": layer.role,
                "grid": layer.grid,
                "relative_error": layer.relative_error,
                "seconds": round(layer.seconds, 4),
            }
            for layer in result.layers
        ],
    }
    if args.json:
        _emit_json(payload)
        return 0
    if result.info.get("embedding_left_dense"):
        _print(f"embedding kept dense: {result.info['embedding_left_dense']}")
    if errors:
        worst = max(result.layers, key=lambda layer: layer.relative_error or 0.0)
        _print(
            f"layers: {len(result.layers)} compressed, mean relative error {sum(errors) / len(errors):.4g}, "
            f"worst {worst.name} ({worst.relative_error:.4g})"
        )
    _print(
        f"wrote {args.output}: {_format_bytes(summary['bytes_on_disk'])}, {summary['bits_per_param']:.3f} bits/param "
        f"overall, {summary['linear_bits_per_param']:.3f} bits/param in compressed linears, "
        + (f"{100 * summary['linear_sparsity']:.1f} % of linear weights pruned, " if summary["linear_sparsity"] else "")
        + f"{result.seconds:.1f} s"
    )
    return 0


def _spawn_ranks(nproc: int) -> int:
    """Run this compress command as `nproc` gloo processes on this machine (as torchrun would): each
    gets its share of the CPU threads, rank 0 prints and writes the container."""
    import socket
    import subprocess

    argv = sys.argv[1:]
    if "--nproc" in argv:
        i = argv.index("--nproc")
        argv = argv[:i] + argv[i + 2 :]
    argv = [a for a in argv if not a.startswith("--nproc=")]
    with socket.socket() as probe:  # a free port for the process group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}  # fmt: skip
        quiet = ["--quiet"] if rank else []
        procs.append(subprocess.Popen([sys.executable, "-m", "compresslm.cli", *argv, *quiet], env=env,
                                      stdout=None if rank == 0 else subprocess.DEVNULL))  # fmt: skip
    codes = [proc.wait() for proc in procs]
    return next((code for code in codes if code), 0)


def _read_layer_widths(path: str) -> dict[str, int]:
    """A JSON object of module path -> width, checked for shape (the widths are checked by the dial)."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompressLMError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise CompressLMError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        example = '{"model.layers.0.mlp.up_proj": 4}'
        raise CompressLMError(f"{path}: expected a JSON object of module path -> bits, e.g. {example}")
    return data


def cmd_dial(args: argparse.Namespace) -> int:
    from compresslm.dial import materialize

    bits = args.bits
    if args.bits_per_layer:
        if args.bits is not None or args.avg_bits is not None:
            raise CompressLMError("--bits-per-layer replaces --bits and --avg-bits; give one of them")
        bits = _read_layer_widths(args.bits_per_layer)
    check_writable_file(args.output)
    report, summary = materialize(args.artifact, args.output, bits, args.sparsity, avg_bits=args.avg_bits)
    widths = ", ".join(f"{n} layers at {b} bits" for b, n in sorted(report.bits.items()))
    sizes = f"{summary['bits_per_param']:.3f} bits/param, {summary['linear_bits_per_param']:.3f} linear bits"
    _print(f"{args.output}: {widths}, sparsity {args.sparsity:g}; {summary['bytes_on_disk']:,} bytes, {sizes}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """The reply on stdout as it is decoded; speed and memory on stderr (or all of it as --json)."""
    from compresslm.eval.generate import generate_llamacpp, generate_torch

    def show(piece: str) -> None:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    if args.backend == "llama.cpp":
        if args.dial or args.float_weights or args.device:
            raise CompressLMError("--dial, --float-weights and --device belong to the torch backend")
        result = generate_llamacpp(args.model, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                                   threads=args.threads, on_text=show)  # fmt: skip
    else:
        from compresslm.models.loading import load_model

        setting = None
        if args.dial:
            from compresslm.dial import parse_setting

            setting = parse_setting(args.dial)
        lm = load_model(args.model, device=args.device, float_weights=args.float_weights)
        if setting is not None:
            from compresslm.dial import apply_setting

            apply_setting(lm, setting)
        result = generate_torch(lm, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens, on_text=show)
    if args.json:
        _emit_json({"model": args.model, **result.to_dict()})
        return 0
    sys.stdout.write("\n")
    speed = f"{result.decode_tokens_per_second:.1f} tokens/s" if result.decode_tokens_per_second else "one token"
    _print(f"[{result.backend}: {result.prompt_tokens} prompt tokens, {result.new_tokens} new ({result.stopped}); "
           f"first token {result.first_token_seconds:.2f} s, decode {speed}; "
           f"peak memory {_format_bytes(result.peak_rss_bytes)}]")  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from compresslm.api import export

    result = export(args.container, args.format, args.output, requantize=args.requantize, dtype=args.dtype,
                    overwrite=args.force, show_progress=not args.quiet)  # fmt: skip
    if args.json:
        _emit_json(result)
        return 0
    line = f"{result['path']}: {args.format}, {result['bytes_on_disk']:,} bytes"
    if args.format == "clm-ans":
        line += f" ({result['bits_per_param']:.3f} bits/param); the same records, codes ANS-coded"
    if args.format == "gguf":
        types = ", ".join(f"{n} {t}" for t, n in result["tensor_types"].items())
        line += f"; tensors {types}"
        if result["requantized_tensors"]:
            worst = result["requantize_max_relative_error"]
            line += f"; {result['requantized_tensors']} re-rounded (worst relative error {worst:.2e})"
        else:
            line += "; lossless"
    _print(line)
    return 0


def cmd_masks(args: argparse.Namespace) -> int:
    from compresslm.analysis.masks import mask_stability
    from compresslm.data.calibration import calibration_windows
    from compresslm.models.loading import load_model
    from compresslm.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    lm = load_model(args.model)
    sets = []
    for source, seed in ((args.calib, args.seed), (args.calib_b or args.calib, args.seed_b)):
        sets.append(calibration_windows(lm.tokenizer, source, args.calib_samples, args.calib_len, seed))
    if sets[0].protocol == sets[1].protocol:
        raise CompressLMError("the two calibration sets are identical; change --calib-b or --seed-b")
    report = mask_stability(lm, recipe, (sets[0], sets[1]), device=args.device, show_progress=not args.quiet)
    if args.json:
        _emit_json({"layers": report.layers, "summary": report.summary, "calibrations": report.calibrations,
                    "recipe": report.recipe})  # fmt: skip
        return 0
    _print(f"mask overlap (pruned sets, intersection over union) for recipe '{recipe.name}'")
    for label, protocol in zip("AB", report.calibrations, strict=True):
        _print(f"  {label}: {protocol.get('source')} seed {protocol.get('seed')}, {protocol.get('windows')} windows")
    _print(f"  {'layer':<40} {'overlap':>8} {'chance':>8}")
    for name, row in report.layers.items():
        _print(f"  {name:<40} {row['overlap']:8.3f} {row['chance']:8.3f}")
    total = report.summary
    mean = f"mean {total['mean_overlap']:.3f} (chance {total['mean_chance']:.3f})"
    _print(f"{mean}; lowest {total['min_overlap']:.3f} in {total['min_layer']}")
    return 0


def _reference_for(args: argparse.Namespace, lm) -> object:
    """The uncompressed model to compare against: --reference, or a container's recorded source."""
    from compresslm.models.loading import load_model

    source = args.reference
    recorded = (lm.container or {}).get("source_model") if lm.kind == "container" else None
    if source is None:
        if recorded is None:
            raise CompressLMError(
                "--kld needs --reference MODEL (the uncompressed model) for a model that is not a .clm"
            )
        source = recorded.get("path") or recorded["source"]
    reference = load_model(source, device=args.device, lazy=args.stream)
    if recorded is not None and recorded.get("sha256") and reference.fingerprint() != recorded["sha256"]:
        raise CompressLMError(
            f"the reference {source} is not the model this container was compressed from (weight hash differs)"
        )
    return reference


def _eval_text(args: argparse.Namespace, lm) -> tuple[dict, list[str]]:
    """Perplexity, and with --kld the distance to the reference on the same windows (one pass)."""
    from compresslm.eval.perplexity import perplexity

    corpus = args.ppl or "wikitext2"
    window = {"split": args.split, "ctx": args.ctx, "stride": args.stride, "limit": args.limit}
    if args.kld:
        from compresslm.eval.distance import distance, reference_logits

        reference = _reference_for(args, lm)
        ref = reference_logits(reference, corpus, k=args.kld_topk, show_progress=not args.quiet, **window)
        del reference
        result = distance(lm, ref, corpus, split=args.split, show_progress=not args.quiet)
        details = {k: v for k, v in result.to_dict().items() if k not in ("window_nll", "protocol")}
        payload = {"ppl": result.ppl, "nll": result.nll, "tokens": result.tokens, "windows": result.windows,
                   "window_nll": result.window_nll, "kld_mean": result.kld_mean,
                   "top1_agreement": result.top1_agreement, "kld": details, "protocol": result.protocol}  # fmt: skip
    else:
        result = perplexity(lm, corpus, batch_size=args.batch_size, show_progress=not args.quiet, **window)
        payload = {"ppl": result.ppl, "nll": result.nll, "tokens": result.tokens, "windows": result.windows,
                   "window_nll": result.window_nll, "protocol": result.protocol}  # fmt: skip
    p = result.protocol
    lines = [
        f"{p['dataset']} {p['split'] or ''} token perplexity {result.ppl:.4f} (ctx {p['ctx']}, stride {p['stride']}, "
        f"{result.windows}/{p.get('windows_available', result.windows)} windows, {result.tokens:,} tokens, "
        f"{p['wall_time_s']:.1f} s)"
    ]
    if args.kld:
        pct = result.kld_percentiles
        lines.append(
            f"KL(reference || model) mean {result.kld_mean:.5f} ± {result.kld_stderr:.5f}, median {pct['p50']:.5f}, "
            f"p99 {pct['p99']:.4f}, max {result.kld_max:.4f}; same top token {100 * result.top1_agreement:.2f} % "
            f"± {100 * result.top1_stderr:.2f}; reference ppl {result.reference_ppl:.4f}"
        )
    return payload, lines


def _load_tasks(args: argparse.Namespace) -> list:
    """The named tasks' data, read (and their names checked) before the model loads."""
    from compresslm.eval.tasks import ALIASES, ALL_TASKS, canonical_task, load_task

    given = ALL_TASKS if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    names = [canonical_task(n) for n in given]
    unknown = [g for g, n in zip(given, names, strict=True) if n not in ALL_TASKS]
    if unknown:
        aliases = ", ".join(f"{a} (= {n})" for a, n in ALIASES.items())
        raise CompressLMError(
            f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(ALL_TASKS)} or all "
            f"(lm-evaluation-harness names accepted: {aliases})"
        )
    return [load_task(name, args.data_dir, gsm8k_shots=args.gsm8k_shots) for name in names]


def _eval_tasks(args: argparse.Namespace, lm) -> tuple[dict, list[str]]:
    from compresslm.eval.harness import evaluate_task

    results, lines = {}, []
    for task in args.task_data:
        result = evaluate_task(lm, task, limit=args.task_limit, seed=args.seed, batch_size=args.batch_size,
                               show_progress=not args.quiet)  # fmt: skip
        results[task.name] = {**result.metrics, "n": result.n, "protocol": result.protocol}
        shown = ", ".join(
            f"{k} {v:.4f}" + (f" ± {result.metrics[k + '_stderr']:.4f}" if k + "_stderr" in result.metrics else "")
            for k, v in result.metrics.items()
            if not k.endswith("_stderr")
        )
        lines.append(f"{task.name:<14} n={result.n:<6} {shown}" + (f"  [{task.note}]" if task.note else ""))
    return {"tasks": results}, lines


def _eval_speed(args: argparse.Namespace, lm) -> tuple[dict, list[str]]:
    from compresslm.eval.speed import measure_speed

    try:
        batches = tuple(int(b) for b in args.speed_batch.split(","))
    except ValueError:
        raise CompressLMError(f"--speed-batch must be comma-separated integers, got {args.speed_batch!r}") from None
    result = measure_speed(lm, prompt_tokens=args.speed_prompt, new_tokens=args.speed_new, batch_sizes=batches,
                           repeats=args.repeats)  # fmt: skip
    lines = []
    for batch, row in result.per_batch.items():
        pre, dec = row["prefill_tokens_per_s"], row["decode_tokens_per_s"]
        lines.append(
            f"batch {batch}: prefill {pre['median']:.0f} tok/s [{pre['min']:.0f}-{pre['max']:.0f}], decode "
            f"{dec['median']:.1f} tok/s [{dec['min']:.1f}-{dec['max']:.1f}], first token "
            f"{row['time_to_first_token_s']['median'] * 1000:.0f} ms, KV cache {row['kv_cache_bytes']:,} B"
        )
    lines.append(f"model {result.model_bytes_in_memory:,} B in memory, peak RSS {result.peak_rss_bytes:,} B; "
                 f"energy {result.energy}")  # fmt: skip
    return {"speed": result.to_dict()}, lines


def _eval_kv(args: argparse.Namespace, lm) -> tuple[dict, list[str]]:
    """Perplexity through a quantized KV cache (chunked prefill), KL to the full-precision cache, passkey."""
    from compresslm.eval.kv_quality import kv_perplexity, passkey_accuracy
    from compresslm.recipe import KVCacheStage

    stage = KVCacheStage(bits=args.kv_bits, group_size=args.kv_group, value_group=args.kv_value_group,
                         window=args.kv_window, outliers=args.kv_outliers, pre_rope=args.kv_pre_rope,
                         rotate=args.kv_rotate, key_axis=args.kv_key_axis, sink=args.kv_sink)  # fmt: skip
    config = None if args.kv_bits == 16 else stage.config
    result = kv_perplexity(lm, config, args.ppl or "wikitext2", ctx=args.ctx, limit=args.limit, chunk=args.kv_chunk,
                           show_progress=not args.quiet)  # fmt: skip
    payload = {"kv": result, "kv_bytes": result["kv_bytes"], "kv_bytes_fp16": result["kv_bytes_fp16"]}
    label = result["protocol"]["kv_cache"]
    line = f"KV cache {label}: ppl {result['ppl']:.4f} (chunked prefill, chunk {args.kv_chunk}, ctx {args.ctx})"
    if config is not None:
        kv, fp16 = result["kv_bytes"], result["kv_bytes_fp16"]
        line += f" vs {result['reference_ppl']:.4f} full precision; KL {result['kld_mean']:.5f}, same top token "
        line += f"{100 * result['top1_agreement']:.2f} %; KV bytes {kv:,} vs {fp16:,} float16 ({fp16 / kv:.2f}x)"
    lines = [line]
    if args.passkey:
        payload["passkey"] = []
        for length in (int(x) for x in args.passkey.split(",")):
            pk = passkey_accuracy(lm, config, length, trials=args.passkey_trials)
            payload["passkey"].append(pk)
            lines.append(f"passkey at {length} tokens: {100 * pk['accuracy']:.0f} % of {pk['trials']} trials")
    return payload, lines


def _eval_llamacpp(args: argparse.Namespace) -> int:
    """`eval FILE.gguf --backend llama.cpp` with --ppl CORPUS, --kld --reference MODEL and/or --speed: the
    PyTorch path's windows and speed workload, llama.cpp's forward. With --kld the text is tokenized by the
    reference's tokenizer (unless --tokenizer names another), so both score the same windows."""
    from compresslm.eval.llamacpp import llamacpp_distance, llamacpp_perplexity, llamacpp_speed
    from compresslm.models.loading import load_model

    others = (("--tasks", args.tasks), ("--kv-bits", args.kv_bits), ("--dial", args.dial))
    others += ("--stream", args.stream), ("--dtype", args.dtype), ("--device", args.device)
    given = [flag for flag, value in others if value not in (None, False)]
    if given or not (args.ppl or args.kld or args.speed):
        named = f"; drop {', '.join(given)}" if given else ""
        raise CompressLMError(f"the llama.cpp backend measures --ppl, --kld and --speed{named}")
    if args.kld and not args.reference:
        raise CompressLMError("--kld with the llama.cpp backend needs --reference MODEL (the uncompressed model)")
    kv_type = args.kv_type or "f16"
    if args.kld:  # a missing or refused file fails now, not after the reference's pass over every window
        from compresslm.eval.llamacpp import LlamaCppModel

        LlamaCppModel(args.model, args.ctx, args.threads, all_logits=False, kv_type=kv_type)  # opened and dropped
    tokenizer = load_model(args.tokenizer).tokenizer if args.tokenizer else None
    payload: dict = {"model": args.model}
    corpus = args.ppl or "wikitext2"
    window = {"split": args.split, "ctx": args.ctx, "stride": args.stride, "limit": args.limit}
    if args.kld:
        from compresslm.eval.distance import reference_logits

        reference = load_model(args.reference)
        ref = reference_logits(reference, corpus, k=args.kld_topk, show_progress=not args.quiet, **window)
        tokenizer = tokenizer or reference.tokenizer
        del reference
        result = llamacpp_distance(args.model, ref, corpus, split=args.split, threads=args.threads,
                                   tokenizer=tokenizer, kv_type=kv_type, show_progress=not args.quiet)  # fmt: skip
        details = {k: v for k, v in result.to_dict().items() if k not in ("window_nll", "protocol")}
        payload.update({"ppl": result.ppl, "nll": result.nll, "tokens": result.tokens, "windows": result.windows,
                        "window_nll": result.window_nll, "kld_mean": result.kld_mean,
                        "top1_agreement": result.top1_agreement, "kld": details,
                        "protocol": result.protocol})  # fmt: skip
    elif args.ppl:
        result = llamacpp_perplexity(args.model, corpus, threads=args.threads, tokenizer=tokenizer,
                                     kv_type=kv_type, show_progress=not args.quiet, **window)  # fmt: skip
        payload.update({"ppl": result.ppl, "nll": result.nll, "tokens": result.tokens, "windows": result.windows,
                        "window_nll": result.window_nll, "protocol": result.protocol})  # fmt: skip
    if args.speed:
        payload["speed"] = llamacpp_speed(args.model, prompt_tokens=args.speed_prompt, new_tokens=args.speed_new,
                                          repeats=args.repeats, threads=args.threads)  # fmt: skip
    if args.json:
        _emit_json(payload)
        return 0
    _print(f"{args.model} (llama.cpp):")
    if args.ppl or args.kld:
        p = result.protocol
        _print(f"  {p['dataset']} {p['split'] or ''} token perplexity {result.ppl:.4f} (ctx {p['ctx']}, stride "
               f"{p['stride']}, {result.windows}/{p['windows_available']} windows, {result.tokens:,} tokens, "
               f"{p['wall_time_s']:.1f} s)")  # fmt: skip
    if args.kld:
        pct = result.kld_percentiles
        _print(
            f"  KL(reference || model) mean {result.kld_mean:.5f} ± {result.kld_stderr:.5f}, median "
            f"{pct['p50']:.5f}, p99 {pct['p99']:.4f}, max {result.kld_max:.4f}; same top token "
            f"{100 * result.top1_agreement:.2f} % ± {100 * result.top1_stderr:.2f}; reference ppl "
            f"{result.reference_ppl:.4f}"
        )
    if args.speed:
        speed = payload["speed"]
        prefill, decode = speed["prefill_tokens_per_s"], speed["decode_tokens_per_s"]
        _print(
            f"  batch 1, {speed['prompt_tokens']} prompt + {speed['new_tokens']} new tokens: prefill "
            f"{prefill['median']:.0f} tok/s, decode {decode['median']:.1f} tok/s (medians of {decode['runs']} runs)"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from compresslm.models.loading import load_model

    if args.backend == "llama.cpp":
        return _eval_llamacpp(args)
    llama_only = [flag for flag, value in (("--tokenizer", args.tokenizer), ("--threads", args.threads),
                                           ("--kv-type", args.kv_type)) if value is not None]  # fmt: skip
    if llama_only:
        raise CompressLMError(f"{', '.join(llama_only)} belong to --backend llama.cpp; drop them or add it")
    if args.kv_bits is not None:
        if args.kld:
            raise CompressLMError("--kv-bits reports its own KL (to the full-precision cache); drop --kld")
    elif args.passkey:
        raise CompressLMError("--passkey needs --kv-bits (16 for the full-precision cache)")
    if not (args.ppl or args.kld or args.tasks or args.speed or args.kv_bits is not None):
        raise CompressLMError("nothing to evaluate: give --ppl CORPUS, --kld, --tasks LIST, --speed and/or --kv-bits")
    windows = args.ppl or args.kld or args.kv_bits is not None
    if args.limit is not None and not windows:  # lm-eval users mean items per task; here it counts windows
        raise CompressLMError(
            f"--limit counts perplexity windows and limits nothing here; to score {args.limit} items per task "
            f"give --task-limit {args.limit}"
        )
    setting = None
    if args.dial:
        from compresslm.dial import parse_setting

        setting = parse_setting(args.dial)  # a bad setting fails before the model loads
    if args.stream and (args.speed or args.kv_bits is not None or setting is not None):
        raise CompressLMError("a streamed evaluation measures --ppl, --kld and --tasks; drop --stream for the others")
    if args.ppl:  # what can be checked without the model is checked before it loads
        from compresslm.data.corpora import check_corpus

        check_corpus(args.ppl)
    args.task_data = _load_tasks(args) if args.tasks else []
    generating = [task.name for task in args.task_data if task.kind == "generation"]
    if args.stream and generating:
        raise CompressLMError(f"{', '.join(generating)} generates text, which a streamed evaluation cannot; "
                              "drop --stream or the task")  # fmt: skip
    lm = load_model(args.model, dtype=args.dtype, device=args.device, lazy=args.stream)
    if args.stream and lm.lazy is None:
        raise CompressLMError(f"{args.model} does not stream: safetensors directories, GGUF files and containers do")
    payload: dict = {"model": args.model}
    lines: list[str] = []
    if setting is not None:
        from compresslm.dial import apply_setting

        report = apply_setting(lm, setting)
        payload["dial"] = {**setting, "switch_seconds": report.seconds, "layers": report.layers}
        lines.append(f"dial {args.dial}: {report.layers} layers switched in {report.seconds:.2f} s")
    text = (args.ppl or args.kld) and args.kv_bits is None
    parts = ((text, _eval_text), (args.kv_bits is not None, _eval_kv), (args.tasks, _eval_tasks),
             (args.speed, _eval_speed))  # fmt: skip
    for wanted, part in parts:
        if wanted:
            values, text = part(args, lm)
            payload.update(values)
            lines += text
    if args.json:
        _emit_json(payload)
        return 0
    _print(f"{args.model}:")
    for line in lines:
        _print(f"  {line}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from compresslm.eval.lm_eval_adapter import run_lm_eval

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = run_lm_eval(args.model, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                          batch_size=args.batch_size, include_path=args.include_path, device=args.device)  # fmt: skip
    metrics = results.get("results", {})
    if args.json:
        _emit_json({"model": args.model, "lm_eval": metrics, "versions": results.get("versions", {})})
        return 0
    for task, values in metrics.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
        _print(f"{task}: {shown}")
    return 0


def _print_frontier(rows: list[dict]) -> None:
    from compresslm.sweep.frontier import size_frontier

    _print("frontier (bytes on disk vs ppl; the uncompressed model first, for reference):")
    _print(f"  {'point':<30} {'ppl':>9} {'KL':>8} {'bits/param':>10} {'MB on disk':>10}")
    for r in size_frontier(rows):
        kld = f"{r['kld_mean']:8.4f}" if "kld_mean" in r else " " * 8
        _print(f"  {r['label']:<30} {r['ppl']:9.3f} {kld} {r['bits_per_param']:10.3f} {r['bytes_on_disk'] / 1e6:10.1f}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from compresslm.sweep.grid import load_grid
    from compresslm.sweep.report import write_report
    from compresslm.sweep.runner import run_sweep
    from compresslm.sweep.store import ResultStore

    grid = load_grid(args.grid)  # validated before any compute
    check_writable_file(args.db, "results database")
    check_writable_dir(args.out, "report folder")
    if args.containers is not None:
        check_writable_dir(args.containers, "containers folder")
    if args.address and args.executor != "ray":
        raise CompressLMError("--address names a Ray cluster: give it with --executor ray")
    rows = run_sweep(args.model, grid, args.db, args.containers, data_dir=args.data_dir,
                     show_progress=not args.quiet, log=_print, executor=args.executor, address=args.address,
                     cpus_per_point=args.cpus_per_point)  # fmt: skip
    store = ResultStore(args.db)
    labels = {p.label for p in grid.points}
    failed = [f for f in store.failures(grid.name) if f["label"] in labels]
    store.close()
    page = write_report(rows, args.out, title=f"compresslm sweep '{grid.name}' of {args.model}", failed=failed)
    if args.json:
        _emit_json({"grid": grid.name, "db": str(args.db), "report": str(page), "points": rows, "failed": failed})
        return 1 if failed else 0
    _print_frontier(rows)
    _print(f"report: {page} (and {page.with_suffix('.md')})")
    _print_best(rows)
    for f in failed:
        _print(f"not measured: {f['label']}: {f['error']}")
    return 1 if failed else 0


BEST_WITHIN = 1.10  # the smallest kept container whose perplexity is within 10 % of the uncompressed model's


def _print_best(rows: list[dict]) -> None:
    """The smallest kept container within BEST_WITHIN of the uncompressed perplexity, and how to open it."""
    base = next((r for r in rows if r["family"] == "uncompressed"), None)
    kept = [r for r in rows if r.get("container") and Path(r["container"]).exists() and r.get("ppl") is not None]
    if base is None or not kept:
        return
    close = [r for r in kept if r["ppl"] <= BEST_WITHIN * base["ppl"]]
    best = min(close, key=lambda r: r["bytes_on_disk"]) if close else min(kept, key=lambda r: r["ppl"])
    what = "the smallest within 10 % of the uncompressed perplexity" if close else "the best perplexity"
    program = sys.argv[0] if Path(sys.argv[0]).name == "compresslm" else "compresslm"
    _print(f"{what}: {best['label']} (ppl {best['ppl']:.3f}, {best['bytes_on_disk'] / 1e6:.1f} MB); open it with:")
    _print(f'  {program} generate {best["container"]} --chat --prompt "Hello! What can you do?"')


def cmd_robustness(args: argparse.Namespace) -> int:
    from compresslm.analysis.robustness import robustness_rows
    from compresslm.data.corpora import check_corpus
    from compresslm.formats.container import is_container

    if not is_container(args.container):
        raise CompressLMError(f"{args.container} is not a .clm container")
    check_corpus(args.ppl)
    try:
        rates = tuple(float(r) for r in args.rates.split(","))
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise CompressLMError(f"cannot read --rates {args.rates!r} or --seeds {args.seeds!r}") from None
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    rows = robustness_rows(args.container, parts, rates, seeds, args.ppl, args.ctx, args.limit, args.protect,
                           show_progress=not args.quiet)  # fmt: skip
    if args.json:
        _emit_json({"container": args.container, "protect": args.protect, "runs": rows})
        return 0
    _print(f"{args.container}: bit flips ({'with' if args.protect else 'without'} range checks), "
           f"reference ppl {rows[0]['reference_ppl']:.3f}")  # fmt: skip
    _print(f"  {'part':<8} {'rate':>8} {'flips (mean)':>12} {'ppl (mean over seeds)':>22} {'KL (mean)':>10}")
    for part in parts:
        for rate in rates:
            runs = [r for r in rows if r["part"] == part and r["rate"] == rate]
            broken = sum(r["ppl"] is None for r in runs)
            ppl = [r["ppl"] for r in runs if r["ppl"] is not None]
            kld = [r["kld_mean"] for r in runs if r["kld_mean"] is not None]
            shown = f"{sum(ppl) / len(ppl):.3f}" if ppl else "not finite"
            shown += f" ({broken} of {len(runs)} not finite)" if broken and ppl else ""
            kl = f"{sum(kld) / len(kld):.4f}" if kld else "-"
            flips = sum(r["flips"] for r in runs) / len(runs)
            _print(f"  {part:<8} {rate:>8.0e} {flips:>12.1f} {shown:>22} {kl:>10}")
    return 0


def cmd_recompress(args: argparse.Namespace) -> int:
    from compresslm.data.corpora import check_corpus
    from compresslm.recipe import load_recipe
    from compresslm.sweep.recompression import recompression_drift

    check_corpus(args.ppl)
    recipes = [load_recipe(r) for r in args.recipe]  # every recipe checked before any compute
    check_writable_dir(args.output, "cycles folder")
    rows = recompression_drift(args.model, recipes, args.cycles, args.output, args.ppl, args.ctx, args.limit,
                               args.calib_samples, show_progress=not args.quiet)  # fmt: skip
    if args.json:
        _emit_json({"model": args.model, "cycles": rows})
        return 0
    _print(f"{args.model}: {args.cycles} compression cycles, each from the previous one's dequantized weights")
    _print(f"  {'cycle':>5} {'recipe':<24} {'ppl':>10} {'bits/param':>10} {'drift prev':>10} {'from 1st':>9} "
           f"{'from source':>11}")  # fmt: skip
    for r in rows:
        drift = f"{r['drift_from_previous']:>10.5f} {r['drift_from_first']:>9.5f} {r['drift_from_source']:>11.5f}"
        _print(f"  {r['cycle']:>5} {str(r['recipe'])[:24]:<24} {r['ppl']:>10.3f} {r['bits_per_param']:>10.3f} {drift}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from compresslm.analysis.diagnose import diagnose, write_diagnosis
    from compresslm.data.calibration import calibration_windows
    from compresslm.models.loading import load_model

    try:
        widths = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
        raise CompressLMError(f"cannot read --bits {args.bits!r}; give widths such as 2,3,4,8") from None
    if any(not 1 <= b <= 8 for b in widths) or args.group_size < 1:
        raise CompressLMError(f"--bits {args.bits} and --group-size {args.group_size}: widths 1-8, a positive group")
    if args.out is not None:
        check_writable_dir(args.out, "diagnosis folder")
    lm = load_model(args.model, dtype="float32")
    calib = calibration_windows(lm.tokenizer, args.calib, args.calib_samples, args.calib_length, args.seed)
    result = diagnose(lm, calib, widths, args.group_size, args.fisher_windows, show_progress=not args.quiet)
    if args.out is not None:
        write_diagnosis(result, args.out, args.model)
    if args.json:
        _emit_json({"model": args.model, **result})
        return 0
    head = " ".join(f"{'W' + str(b) + ' err':>9}" for b in widths)
    _print(f"{args.model}: per-layer indicators and the predicted relative output error of RTN g{args.group_size}")
    _print(f"  {'layer':<36} {'kurt':>7} {'outl %':>6} {'eff.rank':>8} {'act max/med':>11} {head}")
    for layer in result["layers"]:
        errors = " ".join(f"{layer['predicted_error'][str(b)]:>9.2e}" for b in widths)
        _print(f"  {layer['name'][-36:]:<36} {layer['kurtosis']:>7.2f} {100 * layer['outlier_share']:>6.3f} "
               f"{layer['effective_rank']:>8.1f} {layer['activation_max_over_median']:>11.1f} {errors}")  # fmt: skip
    if "predicted_loss_score" in result:
        shown = ", ".join(f"W{b}: {v:.4g}" for b, v in result["predicted_loss_score"].items())
        _print(f"predicted loss score (Fisher-weighted, {args.fisher_windows} windows): {shown}")
    return 0


def cmd_shrink(args: argparse.Namespace) -> int:
    from compresslm.api import shrink
    from compresslm.recipe import load_recipe

    recipe = load_recipe(args.recipe)  # validated before the model is loaded
    for stage in recipe.stages:
        for key, value in (("samples", args.calib_samples), ("length", args.calib_len), ("source", args.calib)):
            if value is not None and hasattr(stage, key):
                setattr(stage, key, value)
    recipe.validate()
    _print(f"shrinking {args.model} with recipe '{recipe.name}'")
    _lm, summary = shrink(args.model, recipe, args.output, show_progress=not args.quiet)
    if args.json:
        _emit_json({"model": args.model, "output": args.output, **summary})
        return 0
    for facts in summary["stages"]:
        changes = [f"{key} {facts[key]['from']} -> {facts[key]['to']}" for key in ("layers", "mlp", "heads", "hidden")
                   if key in facts]  # fmt: skip
        if "removed_blocks" in facts:
            changes.append(f"removed blocks {facts['removed_blocks']}")
        params = facts.get("parameters")
        shown = f"; parameters {_format_count(params['from'])} -> {_format_count(params['to'])}" if params else ""
        _print(f"{facts['stage']}: {', '.join(changes)}{shown}")
    _print(f"model: {args.output} (a plain Hugging Face directory; heal it with "
           f"`compresslm train {args.output} --recipe heal --teacher {args.model} --steps N -o DIR`)")  # fmt: skip
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from compresslm.sweep.report import write_report
    from compresslm.sweep.store import ResultStore

    if not Path(args.db).is_file():
        raise CompressLMError(f"results database not found: {args.db}")
    store = ResultStore(args.db)
    rows = store.results(args.grid, latest=not args.all)
    failed = store.failures(args.grid)
    store.close()
    if not rows:
        raise CompressLMError(f"no finished points in {args.db}" + (f" for grid '{args.grid}'" if args.grid else ""))
    page = write_report(rows, args.out, title=f"compresslm results from {Path(args.db).name}", failed=failed)
    _print_frontier(rows)
    superseded = sum(r.get("superseded", 0) for r in rows)
    if superseded:
        _print(f"{superseded} earlier measurement(s) of re-measured points left out (--all shows every row)")
    _print(f"report: {page}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from compresslm.models.loading import load_model
    from compresslm.train.trainer import check_teacher_use, train, train_recipe

    recipe = train_recipe(args.recipe)  # validated before the model is loaded
    for key in ("data", "lr", "batch_size", "seq_len"):
        value = getattr(args, key)
        if value is not None:
            setattr(recipe, key, value)
    recipe.validate()
    if args.teacher:
        check_teacher_use(recipe)
    elif recipe.name == "heal":
        raise CompressLMError("the heal recipe distils from the unpruned model: name it with --teacher")
    check_writable_dir(args.output, "output directory")
    lm = load_model(args.model, device=args.device)
    teacher = load_model(args.teacher, device=args.device) if args.teacher else None
    if lm.kind == "container" and teacher is None and recipe.distill:
        _print("note: the distillation teacher is this compressed model itself; --teacher names the original")
    _print(f"training {args.model} with '{recipe.name}' for {args.steps} steps "
           f"({args.steps * recipe.batch_size} x {recipe.seq_len} tokens of {recipe.data})")  # fmt: skip
    summary = train(lm, recipe, args.steps, args.output, seed=args.seed, show_progress=not args.quiet, teacher=teacher)
    if args.json:
        _emit_json(summary)
        return 0
    _print(f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; model: {summary['model']}"
           + (f"; QAT container: {summary['container']}" if "container" in summary else "")
           + (f"; QAT containers: {', '.join(summary['containers'].values())}" if "containers" in summary else "")
           + (f" ({summary['linear_bits_per_weight']:.3f} bits per linear weight, widths "
              f"{_width_counts(summary['widths'])})" if "widths" in summary else "")
           + f"; log: {summary['log']}")  # fmt: skip
    return 0


def _width_counts(widths: dict[str, int]) -> str:
    """'W8 x3, W4 x20': how many layers a run left at each learned width."""
    counts = {b: list(widths.values()).count(b) for b in sorted(set(widths.values()), reverse=True)}
    return ", ".join(f"W{b} x{n}" for b, n in counts.items())


def _output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compresslm", description="Make language models small and measure what that costs."
    )
    parser.add_argument("--version", action="version", version=f"compresslm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    model_help = "a registered name (smollm2-135m), a Hugging Face directory, a .gguf file or a hub id"
    info = sub.add_parser("info", help="architecture, parameter counts by role and bytes of a model")
    info.add_argument("model", help=model_help)
    info.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    info.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    info.add_argument(
        "--entropy",
        action="store_true",
        help="a container's codes entropy-coded: Shannon bound, ANS and zstd sizes (extra: entropy)",
    )
    info.set_defaults(func=cmd_info)

    comp = sub.add_parser("compress", help="compress a model with a recipe and write a .clm container")
    comp.add_argument("model", help=model_help)
    comp.add_argument(
        "--recipe", required=True, help="preset (w4-gptq, w4-g64-gptq-act, w8-rtn, ...) or YAML/JSON file"
    )
    comp.add_argument("-o", "--output", required=True, help="the .clm file to write")
    comp.add_argument(
        "--target-bits",
        type=float,
        default=None,
        help="choose per-layer bits so the file has at most this many bits/param (recipe: method, grid)",
    )
    comp.add_argument("--target-size", default=None, help="choose per-layer bits so the file fits, e.g. 60MB")
    comp.add_argument("--target-linear-bits", type=float, default=None,
                      help="choose per-layer bits for at most this many bits per linear weight")  # fmt: skip
    comp.add_argument("--sensitivity", choices=("fisher", "output"), default="fisher",
                      help="budget solver's layer sensitivity: output error weighted by the loss's gradient "
                           "(fisher, default) or plain output error")  # fmt: skip
    comp.add_argument("--budget-estimate", choices=("method", "rtn"), default="method",
                      help="how the budget solver measures each option's error: the recipe's own method, as the "
                           "compression runs it (default), or plain RTN (faster, misleads the choice)")  # fmt: skip
    comp.add_argument("--budget-sparsity", default=None,
                      help="sparsity patterns the budget solver may give a layer at 3 or 4 bits (N:M also at 2), "
                           "comma-separated (default 50%%,2:4 where the recipe allows; 'none' for none)")  # fmt: skip
    comp.add_argument("--calib", default=None, help="calibration source: c4 (default), wikitext2, or a text/JSONL path")
    comp.add_argument("--calib-samples", type=int, default=None, help="number of calibration windows (default 128)")
    comp.add_argument("--calib-len", type=int, default=None, help="tokens per calibration window (default 512)")
    comp.add_argument("--seed", type=int, default=None, help="calibration sampling seed (default 0)")
    comp.add_argument("--propagate", choices=("compressed", "original"), default=None,
                      help="what later blocks calibrate on: the compressed blocks' outputs (sequential, the "
                           "default) or the original model's (one pass, statistics cached and reused)")  # fmt: skip
    comp.add_argument("--stats-cache", default=None,
                      help="where --propagate original keeps calibration statistics for reuse "
                           "(default $COMPRESSLM_CACHE/calibration-stats)")  # fmt: skip
    comp.add_argument("--device", default=None, help="device for calibration (cpu, cuda, ...)")
    comp.add_argument("--nproc", type=int, default=1,
                      help="split the calibration windows over this many processes (gloo; under torchrun the "
                           "process group comes from its environment)")  # fmt: skip
    comp.add_argument("--stream", action="store_true",
                      help="read the model block by block from disk and write the container as it goes, so a model "
                           "larger than memory compresses (safetensors directories and GGUF files)")  # fmt: skip
    _output_flags(comp)
    comp.set_defaults(func=cmd_compress)

    dial = sub.add_parser("dial", help="write one setting (bits, sparsity) of a dial artifact as a container")
    dial.add_argument("artifact", help="a container made with a dial recipe (--recipe dial)")
    dial.add_argument("--bits", type=int, default=None, help="one of the artifact's widths (default: the widest)")
    dial.add_argument("--avg-bits", type=float, default=None,
                      help="choose a width per layer so the layers average at most this many bits per weight "
                           "(scales and zero points counted), from the artifact alone")  # fmt: skip
    dial.add_argument("--bits-per-layer", default=None, metavar="JSON",
                      help="a JSON file of module path -> width; layers it leaves out stay at the widest")  # fmt: skip
    dial.add_argument("--sparsity", type=float, default=0.0, help="fraction of weights removed, 0 to <1")
    dial.add_argument("-o", "--output", required=True, help="the container to write")
    dial.set_defaults(func=cmd_dial)

    gen = sub.add_parser("generate", help="stream a greedy reply to a prompt (torch or llama.cpp)")
    gen.add_argument("model", help=model_help + ", a .clm container or an export")
    gen.add_argument("--prompt", required=True, help="the text to continue (or, with --chat, the user's message)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many tokens (default 128)")
    gen.add_argument("--backend", choices=("torch", "llama.cpp"), default="torch",
                     help="PyTorch (default) or llama.cpp for a .gguf file (extra compresslm[llama-cpp])")  # fmt: skip
    gen.add_argument("--dial", default=None, help="a dial artifact's setting, e.g. bits=3,sparsity=0.5")
    gen.add_argument("--float-weights", action="store_true",
                     help="keep a float copy of each compressed layer (faster, float-sized memory)")  # fmt: skip
    gen.add_argument("--device", default=None, help="torch backend: cpu, cuda, ... (default: cpu)")
    gen.add_argument("--threads", type=int, default=None, help="llama.cpp backend: CPU threads")
    gen.add_argument("--json", action="store_true", help="print the reply and its numbers as one JSON object")
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="write a container as GGUF (llama.cpp), compressed-tensors or plain HF")
    exp.add_argument("container", help="a .clm container (gguf: or an uncompressed model, written in --dtype)")
    exp.add_argument(
        "--format",
        required=True,
        choices=("gguf", "compressed-tensors", "hf", "clm-ans"),
        help="gguf (llama.cpp), compressed-tensors (vLLM, transformers), hf (dequantized), "
        "clm-ans (this container with its codes ANS-coded: smaller, loads to the same records)",
    )
    exp.add_argument("-o", "--output", required=True, help="the file (gguf) or directory to write")
    exp.add_argument(
        "--requantize",
        action="store_true",
        help="gguf: re-round tensors whose grid no GGUF type holds (the added error is printed)",
    )
    exp.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "bfloat16", "float32"),
        help="hf and compressed-tensors: dtype of dequantized and dense tensors; gguf of a model: of its weights",
    )
    exp.add_argument("--force", action="store_true", help="replace an existing output")
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    exp.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    exp.set_defaults(func=cmd_export)

    masks = sub.add_parser("masks", help="prune with two calibration sets and report how far the masks agree")
    masks.add_argument("model", help=model_help)
    masks.add_argument("--recipe", required=True, help="a pruning recipe: preset (50%%-wanda, 2:4-sparsegpt) or file")
    masks.add_argument("--calib", default="c4", help="calibration source A (default c4)")
    masks.add_argument("--calib-b", default=None, help="calibration source B (default: the same as A)")
    masks.add_argument("--seed", type=int, default=0, help="sampling seed of set A (default 0)")
    masks.add_argument("--seed-b", type=int, default=1, help="sampling seed of set B (default 1)")
    masks.add_argument("--calib-samples", type=int, default=128, help="windows per set (default 128)")
    masks.add_argument("--calib-len", type=int, default=512, help="tokens per window (default 512)")
    masks.add_argument("--device", default=None, help="device for calibration (cpu, cuda, ...)")
    _output_flags(masks)
    masks.set_defaults(func=cmd_masks)

    lme = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks (optional extra compresslm[lm-eval])")
    lme.add_argument("model", help=model_help)
    lme.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    lme.add_argument("--num-fewshot", type=int, default=None)
    lme.add_argument("--limit", type=float, default=None, help="items per task (or a fraction below 1)")
    lme.add_argument("--batch-size", type=int, default=8)
    lme.add_argument("--include-path", default=None, help="folder of extra task YAMLs (e.g. tasks on local files)")
    lme.add_argument("--device", default=None)
    lme.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    lme.set_defaults(func=cmd_lm_eval)

    sw = sub.add_parser("sweep", help="measure a grid of recipes into a results DB and write the frontier report")
    sw.add_argument("model", help=model_help)
    sw.add_argument("--grid", default="default", help="smoke, default, full, or a YAML grid file")
    sw.add_argument("--db", default="results.sqlite", help="SQLite results database (resumable)")
    sw.add_argument("--out", default="report", help="report folder (plots, report.md, report.html)")
    sw.add_argument("--containers", default=None, help="keep each point's .clm here (default: deleted)")
    sw.add_argument("--data-dir", default=None, help="task data directory for grids with tasks")
    sw.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="run the points here, one at a time (default), or as Ray tasks (compresslm[ray])")  # fmt: skip
    sw.add_argument(
        "--address",
        default=None,
        help="with --executor ray: a running cluster ('auto' or HOST:PORT; default: a new local one)",
    )
    sw.add_argument("--cpus-per-point", type=int, default=1, help="with --executor ray: CPUs each point declares")
    _output_flags(sw)
    sw.set_defaults(func=cmd_sweep)

    rob = sub.add_parser("robustness", help="seeded bit flips in a container's codes, scales, zeros, masks, dense")
    rob.add_argument("container", help="a .clm container")
    rob.add_argument("--parts", default="codes,scales,zeros,masks,dense", help="comma-separated stored parts")
    rob.add_argument("--rates", default="1e-7,1e-6,1e-5,1e-4", help="comma-separated flip probabilities per bit")
    rob.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (one run each)")
    rob.add_argument("--ppl", default="wikitext2", help="corpus name or file")
    rob.add_argument("--ctx", type=int, default=512)
    rob.add_argument("--limit", type=int, default=8, help="windows")
    rob.add_argument("--protect", action="store_true", help="range checks on scales and dense values at load")
    _output_flags(rob)
    rob.set_defaults(func=cmd_robustness)

    rec = sub.add_parser("recompress", help="compress, dequantize and compress again: quality and weight drift")
    rec.add_argument("model", help=model_help)
    rec.add_argument(
        "--recipe",
        action="append",
        required=True,
        help="a recipe per cycle, taken in turn (repeat the flag for several)",
    )
    rec.add_argument("--cycles", type=int, default=5)
    rec.add_argument("-o", "--output", required=True, help="folder for each cycle's container")
    rec.add_argument("--ppl", default="wikitext2", help="corpus name or file")
    rec.add_argument("--ctx", type=int, default=2048)
    rec.add_argument("--limit", type=int, default=8, help="windows")
    rec.add_argument("--calib-samples", type=int, default=None, help="calibration windows per cycle")
    _output_flags(rec)
    rec.set_defaults(func=cmd_recompress)

    dia = sub.add_parser(
        "diagnose", help="per-layer compressibility indicators and predicted errors, before compressing"
    )
    dia.add_argument("model", help=model_help)
    dia.add_argument("--bits", default="2,3,4,8", help="widths whose RTN error is predicted")
    dia.add_argument("--group-size", type=int, default=64)
    dia.add_argument("--calib", default="c4", help="calibration source (c4, wikitext2 or a file)")
    dia.add_argument("--calib-samples", type=int, default=32)
    dia.add_argument("--calib-length", type=int, default=512)
    dia.add_argument("--seed", type=int, default=0)
    dia.add_argument("--fisher-windows", type=int, default=4, help="windows of the backward pass (0: none)")
    dia.add_argument("--out", default=None, help="folder for diagnosis.json and one plot per indicator")
    _output_flags(dia)
    dia.set_defaults(func=cmd_diagnose)

    shr = sub.add_parser("shrink", help="remove whole MLP channels, heads, hidden channels or blocks: a smaller "
                                        "plain Hugging Face model")  # fmt: skip
    shr.add_argument("model", help=model_help)
    shr.add_argument("--recipe", required=True,
                     help="structured parts joined by '+': mlp<pct>, heads<pct>, hidden<pct>, drop<n> (each with "
                          "-taylor for gradient importance), e.g. drop8+mlp50; or a YAML/JSON recipe")  # fmt: skip
    shr.add_argument("-o", "--output", required=True, help="the Hugging Face directory to write")
    shr.add_argument("--calib", default=None, help="importance text: c4 (default), wikitext2 or a text/JSONL path")
    shr.add_argument("--calib-samples", type=int, default=None, help="importance windows (default 32)")
    shr.add_argument("--calib-len", type=int, default=None, help="tokens per window (default 512)")
    _output_flags(shr)
    shr.set_defaults(func=cmd_shrink)

    rep = sub.add_parser("report", help="write the frontier report of a results DB")
    rep.add_argument("db", help="SQLite results database")
    rep.add_argument("--out", default="report", help="report folder")
    rep.add_argument("--grid", default=None, help="only this grid's points")
    rep.add_argument("--all", action="store_true",
                     help="every finished row, also those a later measurement of a point supersedes")  # fmt: skip
    rep.set_defaults(func=cmd_report)

    tr = sub.add_parser(
        "train", help="fine-tune for compressibility (QAT, randomized precision, pruning, distillation)"
    )
    tr.add_argument("model", help=model_help)
    recipes = (
        "finetune, heal (with --teacher), qat-w4, qat-w3, qat-w2, random-precision, gmp-50%%, gmp-70%%, "
        "nm-2:4, or a YAML file"
    )
    tr.add_argument("--recipe", default="finetune", help=recipes)
    tr.add_argument("--steps", type=int, required=True, help="optimizer steps")
    tr.add_argument("-o", "--output", required=True, help="checkpoint directory (resumes if interrupted)")
    tr.add_argument("--data", default=None, help="training text: c4 (default), wikitext2, or a text/JSONL path")
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--batch-size", type=int, default=None)
    tr.add_argument("--seq-len", type=int, default=None)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--teacher", help="distillation teacher (default: the model as loaded); " + model_help)
    tr.add_argument("--device", default=None)
    _output_flags(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model under a labelled protocol")
    ev.add_argument("model", help=model_help)
    ev.add_argument("--ppl", metavar="CORPUS", help="token perplexity on wikitext2 or a text/JSONL file")
    ev.add_argument("--backend", choices=("torch", "llama.cpp"), default="torch",
                    help="run the model in PyTorch (default) or, for a .gguf file, in llama.cpp (--ppl, --kld "
                         "with --reference, --speed; needs the extra compresslm[llama-cpp])")  # fmt: skip
    ev.add_argument("--tokenizer", default=None,
                    help="llama.cpp backend: tokenize with this model's tokenizer (e.g. the container exported) "
                         "instead of the one transformers reads from the GGUF")  # fmt: skip
    ev.add_argument("--threads", type=int, default=None, help="llama.cpp backend: CPU threads (default: torch's)")
    ev.add_argument("--kv-type", choices=("f16", "f32"), default=None,
                    help="llama.cpp backend: KV cache type (default f16, llama.cpp's; f32 as the PyTorch path "
                         "keeps it)")  # fmt: skip
    ev.add_argument("--split", default="test", help="corpus split (wikitext2: test or validation)")
    ev.add_argument("--ctx", type=int, default=2048, help="window length in tokens (default 2048)")
    ev.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: ctx, no overlap)")
    ev.add_argument("--limit", type=int, default=None,
                    help="score only the first N perplexity windows (for tasks: --task-limit)")  # fmt: skip
    ev.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    ev.add_argument("--stream", action="store_true",
                    help="read the model block by block from disk (every window through one block at a time), "
                         "for models larger than memory; --ppl only")  # fmt: skip
    ev.add_argument("--kld", action="store_true", help="KL divergence and top-1 agreement against the reference")
    ev.add_argument(
        "--reference", default=None, help="the uncompressed model for --kld (default: a container's source)"
    )
    ev.add_argument("--kld-topk", type=int, default=64, help="reference log-probs kept per token (default 64)")
    ev.add_argument("--dial", default=None, help="a dial artifact's setting to evaluate, e.g. bits=3,sparsity=0.5")
    ev.add_argument("--kv-bits", type=int, default=None, help="KV cache bits (2-8; 16 = full precision)")
    ev.add_argument("--kv-group", type=int, default=128, help="tokens per key group (default 128)")
    ev.add_argument("--kv-value-group", type=int, default=64, help="channels per value group (default 64)")
    ev.add_argument("--kv-window", type=int, default=0, help="recent tokens kept in full precision (default 0)")
    ev.add_argument("--kv-outliers", type=float, default=0.0, help="fraction of key entries kept in float16")
    ev.add_argument("--kv-pre-rope", action="store_true", help="quantize keys before the rotary embedding")
    ev.add_argument("--kv-rotate", action="store_true", help="Hadamard-rotate each head before quantizing")
    ev.add_argument("--kv-key-axis", choices=("channel", "token"), default="channel",
                    help="keys per channel over token groups (default) or per token like values")  # fmt: skip
    ev.add_argument("--kv-sink", type=int, default=0, help="first tokens kept in full precision (default 0)")
    ev.add_argument("--kv-chunk", type=int, default=128, help="prefill chunk for KV perplexity (default 128)")
    ev.add_argument("--passkey", default=None, help="passkey retrieval at these lengths, e.g. 1024,4096,8192")
    ev.add_argument("--passkey-trials", type=int, default=5, help="trials per passkey length (default 5)")
    ev.add_argument("--tasks", default=None,
                    help="comma-separated tasks (arc_easy,piqa,...; lm-eval's names such as lambada_openai too) "
                         "or 'all'")  # fmt: skip
    ev.add_argument("--data-dir", default=None, help="task data directory (default: $COMPRESSLM_DATA)")
    ev.add_argument("--task-limit", type=int, default=None, help="score a seeded random subset of N items per task")
    ev.add_argument("--seed", type=int, default=0, help="seed of the task subset (default 0)")
    ev.add_argument("--gsm8k-shots", type=int, default=8, help="GSM8K exemplars from train (default 8)")
    ev.add_argument("--speed", action="store_true", help="prefill/decode tokens/s, first-token time, memory")
    ev.add_argument("--speed-prompt", type=int, default=512, help="prompt tokens for --speed (default 512)")
    ev.add_argument("--speed-new", type=int, default=64, help="decoded tokens for --speed (default 64)")
    ev.add_argument("--speed-batch", default="1", help="batch sizes for --speed, e.g. 1,8 (default 1)")
    ev.add_argument("--repeats", type=int, default=5, help="timed runs for --speed after one warm-up (default 5)")
    _output_flags(ev)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CompressLMError as exc:
        print(f"compresslm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, full disk, ...: writes are atomic, so nothing is half-written
        where = f": {exc.filename}" if exc.filename else ""
        print(f"compresslm: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compresslm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
