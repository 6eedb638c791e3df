"""Which malloc the server's processes get: found on disk, put in front of LD_PRELOAD once."""

from __future__ import annotations

import pytest

from morphserve.runtime.allocator import AllocatorNotFound, find_library, preload_env


@pytest.fixture
def libdir(tmp_path):
    for name in ("libtcmalloc_minimal.so.4", "libtcmalloc_minimal.so.4.5.10", "libtcmalloc_minimal_debug.so.4"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_the_soname_is_found_not_a_versioned_file_or_a_debug_build(libdir):
    assert find_library("tcmalloc", (str(libdir),)) == libdir / "libtcmalloc_minimal.so.4"
    assert find_library("jemalloc", (str(libdir),)) is None


def test_preload_goes_first_keeps_what_was_there_and_is_not_doubled(libdir):
    env = preload_env("tcmalloc", {"LD_PRELOAD": "/x/libgomp.so"}, (str(libdir),))
    assert env["LD_PRELOAD"] == f"{libdir}/libtcmalloc_minimal.so.4:/x/libgomp.so"
    assert preload_env("tcmalloc", env, (str(libdir),)) == env
    assert preload_env("system", {"A": "1"}) == {"A": "1"}


def test_a_missing_library_names_the_package_to_install(tmp_path):
    with pytest.raises(AllocatorNotFound, match="apt-get install libjemalloc2"):
        preload_env("jemalloc", {}, (str(tmp_path),))
    with pytest.raises(AllocatorNotFound, match="unknown allocator"):
        preload_env("mimalloc", {}, (str(tmp_path),))


def test_glibc_is_the_default_and_auto_means_tcmalloc_where_installed(libdir, tmp_path):
    from morphserve.runtime.allocator import default_allocator, resolve

    assert default_allocator({}) == "system" and default_allocator({"MORPHSERVE_ALLOCATOR": "tcmalloc"}) == "tcmalloc"
    assert resolve("auto", (str(libdir),)) == "tcmalloc" and resolve("auto", (str(tmp_path / "none"),)) == "system"
