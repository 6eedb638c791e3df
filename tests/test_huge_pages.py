"""Huge pages asked for through the environment (morphserve.runtime.huge_pages): the pure
rules, and a real torch process that gets them where the kernel offers them."""

import subprocess
import sys

import pytest

from morphserve.runtime import huge_pages


def test_the_kernel_mode_is_the_bracketed_word(tmp_path):
    sysfs = tmp_path / "enabled"
    sysfs.write_text("always [madvise] never\n")
    assert huge_pages.kernel_mode(sysfs) == "madvise"
    sysfs.write_text("[always] madvise never\n")
    assert huge_pages.kernel_mode(sysfs) == "always"
    sysfs.write_text("garbage\n")
    assert huge_pages.kernel_mode(sysfs) is None
    assert huge_pages.kernel_mode(tmp_path / "missing") is None


@pytest.mark.parametrize("kernel", ["madvise", "always"])
def test_auto_asks_torch_and_glibc_where_the_kernel_gives_them(kernel):
    env = huge_pages.apply({}, "auto", kernel)
    assert env == {"THP_MEM_ALLOC_ENABLE": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert "on for tensors" in huge_pages.describe(env, kernel)


@pytest.mark.parametrize("kernel", ["never", None])
def test_auto_leaves_the_environment_where_the_kernel_gives_none(kernel):
    assert huge_pages.apply({"A": "1"}, "auto", kernel) == {"A": "1"}
    assert "off" in huge_pages.describe({}, kernel)


def test_off_leaves_it_and_a_bad_mode_is_refused():
    assert huge_pages.apply({}, "off", "madvise") == {}
    with pytest.raises(ValueError, match="not one of auto, off"):
        huge_pages.apply({}, "yes", "madvise")


def test_other_tunables_are_kept_and_the_operators_own_choice_wins():
    env = huge_pages.apply({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "auto", "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "THP_MEM_ALLOC_ENABLE": "0"}
    assert huge_pages.apply(dict(mine), "auto", "madvise") == mine
    assert "off" in huge_pages.describe(mine, "madvise")


_CHILD = """
import torch
x = torch.ones(64 * 2**20, dtype=torch.int8)  # 64 MiB, every page written
x.add_(1)
for line in open('/proc/self/smaps_rollup'):
    if line.startswith('AnonHugePages:'):
        print(int(line.split()[1]))
"""


def _anon_huge_kib(env_extra: dict) -> int:
    import os

    env = {k: v for k, v in os.environ.items() if k not in (huge_pages.TORCH_ENV, huge_pages.TUNABLES_ENV)}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**env, **env_extra}, capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not huge_pages.usable(huge_pages.kernel_mode()),
                    reason="this kernel gives no transparent huge pages (THP mode never or absent)")
def test_a_torch_process_started_with_the_environment_holds_its_large_tensor_in_huge_pages():
    asked = _anon_huge_kib(dict(huge_pages.apply({}, "auto")))
    assert asked >= 48 * 1024, f"only {asked} KiB of a 64 MiB tensor in huge pages"
    if huge_pages.kernel_mode() == "madvise":  # only what is advised gets them: the environment is what did it
        assert _anon_huge_kib({}) < asked / 4
