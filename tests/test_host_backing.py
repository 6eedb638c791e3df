"""The mmap backing really costs no memory until touched and gives it back on release."""


from kv_resize.host_backing import HostKVBacking, KVTensorLayout, tail_ranges

MB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_reserved_pages_cost_nothing_until_written_and_are_released():
    base = _rss()
    backing = HostKVBacking(256 * MB)
    assert _rss() - base < 8 * MB, "reserving must not commit memory"
    backing.tensor[: 128 * MB].fill_(1)
    touched = _rss()
    assert touched - base > 120 * MB
    advised = backing.release([(64 * MB, 128 * MB)])
    assert advised == 64 * MB
    assert touched - _rss() > 60 * MB, "released pages must leave RSS"
    assert int(backing.tensor[64 * MB + 5]) == 0 and int(backing.tensor[5]) == 1


def test_resident_bytes_counts_touched_pages_only():
    backing = HostKVBacking(64 * MB)
    assert backing.resident_bytes() == 0
    backing.tensor[: 10 * MB].fill_(1)
    assert backing.resident_bytes() == 10 * MB
    backing.release([(0, 4 * MB)])
    assert backing.resident_bytes() == 6 * MB


def _vm_flags(addr: int, length: int) -> list[set[str]]:
    """The VmFlags of every mapping of this process that overlaps [addr, addr + length)."""
    found, span = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                span = lo < addr + length and addr < hi
            elif head == "VmFlags:" and span:
                found.append(set(line.split()[1:]))
    return found


def test_a_huge_reserve_is_advised_huge_and_released_ranges_are_advised_back_small():
    import ctypes

    backing = HostKVBacking(16 * MB, huge=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(backing._map))
    assert [("hg" in f) for f in _vm_flags(addr, 16 * MB)] == [True]
    backing.tensor[: 8 * MB].fill_(1)
    assert backing.release([(4 * MB, 8 * MB)]) == 4 * MB
    assert [("hg" in f, "nh" in f) for f in _vm_flags(addr, 4 * MB)] == [(True, False)]
    assert [("hg" in f, "nh" in f) for f in _vm_flags(addr + 4 * MB, 4 * MB)] == [(False, True)]
    assert int(backing.tensor[5]) == 1 and int(backing.tensor[4 * MB + 5]) == 0
    plain = HostKVBacking(16 * MB)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(plain._map))
    assert not any("hg" in f for f in _vm_flags(addr, 16 * MB))


def _T(layers: list, layer_stride: int, block_stride: int, offset: int = 0) -> KVTensorLayout:
    """A KV tensor shared by `layers` (as vLLM's KVCacheTensor lists them)."""
    return KVTensorLayout(offset=offset, layer_stride=layer_stride, block_stride=block_stride, num_layers=len(layers))


def test_tail_ranges_layer_outermost():
    t = _T(layers=["a", "b"], layer_stride=10 * 4096, block_stride=4096)
    assert tail_ranges([t], 7, 9) == [(7 * 4096, 10 * 4096), (17 * 4096, 20 * 4096)]
    assert tail_ranges([t], 9, 8) == []


def test_tail_ranges_merge_adjacent_layers():
    t = _T(layers=["a", "b"], layer_stride=4 * 4096, block_stride=4096)
    assert tail_ranges([t], 2, 3) == [(2 * 4096, 4 * 4096), (6 * 4096, 8 * 4096)]
    assert tail_ranges([t], 0, 3) == [(0, 8 * 4096)]
