"""Sweep points as Ray tasks, with this process as the one writer of the results database.

The driver claims a point in the database only when a worker slot is free (so sweeps started on one
database still split its grid), submits it as a task that declares what it needs (CPUs, and memory
estimated from the model's size), keeps the claim's heartbeat while the task runs, and records the row
the task returns. A task whose worker dies is retried by Ray (`RETRIES`); a point whose retries are
spent is released for the next sweep, never half-recorded. A point that cannot be made (a
`CompressLMError` inside the task) is recorded as failed, as on the local executor.

Every node must see the model path, the containers folder and the calibration-statistics cache
(`COMPRESSLM_CACHE`) at the same paths (a shared filesystem); the reference logits travel through
Ray's object store. Each worker loads the base model once and keeps it for the points it runs next.
Values between the driver and its workers travel as Ray serializes them: they never leave the
cluster this sweep started or connected to, and nothing read from a file is unpickled.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from compresslm.errors import CompressLMError, MissingPackageError

RETRIES = 3
_BASES: dict[str, object] = {}  # per worker process: model name -> loaded base model


def require_ray():
    try:
        import ray
    except ImportError:
        raise MissingPackageError("ray", "compresslm[ray]") from None
    return ray


def connect(address: str | None, num_cpus: int | None = None) -> dict:
    """Start a local Ray cluster (address None) or join one ('auto' or HOST:PORT); its CPU count and address."""
    ray = require_ray()
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": num_cpus}
        try:
            ray.init(**kwargs, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise CompressLMError(f"cannot reach a Ray cluster at {address or 'a new local cluster'}: {exc}") from None
    resources = ray.cluster_resources()
    return {"cpus": int(resources.get("CPU", 1)), "address": ray.get_runtime_context().gcs_address}


def _measure_remote(measure: Callable, point, model_name: str, grid, reference, workdir: str, keep: bool,
                    data_dir: str | None, threads: int) -> dict:  # fmt: skip
    """One point inside a Ray worker (`measure` is the runner's), with the worker's machine, pid and the time it
    finished in the row (a worker runs many points one after another: the time says which ran before a crash)."""
    import torch

    from compresslm.models.loading import load_model
    from compresslm.sweep.store import machine_id

    torch.set_num_threads(threads)
    Path(workdir).mkdir(parents=True, exist_ok=True)  # a driver's temporary folder exists on its node only
    if model_name not in _BASES:
        _BASES.clear()
        _BASES[model_name] = load_model(model_name)
    row = measure(point, _BASES[model_name], model_name, grid, reference, Path(workdir), keep, data_dir)
    where = {"kind": "ray", "machine": machine_id(), "pid": os.getpid(), "threads": threads, "finished": time.time()}
    return {**row, "executor": where}


def memory_estimate(parameters: int) -> int:
    """Bytes a point needs: the base model, its working copy and the reloaded container in float32, plus 1 GiB."""
    return 3 * 4 * parameters + (1 << 30)


def run_on_ray(
    measure: Callable,
    todo: list,
    claim: Callable,
    store,
    keys: Callable,
    base,
    model_name: str,
    grid,
    reference,
    workdir: Path,
    keep: bool,
    data_dir: str | None,
    log,
    bar,
    cpus_per_point: int,
    poll: float,
) -> None:
    """Measure the points of `todo` on the connected cluster with `measure` (the runner's, called in the
    workers): `claim(point)` -> 'claimed' | 'busy' | 'done' claims one in the store, `keys(point)` its
    key; rows and failures go to `store` from this process."""
    ray = require_ray()
    from ray.exceptions import RayTaskError, WorkerCrashedError

    parameters = sum(p.numel() for p in base.model.parameters())
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_point)
    task = ray.remote(_measure_remote).options(num_cpus=cpus_per_point, memory=memory_estimate(parameters),
                                               max_retries=RETRIES, retry_exceptions=False)  # fmt: skip
    shared_reference = ray.put(reference) if reference is not None else None
    running: dict = {}  # object ref -> (point, heartbeat context)
    waiting: list = list(todo)
    told_busy = False
    with contextlib.ExitStack() as beats:
        try:
            while waiting or running:
                busy = []
                while waiting and len(running) < slots:  # claim only as many points as can run now
                    point = waiting.pop(0)
                    state = claim(point)
                    if state == "busy":
                        busy.append(point)
                    elif state == "claimed":
                        beat = contextlib.ExitStack()
                        beat.enter_context(store.heartbeat(*keys(point)))
                        beats.callback(beat.close)
                        ref = task.remote(measure, point, model_name, grid, shared_reference, str(workdir), keep,
                                          data_dir, cpus_per_point)  # fmt: skip
                        running[ref] = (point, beat)
                    else:  # another sweep finished it meanwhile
                        bar.update(1)
                waiting += busy
                if busy and not running and not told_busy:
                    log(f"  waiting for {len(busy)} point(s) other sweeps are measuring")
                    told_busy = True
                if not running:
                    time.sleep(poll)
                    continue
                done, _ = ray.wait(list(running), num_returns=1, timeout=poll)
                for ref in done:
                    point, beat = running.pop(ref)
                    beat.close()
                    _record(ray, ref, point, store, keys(point), log, RayTaskError, WorkerCrashedError)
                    bar.update(1)
        except BaseException:
            for ref, (point, _beat) in running.items():  # interrupted: the next sweep takes them at once
                ray.cancel(ref, force=True)
                store.release(*keys(point))
            raise


def _record(ray, ref, point, store, key: tuple, log, task_error: type, crashed: type) -> None:
    try:
        row = ray.get(ref)
    except task_error as exc:
        cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
        if isinstance(cause, CompressLMError):
            store.fail(*key, str(cause).splitlines()[0])
            log(f"  {point.label}: not measured: {str(cause).splitlines()[0]}")
            return
        store.release(*key)
        log(f"  {point.label}: failed on its worker ({type(cause).__name__}); released for the next sweep")
        return
    except crashed:
        store.release(*key)
        log(f"  {point.label}: its worker died {RETRIES + 1} times; released for the next sweep")
        return
    store.finish(*key, row)
    kld = f", KL {row['kld_mean']:.4f}" if "kld_mean" in row else ""
    where = f"{row['executor']['machine'][:24]} (pid {row['executor']['pid']})"
    log(
        f"  {point.label}: ppl {row['ppl']:.3f}{kld}, {row['bits_per_param']:.3f} bits/param, "
        f"{row['point_seconds']:.0f} s on {where}"
    )
