"""The measuring worker's malloc (``device.allocator``), and giving freed memory back to the OS.

Stock glibc serves every block over its mmap threshold (32 MB at most) with a fresh ``mmap``
and unmaps it on free, so on a long sequence each call of a variant page-faults its big tensors
in again (~0.4 ms per MB here): the time then grows faster than the work. Three settings:

- ``cached`` (the default, nothing to install): glibc told through its environment never to
  serve a block by mmap and never to give freed memory back (``MALLOC_MMAP_MAX_=0``, a huge
  ``MALLOC_TRIM_THRESHOLD_``), so freed pages are reused as CUDA's caching allocator reuses
  them and a cell times the kernel in steady state;
- ``system``: stock glibc, page faults included (for comparison);
- ``jemalloc`` (``apt install libjemalloc2``) or a path to another malloc library, preloaded.

The headline memory figure is tensor bytes (harness.measure.TensorPeak), which no malloc setting
changes. The process high-water mark beside it is made as honest as a cache allows:
:func:`exact_peak_start` gives every freed page back to the OS before the call whose peak is
measured (glibc: ``malloc_trim``; jemalloc: a purge, with pages freed at once during the call:
``muzzy_decay_ms:0`` makes that a real ``MADV_DONTNEED``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
LIBRARIES = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so")}
SETTINGS = ("cached", "system", "jemalloc")  # or a path to a malloc library
CACHED_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**46)}  # 64 TB: never
DIRTY_DECAY_MS = -1  # between measured peaks jemalloc keeps every freed page, as CUDA's cache
MALLOC_CONF = f"dirty_decay_ms:{DIRTY_DECAY_MS},muzzy_decay_ms:0"  # a purge frees pages at once
ALL_ARENAS = 4096  # jemalloc's MALLCTL_ARENAS_ALL


def library(name: str) -> str | None:
    """The shared library to preload for ``device.allocator`` (None: glibc, cached or stock)."""
    if name in ("cached", "system", "", None):
        return None
    if "/" in name:
        if not Path(name).is_file():
            raise ValueError(f"device.allocator={name}: no such file")
        return name
    if name not in LIBRARIES:
        raise ValueError(
            f"device.allocator={name}: unknown; use {', '.join(SETTINGS)} or a path to a malloc "
            "library"
        )
    for file in LIBRARIES[name]:
        for folder in LIB_DIRS:
            if (Path(folder) / file).is_file():
                return str(Path(folder) / file)
    found = ctypes.util.find_library(name)
    if found:
        return found
    raise ValueError(
        f"device.allocator={name}: lib{name} is not installed (Debian/Ubuntu: apt install "
        f"lib{name}2); install it, or run with device.allocator=cached (the default)"
    )


def worker_env(setting: str | None) -> dict:
    """Environment variables that give a freshly started process the malloc of ``setting``
    (a name of SETTINGS or a library path)."""
    if setting in (None, "", "cached"):
        return dict(CACHED_ENV)
    if setting == "system":
        return {}
    return {"LD_PRELOAD": library(setting), "MALLOC_CONF": MALLOC_CONF}


def in_use() -> str:
    """Which malloc this process runs on, as recorded in a run's meta.json."""
    maps = Path("/proc/self/maps")
    text = maps.read_text() if maps.exists() else ""
    for name, files in LIBRARIES.items():
        if any(f in text for f in files):
            return name
    cached = all(os.environ.get(k) == v for k, v in CACHED_ENV.items())
    return "cached" if cached else "system"


def _mallctl():
    """jemalloc's control function when this process runs on jemalloc, else None."""
    return getattr(ctypes.CDLL(None), "mallctl", None)


def _set_decay(mallctl, ms: int) -> None:
    """Every arena's dirty-page decay time (-1: keep freed pages, 0: free them at once)."""
    narenas = ctypes.c_uint()
    size = ctypes.c_size_t(ctypes.sizeof(narenas))
    mallctl(b"arenas.narenas", ctypes.byref(narenas), ctypes.byref(size), None, 0)
    value = ctypes.c_ssize_t(ms)
    for i in range(narenas.value):
        name = f"arena.{i}.dirty_decay_ms".encode()
        mallctl(name, None, None, ctypes.byref(value), ctypes.sizeof(value))


def release() -> None:
    """Give every freed page back to the OS (glibc: ``malloc_trim``; jemalloc: a purge). The
    worker calls it between cells: a cache is for the repeated calls of one cell, and what a
    cell of 8 GB left behind must not sit beside the next one's 8 GB (the kernel's OOM killer
    ended such a cell at n = 16384 before this)."""
    mallctl = _mallctl()
    if mallctl is None:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to trim
            pass
        return
    mallctl(b"thread.tcache.flush", None, None, None, 0)
    mallctl(f"arena.{ALL_ARENAS}.purge".encode(), None, None, None, 0)


def exact_peak_start() -> None:
    """Before a call whose peak memory is measured: give every freed page back to the OS, so
    that what the call needs is faulted in (and counted), and make jemalloc free pages at
    once during the call, as glibc does for big blocks, so its cache is not counted either."""
    mallctl = _mallctl()
    if mallctl is not None:
        _set_decay(mallctl, 0)
    release()


def exact_peak_stop() -> None:
    """After the measured call: jemalloc keeps freed pages for reuse again."""
    mallctl = _mallctl()
    if mallctl is not None:
        _set_decay(mallctl, DIRTY_DECAY_MS)
