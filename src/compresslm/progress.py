"""Progress bars on stderr, so stdout stays clean for `--json`."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr with rate and ETA; a no-op bar when `enabled` is False. `initial` units are done
    already (a resumed run): the rate counts only what this run does."""
    return tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True, initial=initial
    )
