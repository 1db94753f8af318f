"""Host (CPU) memory housekeeping for long-running processes.

XLA's compiler allocates and frees several hundred MB of small objects per compilation. glibc
keeps freed heap pages mapped for reuse, and the runtime's buffers are then allocated from
fresh pages beside them, so a process's resident memory after compiling a train step stays
about that much higher for the whole run. `malloc_trim` hands the free pages back to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library is not glibc (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Returns the C heap's free pages to the OS; True when the C library could do it."""
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))
