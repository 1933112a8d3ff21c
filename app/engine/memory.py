"""Giving freed memory back to the operating system: when the engine goes idle, and every
TRIM_INTERVAL_S while it is busy.

glibc keeps freed heap memory for reuse. Tensors of every size come and go (prefills of any length,
batches of any width, logits, sampling buffers) and the freed holes between live blocks stay resident;
under steady mixed load they added up faster without the periodic trim (soak, tiny-gpt2: 1418 MB after
2.5 minutes without it, 1313 MB after 4 minutes with it, before the oneDNN cache cap). `malloc_trim`
returns the free pages, in a few milliseconds. Glibc's own remedy, a low fixed mmap threshold
(MALLOC_MMAP_THRESHOLD_), maps and unmaps every large tensor and cost 20% of the throughput here.
Elsewhere (musl, macOS, Windows) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

TRIM_INTERVAL_S = 10.0  # while busy, trim this often: a few ms each time

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
