"""Large buffers in mappings of their own (morphserve.runtime.large_buffers): the pure rules,
and a real glibc process whose freed buffer stays resident in the heap by default and goes
back to the OS with `mapped`."""

import os
import subprocess
import sys

import pytest

from morphserve.errors import MorphServeError
from morphserve.runtime import huge_pages, large_buffers

MAPPED = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("kernel", ["madvise", "always"])
def test_mapped_fixes_the_threshold_and_asks_for_huge_pages(kernel):
    env = large_buffers.apply({}, "mapped", kernel)
    assert env == {"GLIBC_TUNABLES": MAPPED}
    assert "mappings of their own" in large_buffers.describe(env)


def test_heap_leaves_the_environment_as_it_is():
    assert large_buffers.apply({"A": "1"}, "heap", "never") == {"A": "1"}
    assert "glibc's heap" in large_buffers.describe({"A": "1"})


@pytest.mark.parametrize("kernel", ["never", None])
def test_mapped_without_huge_pages_is_refused_in_one_line(kernel):
    with pytest.raises(MorphServeError, match="needs the kernel's transparent huge pages") as e:
        large_buffers.apply({}, "mapped", kernel)
    assert "\n" not in str(e.value)


def test_a_bad_mode_is_refused():
    with pytest.raises(ValueError, match="not one of heap, mapped"):
        large_buffers.apply({}, "both", "madvise")


def test_other_tunables_are_kept_and_the_operators_own_values_win():
    env = large_buffers.apply({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "mapped", "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + MAPPED
    mine = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}
    assert large_buffers.apply(dict(mine), "mapped", "madvise")["GLIBC_TUNABLES"] == (
        "glibc.malloc.mmap_threshold=65536:glibc.malloc.hugetlb=1")


def test_huge_pages_then_mapped_name_hugetlb_once():
    env = huge_pages.apply({}, "auto", "madvise")
    env = large_buffers.apply(env, "mapped", "madvise")
    assert env["GLIBC_TUNABLES"].count("glibc.malloc.hugetlb") == 1


# A 16 MiB block freed raises glibc's dynamic threshold, so the 8 MiB buffer after it comes
# from the heap, where it stays resident once freed (the top is trimmed only past twice the
# raised threshold); with a fixed threshold it is a mapping, unmapped by free().
_CHILD = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1])
libc.free(libc.malloc(16 << 20))
before = anon()
p = libc.malloc(8 << 20)
ctypes.memset(p, 1, 8 << 20)
libc.free(p)
print(anon() - before)
"""


def _kept_kib(tunables: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_a_freed_large_buffer_stays_in_the_heap_by_default_and_not_when_mapped():
    assert _kept_kib(None) >= 7 * 1024  # glibc's own choice: the heap keeps it
    assert _kept_kib("glibc.malloc.mmap_threshold=4194304") < 1024  # mapped: handed back at free()
