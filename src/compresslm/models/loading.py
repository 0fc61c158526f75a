"""Load a causal LM from a registered name, a Hugging Face directory, a GGUF file or a hub id.

Every source ends in the same :class:`LoadedModel`: a float torch module, its tokenizer and its
discovered :class:`~compresslm.models.layout.ModelLayout`. Anything that goes wrong on the way is
reported as one line naming the source and the reason (see :mod:`compresslm.errors`).

GGUF files are dequantized by transformers, which takes seconds. The dequantized model is therefore
cached once as a plain safetensors directory, keyed by the GGUF file's sha256 and the transformers
version; later loads read that directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from compresslm.errors import (
    CompressLMError,
    CorruptFileError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    reason_of,
)
from compresslm.fileio import atomic_path, cache_root
from compresslm.formats.container import is_container
from compresslm.models import registry
from compresslm.models.assemble import load_compressed, load_compressed_lazily
from compresslm.models.layout import discover_layout
from compresslm.models.lazy import LazySource, is_safetensors_dir, lazy_model
from compresslm.models.lazy_gguf import StreamsOnlyWhole, lazy_gguf_model
from compresslm.models.loaded import DTYPES, LoadedModel, check_finite

GGUF_MAGIC = b"GGUF"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_gguf(path: Path) -> object:
    """The `gguf.GGUFReader` of `path`; CorruptFileError unless it is a complete, parseable GGUF file."""
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise CorruptFileError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        if not reader.tensors:
            raise ValueError("it holds no tensors")
        return reader
    except ImportError as exc:
        raise CompressLMError("reading GGUF files needs the 'gguf' package: pip install gguf") from exc
    except Exception as exc:  # the reader raises bare ValueError/IndexError on truncation
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptFileError(f"{path} is a corrupt or truncated GGUF file: {reason}") from exc


def _torch_dtype(dtype: str | None) -> torch.dtype:
    """The torch dtype a `--dtype` name stands for (float32 when none is given)."""
    if dtype is not None and dtype not in DTYPES:
        raise CompressLMError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype or "float32"]


def _finish(model: nn.Module, dtype: str | None, device: str | None) -> nn.Module:
    _strip_load_time_quantizer(model)
    if dtype is not None:
        model = model.to(_torch_dtype(dtype))
    if device is not None:
        model = model.to(device)
    return model.eval()


def _strip_load_time_quantizer(model: nn.Module) -> None:
    """Forget the GGUF 'quantizer' transformers attaches, once the weights are plain dense tensors.

    transformers marks a GGUF-loaded model as quantized and refuses to save it, even when it has
    dequantized every weight. We check the weights are dense and drop the marker.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point:
            raise UnsupportedArchitectureError(
                f"weight of {name} stayed quantized ({weight.dtype}) after loading; cannot use it as a dense model"
            )
    del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    model.is_quantized = False


def _wrap_transformers_error(exc: Exception, source: str) -> CompressLMError:
    text = reason_of(exc)
    lowered = text.lower()
    if any(word in lowered for word in ("not supported", "unrecognized", "recognize", "model_type")):
        return UnsupportedArchitectureError(f"cannot load {source}: unsupported architecture ({text})")
    return CompressLMError(f"cannot load {source}: {text}")


def _check_model_type(config: object, config_file: Path) -> None:
    from transformers import __version__ as tf_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise UnsupportedArchitectureError(f"{config_file} names no model_type")
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: transformers {tf_version} does not know model_type '{model_type}' "
            f"({config_file})"
        )


def _hf_dir_config(path: Path) -> dict:
    """The config of a Hugging Face model directory, checked (readable, a known model_type)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{config_file} is not valid JSON: {exc}") from exc
    _check_model_type(config, config_file)
    return config


def _tokenizer_of(path: Path, source: str) -> object:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise _wrap_transformers_error(exc, source) from exc


def _hf_dir_tokenizer(path: Path, source: str) -> object:
    """The tokenizer of a Hugging Face model directory, once its config is checked."""
    _hf_dir_config(path)
    return _tokenizer_of(path, source)


def _decompressed(config: dict) -> dict:
    """A compressed-tensors checkpoint (llm-compressor's, or our export) is decoded once at load: transformers'
    compressed modules refuse asymmetric packed layers (their zero points are packed), and the decoded
    float32 weights are what the checkpoint's codes mean."""
    from transformers.utils.quantization_config import CompressedTensorsConfig

    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "compressed-tensors":
        return {}  # anything else is transformers' to read (or refuse)
    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def _load_hf_dir(path: Path, source: str) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM

    config = _hf_dir_config(path)
    tokenizer = _tokenizer_of(path, source)
    try:
        with warnings.catch_warnings():  # transformers warns that the passed config overrides the file's (it should)
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                         **_decompressed(config))  # fmt: skip
    except CompressLMError:
        raise
    except Exception as exc:
        raise _wrap_transformers_error(exc, source) from exc
    return model, tokenizer


