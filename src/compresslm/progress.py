"""Progress bars on stderr, so stdout stays clean for `--json`."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int, desc: str, unit: str = "it", enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr with rate and ETA; a no-op bar when `enabled` is False."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True)
