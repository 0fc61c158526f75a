"""An on-disk cache of per-block calibration statistics, for recipes that calibrate on the original model.

With `calibration.propagate: original` every block calibrates on the *uncompressed* model's
activations, so its statistics (input Hessians, mean and max |x| per channel, which linears share
an input and which norm produced it) depend on the model's weights and the calibration windows
alone, not on the recipe. They are computed in one pass and written here, one file per block, in a
directory named by a hash of the model's content, the windows and the batch size; every later
recipe on the same model and windows (GPTQ at any width, AWQ, SmoothQuant, Wanda, SparseGPT, the
dial) reads them instead of running the model (AWQ and SmoothQuant still run one window, on which
they verify their scale folds). A stale entry cannot be hit: changing any weight
or window changes the key. The sequential mode (`propagate: compressed`, the default) never uses
the cache, because there block i's inputs depend on how blocks before it were compressed.

Size: one float32 d×d matrix per distinct linear input of each block.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from compresslm.engine.statistics import BlockStatistics, InputStatistics
from compresslm.errors import CompressLMError
from compresslm.fileio import load_tensors, save_tensors
from compresslm.models.loading import cache_root

FORMAT = 2  # 2: safetensors files (1 was torch pickles, never read again)
_COMPLETE = "complete.safetensors"


def default_cache_dir() -> Path:
    """Where the CLI, sweeps and benchmarks keep these statistics: `$COMPRESSLM_CACHE/calibration-stats`."""
    return cache_root() / "calibration-stats"


def cache_key(model_sha256: str, windows_sha256: str, batch_size: int, device: str) -> str:
    text = json.dumps([FORMAT, model_sha256, windows_sha256, batch_size, device])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class StatisticsCache:
    """The statistics of one (model, windows) pair: one `block_NNN.safetensors` file per block, then a marker.

    Saving the last block writes the marker (the size of every block's file), so an entry whose
    writer was killed part-way is incomplete and is recomputed, never read.
    """

    def __init__(self, root: str | os.PathLike, key: str, blocks: int):
        self.dir = Path(root) / key
        self.blocks = blocks

    def _path(self, index: int) -> Path:
        return self.dir / f"block_{index:03d}.safetensors"

    def complete(self) -> bool:
        """True when every block's file is there, as the marker recorded it."""
        try:
            sizes = load_tensors(self.dir / _COMPLETE)[1]["sizes"]
        except (OSError, CompressLMError, KeyError, TypeError):  # no marker yet, or a damaged one: recomputed
            return False
        if len(sizes) != self.blocks:
            return False
        paths = [self._path(i) for i in range(self.blocks)]
        return all(p.exists() and p.stat().st_size == n for p, n in zip(paths, sizes, strict=True))

    def save(self, index: int, stats: BlockStatistics) -> None:
        tensors, rows = {}, {}
        for name, s in stats.stats.items():
            tensors.update({f"{name}/xtx": s.xtx, f"{name}/abs_sum": s.abs_sum, f"{name}/abs_max": s.abs_max})
            rows[name] = s.rows
        fields = {"format": FORMAT, "rows": rows, "owner": stats.owner, "producer": stats.producer}
        save_tensors(self._path(index), tensors, fields)
        if index == self.blocks - 1:
            sizes = [self._path(i).stat().st_size for i in range(self.blocks)]
            save_tensors(self.dir / _COMPLETE, {}, {"format": FORMAT, "sizes": sizes})

    def load(self, index: int, device: torch.device) -> BlockStatistics:
        path = self._path(index)
        try:
            tensors, fields = load_tensors(path, device)
            result = BlockStatistics(owner=dict(fields["owner"]), producer=dict(fields["producer"]))
            for name, rows in fields["rows"].items():
                result.stats[name] = InputStatistics.from_tensors(
                    tensors[f"{name}/xtx"], tensors[f"{name}/abs_sum"], tensors[f"{name}/abs_max"], int(rows)
                )
        except Exception as error:  # a damaged file: say which, and how to recover
            raise CompressLMError(
                f"calibration statistics cache file {path} is unreadable ({type(error).__name__}); "
                f"delete {self.dir} and rerun"
            ) from error
        return result
