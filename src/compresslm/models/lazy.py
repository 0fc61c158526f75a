"""Models whose weights stay on disk until a block needs them.

A model larger than memory cannot be loaded and then walked: its skeleton is built on the meta
device (no memory), the small parts outside the decoder blocks (final norm, rotary tables) are read
at once, and each block's tensors are read from its safetensors shards when a walk reaches the block
and dropped back to the meta device when it is done. Only one block's weights are then resident
at a time; `LazySource.resident` says which, so tests count instead of timing. The token embedding
and the output head are read only while a step uses them (`LazySource.holding`): at a large
vocabulary they are as large as several blocks in the compute dtype, and most steps need neither.

The shard index is a file from someone else: shard names must be plain file names inside the model
directory, every shard must open, and every tensor the model needs must be present with the
shape the config implies, all checked before the first block is read.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from compresslm.errors import CompressLMError, CorruptFileError, reason_of

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def is_safetensors_dir(path: Path) -> bool:
    """True for a model directory whose weights are safetensors (one file or an indexed set of shards)."""
    return (path / "config.json").is_file() and ((path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file())


class ShardedTensors:
    """The tensors of a safetensors model directory by name, each read on its own from its shard.

    A shard is opened (memory-mapped) only while a tensor is copied out of it: pages of a mapping
    that stays open count as the process's resident memory, and over a whole model they would add up
    to the checkpoint's size.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        indexed = self._index(directory)
        self.shard_of: dict[str, str] = {}
        self._shapes: dict[str, list[int]] = {}
        for shard in sorted(set(indexed.values())) if indexed else [SINGLE_FILE]:
            if not (directory / shard).is_file():
                raise CorruptFileError(f"{directory}: shard {shard} is missing")
            with self._open(shard) as handle:
                for name in handle.keys():  # noqa: SIM118 (not a dict)
                    self.shard_of[name] = shard
                    self._shapes[name] = list(handle.get_slice(name).get_shape())
        misplaced = sorted(name for name, shard in indexed.items() if self.shard_of.get(name) != shard)
        if misplaced:
            raise CorruptFileError(f"{directory}: {INDEX_FILE} places {misplaced[0]} in a shard that does not hold it")

    def _open(self, shard: str):
        from safetensors import safe_open

        file = self.directory / shard
        try:
            return safe_open(str(file), framework="pt")
        except Exception as exc:  # safetensors raises its own error class on a damaged header
            reason = reason_of(exc)
            raise CorruptFileError(f"{file} is a corrupt or truncated safetensors file: {reason}") from None

    @staticmethod
    def _index(directory: Path) -> dict[str, str]:
        """The index's tensor -> shard map ({} for a single-file model); shard names must be plain file names."""
        index = directory / INDEX_FILE
        if not index.is_file():
            if not (directory / SINGLE_FILE).is_file():
                raise CorruptFileError(f"{directory} holds no {SINGLE_FILE} or {INDEX_FILE}")
            return {}
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{index} is not a safetensors index ({exc})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptFileError(f"{index}: weight_map is not a non-empty mapping")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise CorruptFileError(f"{index}: the shard of {name!r} is not a plain file name ({shard!r})")
        return weight_map

    def shape(self, name: str) -> list[int]:
        return self._shapes[name]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name`, a floating-point one cast to `dtype` (if given), in memory of its own."""
        try:
            with self._open(self.shard_of[name]) as handle:
                tensor = handle.get_tensor(name)
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    return tensor.to(dtype)  # the cast is a copy
                return tensor.clone()  # a copy of its own before the mapping goes
        except CorruptFileError:
            raise
        except Exception as exc:  # a shard truncated after it was opened
            reason = reason_of(exc)
            shard = self.shard_of[name]
            raise CorruptFileError(f"{self.directory}: cannot read {name} from {shard}: {reason}") from None


def non_finite(tensor: torch.Tensor) -> int:
    """How many NaN or infinite values a floating-point tensor holds.

    A sum is one fast pass, and any NaN or infinity makes it non-finite, so the elementwise count
    (many times slower on a large tensor) runs only when the sum is not finite (a huge but finite
    tensor can overflow its sum: the count then says 0).
    """
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32 if tensor.element_size() < 4 else None))):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def _stored_tensors(module: nn.Module, recurse: bool = True) -> list[tuple[str, nn.Module, str, bool]]:
    """(name under `module`, owning module, attribute, is parameter) of every tensor a checkpoint stores for it."""
    found = []
    for module_name, sub in module.named_modules() if recurse else [("", module)]:
        prefix = f"{module_name}." if module_name else ""
        for attr, param in sub._parameters.items():
            if param is not None:
                found.append((prefix + attr, sub, attr, True))
        for attr, buffer in sub._buffers.items():
            if buffer is not None and attr not in sub._non_persistent_buffers_set:
                found.append((prefix + attr, sub, attr, False))
    return found


class LazySource:
    """Reads a lazily built model's tensors into it, one module at a time, and drops them again.

    Subclasses say where tensors come from (`_read_into`). `prepare(module, path)` runs on each module
    right after its tensors are read (the engine rounds dense tensors there, as it does for a resident model
    before compressing). `resident` names the blocks in memory now; `most_resident` is the most at once.
    `deferred` names the modules outside the blocks that stay on disk until `holding` reads them.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.resident: set[str] = set()
        self.most_resident = 0
        self.prepare: Callable[[nn.Module, str], None] | None = None
        self.deferred: tuple[str, ...] = ()

    def materialize(self, module: nn.Module, prefix: str, block: bool = True) -> None:
        """Read the tensors of `module` (named `prefix` in the model) that are still on the meta device.

        A `block` is counted resident until `release`; other modules (outside the blocks) get only their
        own tensors, not their children's.
        """
        self._read_into(module, prefix, block)
        if self.prepare is not None:
            self.prepare(module, prefix)
        if block:
            self.resident.add(prefix)
            self.most_resident = max(self.most_resident, len(self.resident))

    def _read_into(self, module: nn.Module, prefix: str, block: bool) -> None:
        raise NotImplementedError

    def load_outside(self, model: nn.Module, blocks: list[str], defer: tuple[str, ...] = ()) -> None:
        """Read every tensor that is not inside a decoder block except those of the modules `defer` names
        (the embedding and head, read by `holding` when a step needs them); tie the head to the embedding."""
        inside = tuple(f"{name}." for name in blocks)
        self.deferred = tuple(defer)
        for name, sub in list(model.named_modules()):
            if name in blocks or name.startswith(inside) or name in self.deferred:
                continue
            self.materialize(sub, name, block=False)
        model.tie_weights()

    @contextlib.contextmanager
    def holding(self, model: nn.Module) -> Iterator[None]:
        """The deferred modules in memory while the `with` body runs, back on the meta device after it.

        All of them at once, so that a tied head and its embedding are one tensor again; held already
        (an enclosing `holding`, or `keep`), nothing is read or dropped.
        """
        read = [path for path in self.deferred if _on_meta(model.get_submodule(path))]
        for path in read:
            self.materialize(model.get_submodule(path), path, block=False)
        if read:
            model.tie_weights()
        try:
            yield
        finally:
            for path in read:
                self.drop(model.get_submodule(path))
            if read:
                model.tie_weights()

    def keep(self, model: nn.Module) -> None:
        """Read the deferred modules for good (a compression that quantizes the embedding or head changes them)."""
        for path in self.deferred:
            module = model.get_submodule(path)
            if _on_meta(module):
                self.materialize(module, path, block=False)
        model.tie_weights()
        self.deferred = ()

    def release(self, module: nn.Module, prefix: str) -> None:
        """Put the block's tensors back on the meta device (compressed linears' dequantized weights too)."""
        self.drop(module)
        self.resident.discard(prefix)

    def drop(self, module: nn.Module) -> None:
        """Put a module's tensors back on the meta device (a layer swapped out of its block, say)."""
        for _, sub in module.named_modules():
            compressed = hasattr(type(sub), "compressed")  # a CompressedLinear (its property is not read here)
            for attr, param in sub._parameters.items():
                if param is not None:
                    sub._parameters[attr] = nn.Parameter(param.detach().to("meta"), requires_grad=False)
            for attr, buffer in sub._buffers.items():
                if buffer is not None and (attr not in sub._non_persistent_buffers_set or compressed):
                    sub._buffers[attr] = buffer.to("meta")
            if compressed:  # its record is on disk
                sub.compressed = sub.nested = None

    def activations(self) -> dict[str, dict]:
        """The simulated activation grid of each compressed linear not in memory (a fingerprint hashes them)."""
        return {}


class LazyWeights(LazySource):
    """A model's tensors from its safetensors shards, each cast to the model's dtype as it is read."""

    def __init__(self, tensors: ShardedTensors, dtype: torch.dtype, device: torch.device, tied: set[str]) -> None:
        super().__init__(dtype, device)
        self.tensors, self.tied = tensors, tied

    def check(self, model: nn.Module) -> None:
        """Every tensor the model stores must be in the checkpoint with its shape: said before any is read."""
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in self.tied:
                continue
            if name not in self.tensors.shard_of:
                raise CorruptFileError(f"{self.tensors.directory}: the checkpoint has no tensor {name}")
            stored = self.tensors.shape(name)
            if stored != list(tensor.shape):
                raise CorruptFileError(
                    f"{self.tensors.directory}: {name} is {stored} in the checkpoint, "
                    f"the config asks for {list(tensor.shape)}"
                )

    def _read_into(self, module: nn.Module, prefix: str, block: bool) -> None:
        for name, owner, attr, is_param in _stored_tensors(module, recurse=block):
            current = (owner._parameters if is_param else owner._buffers)[attr]
            full = f"{prefix}.{name}" if prefix else name
            if current.device.type != "meta" or full in self.tied:
                continue
            tensor = self.tensors.read(full, self.dtype)
            if tensor.is_floating_point():
                bad = non_finite(tensor)
                if bad:
                    raise CorruptFileError(
                        f"{self.tensors.directory} has non-finite weights: {full} holds {bad:,} NaN or infinite values"
                    )
            set_tensor(owner, attr, tensor.to(self.device), is_param)


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])


def held(lazy: LazySource | None, model: nn.Module) -> contextlib.AbstractContextManager:
    """`lazy.holding(model)` for a lazily loaded model, nothing for one in memory."""
    return lazy.holding(model) if lazy is not None else contextlib.nullcontext()


def set_tensor(owner: nn.Module, attr: str, tensor: torch.Tensor, is_param: bool) -> None:
    if is_param:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


def lazy_model(directory: Path, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, LazyWeights]:
    """The model of a safetensors directory on the meta device, every tensor it needs checked against the
    checkpoint, and its `LazyWeights`; nothing is read yet (the caller discovers the layout, reads what
    lies outside the blocks with `load_outside` and the blocks as it walks them).
    """
    from transformers import AutoConfig

    tensors = ShardedTensors(directory)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        reason = reason_of(exc)
        raise CompressLMError(f"cannot build {directory} for streaming: {reason}") from None
    model = empty_model(config, dtype, directory)
    return model, lazy_weights(model, tensors, dtype, device)


def empty_model(config: object, dtype: torch.dtype, source: Path) -> nn.Module:
    """The causal LM `config` describes, built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    except Exception as exc:
        reason = reason_of(exc)
        raise CompressLMError(f"cannot build {source} for streaming: {reason}") from None


def lazy_weights(model: nn.Module, tensors: object, dtype: torch.dtype, device: torch.device) -> LazyWeights:
    """`LazyWeights` over `tensors` (a `ShardedTensors` or anything with its `shard_of`, `shape`, `read` and
    `directory`) for `model`, every tensor the model stores checked against them first."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if not getattr(model.config, "tie_word_embeddings", False):
        tied = set()
    lazy = LazyWeights(tensors, dtype, device, tied)
    lazy.check(model)
    return lazy
