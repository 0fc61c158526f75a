"""GGUF files streamed tensor by tensor: no float copy of the model in memory or on disk.

transformers reads a GGUF whole, every tensor dequantized to float at once, and streaming once
went through a float32 safetensors copy of it written to the cache (4 bytes per parameter on disk).
Here the file's tensor table is read once; each tensor's bytes are read from the file when its block
is reached (a plain read, not a mapping that would stay resident), dequantized by the `gguf`
package and shaped by transformers' own per-family processing and name map (the rotary permutation
of Llama's q and k, say), so the weights are those a whole load gives, bit for bit.

Families whose GGUF tensors do not map one to one onto the model's (experts fused in one tensor,
a head stored under two names) are not streamed from the file; `StreamsOnlyWhole` says so and the
caller streams them from the dequantized copy instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from compresslm.errors import CompressLMError, CorruptFileError, reason_of
from compresslm.models.lazy import LazyWeights, empty_model, lazy_weights

# transformers' tensor processors that keep each tensor's name and shape (values may change: a
# permutation, a norm offset), so a tensor's model name is known before it is read
_ONE_TO_ONE = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor", "NemotronTensorProcessor")


class StreamsOnlyWhole(CompressLMError):
    """This GGUF's family does not map its tensors one to one onto the model's."""


class GGUFTensors:
    """The tensors of a GGUF file by their transformers names, each read and dequantized on its own.

    Every tensor the model needs must have a type the `gguf` package dequantizes: checked when the
    table is read, before any weight is.
    """

    def __init__(self, path: Path, model: nn.Module, architecture: str, reader: object) -> None:
        from gguf.quants import GGMLQuantizationType
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
        if processor_class.__name__ not in _ONE_TO_ONE:
            raise StreamsOnlyWhole(f"{path}: the {architecture} family's GGUF tensors do not map one to one")
        self.directory = path  # named in messages, as a shard directory is
        self.processor = processor_class(config=model.config.to_dict())
        mapping = get_gguf_hf_weights_map(model, self.processor)
        readable = _dequantizable()
        self.shard_of: dict[str, str] = {}
        self._shapes: dict[str, list[int]] = {}
        self._entries: dict[str, tuple] = {}
        for tensor in reader.tensors:
            name = mapping.get(tensor.name)
            if name is None:
                continue
            kind = GGMLQuantizationType(int(tensor.tensor_type))
            if kind not in readable:
                raise CorruptFileError(
                    f"{path}: tensor {tensor.name} is of GGUF type {kind.name}, which cannot be dequantized "
                    f"(readable types: {', '.join(sorted(k.name for k in readable))})"
                )
            self.shard_of[name] = path.name
            self._shapes[name] = [int(n) for n in reversed(tensor.shape)]
            self._entries[name] = (tensor.name, kind, tensor.data.dtype, tuple(tensor.data.shape),
                                   int(tensor.data_offset), int(tensor.n_bytes))  # fmt: skip

    def shape(self, name: str) -> list[int]:
        return self._shapes[name]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` as transformers would load it (float32), cast to `dtype` if given."""
        from gguf import dequantize

        gguf_name, kind, stored, shape, offset, size = self._entries[name]
        try:
            with self.directory.open("rb") as handle:
                handle.seek(offset)
                raw = handle.read(size)
        except OSError as exc:
            raise CorruptFileError(f"{self.directory}: cannot read {gguf_name}: {exc.strerror or exc}") from None
        if len(raw) != size:
            raise CorruptFileError(f"{self.directory} is truncated: {gguf_name} ends past the end of the file")
        data = np.frombuffer(raw, dtype=stored).reshape(shape)
        weights = self.processor.process(weights=dequantize(data, kind), name=gguf_name).weights
        tensor = torch.from_numpy(np.array(weights, dtype=np.float32))  # a copy: the read buffer is read-only
        return tensor.to(dtype) if dtype is not None and dtype != tensor.dtype else tensor


def _dequantizable() -> set:
    from gguf.quants import GGMLQuantizationType, _type_traits

    return {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}


def lazy_gguf_model(
    path: Path, reader: object, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, LazyWeights]:
    """The model of a GGUF file (`reader`: its parsed `gguf.GGUFReader`) on the meta device and its
    `LazyWeights` reading from the file itself; raises `StreamsOnlyWhole` for a family whose tensors do
    not map one to one."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import read_field

    try:
        architecture = str(read_field(reader, "general.architecture")[0])
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        reason = reason_of(exc)
        raise CorruptFileError(f"{path} cannot be read for streaming: {reason}") from None
    model = empty_model(config, dtype, path)
    tensors = GGUFTensors(path, model, architecture, reader)
    del reader  # its mapping of the whole file goes: tensors are read with plain reads
    return model, lazy_weights(model, tensors, dtype, device)
