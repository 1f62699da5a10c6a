"""Give freed C-heap memory back to the operating system.

After a large native object is freed (an ONNX Runtime session and its arena, a torch
module's weights), glibc keeps the pages in its heaps: the process's resident size does
not go down, and on a Jetson, whose CPU and GPU share one memory, those pages stay
unavailable to everything else. malloc_trim(0) releases the free pages of every arena
(madvise in the middle of a heap, not only at its top). Elsewhere (macOS, musl) nothing
is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Release free heap pages to the OS; True if glibc gave any back (False elsewhere)."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
