"""compresslm: make language models small and measure exactly what that costs.

The public names are imported lazily so that `import compresslm` (and the CLI's `--help`) stays
fast; torch and transformers load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "CompressLMError": "compresslm.errors",
    "LoadedModel": "compresslm.models.loaded",
    "load_compressed": "compresslm.models.assemble",
    "load_model": "compresslm.models.loading",
    "save_model": "compresslm.models.loading",
    "ModelLayout": "compresslm.models.layout",
    "discover_layout": "compresslm.models.layout",
    "PerplexityResult": "compresslm.eval.perplexity",
    "perplexity": "compresslm.eval.perplexity",
    "set_budget": "compresslm.dial",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'compresslm' has no attribute '{name}'")
