"""Small C kernels built on first use with the system C compiler, for the CPU they run on.

`cc -O3 -march=native`: the instruction set is the host's, checked by the compiler, never assumed (a kernel
that needs an extension says `#error` without it, and then does not build). Built libraries are cached under
~/.cache/textgen/kernels by source, flags, macros, compiler version and CPU flags. OpenMP comes from the
libgomp torch already loaded (same soname), so the kernels and torch share one thread pool. Without a
compiler, or where a kernel does not build, `build` returns None and the caller uses its torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

FOLDER = Path(__file__).parent  # the C sources sit beside this module
BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "textgen" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(
    source: str, what: str, defines: dict[str, int] | None = None, extra_flags: tuple[str, ...] = (),
    libs: tuple[str, ...] = (),
) -> Path | None:
    """The shared library built from kernels/`source` (cached), or None where it does not build; `what`
    names the kernel in the log, `libs` are linked after it (e.g. -lmvec: glibc's vector math)."""
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = FOLDER / source
    flags = (*BASE_FLAGS, *extra_flags)
    macros = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    headers = [h.read_text() for h in sorted(FOLDER.glob("*.h"))]  # what a kernel may include
    key = hashlib.sha256("\0".join([path.read_text(), *headers, *flags, *macros, *libs, version,
                                     _cpu_flags()]).encode())  # fmt: skip
    target = _cache_dir() / f"{path.stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    for folder in (target.parent, Path(tempfile.gettempdir()) / "textgen-kernels"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            final = folder / target.name
            if final.exists():
                return final
            # a private name, then one rename: two processes building at once never load half a file
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            started = time.perf_counter()
            done = subprocess.run([compiler, *flags, *macros, str(path), "-o", tmp, *libs, "-lm"],
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
            if done.returncode != 0:
                os.unlink(tmp)
                log.warning("the %s did not build (%s); using the torch path", what,
                            done.stderr.strip().splitlines()[-1:] or done.returncode)  # fmt: skip
                return None
            os.replace(tmp, final)
            log.info("built the %s in %.1fs: %s", what, time.perf_counter() - started, final)
            return final
        except OSError:
            continue
    return None


def load(source: str, what: str, wrap: Callable[[Path], T], defines: dict[str, int] | None = None,
         extra_flags: tuple[str, ...] = (), libs: tuple[str, ...] = ()) -> T | None:  # fmt: skip
    """`wrap(path)` of the library `build` makes (it binds the functions), or None where it does not build or
    load."""
    path = build(source, what, defines, extra_flags, libs)
    if path is None:
        return None
    try:
        return wrap(path)
    except (OSError, AttributeError) as exc:  # a library that does not load, a function it lacks
        log.warning("the %s did not load (%s); using the torch path", what, exc)
        return None


_profiling = torch._C._autograd._profiler_enabled  # ~0.1 us


def call(name: str, fn: Callable[..., None], *args: object) -> None:
    """`fn(*args)`, inside a profiler scope `name` only while a profiler runs (app/bench/step_profile counts
    kernels by it): entering a scope costs ~15 us, and a decode step makes ~150 kernel calls."""
    if _profiling():
        with torch.profiler.record_function(name):
            fn(*args)
    else:
        fn(*args)
