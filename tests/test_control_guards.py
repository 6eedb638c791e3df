"""Pure guards of the control surface and the start-up refusals (no engine: milliseconds).

The same checks run against a real server in test_failure_recovery.py; here they are
fuzzed with many more bodies than a server could take in a test run."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from morphserve.errors import MorphServeError
from morphserve.vllm.http_api import MAX_BODY_BYTES, MAX_LEVEL, parse_level_body
from tests.engine_utils import REPO

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=30), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=1000, deadline=None)  # 3,000 took 20 s of the suite on a 2-vCPU AVX2 EPYC
@given(st.one_of(json_values.map(lambda v: json.dumps({"level": v}).encode()),
                 json_values.map(lambda v: json.dumps({"quantized_layers": v}).encode()),
                 json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=2000)))
def test_every_body_parses_to_a_level_or_a_400_message(raw):
    level, problem, key = parse_level_body(raw)
    if problem is None:
        assert level is None or (type(level) is int and 0 <= level <= MAX_LEVEL)
        assert key in ("level", "quantized_layers") and json.loads(raw) == {key: level}
    else:
        assert isinstance(problem, str) and problem and level is None


@pytest.mark.parametrize("raw", [
    b'{"quantized_layers": %d}' % 2**64,  # passed validation, then failed in msgpack
    b'{"quantized_layers": ' + b"9" * 4301 + b"}",  # int() digit limit: ValueError
    b"[" * 500 + b"]" * 500,
    b'{"level": 1, "quantized_layers": 1}', b'{"level": "3"}',
    b'{"quantized_layers": 1}' + b" " * MAX_BODY_BYTES,
    b'{"quantized_layers": 1e400}', b'{"quantized_layers": NaN}', b'{"quantized_layers": true}',
    b'\xff\xfe', b"",
])
def test_adversarial_bodies_are_400s(raw):
    level, problem, _ = parse_level_body(raw)
    assert problem and level is None


def test_deep_nesting_under_the_size_cap_is_a_400():
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # json's C decoder recurses: a deep body raises RecursionError
    try:
        assert "recursion" in parse_level_body(b"[" * 400 + b"]" * 400)[1]
    finally:
        sys.setrecursionlimit(old)


def _vllm_config(platform_ok=True, tp=1, pp=1, dp=1, async_scheduling=False, batches=1):
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                                        world_size=tp * pp),
        scheduler_config=SimpleNamespace(async_scheduling=async_scheduling), max_concurrent_batches=batches)


@pytest.mark.parametrize("changes,message", [
    ({"pp": 2}, "--pipeline-parallel-size is 2"),
    ({"dp": 2}, "--data-parallel-size is 2"),
    ({"async_scheduling": True}, "async scheduling"),
    ({"batches": 2}, "batch queue"),
])
def test_unsafe_engine_setups_are_refused_in_one_line(changes, message):
    from morphserve.vllm.patches import check_supported

    check_supported(_vllm_config())
    with pytest.raises(MorphServeError, match=message) as e:
        check_supported(_vllm_config(**changes))
    assert "\n" not in str(e.value)


def test_tensor_parallelism_is_accepted():
    from morphserve.vllm.patches import check_supported

    check_supported(_vllm_config(tp=3))  # every rank morphs its shard (tests/test_tensor_parallel.py)


def test_a_vllm_whose_kv_allocation_drifted_is_refused_per_engine(monkeypatch):
    from morphserve.vllm import kv_cache
    from morphserve.vllm.patches import check_supported

    check_supported(_vllm_config())  # the installed vLLM matches the pinned copy
    monkeypatch.setattr(kv_cache, "UPSTREAM_ALLOCATE_SHA256", "0" * 64)
    with pytest.raises(MorphServeError, match="allocate_kv_cache differs") as e:
        check_supported(_vllm_config())
    assert "\n" not in str(e.value)


def test_a_non_cpu_platform_is_refused(monkeypatch):
    from vllm import platforms

    from morphserve.vllm.patches import check_supported

    fake = SimpleNamespace(is_cpu=lambda: False, device_name="cuda")
    monkeypatch.setattr(platforms, "current_platform", fake, raising=False)
    with pytest.raises(MorphServeError, match="CPU backend only"):
        check_supported(_vllm_config())


def test_a_controller_attaches_only_to_its_own_engine():
    from morphserve.vllm import patches as vp
    mine, other = object(), object()
    controller = object()
    vp._AWAITING_SCHEDULER.append((mine, controller))
    try:
        assert vp.take_awaiting_controller(other) is None  # a later, plain engine
        assert vp.take_awaiting_controller(mine) is controller
        assert vp.take_awaiting_controller(mine) is None
    finally:
        vp._AWAITING_SCHEDULER.clear()


def test_the_host_kv_backing_serves_one_allocation_only(monkeypatch):
    from morphserve.vllm import kv_cache
    from morphserve.vllm import patches as vp
    calls = []
    monkeypatch.setattr(kv_cache, "allocate_on_backing", lambda *a: calls.append("mmap") or {})
    allocate = vp._patch_allocate_kv_cache(lambda *a: calls.append("vllm") or {})
    config = SimpleNamespace(kv_cache_tensors=["one tensor"])
    from morphserve.vllm.backends import CpuBackend

    kv_cache.enable_kv_backing(CpuBackend())
    allocate(config, SimpleNamespace(type="cpu"), None)
    allocate(config, SimpleNamespace(type="cpu"), None)  # a later engine in the same process
    assert calls == ["mmap", "vllm"]


def test_a_failed_metrics_refresh_exports_no_stale_gauges():
    from morphserve.vllm.metrics import MorphServeCollector

    c = MorphServeCollector()
    c.state, c.up = {"active": True, "quantized_layers": 7, "kv_capacity_blocks": 10, "errors": 2}, True
    c.refresh_failed(TimeoutError("engine busy"))
    names = {m.name: m for m in c.collect()}
    assert "morphserve_quantized_layers" not in names
    assert names["morphserve_up"].samples[0].value == 0
    assert names["morphserve_scrape_errors"].samples[0].value == 1


def test_an_unsupported_vllm_leaves_plain_engines_alone_and_refuses_morphserve():
    """In a fresh process: vLLM reports another version; register() must not raise."""
    code = """
