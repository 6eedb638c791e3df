"""The backend interface: the CPU backend satisfies it, the CUDA backend is refused unless
opted in, and vLLM's own CUDA kernel choice is predicted per capability (on CPU, against
vLLM's real kernel classes; no GPU involved)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from morphserve.errors import MorphServeError
from morphserve.runtime.backend import KVBacking, MorphBackend
from morphserve.vllm import backends


def test_the_cpu_backend_satisfies_the_interface_and_commits_on_touch():
    backend = backends.backend_for("cpu")
    assert isinstance(backend, MorphBackend) and backend.verified and backend.commits_on_touch
    backing = backend.new_kv_backing(8 * 2**20)
    assert isinstance(backing, KVBacking)
    assert backing.commit([(0, 2**20)]) == 0  # nothing to map: the first write commits
    backing.tensor[: 2**20].fill_(1)
    assert backing.resident_bytes() >= 2**20
    assert backing.release([(0, 2**20)]) == 2**20 and backing.resident_bytes() < 2**20


def test_the_cuda_backend_is_refused_unless_opted_in(monkeypatch):
    monkeypatch.delenv(backends.UNVERIFIED_CUDA_ENV, raising=False)
    with pytest.raises(MorphServeError, match="unverified.*MORPHSERVE_UNVERIFIED_CUDA=1"):
        backends.backend_for("cuda")
    with pytest.raises(MorphServeError, match="no backend for device type 'xpu'"):
        backends.backend_for("xpu")
    monkeypatch.setenv(backends.UNVERIFIED_CUDA_ENV, "1")
    backend = backends.backend_for("cuda")  # builds without touching a GPU
    assert isinstance(backend, MorphBackend) and not backend.verified and not backend.commits_on_touch
    with pytest.raises(MorphServeError, match="compiled.*CPU only.*drop \"compile\""):
        backends.backend_for("cuda", compiled=True)  # even opted in: a CUDA graph would keep the old kernel


def _config():
    """The fields check_supported reads, for a single-rank synchronous engine."""
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=1),
        scheduler_config=SimpleNamespace(async_scheduling=False), max_concurrent_batches=1)


@pytest.mark.parametrize("opted_in", [False, True])
def test_a_cuda_engine_starts_only_with_the_opt_in(monkeypatch, opted_in):
    from vllm import platforms

    from morphserve.vllm.patches import check_supported

    fake = SimpleNamespace(is_cpu=lambda: False, is_cuda=lambda: True, device_name="cuda")
    monkeypatch.setattr(platforms, "current_platform", fake, raising=False)
    if opted_in:
        monkeypatch.setenv(backends.UNVERIFIED_CUDA_ENV, "1")
        check_supported(_config())
    else:
        monkeypatch.delenv(backends.UNVERIFIED_CUDA_ENV, raising=False)
        with pytest.raises(MorphServeError, match="CPU backend only; this is cuda.*UNVERIFIED_CUDA=1") as e:
            check_supported(_config())
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("capability, expected", [(90, "MacheteLinearKernel"), (89, "MarlinLinearKernel"),
                                                   (80, "MarlinLinearKernel"), (75, "MarlinLinearKernel")])
@pytest.mark.parametrize("group_size, dtype", [(128, torch.bfloat16), (64, torch.bfloat16), (128, torch.float16)])
def test_vllm_picks_machete_on_hopper_and_marlin_elsewhere(capability, expected, group_size, dtype):
    """Llama-2-7B's q projection in the pack's format (symmetric 4-bit, no zero points)."""
    from vllm.platforms import current_platform

    from morphserve.vllm.cuda_kernels import predict_w4a16_kernel

    before = current_platform
    assert predict_w4a16_kernel(4096, 4096, group_size, dtype, capability) == expected
    from vllm.platforms import current_platform as after

    assert after is before and after.is_cpu()  # the CUDA view is gone again


def test_below_marlin_vllm_falls_back_to_triton_or_exllama():
    """Marlin needs capability 75; on a V100 vLLM's list ends in Triton (bf16) or Exllama (fp16)."""
    from morphserve.vllm.cuda_kernels import predict_w4a16_kernel

    assert predict_w4a16_kernel(4096, 4096, 128, torch.bfloat16, 70) == "TritonW4A16LinearKernel"
    assert predict_w4a16_kernel(4096, 4096, 128, torch.float16, 70) == "ExllamaLinearKernel"


def test_a_backing_that_does_not_commit_on_touch_is_mapped_before_its_blocks_show():
    """Pure logic with a stand-in pool: the commit call precedes the grow, covers only the
    blocks not yet committed, and a commit-on-touch backing (CPU) makes no call at all."""
    from morphserve.runtime.policy_loop import PolicyLoop
    from morphserve.runtime.recorder import Recorder
    from morphserve.runtime.transitions import Transitions

    calls: list[tuple] = []

    class Pool:
        committed = 10

        def grow(self, target: int) -> None:
            calls.append(("grow", target))
            self.committed = max(self.committed, target)

    def rpc(method: str, *args):
        calls.append((method, *args))
        return [{}]

    moves = Transitions([0, 1], rpc, Pool(), None, lambda level: 10, Recorder(None), PolicyLoop(None), "wait",
                        commits_on_touch=False)
    moves.grow(14)
    moves.grow(12)  # already committed: no mapping
    assert calls == [("morphserve_kv_commit", 11, 14), ("grow", 14), ("grow", 12)]
    calls.clear()
    moves.commits_on_touch = True
    moves.grow(20)
    assert calls == [("grow", 20)]
