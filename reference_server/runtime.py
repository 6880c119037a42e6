"""How the server process runs: its event loop, and how it asks memory of the C library.

Neither changes what the server says on the wire; both change how fast it
says it (``bench/fio_bench.py`` measures each, side by side with nbdkit).

* The event loop is asyncio's own unless ``--event-loop=uvloop`` asks for
  uvloop, which must then be installed: it is never required, and the
  standard-library loop stays the default.
* Reply and payload buffers of up to a few MiB are allocated per request.
  glibc serves large allocations with fresh ``mmap`` pages, each of which
  faults on first touch (a 1 MiB read reply then costs 256 page faults,
  several times the copy itself), and the threshold that decides it moves
  with the program's history, so the same request can cost four times
  more from one run to the next.  :func:`tune_allocator` fixes the
  threshold: buffers up to ``HEAP_BUFFERS_UP_TO`` are recycled from the
  heap, larger ones (up to the 32 MiB maximum payload) still come from and
  go back to the kernel, so memory held stays bounded.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import platform
from collections.abc import Callable

__all__ = ["EVENT_LOOPS", "HEAP_BUFFERS_UP_TO", "UnavailableLoop", "loop_factory", "tune_allocator"]

EVENT_LOOPS = ("asyncio", "uvloop")
HEAP_BUFFERS_UP_TO = 4 * 1024 * 1024
# Memory freed at the top of the heap beyond this goes back to the kernel.
_TRIM_ABOVE = 64 * 1024 * 1024
# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class UnavailableLoop(Exception):
    """The event loop asked for is not installed."""


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold (see the module docstring); False where there is no glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, HEAP_BUFFERS_UP_TO) and mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE)
    )


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The constructor of the named event loop; UnavailableLoop if it is not installed."""
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise UnavailableLoop(
                "--event-loop=uvloop needs the uvloop package (pip install uvloop); "
                "the default, --event-loop=asyncio, needs nothing"
            ) from None
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    raise UnavailableLoop(f"unknown event loop {name!r}: choose from {', '.join(EVENT_LOOPS)}")
