"""Faults injected into the workers of a real server: every failed transition is rolled
back, the level is pinned, the error is reported, and every request is still served.
Then the control API is fuzzed on the same server: 200 or 4xx for every body, never a 500,
and no change of state on a refusal."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from morphserve.harness.servers import free_port
from policies.config import PRESETS_DIR
from tests.engine_utils import running_server
from tests.test_http_control import _request

pytestmark = [pytest.mark.engine, pytest.mark.quant]
FAULTS = "quantize,restore,kv_release,restore_commit"
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def server(model_dir, pack_dir, fast_dtype, tmp_path_factory):
    """No API key: reads are open, level changes only from this host. Default policy, so a
    background restore (the restore_commit fault) happens when control is handed back. In the
    CPU's fastest dtype: rollback does not depend on it, and where bf16 is emulated (an
    AVX2-only EPYC) this server's start and its faulted transitions took most of the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("faults") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "MORPHSERVE_TEST_FAULTS": FAULTS}
    env.pop("VLLM_API_KEY", None)
    # The default policy with SLOs this traffic meets in bf16 on any CPU, and no resting on faster
    # rungs, so handing control back means a restore (the restore_commit fault) on every kind:
    # on a 2-core AVX2 EPYC a bf16 decode step of this traffic misses the 0.2 s TPOT SLO and
    # the default policy compresses instead.
    policy = log.parent / "restoring.yaml"
    policy.write_text((PRESETS_DIR / "default.yaml").read_text().replace("fast_rest_idle_s: 10", "fast_rest_idle_s: null")
                      .replace("ttft_slo_s: 2.0", "ttft_slo_s: 60.0").replace("tpot_slo_s: 0.2", "tpot_slo_s: 10.0"))
    args = [str(model_dir), "--pack", str(pack_dir), "--policy", str(policy), "--manual-min-interval", "0",
            "--max-model-len", "1024", "--max-num-seqs", "8", "--dtype", fast_dtype]
    with running_server(args, env, log, port, host="0.0.0.0") as base:
        yield base


def _state(base: str) -> dict:
    status, state = _request(base + "/morphserve/state", key=None)
    assert status == 200, state
    return state


def _level(base: str, level) -> tuple[int, dict]:
    return _request(base + "/morphserve/level", {"quantized_layers": level}, key=None)


def _consistent(state: dict) -> None:
    """The KV the scheduler sees is the capacity of the level actually served."""
    assert state["kv_capacity_blocks"] == state["kv_blocks_by_level"][state["quantized_layers"]], state
    assert state["memory"]["within_budget"], state["memory"]
    assert state["memory"]["prepared_bytes"] == 0
    assert state["memory"]["split_layers"] == []  # no layer computes in two tiers