import vllm
vllm.__version__ = "0.99.0"
from morphserve.vllm.plugin import register
register()
from vllm.engine.arg_utils import EngineArgs
from morphserve.errors import MorphServeError
from morphserve.vllm.patches import PATCHES, MARKER
import importlib
assert not getattr(importlib.import_module("vllm.v1.engine.core").EngineCore, "morphserve_state", None)
try:
    EngineArgs(model="x", additional_config={"morphserve": {"pack": "p"}}).create_engine_config()
except MorphServeError as e:
    print("refused:", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: MorphServe supports vLLM 0.32.0 only; found 0.99.0" in proc.stdout


class _StuckEngine:
    """An engine client whose utility calls never answer (or fail), for the route's timeouts."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    async def call_utility_async(self, method, *args):
        import asyncio

        if self.fail:
            raise ConnectionError("engine core died")
        await asyncio.sleep(60)


def _app(engine, monkeypatch, key=None):
    from fastapi import FastAPI

    from morphserve.vllm import http_api, metrics

    monkeypatch.setattr(http_api, "STATE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(http_api, "LEVEL_TIMEOUT_S", 0.2)
    monkeypatch.setattr(metrics, "SCRAPE_TIMEOUT_S", 0.2)
    monkeypatch.setenv("VLLM_API_KEY", "")
    app = FastAPI()
    app.include_router(http_api.router)
    app.state.engine_client = SimpleNamespace(engine_core=engine)
    app.state.args = SimpleNamespace(api_key=[key] if key else None)

    @app.get("/metrics")
    async def _metrics():
        from fastapi.responses import PlainTextResponse
        from prometheus_client import generate_latest
        from prometheus_client.registry import CollectorRegistry

        registry = CollectorRegistry()
        registry.register(metrics.COLLECTOR)
        return PlainTextResponse(generate_latest(registry).decode())

    metrics.install(app)
    return app


@pytest.mark.parametrize("fail,status", [(False, 504), (True, 503)])
def test_a_stuck_or_dead_engine_gives_504_or_503_not_a_hang(monkeypatch, fail, status):
    from fastapi.testclient import TestClient

    client = TestClient(_app(_StuckEngine(fail), monkeypatch), client=("127.0.0.1", 5000))
    assert client.get("/morphserve/state").status_code == status
    assert client.post("/morphserve/level", json={"quantized_layers": 1}).status_code == status
    text = client.get("/metrics").text
    assert "morphserve_up 0.0" in text and "morphserve_quantized_layers" not in text


def test_without_a_key_only_loopback_callers_change_the_level(monkeypatch):
    from fastapi.testclient import TestClient

    app = _app(_StuckEngine(fail=True), monkeypatch)
    remote = TestClient(app, client=("203.0.113.9", 5000))
    assert remote.post("/morphserve/level", json={"quantized_layers": 1}).status_code == 403
    local = TestClient(app, client=("127.0.0.1", 5000))
    assert local.post("/morphserve/level", json={"quantized_layers": 1}).status_code == 503  # reached the engine
    keyed = TestClient(_app(_StuckEngine(fail=True), monkeypatch, key="k"), client=("127.0.0.1", 5000))
    assert keyed.post("/morphserve/level", json={"quantized_layers": 1}).status_code == 401


@pytest.mark.parametrize("headers", [{"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"},
                                     {"X-Real-IP": "127.0.0.1"}])
def test_without_a_key_a_proxied_request_is_not_local(monkeypatch, headers):
    """uvicorn may rewrite the client address from these headers; a proxied caller is remote."""
    from fastapi.testclient import TestClient

    local = TestClient(_app(_StuckEngine(fail=True), monkeypatch), client=("127.0.0.1", 5000))
    assert local.post("/morphserve/level", json={"quantized_layers": 1}, headers=headers).status_code == 403


def test_an_ipv4_mapped_loopback_caller_is_local(monkeypatch):
    from fastapi.testclient import TestClient

    mapped = TestClient(_app(_StuckEngine(fail=True), monkeypatch), client=("::ffff:127.0.0.1", 5000))
    assert mapped.post("/morphserve/level", json={"quantized_layers": 1}).status_code == 503  # reached the engine


@pytest.mark.parametrize("length,status", [("0" * 4400 + "4", 413), ("١٢", 400), ("-1", 400), ("99999999999", 413)])
def test_odd_content_lengths_are_4xx(monkeypatch, length, status):
    from morphserve.vllm import http_api
    scope = {"type": "http", "method": "POST", "path": "/morphserve/level", "headers": [
        (b"content-length", length.encode()), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000), "query_string": b"", "app": _app(_StuckEngine(), monkeypatch)}
    import asyncio

    from starlette.requests import Request

    async def receive():
        return {"type": "http.request", "body": b'{"quantized_layers": 1}', "more_body": False}

    response = asyncio.run(http_api.post_level(Request(scope, receive)))
    assert response.status_code == status


def test_metrics_render_with_figures_left_unmeasured():
    """A None in the state (e.g. kv_resident_bytes, read only on request) must not break
    the whole /metrics page, vLLM's own metrics included."""
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from morphserve.vllm.metrics import MorphServeCollector

    c = MorphServeCollector()
    c.up = True
    c.state = {"active": True, "quantized_layers": 3, "kv_capacity_blocks": 10, "policy_target": None, "errors": 1,
               "memory": {"budget_bytes": 10, "kv_resident_bytes": None, "error": "x"},
               "transitions_by_direction": {"quantize": 1}, "transition_seconds": None}
    registry = CollectorRegistry()
    registry.register(c)
    text = generate_latest(registry).decode()
    assert 'morphserve_memory_bytes{kind="budget"} 10.0' in text and "kv_resident" not in text
    assert "morphserve_errors_total 1.0" in text


@pytest.mark.parametrize("content_type,origin,host,status", [
    ("application/json", None, "127.0.0.1:8000", None),
    ("Application/JSON; charset=utf-8", None, "127.0.0.1:8000", None),
    ("application/json", "http://127.0.0.1:8000", "127.0.0.1:8000", None),  # the server's own page
    ("text/plain", None, "127.0.0.1:8000", 415),  # a no-cors page POST
    ("application/x-www-form-urlencoded", None, "127.0.0.1:8000", 415),  # a form, or curl -d without -H
    (None, None, "127.0.0.1:8000", 415),
    ("application/json", "http://evil.example", "127.0.0.1:8000", 403),
    ("application/json", "http://127.0.0.1:9999", "127.0.0.1:8000", 403),  # another local site
    ("application/json", "null", "127.0.0.1:8000", 403),  # sandboxed frames, file:// pages
])
def test_level_changes_a_web_page_could_forge_are_refused(content_type, origin, host, status):
    from morphserve.vllm.http_api import cross_site_problem

    problem = cross_site_problem(content_type, origin, host)
    assert (problem[0] if problem else None) == status


def test_a_text_plain_post_from_this_host_changes_nothing(monkeypatch):
    """The browser's no-cors POST: loopback, no key, a JSON body declared text/plain."""
    from fastapi.testclient import TestClient

    local = TestClient(_app(_StuckEngine(fail=True), monkeypatch), client=("127.0.0.1", 5000))
    forged = local.post("/morphserve/level", content=b'{"quantized_layers": 30}', headers={"Content-Type": "text/plain"})
    assert forged.status_code == 415
    foreign = local.post("/morphserve/level", json={"quantized_layers": 30}, headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403
    assert local.post("/morphserve/level", json={"quantized_layers": 30}).status_code == 503  # reached the engine


def test_kv_resident_without_a_key_is_for_this_host_only(monkeypatch):
    """The mincore over the whole KV reserve runs on the engine thread: not for anyone."""
    from fastapi.testclient import TestClient

    app = _app(_StuckEngine(fail=True), monkeypatch)
    remote = TestClient(app, client=("203.0.113.9", 5000))
    assert remote.get("/morphserve/state?kv_resident=1").status_code == 403
    assert remote.get("/morphserve/state").status_code == 503  # the plain read stays open (reached the engine)
    local = TestClient(app, client=("127.0.0.1", 5000))
    assert local.get("/morphserve/state?kv_resident=1").status_code == 503  # reached the engine


def test_the_metrics_speak_of_levels_and_tiers():
    """A tiered state: the level, the top of the ladder and the layers per tier; the old
    gauge stays one release as an alias, its help saying so."""
    from morphserve.vllm.metrics import MorphServeCollector

    c = MorphServeCollector()
    c.state, c.up = {"active": True, "level": 35, "quantized_layers": 35, "max_level": 60, "swappable_layers": 30,
                     "tier_counts": {"w8a8": 25, "w4a16": 5}, "kv_capacity_blocks": 10, "errors": 0}, True
    families = {m.name: m for m in c.collect()}
    assert families["morphserve_level"].samples[0].value == 35
    assert families["morphserve_max_level"].samples[0].value == 60
    assert families["morphserve_floor"].samples[0].value == 0  # a state without one: none
    c.state = {**c.state, "floor": 5}
    assert {m.name: m for m in c.collect()}["morphserve_floor"].samples[0].value == 5
    by_tier = {s.labels["tier"]: s.value for s in families["morphserve_layers"].samples}
    assert by_tier == {"bf16": 0, "w8a8": 25, "w4a16": 5}
    assert "Deprecated" in families["morphserve_quantized_layers"].documentation
    assert "W4" not in families["morphserve_level"].documentation


def test_patches_wait_for_their_module_and_land_before_anyone_reads_it():
    """In a fresh process, as vLLM's API server calls the plugin: the engine's and the
    worker's modules are not imported for patching (memory the API server never uses), and
    each is patched the moment it is imported."""
    code = """
import sys
from morphserve.vllm.plugin import register
register()
print("imported early:", sorted(m for m in ("vllm.v1.engine.core", "vllm.v1.worker.gpu_model_runner") if m in sys.modules))
from vllm.v1.engine.core import EngineCore, EngineCoreProc
from vllm.v1.worker.gpu_model_runner import allocate_kv_cache
from morphserve.vllm.patches import MARKER
print("patched:", all(getattr(f, MARKER, False) for f in (EngineCore.morphserve_state, EngineCore.post_step,
      EngineCoreProc._process_input_queue, allocate_kv_cache)))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "imported early: []" in proc.stdout and "patched: True" in proc.stdout


def test_a_patch_that_cannot_land_fails_the_import_of_its_module(tmp_path, monkeypatch):
    from morphserve.vllm import patches as vp

    (tmp_path / "morph_lazy_target.py").write_text("def present():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    finder = vp._PatchOnImport()
    finder.pending["morph_lazy_target"] = [
        vp.Patch("morph_lazy_target", None, "present", lambda original: lambda: original() + 1),
        vp.Patch("morph_lazy_target", None, "absent", lambda original: original)]
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    with pytest.raises(vp.PatchError, match="morph_lazy_target.absent not found"):
        import morph_lazy_target  # noqa: F401
    assert "morph_lazy_target" not in sys.modules
