"""The control surface on a real `morphserve serve` server, and startup refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from morphserve.harness.servers import free_port
from tests.engine_utils import REPO, running_server

pytestmark = [pytest.mark.engine, pytest.mark.quant]
KEY = "test-key"


def _request(url: str, body=None, key: str | None = KEY, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def server(model_dir, pack_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    args = [str(model_dir), "--pack", str(pack_dir), "--api-key", KEY, "--max-model-len", "1024",
            "--frontend-cpus", "auto"]
    with running_server(args, env, log, port) as base:
        yield base


def test_state_requires_the_api_key(server):
    assert _request(server + "/morphserve/state", key=None)[0] == 401
    assert _request(server + "/morphserve/state", key="wrong")[0] == 401
    status, state = _request(server + "/morphserve/state")
    assert status == 200
    for field in ("quantized_layers", "swappable_layers", "quantized_layer_ids", "kv_capacity_blocks",
                  "kv_capacity_tokens", "policy", "transitions"):
        assert field in state
    assert state["swappable_layers"] == 30
    assert state["memory"]["budget_bytes"] > 0
    assert state["kv_cold_above"] is None  # serve's default: no cold KV tail (`--kv-cold-tail on` keeps one)
    light = _request(server + "/morphserve/state?memory=0")[1]
    assert light["memory"] is None and light["quantized_layers"] == state["quantized_layers"]
    brief = _request(server + "/morphserve/state?brief=1")[1]
    assert set(brief) == {"active", "level", "quantized_layers", "kv_capacity_blocks", "admission_cap", "token_budget"}
    assert brief["level"] == state["level"] and brief["kv_capacity_blocks"] == state["kv_capacity_blocks"]
    assert _request(server + "/morphserve/state?brief=1", key=None)[0] == 401


def test_the_engine_core_and_api_server_run_off_the_workers_cores(server):
    """--frontend-cpus auto: every thread of the engine core and of its parent, the
    API server, is on the CPUs no worker is bound to; the worker keeps its own. A server
    started on one CPU (`make test` pins each pytest worker to its own core, and the servers
    it starts inherit that) has none to spare and moves nothing."""
    moved = _request(server + "/morphserve/state?memory=0")[1]["frontend_cpus"]
    assert moved["mode"] == "auto", moved
    if len(os.sched_getaffinity(0)) < 2:
        assert moved["cpus"] is None and moved["why"] == "no CPU is free of a worker", moved
        return
    assert moved["cpus"], moved
    cpus, core = set(moved["cpus"]), moved["engine_core_pid"]
    api = _parent(core)
    assert moved["threads_moved"]["api_server"] >= 1
    for pid in (core, api):
        assert all(os.sched_getaffinity(int(t)) == cpus for t in os.listdir(f"/proc/{pid}/task")), pid
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == core
               and open(f"/proc/{p}/comm").read().strip() == "VLLM::Worker"]
    assert workers and all(not os.sched_getaffinity(w) & cpus for w in workers)


def test_every_server_process_starts_with_huge_pages_where_the_kernel_gives_them(server):
    """serve's default, --huge-pages auto: the API server, the engine core and each worker
    start with the environment (read once, as each process starts), and the worker then
    holds some of its memory in 2 MiB pages; where the kernel gives none, nothing is asked."""
    from morphserve.runtime import huge_pages

    port = server.rsplit(":", 1)[1]
    api = next(int(p) for p in _pids() if f"\0{port}\0" in _read(f"/proc/{p}/cmdline") and "serve" in _read(f"/proc/{p}/cmdline"))
    core = next(p for p in _pids() if _parent(p) == api and _read(f"/proc/{p}/comm").startswith("VLLM::EngineCor"))
    workers = [p for p in _pids() if _parent(p) == core and _read(f"/proc/{p}/comm").strip() == "VLLM::Worker"]
    assert workers
    for pid in (api, core, *workers):
        env = dict(item.split("=", 1) for item in open(f"/proc/{pid}/environ").read().split("\0") if "=" in item)
        asked = env.get(huge_pages.TORCH_ENV) == "1" and "glibc.malloc.hugetlb=1" in env.get(huge_pages.TUNABLES_ENV, "")
        assert asked == huge_pages.usable(huge_pages.kernel_mode()), (pid, huge_pages.kernel_mode())
    if huge_pages.usable(huge_pages.kernel_mode()):
        huge_kib = next(int(line.split()[1]) for line in open(f"/proc/{workers[0]}/smaps_rollup")
                        if line.startswith("AnonHugePages:"))
        assert huge_kib >= 2048, huge_kib


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _parent(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return None


def test_reads_and_scrapes_never_call_the_worker(server):
    """The memory figures are the worker's last reading: reads and /metrics scrapes of an
    idle server serve it (its age grows) and make no worker call (the count stays)."""
    import time
    import urllib.request

    first = _request(server + "/morphserve/state")[1]["memory"]
    for _ in range(3):
        with urllib.request.urlopen(server + "/metrics", timeout=30) as r:
            assert b"morphserve_up 1.0" in r.read()
        time.sleep(0.2)
    later = _request(server + "/morphserve/state")[1]["memory"]
    assert later["reads"] == first["reads"] and later["read_age_s"] > first["read_age_s"] + 0.5
    fresh = _request(server + "/morphserve/state?kv_resident=1")[1]["memory"]  # an audit reads anew
    assert fresh["reads"] == first["reads"] + 1 and fresh["kv_resident_bytes"] is not None


def test_forcing_a_level_swaps_and_serving_continues(server, model_dir):
    status, result = _request(server + "/morphserve/level", {"level": 12})
    assert status == 200 and result["level"] == result["quantized_layers"] == 12 and result["policy"] == "manual"
    assert "deprecation" not in result and result["max_level"] == 30 and sum(result["tier_counts"].values()) == 12
    assert result["transition"]["fp_bytes_freed"] == 12 * 7_077_888
    status, completion = _request(server + "/v1/completions", {
        "model": str(model_dir), "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert status == 200 and completion["choices"][0]["text"], completion
    status, result = _request(server + "/morphserve/level", {"quantized_layers": None})
    assert status == 200 and result["forced_level"] is None and result["policy"] == "none"


def _when_allowed(server: str, body: dict):
    """POST a level once the rate limit allows it (its wait grows with transition time)."""
    status, result = _request(server + "/morphserve/level", body)
    if status == 429:
        time.sleep(result["retry_after_s"] + 0.05)
        status, result = _request(server + "/morphserve/level", body)
    return status, result


def test_level_changes_over_http_are_rate_limited(server):
    status, result = _when_allowed(server, {"quantized_layers": 2})  # the old key, still accepted
    assert status == 200 and result["quantized_layers"] == 2 and "deprecated" in result["deprecation"]
    status, result = _request(server + "/morphserve/level", {"level": 3})
    assert status == 429 and result["retry_after_s"] > 0 and "manual_min_interval_s" in result["error"]
    assert _request(server + "/morphserve/state")[1]["level"] == 2
    assert _when_allowed(server, {"level": 0})[0] == 200
    assert _request(server + "/morphserve/level", {"level": None})[0] == 200


@pytest.mark.parametrize("body", [{"quantized_layers": 31}, {"level": 31}, {"quantized_layers": -1}, {"level": "3"},
                                  {"lvl": 3}, {"level": 3, "quantized_layers": 3}, [3], None])
def test_bad_bodies_get_400_and_change_nothing(server, body):
    before = _request(server + "/morphserve/state")[1]
    raw = b"not json" if body is None else None
    status, result = _request(server + "/morphserve/level", body, raw=raw)
    assert status == 400 and result["error"]
    after = _request(server + "/morphserve/state")[1]
    assert after["quantized_layer_ids"] == before["quantized_layer_ids"]
    assert after["transitions"] == before["transitions"]


def _broken_pack(pack_dir, tmp_path, **changes):
    bad = tmp_path / "bad-pack"
    shutil.copytree(pack_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest.update(changes)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


@pytest.mark.parametrize("changes,message", [
    ({"model_sha256": "0" * 64}, "different weights"),
    ({"architecture": "MistralForCausalLM"}, "does not match the served model"),
])
def test_serve_refuses_a_pack_for_another_model(model_dir, pack_dir, tmp_path, changes, message):
    bad = _broken_pack(pack_dir, tmp_path, **changes)
    proc = subprocess.run([sys.executable, "-m", "morphserve.cli", "serve", str(model_dir), "--pack", str(bad)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_offline_api_refuses_a_bad_config_before_starting(model_dir, pack_dir, tmp_path):
    from morphserve.errors import MorphServeError
    from morphserve.vllm.plugin import register
    from vllm import EngineArgs

    register()
    bad = _broken_pack(pack_dir, tmp_path, model_sha256="0" * 64)
    with pytest.raises(MorphServeError, match="different weights"):
        EngineArgs(model=str(model_dir), additional_config={"morphserve": {"pack": str(bad)}}).create_engine_config()
    with pytest.raises(MorphServeError, match="morphserve.bogus"):
        EngineArgs(model=str(model_dir),
                   additional_config={"morphserve": {"pack": str(pack_dir), "bogus": 1}}).create_engine_config()


@pytest.mark.parametrize("flags,last_line", [
    # vLLM's own refusal, as one line: SmolLM2's 9 heads do not split over 2 ranks (1, 3 and 9 do).
    # Pipeline parallelism's refusal: tests/test_thread_binding.py (the same path, in-process).
    (["--tensor-parallel-size", "2"], "error: Total number of attention heads (9) must be divisible by tensor "
                                      "parallel size (2)."),
])
def test_serve_refuses_unsupported_parallelism_in_one_line(model_dir, pack_dir, flags, last_line):
    proc = subprocess.run([sys.executable, "-m", "morphserve.cli", "serve", str(model_dir), "--pack", str(pack_dir),
                           *flags, "--port", str(free_port())],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last == last_line, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
