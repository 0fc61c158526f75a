"""Plain Hugging Face export: a container dequantized into a safetensors directory any tool loads.

Each record is dequantized exactly (`CompressedWeight.dequantize`) and cast to the chosen dtype;
dense tensors keep their values (cast the same way). Tensors are read one at a time and written in
shards of at most `shard_bytes` with the usual index file, so a model larger than memory exports.
The config and tokenizer files are the container's own. Tied tensors (the container's aliases) are
left to the config's `tie_word_embeddings`, as transformers saves them. `write_directory` is shared
with the compressed-tensors export, which writes packed tensors the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from compresslm.fileio import atomic_path
from compresslm.formats.container import ContainerReader
from compresslm.progress import progress

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SHARD_BYTES = 2 << 30


def record_names(header: dict) -> list[tuple[str, str]]:
    """(kind, name) of every tensor a container holds: its linears, embeddings and dense tensors."""
    names = [("linear", n) for n in header["linears"]] + [("embedding", n) for n in header.get("embeddings", {})]
    return names + [("dense", key) for key in header["dense"]]


def export_hf(container: str | os.PathLike, output: str | os.PathLike, dtype: str = "float16",
              transposed: frozenset[str] = frozenset(), shard_bytes: int = SHARD_BYTES,
              show_progress: bool = True) -> dict:  # fmt: skip
    """Write `container` as a transformers directory at `output` (atomically).

    `transposed`: records of layers that hold their weight as [in, out] (GPT-2's Conv1D); the caller
    knows the model's modules, this module only the records.
    """
    torch_dtype = DTYPES[dtype]
    reader = ContainerReader(container)
    try:
        names = record_names(reader.header)

        def tensors() -> Iterator[dict[str, torch.Tensor]]:
            for kind, name in names:
                if kind == "dense":
                    key, tensor = name, reader.dense(name)
                else:
                    record = reader.linear(name) if kind == "linear" else reader.embedding(name)
                    key, tensor = f"{name}.weight", record.dequantize()
                    if name in transposed:
                        tensor = tensor.T
                yield {key: tensor.to(torch_dtype).contiguous() if tensor.is_floating_point() else tensor}

        config = {**reader.header["config"], "dtype": dtype}
        written = write_directory(output, tensors(), len(names), config, reader.tokenizer_files(), shard_bytes,
                                  "export hf", show_progress)  # fmt: skip
        return {"path": str(output), "format": "hf", "dtype": dtype, **written}
    finally:
        reader.close()


def write_directory(output: str | os.PathLike, items: Iterator[dict[str, torch.Tensor]], count: int, config: dict,
                    tokenizer_files: dict[str, bytes], shard_bytes: int, desc: str,
                    show_progress: bool) -> dict:  # fmt: skip
    """Write the tensors of `items` (one dict per source tensor, `count` of them) as safetensors shards, the
    config and the tokenizer files into a new directory at `output`, atomically."""
    from safetensors.torch import save_file

    bar = progress(count, desc, unit="tensor", enabled=show_progress)
    with atomic_path(output, directory=True) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for item in items:
            nbytes = sum(t.numel() * t.element_size() for t in item.values())
            if shards[-1] and size + nbytes > shard_bytes:
                _write_shard(tmp, shards, save_file)
                shards.append({})
                size = 0
            shards[-1].update(item)
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
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name, data in tokenizer_files.items():  # allow-listed plain names
            (tmp / name).write_bytes(data)
    return {"tensors": len(weight_map), "shards": len(shards), "bytes_on_disk": _total(Path(output))}


def _shard_name(index: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _write_shard(directory: Path, shards: list[dict], save_file) -> None:
    """Write the last shard under a provisional name (final names need the count) and free its tensors."""
    index = len(shards) - 1
    save_file(shards[index], str(directory / f"part-{index:05d}.safetensors"), metadata={"format": "pt"})
    shards[index] = dict.fromkeys(shards[index])  # keep the keys, free the tensors


def _total(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
