"""The harness reaps a server's whole process group however it ends (vLLM's engine core and
workers can outlive the API server), shown with a stand-in server that starts a child."""

from __future__ import annotations

import os
import sys
import time
import urllib.request

import pytest

from morphserve.harness.servers import ServerStartError, free_port, group_survivors, run_in_group, running, serving

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


def _ends(pid: int, within: float = 10) -> bool:
    """SIGKILL is delivered asynchronously: the process may take a moment to be gone."""
    deadline = time.monotonic() + within
    while running(pid):
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
        assert running(child) and os.getpgid(child) == server.proc.pid
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


def test_group_survivors_waits_for_a_killed_group_and_names_a_live_one(tmp_path):
    """The soak's "no process survives the stop": a killed group (its orphaned child a zombie
    for a moment) has no survivors; a group left running is named, after the wait."""
    from morphserve.harness.servers import _spawn, stop_server

    pidfile = tmp_path / "child.pid"
    proc = _spawn([sys.executable, "-c", STAND_IN, "0", "exit-not", str(pidfile)], dict(os.environ),
                  tmp_path / "log", None)
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pidfile.read_text())
    try:
        assert set(group_survivors(proc.pid, within=0.3)) == {proc.pid, child}
    finally:
        stop_server(proc)
    assert group_survivors(proc.pid, within=10) == []


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
        # and smaps says which mapping holds it: the 64 MiB buffer is one anonymous mapping
        from morphserve.runtime.proc_memory import process_breakdown

        (pid,) = [p for p, name in rss["pids"].items() if name == "rss-holder"]
        size, resident = process_breakdown(pid)["largest_anon"][0]
        assert size >= 64 << 20 and resident >= 64 << 20
    finally:
        stop_server(proc)


SMAPS = """\
55ae0f26d000-55ae0f26f000 r--p 00000000 fe:00 260386                     /usr/lib/libfoo.so.1
Size:                  8 kB
Rss:                   8 kB
Anonymous:             0 kB
55ae0f26f000-55ae0f275000 rw-p 00002000 fe:00 260386                     /usr/lib/libfoo.so.1
Size:                 24 kB
Rss:                  24 kB
Anonymous:             4 kB
5600000000-5600100000 rw-p 00000000 00:00 0                              [heap]
Size:               1024 kB
Rss:                 512 kB
Anonymous:           512 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              102400 kB
Anonymous:        102400 kB
7f0010000000-7f0010100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                1024 kB
Anonymous:          1024 kB
7f0020000000-7f0021000000 r--s 00000000 fe:00 77                         /models/x/model.safetensors
Size:              16384 kB
Rss:                2048 kB
Anonymous:             0 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  20 kB
Anonymous:            20 kB
"""


def test_smaps_breakdown_places_each_mapping():
    from morphserve.runtime.proc_memory import smaps_breakdown

    parts = smaps_breakdown(SMAPS)
    k = 1024
    assert parts["heap"] == 512 * k and parts["other"] == 20 * k
    assert parts["anon_mappings"] == (102400 + 1024) * k
    assert parts["largest_anon"] == [[262144 * k, 102400 * k], [1024 * k, 1024 * k]]  # the KV-sized one first
    assert parts["libraries_anon"] == 4 * k and parts["libraries_file"] == 28 * k
    assert parts["files_file"] == 2048 * k and parts["files_anon"] == 0


def test_a_server_gets_its_own_process_group_but_stays_in_our_session(tmp_path):
    """Its own group, so it is reaped and measured as one; our session, so the kernel does
    not make it a scheduling group (autogroup) that can starve the load generator."""
    port, pidfile = free_port(), tmp_path / "child.pid"
    cmd = [sys.executable, "-c", STAND_IN, str(port), "serve", str(pidfile)]
    with serving(cmd, dict(os.environ), tmp_path / "server.log", port, timeout=30) as server:
        pid = server.proc.pid
        child = int(pidfile.read_text())
        assert os.getpgid(pid) == pid != os.getpgid(0)
        assert os.getpgid(child) == pid
        assert os.getsid(pid) == os.getsid(child) == os.getsid(0)


def test_free_ports_come_from_below_the_ephemeral_range_and_are_never_handed_out_twice():
    """A port the OS picks for port 0 is the kind vLLM's engine sockets are given too; a server
    once lost its port to one in CI."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    if low >= 21000:
        assert all(20000 <= p < low for p in ports)