def _gguf_cache_dir(path: Path) -> Path:
    """Where the dequantized copy of a GGUF file is cached: keyed by its sha256 and the transformers version."""
    from transformers import __version__ as tf_version

    return cache_root() / "gguf" / f"{_file_sha256(path)[:32]}-tf{tf_version}"


def _load_gguf(path: Path, source: str, cache: bool) -> tuple[nn.Module, object]:
    check_gguf(path)
    cache_dir = None
    if cache:
        cache_dir = _gguf_cache_dir(path)
        if (cache_dir / "config.json").is_file():
            try:
                return _load_hf_dir(cache_dir, source)
            except CompressLMError:
                shutil.rmtree(cache_dir, ignore_errors=True)  # a damaged cache is rebuilt below

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"gguf_file": path.name}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=path.name, dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
        except TypeError:
            kwargs.pop("quantization_config", None)
            model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    except CompressLMError:
        raise
    except Exception as exc:
        raise _wrap_transformers_error(exc, source) from exc
    _strip_load_time_quantizer(model)
    if cache_dir is not None:
        with contextlib.suppress(OSError):  # a read-only or full cache must not stop the load
            save_model(model, tokenizer, cache_dir)
    return model, tokenizer


def _load_hub(repo_id: str) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour a value set later too.
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch.float32, local_files_only=offline)
    except Exception as exc:
        text = reason_of(exc)
        raise ModelNotFoundError(
            f"'{repo_id}' is not a registered name, a local path, or a reachable Hugging Face hub id ({text})"
        ) from exc
    return model, tokenizer


def _looks_like_path(source: str) -> bool:
    """A hub id is `org/name`; anything else with slashes, a dot prefix or a file suffix is a path."""
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or source.lower().endswith((".gguf", ".safetensors", ".json", ".bin"))
    )


def _load_lazy(directory: Path, source: str, dtype: str | None, device: str | None) -> LoadedModel:
    """A safetensors model with only what lies outside its blocks in memory (see `models.lazy`)."""
    torch_dtype = _torch_dtype(dtype)
    tokenizer = _hf_dir_tokenizer(directory, source)
    model, lazy = lazy_model(directory, torch_dtype, torch.device(device or "cpu"))
    return _lazy_loaded(model, lazy, tokenizer, source, "hf_dir", directory)


def load_model(
    source: str | os.PathLike,
    *,
    dtype: str | None = None,
    device: str | None = None,
    cache: bool = True,
    lazy: bool = False,
    float_weights: bool = False,
) -> LoadedModel:
    """Load a causal LM and discover its layout.

    `source` is a registered name (`smollm2-135m`), a Hugging Face model directory, a `.gguf` file
    or a hub id (`org/name`, only where a network or a local hub cache exists). `dtype` casts the
    weights (float32, bfloat16, float16); `cache` keeps a dequantized copy of GGUF files. `lazy`
    leaves each decoder block's weights on disk until a walk over the blocks reads it (a safetensors
    directory, a container, or a GGUF file: read tensor by tensor from the file where its family's
    tensors map one to one, else through its dequantized cache), so models larger than memory stream.
    A container's compressed layers are held packed and dequantized at each forward;
    `float_weights` caches a float copy of each instead (faster, as large as the float model).
    """
    text = str(source)
    path = Path(text).expanduser()
    if lazy and is_container(path):
        lm = load_compressed_lazily(path, device=device)
        lm.source = text
        return lm
    if lazy:
        gguf = _gguf_file(text, path)
        streamed = _load_lazy_gguf(gguf, text, dtype, device) if gguf is not None else None
        if streamed is not None:
            return streamed
        directory = _lazy_source(text, path, cache)
        if directory is not None:
            return _load_lazy(directory, text, dtype, device)
    if (path.is_file() and path.suffix.lower() == ".clm") or is_container(path):
        lm = load_compressed(path, device=device, float_weights=float_weights)
        if dtype is not None:
            lm.model = _finish(lm.model, dtype, None)
        lm.source = text
        check_finite(lm.model, text)
        return lm
    if registry.is_registered(text) and not path.exists():
        entry = registry.lookup(text)
        file = entry.path()
        model, tokenizer = _load_gguf(file, text, cache)
        kind, resolved = "registered", str(file)
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            with path.open("rb") as handle:
                if handle.read(4) != GGUF_MAGIC:
                    raise ModelNotFoundError(
                        f"{path} is neither a .gguf file nor a model directory "
                        "(give the directory that holds config.json)"
                    )
        model, tokenizer = _load_gguf(path, text, cache)
        kind, resolved = "gguf", str(path.resolve())
    elif path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            model, tokenizer = _load_gguf(ggufs[0], text, cache)
            kind, resolved = "gguf", str(ggufs[0].resolve())
        else:
            model, tokenizer = _load_hf_dir(path, text)
            kind, resolved = "hf_dir", str(path.resolve())
    elif _looks_like_path(text):
        raise ModelNotFoundError(f"no such file or directory: {text}")
    elif "/" in text:
        model, tokenizer = _load_hub(text)
        kind, resolved = "hub", None
    else:
        registry.lookup(text)  # raises the unknown-name error with the known names
        raise AssertionError("unreachable")

    model = _finish(model, dtype, device)
    check_finite(model, text)
    return LoadedModel(
        model=model, tokenizer=tokenizer, layout=discover_layout(model), source=text, kind=kind, path=resolved
    )


