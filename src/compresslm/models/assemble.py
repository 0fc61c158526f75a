"""Between a compressed model in memory and its container: gather what to write, build what was read.

`formats.container` only reads and writes records, tensors and bytes; this module knows models.
Saving gathers the dense tensors (in the recipe's dense dtype, a tied lm_head once), the tokenizer's
files and each linear's simulated activation grid. Loading builds the model its config describes on
the meta device first and checks every stored tensor against it, then swaps in `CompressedLinear`
modules over the records; any mismatch is reported as a corrupt file, nothing is half-built.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn

from compresslm.compressed import CompressedWeight
from compresslm.errors import CompressLMError, CorruptFileError, reason_of
from compresslm.fileio import load_tensors, save_tensors
from compresslm.formats.container import ContainerContents, ContainerReader, ContainerWriter, read_container
from compresslm.formats.header_check import TENSOR_DTYPES, check_config
from compresslm.memory import release_freed_memory
from compresslm.models.forward import Carried
from compresslm.models.layout import discover_layout, is_linear
from compresslm.models.lazy import LazySource, held, set_tensor
from compresslm.models.loaded import LoadedModel
from compresslm.recipe import Recipe
from compresslm.runtime.linear import CompressedLinear, replace_module


def save_compressed(
    lm: LoadedModel,
    weights: dict[str, CompressedWeight],
    path: str | os.PathLike,
    metadata: dict | None = None,
    dense_dtype: str = "float16",
    embeddings: dict[str, CompressedWeight] | None = None,
) -> dict:
    """Write `lm` (already compressed in place) and its records to a `.clm` file; return its summary.

    `weights` are the compressed linears (replaced by CompressedLinear in the model); `embeddings`
    are quantized embedding matrices (module path -> record), whose dense copies are not stored.
    """
    embeddings = embeddings or {}
    writer = ContainerWriter(path)
    try:
        for name, record in weights.items():
            writer.add_linear(name, record, _activation(lm.model.get_submodule(name)))
        state = lm.model.state_dict(keep_vars=True)
        items = [(key, (t.data_ptr(), tuple(t.shape)), t.detach()) for key, t in state.items()]
        dense, aliases = _gather_dense(items, dense_dtype, {f"{name}.weight" for name in embeddings})
    except BaseException:
        writer.abort()
        raise
    return _finish(writer, lm, dense, aliases, embeddings, dense_dtype, metadata)


class StreamingSave:
    """Writes a model to a container while the engine compresses it block by block (its `RecordSink`).

    Each record goes to the container's spill file as it is made, and each finished block's dense
    tensors (norms, biases) are kept in their storage dtype, so the records and weights of only one
    block are held at a time. `finish` writes what lies outside the blocks; the container is
    byte for byte the one `save_compressed` writes for the same model compressed whole.

    Every finished block is journalled beside the target (`.NAME.partial/`: the spill, each block's
    dense tensors, and what the next block needs), so a killed compression resumes at the block after
    the last finished one and writes the same file; the journal is removed once the file is in place.
    """

    def __init__(self, path: str | os.PathLike, dense_dtype: str) -> None:
        target = Path(path).expanduser()
        self.journal = target.with_name(f".{target.name}.partial")
        self.journal.mkdir(parents=True, exist_ok=True)
        self.writer = ContainerWriter(target, spill=self.journal / "blobs")
        self.dense_dtype = dense_dtype
        self.blocks: dict[str, torch.Tensor] = {}  # dense tensors of finished blocks, in storage dtype
        self.dense_files: list[str] = []

    def resume(self, run: str) -> Carried | None:
        """What a killed run of the same compression (`run`) carried past its last finished block, or None
        (a journal of another run, or none, is started afresh)."""
        state_file = self.journal / "state.safetensors"
        fields = None
        if state_file.is_file():
            try:
                tensors, fields = load_tensors(state_file)
            except CorruptFileError:
                fields = None
        if fields is None or fields.get("run") != run:
            self.writer.restore({"offset": 0, "blobs": {}, "linears": {}, "linear_parameters": 0})
            return None
        self.writer.restore(fields["writer"])
        self.dense_files = list(fields["dense_files"])
        for name in self.dense_files:
            dense, _ = load_tensors(self.journal / Path(name).name)
            self.blocks.update(dense)
        carried = fields["carried"]
        streams = {key: [tensors[f"streams.{key}.{i}"] for i in range(count)]
                   for key, count in carried["streams"].items()}  # fmt: skip
        return Carried(carried["next_block"], [tensors[f"inputs.{i}"] for i in range(carried["inputs"])],
                       [tensors[f"probe.{i}"] for i in range(carried["probe"])], streams, carried["layers"],
                       carried["folds"])  # fmt: skip

    def linear(self, name: str, record: CompressedWeight, module: nn.Module) -> None:
        if name not in self.writer.linears:  # a resumed run makes the head's record again: it is stored already
            self.writer.add_linear(name, record, _activation(module))

    def block(self, block: object, carried: Carried, run: str) -> None:
        """Keep the finished block's dense tensors, then journal it: the file's state and what comes next."""
        state = block.module.state_dict(prefix=f"{block.name}.", keep_vars=True)
        dense = {key: _stored(key, tensor.detach(), self.dense_dtype) for key, tensor in state.items()}
        self.blocks.update(dense)
        name = f"dense-{carried.next_block - 1:05d}.safetensors"
        self._journal(name, dense, {})
        self.dense_files.append(name)
        tensors = {f"inputs.{i}": t for i, t in enumerate(carried.inputs)}
        tensors.update({f"probe.{i}": t for i, t in enumerate(carried.probe)})
        for key, stream in carried.streams.items():
            tensors.update({f"streams.{key}.{i}": t for i, t in enumerate(stream)})
        fields = {"run": run, "writer": self.writer.state(), "dense_files": self.dense_files,
                  "carried": {"next_block": carried.next_block, "inputs": len(carried.inputs),
                              "probe": len(carried.probe), "streams": {k: len(v) for k, v in carried.streams.items()},
                              "layers": carried.layers, "folds": carried.folds}}  # fmt: skip
        self._journal("state.safetensors", tensors, fields)

    def _journal(self, name: str, tensors: dict[str, torch.Tensor], fields: dict) -> None:
        try:
            save_tensors(self.journal / name, tensors, fields)
        except OSError as exc:
            raise CompressLMError(f"cannot write the journal {self.journal / name}: {exc.strerror or exc}") from None

    def finish(self, lm: LoadedModel, embeddings: dict[str, CompressedWeight], metadata: dict | None = None) -> dict:
        """Write the tensors outside the blocks, the tokenizer and the header; return the container's summary."""
        try:
            items = []
            compressed = {f"{name}.weight" for name in self.writer.linears}  # blocks a resumed run never read
            with held(lm.lazy, lm.model):  # the embedding and head, if they were left on disk
                for key, tensor in lm.model.state_dict(keep_vars=True).items():
                    if key in compressed:
                        continue
                    identity = id(tensor) if tensor.is_meta else (tensor.data_ptr(), tuple(tensor.shape))
                    items.append((key, identity, self.blocks.get(key, tensor.detach())))
                dense, aliases = _gather_dense(items, self.dense_dtype, {f"{name}.weight" for name in embeddings})
            del items
        except BaseException:
            self.writer.abort()
            raise
        summary = _finish(self.writer, lm, dense, aliases, embeddings, self.dense_dtype, metadata)
        shutil.rmtree(self.journal, ignore_errors=True)
        return summary

    def abort(self) -> None:
        """Stop writing; the journal stays, so the same compression run again resumes from it."""
        self.writer.abort()


