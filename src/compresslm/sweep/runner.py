"""Run a sweep: compress, write, reload and evaluate every point of a grid, recording each in SQLite.

Each point is measured on the model *reloaded from its written container* (the number is about
the artifact, not the in-memory state), under the grid's protocol: perplexity (and, with `kld`,
KL divergence and top-1 agreement against the uncompressed model on the same windows, in one
pass), optional tasks and speed. Finished points are skipped on a rerun; a point that was
interrupted is redone. Sweeps started on one database split its grid: each claims a point before
measuring it (`ResultStore.claim`) and at the end waits for the points others still hold. The
uncompressed model's reference logits are computed once per sweep (and cached on disk across
sweeps), and so are the calibration statistics of points whose recipe calibrates on the original
model (`calibration: {propagate: original}`): every such point after the first compresses without
running the model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from compresslm.engine.stats_cache import default_cache_dir
from compresslm.errors import CompressLMError, MissingPackageError
from compresslm.eval.stats import mean_stderr
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import load_model
from compresslm.progress import progress
from compresslm.sweep.grid import Grid, GridError, SweepPoint, upgrade_point_key
from compresslm.sweep.store import ResultStore, machine_id, utc_now


def family(point: SweepPoint) -> str:
    """The line a point belongs to in the plots: its methods in order, e.g. 'gptq', 'sparsegpt>gptq'; a
    point that starts from another model is on a line of its own ('other model', 'other model>gptq')."""
    if point.model is not None:
        return "other model" + (f">{_methods(point)}" if point.recipe is not None else "")
    if point.recipe is None:
        return "uncompressed"
    if point.target_bits is not None:
        return "budget solver"
    if point.dial is not None:
        return "dial" + (" sparse" if point.dial.get("sparsity") else "")
    return _methods(point)


def _methods(point: SweepPoint) -> str:
    parts = []
    for stage in point.recipe.stages:
        if stage.type == "quantize":
            parts.append(stage.method + ("+awq" if stage.awq_scale else "") + ("+sq" if stage.smoothquant else ""))
        elif stage.type == "prune":
            parts.append(stage.method + (" 2:4" if ":" in str(stage.sparsity) else ""))
        elif stage.type == "lowrank":
            parts.append(f"low-rank {stage.method}")
        elif stage.type == "lowrank_compensation" and parts:
            parts[-1] += "+lqer"
        elif stage.type in ("rotate", "lowrank_compensation"):
            parts.append({"rotate": "rotated"}.get(stage.type, stage.type))
        elif stage.type not in ("quantize_embedding", "kv_cache"):  # any other registered stage, by its name
            parts.append(stage.type)
    kv = point.recipe.kv_cache
    label = ">".join(parts) or ("fp weights" if kv else "embedding only")
    return label + (f" +kv{kv.bits}" if kv else "")


def _protocol_key(grid: Grid) -> str:
    return hashlib.sha256(json.dumps(grid.protocol.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _evaluate(lm: LoadedModel, grid: Grid, reference, data_dir: str | None, show_progress: bool = False,
              is_reference: bool = False) -> dict:  # fmt: skip
    """The grid's protocol on `lm`; `is_reference`: `lm` is the model the reference logits came from, whose
    perplexity and (zero) distance are read from that pass rather than measured again."""
    from compresslm.eval.distance import distance, reference_distance
    from compresslm.eval.perplexity import perplexity

    protocol = grid.protocol
    out: dict = {}
    if reference is not None:
        if is_reference:
            result = reference_distance(reference)
        else:
            result = distance(lm, reference, protocol.corpus, show_progress=show_progress)
        window_nll = result.window_nll
        out.update({"ppl": result.ppl, "kld_mean": result.kld_mean, "kld_stderr": result.kld_stderr,
                    "kld_p99": result.kld_percentiles["p99"], "top1_agreement": result.top1_agreement,
                    "top1_stderr": result.top1_stderr, "eval_protocol": result.protocol})  # fmt: skip
    else:
        result = perplexity(lm, protocol.corpus, ctx=protocol.ctx, limit=protocol.limit, show_progress=show_progress)
        window_nll = result.window_nll
        out.update({"ppl": result.ppl, "eval_protocol": result.protocol})
    if len(window_nll) > 1:  # an error bar for ppl: the standard error of the mean window NLL, mapped through exp
        se = mean_stderr(window_nll)
        out["ppl_low"], out["ppl_high"] = math.exp(math.log(out["ppl"]) - se), math.exp(math.log(out["ppl"]) + se)
    if lm.kv_cache is not None:
        out.update(_kv_bytes(lm, protocol.ctx))
    if protocol.tasks:
        from compresslm.eval.harness import evaluate_task
        from compresslm.eval.tasks import load_task

        out["tasks"] = {}
        for name in protocol.tasks:
            task = evaluate_task(lm, load_task(name, data_dir), limit=protocol.task_limit,
                                 show_progress=show_progress)  # fmt: skip
            out["tasks"][name] = {**task.metrics, "n": task.n}
    if protocol.speed:
        from compresslm.eval.speed import measure_speed

        speed = measure_speed(lm, batch_sizes=(1,), repeats=3)
        out["decode_tokens_per_s"] = speed.per_batch["1"]["decode_tokens_per_s"]["median"]
        out["peak_rss_bytes"] = speed.peak_rss_bytes
    return out


def _kv_bytes(lm: LoadedModel, tokens: int) -> dict:
    """The quantized cache's bytes after a `tokens`-token prefill (measured), and a float16 cache's."""
    import torch

    from compresslm.kv.cache import fp16_kv_bytes, make_cache

    cache = make_cache(lm.model, lm.kv_cache.config)
    ids = torch.randint(0, lm.model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lm.model(input_ids=ids.to(lm.device), past_key_values=cache, use_cache=True)
    return {"kv_bytes": cache.nbytes(), "kv_bytes_fp16": fp16_kv_bytes(lm.model, tokens)}


def uncompressed_size(lm: LoadedModel) -> dict:
    """Sizes of the model as evaluated (its tensors in memory), in the fields a compressed point reports."""
    params = sum(p.numel() for p in lm.model.parameters())
    size = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    bits = 8 * size / params
    return {"bits_per_param": bits, "linear_bits_per_param": bits, "bytes_on_disk": size, "linear_sparsity": 0.0,
            "size_source": "tensors as evaluated, not a file"}  # fmt: skip


def run_sweep(
    model: str | os.PathLike,
    grid: Grid,
    db_path: str | os.PathLike,
    containers: str | os.PathLike | None = None,
    *,
    data_dir: str | None = None,
    show_progress: bool = True,
    log=print,
    executor: str = "local",
    address: str | None = None,
    cpus_per_point: int = 1,
) -> list[dict]:
    """Measure every point of `grid` not yet in the database; return this grid's finished rows.

    `executor="ray"` runs the points as Ray tasks (`sweep.ray_executor`) on the cluster at `address`
    ('auto', HOST:PORT, or None for a new local one), `cpus_per_point` CPUs each; this process stays
    the only writer of the database.
    """
    from compresslm.eval.distance import reference_logits

    if executor not in ("local", "ray"):
        raise CompressLMError(f"executor {executor!r} is not one of local, ray")
    if cpus_per_point < 1:
        raise CompressLMError(f"cpus_per_point={cpus_per_point}: give at least 1")
    if executor == "ray":  # before the model loads: a missing package or an unreachable cluster fails now
        from compresslm.sweep.ray_executor import connect

        cluster = connect(address)
        log(f"Ray cluster at {cluster['address']}: {cluster['cpus']} CPUs, {cpus_per_point} per point")
    store = ResultStore(db_path)
    base = load_model(model)
    model_sha, machine, protocol_key = base.fingerprint(), machine_id(), _protocol_key(grid)
    store.adopt_model(base.weights_fingerprint(), model_sha)
    store.upgrade_keys(upgrade_point_key)
    _key_start_models(grid.points, base)
    since = utc_now()
    todo = [p for p in grid.points if not store.is_done(model_sha, machine, p.key, protocol_key)]
    log(f"sweep '{grid.name}' on {model}: {len(grid.points) - len(todo)} of {len(grid.points)} points already done")
    reference = None
    if grid.protocol.kld and todo:
        p = grid.protocol
        reference = reference_logits(base, p.corpus, ctx=p.ctx, limit=p.limit, show_progress=show_progress)
    workdir = Path(containers) if containers else Path(tempfile.mkdtemp(prefix="compresslm-sweep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        bar = progress(len(todo), "sweep", unit="point", enabled=show_progress)
        waiting = False
        if executor == "ray" and todo:
            from compresslm.sweep.ray_executor import run_on_ray

            def key_of(point: SweepPoint) -> tuple:
                return (model_sha, machine, point.key, protocol_key)

            def claim(point: SweepPoint) -> str:
                return store.claim(*key_of(point), grid.name, point.label, since)

            run_on_ray(_measure, todo, claim, store, key_of, base, str(model), grid, reference, workdir,
                       containers is not None, data_dir, log, bar, cpus_per_point, POLL_S)  # fmt: skip
            todo = []
        while todo:
            busy = []
            for point in todo:
                key = (model_sha, machine, point.key, protocol_key)
                state = store.claim(*key, grid.name, point.label, since)
                if state == "busy":  # another sweep on this database is measuring it
                    busy.append(point)
                    continue
                if state == "claimed":
                    _run_point(store, key, point, base, str(model), grid, reference, workdir, containers is not None,
                               data_dir, log, show_progress)  # fmt: skip
                bar.update(1)
            if busy and not waiting:
                labels = ", ".join(p.label for p in busy)
                log(f"  waiting for {len(busy)} point(s) other sweeps are measuring: {labels}")
            waiting = bool(busy)
            todo = busy
            if todo:
                time.sleep(POLL_S)
        bar.close()
        keys = {p.key for p in grid.points}
        return [r for r in store.results(grid.name) if (r["model_sha"], r["machine"], r["protocol_key"]) ==
                (model_sha, machine, protocol_key) and r["point_key"] in keys]  # fmt: skip
    finally:
        store.close()
        if containers is None:
            shutil.rmtree(workdir, ignore_errors=True)


POLL_S = 2.0  # how often a sweep looks again at points other sweeps hold


def _key_start_models(points: list[SweepPoint], base: LoadedModel) -> None:
    """Load once each other model that points start from: its fingerprint goes into those points' keys,
    and its tokenizer must be the sweep model's (perplexity and KL compare the same tokens)."""
    seen: dict[str, str] = {}
    for point in points:
        if point.model is None:
            continue
        if point.model not in seen:
            other = load_model(point.model)
            if other.tokenizer.get_vocab() != base.tokenizer.get_vocab():
                raise GridError(f"point '{point.label}': {point.model} has another tokenizer than the sweep's model; "
                                "a point can start only from a model with the same tokenizer")  # fmt: skip
            seen[point.model] = other.fingerprint()
            del other
        point.model_sha = seen[point.model]


