"""release_free_heap gives freed heap pages back to the OS (Linux/glibc, where CI runs)."""

import pathlib
import sys

import pytest

from mcckd_jax import host_memory


def _resident_bytes() -> int:
    return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_freed_heap_is_returned_to_the_os():
    # 200k blocks of 2 KiB come from malloc's heap (above pymalloc's 512-byte limit and below
    # the mmap threshold); the last one stays alive so the heap top cannot shrink on its own.
    blocks = [bytes(2048 - 33) + bytes([i % 256]) for i in range(200_000)]
    keep = blocks[-1]
    before = _resident_bytes()
    del blocks
    after_free = _resident_bytes()
    assert host_memory.release_free_heap()
    after_trim = _resident_bytes()
    assert before - after_free < 100 * 2**20  # glibc kept the freed pages ...
    assert after_free - after_trim > 200 * 2**20  # ... and gave them back on request
    assert keep[-1] == (200_000 - 1) % 256
