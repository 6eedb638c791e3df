"""Which CPUs run the model (morphserve.runtime.compute_cpus): the pure choice, vLLM's binding
honouring it, and `morphserve serve` and the evaluation passing it on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from morphserve.runtime import compute_cpus
from tests.conftest import morphserve_cli


def test_all_sets_vllms_reserve_to_none_and_vllm_changes_nothing():
    env: dict = {}
    assert compute_cpus.apply(env, "all") == "0" and env == {compute_cpus.RESERVED_ENV: "0"}
    env = {}
    assert compute_cpus.apply(env, "vllm") is None and env == {}


@pytest.mark.parametrize("env", [
    {compute_cpus.RESERVED_ENV: "1"},  # the operator's reserve
    {compute_cpus.BIND_ENV: "0|1"},  # the operator's (or tensor parallelism's) CPU lists
])
def test_an_operators_choice_wins(env):
    before = dict(env)
    assert compute_cpus.operator_chose(env) and not compute_cpus.operator_chose({compute_cpus.BIND_ENV: "auto"})
    assert compute_cpus.apply(env, "all") is None and env == before


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="one of all, vllm"):
        compute_cpus.apply({}, "half")


def test_the_start_up_line_says_who_chose():
    assert "--compute-cpus all" in compute_cpus.describe({compute_cpus.RESERVED_ENV: "0"}, "all")
    assert "set by the operator" in compute_cpus.describe({compute_cpus.RESERVED_ENV: "0"}, "vllm")
    assert "one CPU per rank kept" in compute_cpus.describe({}, "vllm")
    assert compute_cpus.BIND_ENV in compute_cpus.describe({compute_cpus.BIND_ENV: "0"}, "all")


def _vllm_binding(monkeypatch, reserved: str | None) -> tuple[list[list[int]], int]:
    """vLLM 0.32's own automatic binding (vllm/utils/ompmultiprocessing.py) for one rank, with
    the reserve as `apply` leaves it: its CPU list and the reserve it used."""
    from vllm import envs
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    monkeypatch.setenv(compute_cpus.BIND_ENV, "auto")
    if reserved is None:
        monkeypatch.delenv(compute_cpus.RESERVED_ENV, raising=False)
    else:
        monkeypatch.setenv(compute_cpus.RESERVED_ENV, reserved)
    if envs._is_envs_cache_enabled():
        envs.__getattr__.cache_clear()
    config = SimpleNamespace(parallel_config=SimpleNamespace(local_world_size=1, data_parallel_rank_local=None,
                                                             _api_process_count=1), kv_transfer_config=None)
    manager = OMPProcessManager(config)
    return manager.cpu_lists, manager.reserve_cpu_num


def test_vllms_binding_computes_on_every_allowed_core_with_the_reserve_apply_sets(monkeypatch):
    """The contract `all` relies on: with VLLM_CPU_NUM_OF_RESERVED_CPU=0 vLLM binds rank 0 to
    every core this process may use (one logical CPU per physical core, its own selector); with
    its default it keeps one back wherever there is more than one."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

    cores = {cpu.physical_core for cpu in get_allowed_cpu_list()}
    env: dict = {}
    compute_cpus.apply(env, "all")
    lists, reserve = _vllm_binding(monkeypatch, env[compute_cpus.RESERVED_ENV])
    assert reserve == 0 and len(lists) == 1 and len(lists[0]) == len(cores)
    lists, reserve = _vllm_binding(monkeypatch, None)
    assert reserve == 1 and len(lists[0]) == (len(cores) - 1 if len(cores) > 1 else 1)


@pytest.mark.quant
def test_serve_names_the_compute_cpus_it_chose(model_dir, pack_dir, monkeypatch):
    monkeypatch.delenv(compute_cpus.RESERVED_ENV, raising=False)
    monkeypatch.delenv(compute_cpus.BIND_ENV, raising=False)
    proc = morphserve_cli("serve", str(model_dir), "--pack", str(pack_dir), "--compute-cpus", "all", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"compute CPUs: vLLM's binding with {compute_cpus.RESERVED_ENV}=0 (--compute-cpus all)" in proc.stderr
    proc = morphserve_cli("serve", str(model_dir), "--pack", str(pack_dir), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "compute CPUs: vLLM's binding (one CPU per rank kept" in proc.stderr


def test_the_evaluation_gives_any_system_the_choice_the_way_serve_would(tmp_path, monkeypatch):
    monkeypatch.delenv(compute_cpus.RESERVED_ENV, raising=False)
    monkeypatch.delenv(compute_cpus.BIND_ENV, raising=False)
    from morphserve.evaluation.suite import System
    from tests.test_evaluation_logic import _server_of

    run, serve_args = _server_of(tmp_path)
    _, env = run(System(name="w8", kind="w8a8", compute_cpus="all"))
    assert env[compute_cpus.RESERVED_ENV] == "0"
    _, env = run(System(name="w8", kind="w8a8"))
    assert compute_cpus.RESERVED_ENV not in env
    cmd, _ = run(System(name="m", kind="morphserve", policy="default", compute_cpus="all"))
    assert serve_args(cmd).compute_cpus == "all"
    cmd, _ = run(System(name="m", kind="morphserve", policy="default"))
    assert "--compute-cpus" not in cmd