class Traffic:
    """Completions sent continuously while transitions fail; every one must come back whole."""

    def __init__(self, base: str, model: str):
        self.base, self.model = base, model
        self.results: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(4)]

    def _run(self, i: int) -> None:
        while not self._stop.is_set():
            status, out = _request(self.base + "/v1/completions", {
                "model": self.model, "prompt": f"{i}: tell me about layer swapping", "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True}, key=None)
            if status != 200:
                self.failures.append(f"{status}: {out}")
            else:
                self.results.append(out["usage"]["completion_tokens"])

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def _wait_for(base: str, predicate, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = _state(base)
        if predicate(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_failed_transitions_roll_back_pin_and_keep_serving(server, model_dir):
    # Manual control first: each fault fires once per process, and on a CPU where int8 is
    # faster than bf16 the default policy's own first move under this traffic is a quantize.
    assert _level(server, 0)[0] == 200
    with Traffic(server, str(model_dir)) as traffic:
        time.sleep(2)
        status, r = _level(server, 10)  # the worker fails inside the first layer's swap
        assert status == 503 and "injected fault at quantize" in r["error"], r
        state = _state(server)
        assert state["quantized_layers"] == 0 and state["pinned_by_error"] and state["forced_level"] == 0
        assert state["errors"] == 1 and "quantize" in state["last_error"]["error"]
        _consistent(state)

        status, r = _level(server, 10)
        assert status == 200 and r["quantized_layers"] == 10 and not r["pinned_by_error"], r
        status, r = _level(server, 0)  # the KV shrink's release fails: nothing was restored yet
        assert status == 503 and "kv_release" in r["error"], r
        state = _state(server)
        assert state["quantized_layers"] == 10 and state["errors"] == 2
        _consistent(state)

        status, r = _level(server, 0)  # the worker fails inside the first layer's restore
        assert status == 503 and "injected fault at restore" in r["error"], r
        state = _state(server)
        assert state["quantized_layers"] == 10 and state["errors"] == 3
        _consistent(state)

        # Hand control back: the policy restores in the background; the commit fails after
        # one layer is installed, the preparer is stopped, and the level is pinned there.
        status, r = _level(server, None)
        assert status == 200 and r["forced_level"] is None
        # The cancelled preparer frees the layer it holds on its own thread, without the engine
        # waiting for it; until then its bytes are counted (prepared_bytes > 0), so wait it out.
        state = _wait_for(server, lambda s: s["errors"] == 4 and s["memory"]["prepared_bytes"] == 0)
        assert state["errors"] == 4 and state["pinned_by_error"], state
        assert "restore_commit" in state["last_error"]["error"]
        assert state["quantized_layers"] == 9, state["quantized_layer_ids"]
        _consistent(state)
        time.sleep(2)
    assert not traffic.failures, traffic.failures[:3]
    # every client served whole through the failures (4 requests of 48 tokens took the whole test on a
    # 2-core AVX2 EPYC when this server ran bf16 there, through torch's emulation; 8+ on AVX-512 machines)
    assert len(traffic.results) >= 4 and set(traffic.results) == {MAX_TOKENS}

    with urllib.request.urlopen(server + "/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    assert "morphserve_errors_total 4.0" in metrics and "morphserve_up 1.0" in metrics

    status, r = _level(server, None)  # unpinned: the policy restores the rest, no fault left
    state = _wait_for(server, lambda s: s["quantized_layers"] == 0)
    assert state["quantized_layers"] == 0 and state["errors"] == 4 and not state["pinned_by_error"]
    _consistent(state)


def _outbound_address() -> str | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))
        address = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if address.startswith("127.") else address


def test_without_a_key_only_this_host_may_change_the_level(server):
    address = _outbound_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    remote = server.replace("127.0.0.1", address)
    status, r = _request(remote + "/morphserve/level", {"quantized_layers": 3}, key=None)
    assert status == 403 and "--api-key" in r["error"]
    status, state = _request(remote + "/morphserve/state", key=None)
    assert status == 200 and state["quantized_layers"] == _state(server)["quantized_layers"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4),
    max_leaves=10)
bodies = st.one_of(
    st.builds(lambda v: json.dumps({"quantized_layers": v}).encode(), st.none() | st.integers(-3, 40)),
    st.builds(lambda v: json.dumps({"quantized_layers": v}).encode(), json_values),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.binary(max_size=64),
    st.integers(min_value=2**63, max_value=2**70).map(lambda n: b'{"quantized_layers": %d}' % n),
    st.just(b'{"quantized_layers": ' + b"9" * 5000 + b"}"),
    st.just(b"[" * 100_000 + b"]" * 100_000),
    st.just(b'{"quantized_layers": 1}' + b" " * 4096),
)
FUZZ_EXAMPLES = 300
_fuzzed = {"n": 0, "statuses": {}}


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_fuzzed_bodies_get_200_or_4xx_and_a_refusal_changes_nothing(server, body):
    before = _state(server)
    req = urllib.request.Request(server + "/morphserve/level", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    _fuzzed["n"] += 1
    _fuzzed["statuses"][status] = _fuzzed["statuses"].get(status, 0) + 1
    assert status in (200, 400, 413), (status, body[:100])
    after = _state(server)
    if after["forced_level"] is None:  # handed back: pin again so the policy cannot move it under us
        assert _level(server, after["quantized_layers"])[0] == 200
        # a restore the policy began in the moment it was in charge is cancelled by the pin,
        # and its thread frees what it half-built when it stops: wait for that, not a fixed time
        after = _wait_for(server, lambda s: s["memory"]["prepared_bytes"] == 0, 30)
    if status != 200:
        for key in ("quantized_layer_ids", "transitions", "forced_level", "errors"):
            assert after[key] == before[key], key
    _consistent(after)


def test_fuzz_ran(server):
    print(f"fuzz: {_fuzzed['n']} bodies, statuses {_fuzzed['statuses']}")
    assert _fuzzed["n"] >= FUZZ_EXAMPLES * 0.9, _fuzzed
    assert _fuzzed["statuses"].get(200, 0) >= 10, "too few valid bodies: the 200 path was not fuzzed" 