def _activation(module: nn.Module) -> dict | None:
    return module.activation_config() if isinstance(module, CompressedLinear) else None


def _stored(key: str, tensor: torch.Tensor, dense_dtype: str) -> torch.Tensor:
    """A dense tensor in its storage dtype, which must hold it exactly."""
    if not tensor.is_floating_point():
        return tensor
    stored = tensor.to(TENSOR_DTYPES[dense_dtype])
    flat, back = tensor.reshape(-1), stored.reshape(-1)
    step = 1 << 22  # compared a slice at a time: a float copy of a large embedding is most of a small model
    if not all(
        torch.equal(back[i : i + step].to(tensor.dtype), flat[i : i + step]) for i in range(0, flat.numel(), step)
    ):
        raise CompressLMError(
            f"{key} is not exactly representable in {dense_dtype}, so the container could not reload it "
            "bit-exactly; compress() rounds dense tensors first"
        )
    return stored


def _gather_dense(
    items: list[tuple[str, object, torch.Tensor]], dense_dtype: str, skip: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The dense tensors to store (key, identity, tensor) in order, and the keys that alias an earlier one."""
    dense, aliases, seen = {}, {}, {}
    for key, identity, tensor in items:
        if identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        if key not in skip:
            dense[key] = _stored(key, tensor, dense_dtype)
    return dense, aliases


def _finish(
    writer: ContainerWriter,
    lm: LoadedModel,
    dense: dict[str, torch.Tensor],
    aliases: dict[str, str],
    embeddings: dict[str, CompressedWeight],
    dense_dtype: str,
    metadata: dict | None,
) -> dict:
    config = lm.model.config.to_dict()
    config.pop("quantization_config", None)
    compressed = {f"{name}.weight" for name in writer.linears}
    uncompressed = sum(p.numel() for name, p in lm.model.named_parameters() if name not in compressed)
    parameters = uncompressed + writer.linear_parameters
    files = tokenizer_files(lm.tokenizer)
    return writer.finish(
        config=config, embeddings=embeddings, dense=dense, aliases=aliases, tokenizer_files=files,
        parameters=parameters, dense_dtype=dense_dtype, metadata=metadata,
    )  # fmt: skip


def tokenizer_files(tokenizer: object | None) -> dict[str, bytes]:
    """The files a container stores for `tokenizer` (name -> bytes), as its `save_pretrained` writes them."""
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {file.name: file.read_bytes() for file in sorted(Path(tmp).iterdir()) if file.is_file()}


def load_compressed(path: str | os.PathLike, device: str | None = None, dial_bits: int | None = None,
                    float_weights: bool = False) -> LoadedModel:  # fmt: skip
    """Rebuild the compressed model from a `.clm` file, checking the header, the layout and every checksum first.

    `dial_bits` loads a dial artifact at that width, reading only the bit planes it needs (and
    verifying only what it reads); `lm.bytes_read` says how much of the file was read. The
    compressed linears hold their records packed and dequantize at each forward, unless
    `float_weights` caches a float copy of each (faster, as large as the float model).
    """
    p = Path(path).expanduser()
    contents = read_container(p, dial_bits)
    try:
        model, tokenizer, kv_cache = _build(contents, float_weights)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as exc:
        reason = reason_of(exc)
        raise CorruptFileError(f"{p} is corrupt: {reason}") from None
    if device is not None:
        model = model.to(device)
    lm = LoadedModel.from_module(model.eval(), tokenizer, name=str(path))
    lm.kind, lm.path = "container", str(p.resolve())
    lm.container = contents.header
    lm.bytes_read = contents.bytes_read
    lm.compressed = Records(model, list(contents.linears), contents.embeddings)
    lm.kv_cache = kv_cache
    del contents
    release_freed_memory()
    return lm


def load_compressed_lazily(path: str | os.PathLike, device: str | None = None) -> LoadedModel:
    """A container's model with only what lies outside its blocks in memory; each block is built from its
    records when a walk reaches it (`LazyContainer`), so a compressed model larger than memory evaluates."""
    p = Path(path).expanduser()
    reader = ContainerReader(p)
    header = reader.header
    try:
        config = _config(header)
        with init_empty_weights(include_buffers=False):
            model = _model_from_config(config)
        _check_against_model(header, model)
        _check_complete(header, model)
        kv_cache = _kv_stage(header)
    except ValueError as exc:
        reason = reason_of(exc)
        raise CorruptFileError(f"{p} is corrupt: {reason}") from None
    try:
        tokenizer = _tokenizer(reader.tokenizer_files())
    except ValueError as exc:
        raise CorruptFileError(f"{p} is corrupt: {exc}") from None
    lazy = LazyContainer(reader, model, torch.device(device or "cpu"))
    layout = discover_layout(model)
    lazy.load_outside(model, [block.name for block in layout.blocks], defer=(layout.token_embedding, layout.lm_head))
    lm = LoadedModel.from_module(model.eval(), tokenizer, name=str(path))
    lm.kind, lm.path, lm.container, lm.kv_cache, lm.lazy = "container", str(p.resolve()), header, kv_cache, lazy
    return lm


class LazyContainer(LazySource):
    """A container's tensors and records, read block by block into a model built on the meta device.

    A block's compressed linears become `CompressedLinear` modules over their records; dense tensors
    are read in float32, as `load_compressed` reads them.
    """

    def __init__(self, reader: ContainerReader, model: nn.Module, device: torch.device) -> None:
        super().__init__(torch.float32, device)
        self.reader, self.model = reader, model

    def activations(self) -> dict[str, dict]:
        return {name: entry["activation"] for name, entry in self.reader.header["linears"].items()
                if entry.get("activation")}  # fmt: skip

    def _read_into(self, module: nn.Module, prefix: str, block: bool) -> None:
        header = self.reader.header
        linears = [n for n in header["linears"] if (n.startswith(f"{prefix}.") if block else n == prefix)]
        for name in linears:
            bias_key = f"{name}.bias"
            bias = self.reader.dense(bias_key).float() if bias_key in header["dense"] else None
            new = _compressed_linear(self.reader.linear(name), bias, header["linears"][name].get("activation"))
            replace_module(self.model, name, new.to(self.device))
        owned = {f"{name}.bias" for name in linears}
        for key in header["dense"]:
            owner_path, _, attr = key.rpartition(".")
            inside = owner_path.startswith(f"{prefix}.") or owner_path == prefix if block else owner_path == prefix
            if not inside or key in owned:
                continue
            tensor = self.reader.dense(key)
            owner = self.model.get_submodule(owner_path)
            tensor = tensor.float() if tensor.is_floating_point() else tensor
            set_tensor(owner, attr, tensor.to(self.device), attr in owner._parameters)
        if not block and prefix in header.get("embeddings", {}):
            weight = self.reader.embedding(prefix).dequantize().to(self.device)
            set_tensor(module, "weight", weight, True)


class Records(Mapping):
    """A loaded container's records by module path, read from its modules when asked (a packed layer
    rebuilds its record then), so that the model does not hold a second, unpacked copy of each."""

    def __init__(self, model: nn.Module, linears: list[str], embeddings: dict[str, CompressedWeight]) -> None:
        self._model, self._linears, self._embeddings = model, linears, embeddings

    def __getitem__(self, name: str) -> CompressedWeight:
        if name in self._embeddings:
            return self._embeddings[name]
        if name not in self._linears:
            raise KeyError(name)
        return self._model.get_submodule(name).compressed

    def __iter__(self):
        return iter([*self._linears, *self._embeddings])

    def __len__(self) -> int:
        return len(self._linears) + len(self._embeddings)


def _compressed_linear(
    record: CompressedWeight, bias: torch.Tensor | None, activation: dict | None, float_weight: bool = True
) -> CompressedLinear:
    """A stored linear as a module: its record, its bias and its simulated activation grid (or None)."""
    module = CompressedLinear(record, bias, float_weight=float_weight)
    if activation:
        scale = None if activation["scale"] is None else torch.tensor(float(activation["scale"]))
        module.set_activation_quantization(activation["bits"], activation["granularity"], scale)
    return module


def _check_complete(header: dict, model: nn.Module) -> None:
    """Every tensor of the model must be stored: as a dense tensor, an alias, a record or an embedding."""
    provided = set(header["dense"]) | set(header["aliases"])
    provided |= {f"{name}.weight" for name in (*header["linears"], *header.get("embeddings", {}))}
    missing = [key for key in model.state_dict() if key not in provided]
    if missing:
        raise ValueError(f"tensors do not match the model (missing {missing[:3]})")


def _kv_stage(header: dict) -> object | None:
    if not header.get("recipe"):
        return None
    try:
        return Recipe.from_dict(header["recipe"]).kv_cache
    except CompressLMError as exc:
        raise ValueError(f"its recipe is invalid: {exc}") from None


def _model_from_config(config: object) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError:
        raise
    except Exception as exc:  # transformers' config validators raise their own classes on a hostile config
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"its config does not describe a model ({reason.strip()})") from None


def _build(contents: ContainerContents, float_weights: bool) -> tuple[nn.Module, object | None, object | None]:
    """The model, its tokenizer and KV-cache stage from a container's checked contents.

    The model is built on the meta device and each tensor is put in as it is made, so loading never
    holds the float model's weights beside the records (a packed model's peak stays near its size).
    """
    header = contents.header
    config = _config(header)
    with init_empty_weights(include_buffers=False):  # the tensors must fit the config before memory is spent
        model = _model_from_config(config)
    _check_against_model(header, model)
    for name, record in contents.linears.items():
        bias = getattr(model.get_submodule(name), "bias", None)  # on meta: its values are a dense tensor
        replace_module(model, name, _compressed_linear(record, bias, contents.activations.get(name), float_weights))
    state = {key: t.float() if t.is_floating_point() else t for key, t in contents.dense.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    for name, record in contents.embeddings.items():
        set_tensor(model.get_submodule(name), "weight", record.dequantize(), True)
    for alias, target in header["aliases"].items():  # tied tensors: one tensor under both names
        owner, _, attr = alias.rpartition(".")
        source, _, source_attr = target.rpartition(".")
        setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(source), source_attr))
    provided = set(header["aliases"]) | {f"{name}.weight" for name in contents.embeddings}
    missing = [k for k in missing if k not in provided]
    missing += [k for k, t in model.state_dict().items() if t.is_meta and k not in missing]
    if missing or unexpected:
        raise ValueError(f"tensors do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, _tokenizer(contents.tokenizer_files), _kv_stage(header)


def _config(header: dict) -> object:
    """The model config of a checked header; a model_type transformers does not know is refused."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values = dict(header["config"])
    model_type = values.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"its config names model_type {model_type!r}, which this transformers does not know")
    check_config(values, CONFIG_MAPPING[model_type]().to_dict())
    try:
        config = AutoConfig.for_model(model_type, **values)
    except ValueError:
        raise
    except Exception as exc:  # transformers' config validators raise their own classes on a hostile config
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"its config does not describe a model ({reason.strip()})") from None
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > len(header["linears"]) + len(header["dense"]):
        raise ValueError(f"its config asks for {layers} layers, more than the tensors it stores")
    return config


