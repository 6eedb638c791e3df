"""The harness reaps a server's whole process group however it ends (vLLM's engine core and
workers can outlive the API server), shown with a stand-in server that starts a child."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from morphserve.harness.servers import ServerStartError, free_port, run_in_group, serving

# argv: PORT serve|exit PIDFILE. Starts a long-lived child in the server's process group (as
# the API server starts vLLM's engine core), writes its pid, then serves /health or exits 3.
STAND_IN = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[3], "w").write(str(child.pid))
print("started", flush=True)
if sys.argv[2] == "exit":
    sys.exit(3)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def _running(pid: int) -> bool:
    """Not exited (a killed orphan may stay a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _ends(pid: int, within: float = 10) -> bool:
    """SIGKILL is delivered asynchronously: the process may take a moment to be gone."""
    deadline = time.monotonic() + within
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_serving_yields_once_healthy_and_reaps_the_group(tmp_path):
    port, pidfile = free_port(), tmp_path / "child.pid"
    cmd = [sys.executable, "-c", STAND_IN, str(port), "serve", str(pidfile)]
    with serving(cmd, dict(os.environ), tmp_path / "server.log", port, timeout=30) as server:
        assert server.url == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
            assert r.status == 200
        child = int(pidfile.read_text())
        assert _running(child) and os.getpgid(child) == server.proc.pid
    assert server.proc.returncode is not None and _ends(child)


def test_a_server_that_exits_in_start_up_raises_with_its_log_and_its_group_is_reaped(tmp_path):
    port, pidfile = free_port(), tmp_path / "child.pid"
    cmd = [sys.executable, "-c", STAND_IN, str(port), "exit", str(pidfile)]
    with pytest.raises(ServerStartError, match="(?s)server exited.*started"):
        with serving(cmd, dict(os.environ), tmp_path / "server.log", port, timeout=30):
            pytest.fail("must not yield")
    assert _ends(int(pidfile.read_text()))


def test_run_in_group_returns_the_status_and_reaps_the_group(tmp_path):
    pidfile, log = tmp_path / "child.pid", tmp_path / "run.log"
    assert run_in_group([sys.executable, "-c", STAND_IN, "0", "exit", str(pidfile)], log) == 3
    assert log.read_text() == "started\n"
    assert _ends(int(pidfile.read_text()))


def test_group_rss_places_memory_by_process_name(tmp_path):
    """The per-process peaks say where a difference between two servers sits: a child that
    holds 64 MiB shows under its own name, and the names add up to the group's total."""
    from morphserve.harness.servers import group_rss, stop_server
    from morphserve.harness.servers import _spawn

    hold = ("import ctypes, sys, time\n"
            "ctypes.CDLL(None).prctl(15, b'rss-holder', 0, 0, 0)\n"  # PR_SET_NAME
            "block = bytearray(64 << 20)\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n")
    proc = _spawn([sys.executable, "-c", hold], dict(os.environ), tmp_path / "log", None)
    try:
        deadline = time.monotonic() + 30
        while "held" not in (tmp_path / "log").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        rss = group_rss(proc.pid)
        anon, file = rss["by_process"]["rss-holder"]
        assert anon >= 64 << 20
        assert sum(a for a, _ in rss["by_process"].values()) == rss["rss_anon_bytes"]
        assert sum(f for _, f in rss["by_process"].values()) == rss["rss_file_bytes"]
    finally:
        stop_server(proc)
