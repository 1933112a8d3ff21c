"""Memory: giving freed host memory back to the operating system (CPU), and reading the device's (CUDA).

On CPU the engine trims when it goes idle, and every TRIM_INTERVAL_S while it is busy.

glibc keeps freed heap memory for reuse. Tensors of every size come and go (prefills of any length,
batches of any width, logits, sampling buffers) and the freed holes between live blocks stay resident;
under steady mixed load they added up faster without the periodic trim (soak, tiny-gpt2: 1418 MB after
2.5 minutes without it, 1313 MB after 4 minutes with it, before the oneDNN cache cap). `malloc_trim`
returns the free pages, in a few milliseconds. Glibc's own remedy, a low fixed mmap threshold
(MALLOC_MMAP_THRESHOLD_), maps and unmaps every large tensor and cost 20% of the throughput here.
Elsewhere (musl, macOS, Windows) this does nothing. On CUDA the tensors live in the device's caching
allocator, not the heap: no trim there, and `device_memory` says what the device holds instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass

import torch

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


@dataclass(frozen=True)
class DeviceMemory:
    reserved_bytes: int = 0  # held by the CUDA caching allocator now (what nvidia-smi counts, less the context)
    peak_allocated_bytes: int = 0  # the most live tensors took at once since start


def device_memory(device: torch.device) -> DeviceMemory:
    """What an accelerator holds for this process; zeros on CPU (host memory: process_resident_memory_bytes)."""
    if device.type != "cuda":
        return DeviceMemory()
    return DeviceMemory(int(torch.cuda.memory_reserved(device)), int(torch.cuda.max_memory_allocated(device)))
