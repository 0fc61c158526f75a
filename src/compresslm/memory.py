"""Handing freed memory back to the operating system.

Loading a container allocates and frees many buffers (file bytes, unpacked codes, float copies of
dense tensors); glibc's allocator keeps much of that freed memory in its heap, so the process stays
hundreds of MB larger than what it holds. `release_freed_memory` asks glibc to return it
(`malloc_trim`); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def release_freed_memory() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)