def _load_lazy_gguf(path: Path, source: str, dtype: str | None, device: str | None) -> LoadedModel | None:
    """A GGUF file streamed from itself (`models.lazy_gguf`); None for a family that streams only from a
    dequantized copy."""
    torch_dtype = _torch_dtype(dtype)
    try:  # the reader is passed on, not held here: its mapping of the file goes once the tensor table is read
        model, lazy = lazy_gguf_model(path, check_gguf(path), torch_dtype, torch.device(device or "cpu"))
    except StreamsOnlyWhole:
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise _wrap_transformers_error(exc, source) from exc
    return _lazy_loaded(model, lazy, tokenizer, source, "gguf", path)


def _lazy_loaded(model: nn.Module, lazy: LazySource, tokenizer: object, source: str, kind: str,
                 path: Path) -> LoadedModel:  # fmt: skip
    layout = discover_layout(model)
    lazy.load_outside(model, [block.name for block in layout.blocks], defer=(layout.token_embedding, layout.lm_head))
    layout = discover_layout(model)  # again, now that a tied head is one tensor with the embedding
    return LoadedModel(model=model, tokenizer=tokenizer, layout=layout, source=source, kind=kind,
                       path=str(path.resolve()), lazy=lazy)  # fmt: skip


def _gguf_file(text: str, path: Path) -> Path | None:
    """The GGUF file `text` names (a registered model's or a path), or None."""
    if registry.is_registered(text) and not path.exists():
        return registry.lookup(text).path()
    if path.is_file() and not is_container(path):
        return path
    return None


def _lazy_source(text: str, path: Path, cache: bool) -> Path | None:
    """The safetensors directory a lazy load reads for `text` (a GGUF's dequantized cache, built once);
    None for sources that only load whole (containers, hub ids)."""
    if path.is_dir() and is_safetensors_dir(path):
        return path
    gguf = _gguf_file(text, path)
    if gguf is None or not cache:
        return None
    cache_dir = _gguf_cache_dir(gguf)
    if not is_safetensors_dir(cache_dir):
        _load_gguf(gguf, text, cache=True)  # dequantizes once, whole, and fills the cache
    return cache_dir if is_safetensors_dir(cache_dir) else None


def save_model(model: nn.Module | LoadedModel, tokenizer: object | None, path: str | os.PathLike) -> Path:
    """Write a plain Hugging Face safetensors directory that transformers loads back.

    The write is atomic: files go to a temporary sibling directory that is renamed into place, so
    an interrupted save never leaves a half-written model under `path`. An existing directory at
    `path` is replaced only after the new one is complete. Files follow the umask.
    """
    if isinstance(model, LoadedModel):
        tokenizer = model.tokenizer if tokenizer is None else tokenizer
        model = model.model
    _strip_load_time_quantizer(model)
    target = Path(path).expanduser()
    with atomic_path(target, directory=True) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return target
