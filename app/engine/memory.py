"""Giving freed memory back to the operating system when the engine goes idle.

glibc keeps freed heap memory for reuse; after a burst (many rows, long prompts) that can stay
resident for good. `malloc_trim` returns it. Elsewhere (musl, macOS, Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_libc: ctypes.CDLL | None = None
try:
    _name = ctypes.util.find_library("c")
    if _name:
        _lib = ctypes.CDLL(_name)
        if hasattr(_lib, "malloc_trim"):
            _libc = _lib
except OSError:  # no loadable C library: nothing to trim
    _libc = None


def release_free_memory() -> bool:
    """True when memory could be handed back (glibc), False where there is no such call."""
    if _libc is None:
        return False
    return bool(_libc.malloc_trim(0))
