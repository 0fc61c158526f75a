"""Versions of everything that can change a number, recorded in every protocol."""

from __future__ import annotations

import platform
import sys
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Return the versions of Python, compresslm and the libraries that compute our numbers."""
    from compresslm import __version__

    return {
        "compresslm": __version__,
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "gguf": _version("gguf"),
        "numpy": _version("numpy"),
        **({"llama_cpp_python": v} if (v := _version("llama_cpp_python")) else {}),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