def _check_against_model(header: dict, model: nn.Module) -> None:
    """Every stored tensor and record must be one the model (on the meta device) has, of its shape."""
    expected = dict(model.state_dict())
    for name, entry in header["linears"].items():
        module = model.get_submodule(name)
        if not is_linear(module):
            raise ValueError(f"{name} is a {type(module).__name__}, not a linear layer")
        weight = module.weight
        out_in = [weight.shape[1], weight.shape[0]] if type(module).__name__ == "Conv1D" else list(weight.shape)
        if entry["shape"] != out_in:
            raise ValueError(f"the record of {name} is {entry['shape']}, the model's layer is {out_in}")
        expected.pop(f"{name}.weight", None)
    for name, entry in header.get("embeddings", {}).items():
        module = model.get_submodule(name)
        if not isinstance(module, torch.nn.Embedding) or entry["shape"] != list(module.weight.shape):
            raise ValueError(f"the embedding record of {name} does not fit the model's {type(module).__name__}")
    blobs = header["blobs"]
    for key, blob in header["dense"].items():
        if key not in expected:
            raise ValueError(f"it stores a tensor {key!r} the model does not have")
        tensor, stored = expected[key], blobs[blob]
        floating = TENSOR_DTYPES[stored["dtype"]].is_floating_point
        if stored["shape"] != list(tensor.shape) or floating != tensor.is_floating_point():
            model_has = f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
            raise ValueError(f"tensor {key!r} is {stored['dtype']} {stored['shape']}, the model has {model_has}")
    for key in header["aliases"]:
        if key not in expected:
            raise ValueError(f"it aliases a tensor {key!r} the model does not have")


def transposed_linears(header: dict) -> frozenset[str]:
    """The records of a checked container header whose layers hold their weight as [in, out] (GPT-2's Conv1D)."""
    try:
        config = _config(header)
    except ValueError as exc:
        raise CorruptFileError(f"the container is corrupt: {reason_of(exc)}") from None
    with torch.device("meta"):
        model = _model_from_config(config)
    return frozenset(n for n in header["linears"] if type(model.get_submodule(n)).__name__ == "Conv1D")


def _tokenizer(files: dict[str, bytes]) -> object | None:
    """The stored tokenizer, read from a private directory holding only the container's checked file names."""
    from transformers import AutoTokenizer

    if not files:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:  # the tokenizer libraries raise anything on bad files (even Rust exceptions)
            reason = reason_of(exc)
            raise ValueError(f"its tokenizer files do not load ({reason})") from None
