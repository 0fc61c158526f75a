"""A model in memory with where it came from: the one object every command passes around.

Its fingerprint (weights and config) keys every result and cache, so two models that compute
differently never share one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from compresslm.errors import CorruptFileError
from compresslm.models.layout import ModelLayout, count_parameters, discover_layout
from compresslm.models.lazy import LazySource, non_finite
from compresslm.progress import progress

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for compression or evaluation, with where it came from."""

    model: nn.Module
    tokenizer: object
    layout: ModelLayout
    source: str  # what the user gave
    kind: str  # "registered", "gguf", "hf_dir", "hub", "container" or "module"
    path: str | None = None  # the resolved file or directory, if any
    container: dict | None = field(default=None, repr=False)  # the .clm header, for containers
    bytes_read: int | None = field(default=None, repr=False)  # bytes of the file read to build it (containers)
    compressed: dict | None = field(default=None, repr=False)  # CompressedWeight records by module path
    kv_cache: object | None = None  # a recipe.KVCacheStage: evaluation runs through that quantized cache
    lazy: LazySource | None = field(default=None, repr=False)  # blocks read from disk when walked (streaming)
    _fingerprint: str | None = field(default=None, repr=False)
    _weights_fingerprint: str | None = field(default=None, repr=False)

    @classmethod
    def from_module(cls, model: nn.Module, tokenizer: object, name: str = "module") -> LoadedModel:
        """Wrap an in-memory model (e.g. a tiny test model) so every API accepts it."""
        return cls(model=model.eval(), tokenizer=tokenizer, layout=discover_layout(model), source=name, kind="module")

    @property
    def dtype(self) -> torch.dtype:
        return self.lazy.dtype if self.lazy is not None else next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self.lazy.device if self.lazy is not None else next(self.model.parameters()).device

    def changed(self) -> None:
        """Forget the cached fingerprints: call after changing the weights in place."""
        self._fingerprint = self._weights_fingerprint = None

    def fingerprint(self) -> str:
        """sha256 of the weights and the config (see `model_fingerprint`)."""
        if self._fingerprint is None:
            config = config_identity(self.model)
            if self.kv_cache is not None:  # a quantized KV cache changes what evaluation computes
                config = {**config, "compresslm_kv_cache": dataclasses.asdict(self.kv_cache)}
            self._fingerprint = combined_fingerprint(self.weights_fingerprint(), config)
        return self._fingerprint

    def weights_fingerprint(self) -> str:
        """sha256 of the weights alone: the model hash of compresslm before 0.2 (old results stores)."""
        if self._weights_fingerprint is None:
            blocks = [(block.name, block.module) for block in self.layout.blocks]
            self._weights_fingerprint = weights_fingerprint(self.model, self.lazy, blocks)
        return self._weights_fingerprint

    def describe(self) -> dict:
        """The model's identity as recorded in every protocol."""
        return {
            "source": self.source,
            "kind": self.kind,
            "path": self.path,
            "model_type": self.layout.model_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "parameters": count_parameters(self.model),
            "sha256": self.fingerprint(),
        }


# Config fields that say how or where a model was loaded, not what it computes.
_VOLATILE_CONFIG = frozenset({"transformers_version", "dtype", "torch_dtype", "architectures"})


def config_identity(model: nn.Module) -> dict:
    """The model's config as hashed: every field except private ones (`_name_or_path`) and the volatile few."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG}


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of the model: its weights and its config, independent of where it was loaded from.

    The config is part of it because it changes what the weights compute (`rope_theta`, `rms_norm_eps`,
    the head count): two models that compute differently never share a fingerprint.
    """
    return combined_fingerprint(weights_fingerprint(model), config_identity(model))


def combined_fingerprint(weights_sha256: str, config: dict) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(f"weights {weights_sha256}\nconfig {text}".encode()).hexdigest()


