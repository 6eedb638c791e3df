"""Memory of one process as the kernel counts it: what the worker reports in
/morphserve/state and what the harness sums over a server's processes."""

from __future__ import annotations


def process_rss(pid: int | str = "self") -> dict[str, int]:
    """RssAnon / RssFile / RssShmem of one process, in bytes (from /proc/PID/status)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return {"rss_anon_bytes": out.get("RssAnon", 0), "rss_file_bytes": out.get("RssFile", 0),
            "rss_shmem_bytes": out.get("RssShmem", 0)}
