"""Plain Hugging Face export: a container dequantized into a safetensors directory any tool loads.

Each record is dequantized exactly (`CompressedWeight.dequantize`) and cast to the chosen dtype;
dense tensors keep their values (cast the same way). Tensors are read one at a time and written in
shards of at most `shard_bytes` with the usual index file, so a model larger than memory exports.
The config and tokenizer files are the container's own. Tied tensors (the container's aliases) are
left to the config's `tie_word_embeddings`, as transformers saves them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from compresslm.fileio import atomic_path
from compresslm.formats.container import ContainerReader
from compresslm.progress import progress

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SHARD_BYTES = 2 << 30


def export_hf(container: str | os.PathLike, output: str | os.PathLike, dtype: str = "float16",
              transposed: frozenset[str] = frozenset(), shard_bytes: int = SHARD_BYTES,
              show_progress: bool = True) -> dict:  # fmt: skip
    """Write `container` as a transformers directory at `output` (atomically).

    `transposed`: records of layers that hold their weight as [in, out] (GPT-2's Conv1D); the caller
    knows the model's modules, this module only the records.
    """
    from safetensors.torch import save_file

    torch_dtype = DTYPES[dtype]
    reader = ContainerReader(container)
    try:
        header = reader.header
        names = [("linear", n) for n in header["linears"]] + [("embedding", n) for n in header.get("embeddings", {})]
        names += [("dense", key) for key in header["dense"]]
        bar = progress(len(names), "export hf", unit="tensor", enabled=show_progress)
        with atomic_path(output, directory=True) as tmp:
            shards: list[dict[str, torch.Tensor]] = [{}]
            size = 0
            for kind, name in names:
                if kind == "dense":
                    key, tensor = name, reader.dense(name)
                else:
                    record = reader.linear(name) if kind == "linear" else reader.embedding(name)
                    key, tensor = f"{name}.weight", record.dequantize()
                    if name in transposed:
                        tensor = tensor.T
                tensor = tensor.to(torch_dtype).contiguous() if tensor.is_floating_point() else tensor
                nbytes = tensor.numel() * tensor.element_size()
                if shards[-1] and size + nbytes > shard_bytes:
                    _write_shard(tmp, shards, save_file)
                    shards.append({})
                    size = 0
                shards[-1][key] = tensor
                size += nbytes
                bar.update(1)
            _write_shard(tmp, shards, save_file)
            bar.close()
            for i in range(len(shards)):
                (tmp / f"part-{i:05d}.safetensors").rename(tmp / _shard_name(i, len(shards)))
            weight_map = {key: _shard_name(i, len(shards)) for i, shard in enumerate(shards) for key in shard}
            if len(shards) > 1:
                index = {"metadata": {"total_size": _total(tmp)}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            config = {**header["config"], "dtype": dtype}
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            for name, data in reader.tokenizer_files().items():  # allow-listed plain names
                (tmp / name).write_bytes(data)
        return {"path": str(output), "format": "hf", "dtype": dtype, "tensors": len(weight_map),
                "shards": len(shards), "bytes_on_disk": _total(Path(output))}  # fmt: skip
    finally:
        reader.close()


def _shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _write_shard(directory: Path, shards: list[dict], save_file) -> None:
    """Write the last shard under a provisional name (final names need the count) and free its tensors."""
    index = len(shards) - 1
    save_file(shards[index], str(directory / f"part-{index:05d}.safetensors"), metadata={"format": "pt"})
    shards[index] = dict.fromkeys(shards[index])  # keep the keys, free the tensors


def _total(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
