"""trim_heap gives freed heap memory back to the OS (what closing a teacher relies on)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import re
from fieldlearn.runtime.heap import trim_heap

def rss_anon():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) << 10

trim_heap()
before = rss_anon()
blocks = [bytearray(4000) for _ in range(50_000)]     # ~200 MB through malloc's heap, below mmap
for b in blocks[::2]:
    b[0] = 1
kept = blocks[-1]                                    # a live block at the top: free() alone cannot shrink the heap
del blocks
after_free = rss_anon()
released = trim_heap()
after_trim = rss_anon()
print(before >> 20, after_free >> 20, after_trim >> 20, released)
"""


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="malloc_trim is glibc's")
def test_trim_heap_returns_freed_heap_pages():
    """If this fails, a closed teacher's memory stays in the process's RSS (the step's peak grows by it)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    before, after_free, after_trim, released = int(out[0]), int(out[1]), int(out[2]), out[3] == "True"
    assert after_free - before > 150, f"the allocation did not stay resident after free ({out})"
    assert released and after_trim - before < 30, f"trim_heap gave back too little: {out} (MiB)"