def _run_point(store: ResultStore, key: tuple, point: SweepPoint, base: LoadedModel, model_name: str, grid: Grid,
               reference, workdir: Path, keep: bool, data_dir: str | None, log,
               show_progress: bool = False) -> None:  # fmt: skip
    """Measure one claimed point and record its row (or why it could not be made)."""
    try:
        with store.heartbeat(*key):
            row = _measure(point, base, model_name, grid, reference, workdir, keep, data_dir, show_progress)
    except CompressLMError as exc:  # this point cannot be made (e.g. a budget below every option): go on
        store.fail(*key, str(exc))
        log(f"  {point.label}: not measured: {exc}")
        return
    except BaseException:
        store.release(*key)  # interrupted: the next sweep takes it at once
        raise
    store.finish(*key, row)
    kld = f", KL {row['kld_mean']:.4f}" if "kld_mean" in row else ""
    log(f"  {point.label}: ppl {row['ppl']:.3f}{kld}, {row['bits_per_param']:.3f} bits/param, "
        f"{row['point_seconds']:.0f} s")  # fmt: skip


def _measure(point: SweepPoint, base: LoadedModel, model_name: str, grid: Grid, reference, workdir: Path,
             keep: bool, data_dir: str | None, show_progress: bool = False) -> dict:  # fmt: skip
    """Compress one point (budget-planned if asked), write it, reload it from the file, evaluate it; with
    `show_progress`, bars for the blocks compressed and the windows evaluated inside the point."""
    from compresslm.api import compress
    from compresslm.engine.budget import BudgetTarget

    started = time.perf_counter()
    row: dict = {"label": point.label, "family": family(point), "model": model_name}
    origin = base
    if point.model is not None:  # a point that starts from another model (a pruned and healed student)
        origin = load_model(point.model)
        row["start_model"] = {"source": point.model, "sha256": origin.fingerprint()}
    if point.recipe is None:
        lm = origin
        row.update(uncompressed_size(origin))
    elif point.dial is not None:
        lm = _dial_point(point, base, row, workdir, show_progress)
    else:
        path = workdir / f"{_safe(point.label)}.clm"
        work, recipe, target = copy.deepcopy(base) if origin is base else origin, point.recipe, None
        if point.target_bits is not None:
            patterns = tuple(point.budget_sparsity) if point.budget_sparsity is not None else None
            target = BudgetTarget(bits=point.target_bits, sparsity=patterns)
        _, result, summary = compress(
            work, recipe, path, show_progress=show_progress, stats_cache=default_cache_dir(), target=target
        )
        if result.plan is not None:
            recipe = result.recipe
            row["budget"] = {"target_bits": point.target_bits, "choices": result.plan.choices,
                             "predicted_bytes": result.plan.predicted_bytes,
                             "plan_seconds": result.plan.seconds}  # fmt: skip
        del work
        row.update({k: summary[k] for k in ("bits_per_param", "linear_bits_per_param", "bytes_on_disk",
                                            "linear_sparsity")})  # fmt: skip
        row.update({"compress_seconds": result.seconds, "recipe": recipe.to_dict(), "calibration": result.calibration,
                    "compress_threads": result.info["torch_threads"]})  # fmt: skip
        row.update(_entropy_sizes(path))
        lm = load_model(path)
        if keep:
            row["container"] = str(path)
        else:
            path.unlink(missing_ok=True)
    row.update(_evaluate(lm, grid, reference, data_dir, show_progress, is_reference=lm is base))
    row["point_seconds"] = time.perf_counter() - started
    return row


