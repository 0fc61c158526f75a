"""An on-disk cache of per-block calibration statistics, for recipes that calibrate on the original model.

With `calibration.propagate: original` every block calibrates on the *uncompressed* model's
activations, so its statistics (input Hessians, mean and max |x| per channel, which linears share
an input and which norm produced it) depend on the model's weights and the calibration windows
alone, not on the recipe. They are computed in one pass and written here, one file per block, in a
directory named by a hash of the model's content, the windows and the batch size; every later
recipe on the same model and windows (GPTQ at any width, AWQ, SmoothQuant, Wanda, SparseGPT, the
dial) reads them instead of running the model. A stale entry cannot be hit: changing any weight
or window changes the key. The sequential mode (`propagate: compressed`, the default) never uses
the cache, because there block i's inputs depend on how blocks before it were compressed.

Size: one float32 d×d matrix per distinct linear input of each block (≈13 MB per block of
SmolLM2-135M, 0.4 GB for the model).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from compresslm.engine.statistics import BlockStatistics, InputStatistics
from compresslm.errors import CompressLMError
from compresslm.fileio import atomic_torch_save
from compresslm.models.loading import cache_root

FORMAT = 1
_COMPLETE = "complete.pt"


def default_cache_dir() -> Path:
    """Where the CLI, sweeps and benchmarks keep these statistics: `$COMPRESSLM_CACHE/calibration-stats`."""
    return cache_root() / "calibration-stats"


def cache_key(model_sha256: str, windows_sha256: str, batch_size: int, device: str) -> str:
    text = json.dumps([FORMAT, model_sha256, windows_sha256, batch_size, device])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class StatisticsCache:
    """The statistics of one (model, windows) pair: one `block_NNN.pt` file per block, then a marker.

    Saving the last block writes the marker (the size of every block's file), so an entry whose
    writer was killed part-way is incomplete and is recomputed, never read.
    """

    def __init__(self, root: str | os.PathLike, key: str, blocks: int):
        self.dir = Path(root) / key
        self.blocks = blocks

    def _path(self, index: int) -> Path:
        return self.dir / f"block_{index:03d}.pt"

    def complete(self) -> bool:
        """True when every block's file is there, as the marker recorded it."""
        try:
            sizes = torch.load(self.dir / _COMPLETE, weights_only=True)["sizes"]
        except Exception:  # no marker yet, or a damaged one: the entry is recomputed
            return False
        if len(sizes) != self.blocks:
            return False
        paths = [self._path(i) for i in range(self.blocks)]
        return all(p.exists() and p.stat().st_size == n for p, n in zip(paths, sizes, strict=True))

    def save(self, index: int, stats: BlockStatistics) -> None:
        payload = {
            "format": FORMAT,
            "stats": {
                name: {"xtx": s.xtx, "abs_sum": s.abs_sum, "abs_max": s.abs_max, "rows": s.rows}
                for name, s in stats.stats.items()
            },
            "owner": stats.owner,
            "producer": stats.producer,
        }
        atomic_torch_save(payload, self._path(index))
        if index == self.blocks - 1:
            sizes = [self._path(i).stat().st_size for i in range(self.blocks)]
            atomic_torch_save({"format": FORMAT, "sizes": sizes}, self.dir / _COMPLETE)

    def load(self, index: int, device: torch.device) -> BlockStatistics:
        path = self._path(index)
        try:
            payload = torch.load(path, map_location=device, weights_only=True)
            result = BlockStatistics(owner=dict(payload["owner"]), producer=dict(payload["producer"]))
            for name, raw in payload["stats"].items():
                result.stats[name] = InputStatistics.from_tensors(
                    raw["xtx"], raw["abs_sum"], raw["abs_max"], int(raw["rows"])
                )
        except Exception as error:  # a damaged file: say which, and how to recover
            raise CompressLMError(
                f"calibration statistics cache file {path} is unreadable ({type(error).__name__}); "
                f"delete {self.dir} and rerun"
            ) from error
        return result