def weights_fingerprint(
    model: nn.Module, lazy: LazySource | None = None, blocks: list[tuple[str, nn.Module]] = ()
) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes); tied weights once.

    Compressed linears keep their weight outside the state dict (a non-persistent buffer rebuilt
    from the record), so their dequantized weights are hashed too, and so is their simulated
    activation grid: two models compressed differently never share a fingerprint. Before
    compresslm 0.2 the weights alone were the model hash.

    A lazily loaded model (`lazy`, with its `blocks` as (path, module)) hashes exactly as it would
    loaded whole: names are hashed in sorted order, and since a block's names are one contiguous
    run of that order, each block is read, hashed and dropped in turn.
    """
    digest = hashlib.sha256()
    pending = lazy.activations() if lazy is not None else {}
    for module_name, module in model.named_modules():
        activation = module.activation_config() if hasattr(module, "compressed") else pending.get(module_name)
        if activation is not None:
            digest.update(f"{module_name}|activation|{json.dumps(activation, sort_keys=True)}|".encode())
    if lazy is None:
        state, seen = _hashed_state(model), set()
        for name in sorted(state):
            _hash_tensor(digest, seen, name, state[name])
        return digest.hexdigest()
    with lazy.holding(model):  # the embedding and head: hashed where their names fall among the blocks'
        return _hash_lazily(digest, model, lazy, blocks)


def _hash_lazily(digest, model: nn.Module, lazy: LazySource, blocks: list[tuple[str, nn.Module]]) -> str:
    state = _hashed_state(model)
    seen: set[tuple[int, tuple[int, ...]]] = set()  # (address, shape) of what is hashed: tied weights once
    prefixes = {f"{path}.": module for path, module in blocks}
    units = [(name, None) for name in state if not name.startswith(tuple(prefixes))] + list(prefixes.items())
    bar = progress(len(prefixes), "hashing the model", unit="block")  # each block is read from disk for it
    for key, module in sorted(units, key=lambda unit: unit[0]):
        if module is None:
            _hash_tensor(digest, seen, key, state[key])
            continue
        path = key[:-1]
        was_resident = path in lazy.resident
        if not was_resident:
            lazy.materialize(module, path)
        block_state = _hashed_state(module, key)
        block_seen = set(seen)  # a dropped block's addresses are reused by the next: they must not count as seen
        for name in sorted(block_state):
            _hash_tensor(digest, block_seen, name, block_state[name])
        del block_state  # held past the release, it would keep this block in memory while the next is read
        if not was_resident:
            lazy.release(module, path)
        bar.update(1)
    bar.close()
    return digest.hexdigest()


def _hashed_state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict plus each compressed linear's dequantized weight (held as float or packed alike)."""
    state = dict(module.state_dict(prefix=prefix, keep_vars=True))
    for name, sub in module.named_modules():
        if name and hasattr(sub, "dequantized") and sub.holds_weight:
            state[f"{prefix}{name}.weight[dequantized]"] = sub.dequantized()
    return state


def _hash_tensor(digest, seen: set, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach()
    key = (tensor.data_ptr(), tuple(tensor.shape))
    if key in seen:  # tied weights appear under two names
        return
    seen.add(key)
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    flat = tensor.cpu().contiguous().reshape(-1)
    if flat.numel():
        digest.update(flat.view(torch.uint8).numpy())  # the tensor's own bytes, not a copy of them


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse a model with NaN or infinite weights, naming the first such tensor and its count.

    Such a model computes NaN everywhere: every later number (perplexity, errors, a quantization
    grid) would be NaN or a misleading message far from the cause. Parameters are checked; tied
    weights once.
    """
    bad: list[tuple[str, int]] = []
    for name, param in model.named_parameters():
        if param.is_floating_point():
            count = non_finite(param.detach())
            if count:
                bad.append((name, count))
    if bad:
        name, count = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CorruptFileError(
            f"{source} has non-finite weights: {name} holds {count:,} NaN or infinite values{more}; "
            "the file is damaged or the model diverged"
        )