def _entropy_sizes(path: Path) -> dict:
    """The file's size with its codes ANS-coded (`formats.entropy`), where the entropy extra is installed."""
    from compresslm.formats.entropy import entropy_summary

    try:
        summary = entropy_summary(path)
    except MissingPackageError:
        return {}
    return {"ans_bytes": summary["file_ans_bytes"], "bits_per_param_ans": summary["bits_per_param_ans"],
            "codes_bits_per_code_ans": summary["codes_bits_per_code"]["ans"]}  # fmt: skip


def _dial_point(
    point: SweepPoint, base: LoadedModel, row: dict, workdir: Path, show_progress: bool = False
) -> LoadedModel:
    """A dial setting: the artifact of the point's recipe (built by the first point that needs it), switched."""
    from compresslm.api import compress
    from compresslm.dial import apply_setting, materialize
    from compresslm.formats.container import container_summary
    from compresslm.models.assemble import load_compressed

    digest = hashlib.sha256(json.dumps(point.recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    artifact = workdir / f"dial-{digest}.clm"
    if not artifact.exists():
        _, result, _ = compress(copy.deepcopy(base), point.recipe, artifact, show_progress=show_progress,
                                stats_cache=default_cache_dir())  # fmt: skip
        row["compress_seconds"] = result.seconds  # the whole artifact's, paid once for all its settings
        row["calibration"] = result.calibration
    bits, sparsity, avg_bits = point.dial.get("bits"), point.dial.get("sparsity", 0.0), point.dial.get("avg_bits")
    fixed = workdir / f"{_safe(point.label)}.fixed.clm"
    _, summary = materialize(artifact, fixed, bits, sparsity, avg_bits)  # the bytes this setting needs on its own
    fixed.unlink(missing_ok=True)
    row.update({k: summary[k] for k in ("bits_per_param", "linear_bits_per_param", "bytes_on_disk", "linear_sparsity")})
    row.update({"recipe": point.recipe.to_dict(), "dial": point.dial,
                "artifact_bytes": container_summary(artifact)["bytes_on_disk"]})  # fmt: skip
    lm = load_compressed(artifact)
    row["switch_seconds"] = apply_setting(lm, point.dial).seconds
    return lm


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
