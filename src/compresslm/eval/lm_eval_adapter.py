"""Run lm-evaluation-harness tasks on any model compresslm loads, containers included.

An optional extra: `pip install 'compresslm[lm-eval]'`. lm-eval's `HFLM` accepts an already-built
transformers model, so a container's `CompressedLinear` modules run exactly as they do in
compresslm's own evaluation. lm-eval downloads its datasets from the Hugging Face hub unless a task
is defined on local files (`include_path`: a folder of task YAMLs, e.g. `dataset_path: json` with
`dataset_kwargs: {data_files: ...}`), so without a network only such local tasks run.
"""

from __future__ import annotations

import os

from compresslm.errors import MissingPackageError
from compresslm.models.loaded import LoadedModel
from compresslm.models.loading import load_model


def lm_eval_model(model: str | os.PathLike | LoadedModel, batch_size: int = 8, device: str | None = None):
    """An lm-eval `HFLM` wrapping a model compresslm loaded (a name, an HF dir, a GGUF or a .clm)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise MissingPackageError("lm-evaluation-harness is not installed: pip install 'compresslm[lm-eval]'") from None
    lm = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    return HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)


def run_lm_eval(
    model: str | os.PathLike | LoadedModel,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
    device: str | None = None,
) -> dict:
    """lm-eval's `simple_evaluate` on `model`; returns its results dict (per-task metrics and configs)."""
    wrapped = lm_eval_model(model, batch_size=batch_size, device=device)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else None
    return simple_evaluate(model=wrapped, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager)
