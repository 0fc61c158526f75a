"""Progress bars on stderr, so stdout stays clean for `--json`."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator

from tqdm.auto import tqdm

_SHOWN = contextvars.ContextVar("compresslm_progress_shown", default=True)


@contextlib.contextmanager
def shown(enabled: bool) -> Iterator[None]:
    """Inside, bars show only if `enabled`: a caller's `--quiet` reaches code it calls through an
    interface that has no progress argument (a registered stage's apply)."""
    token = _SHOWN.set(enabled and _SHOWN.get())
    try:
        yield
    finally:
        _SHOWN.reset(token)


def progress(total: int, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar on stderr with rate and ETA; a no-op bar when `enabled` is False. `initial` units are done
    already (a resumed run): the rate counts only what this run does."""
    disable = not (enabled and _SHOWN.get())
    return tqdm(
        total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, dynamic_ncols=True, initial=initial
    )
