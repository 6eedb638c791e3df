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


LARGEST = 6  # anonymous mappings listed one by one (a KV cache is one mapping of known size)


def smaps_breakdown(text: str) -> dict:
    """Where one process's resident memory sits, from the text of /proc/PID/smaps, in bytes:
    the heap, anonymous mappings (with the largest listed as [size, resident], which is how
    a KV cache shows: one mapping of its buffer's size), shared libraries (anon = their
    written pages, file = their code and data read), other mapped files (checkpoints) and
    the rest. Status's RssAnon/RssFile say how much; this says which mapping holds it, so
    two servers' difference can be placed."""
    parts = {"heap": 0, "anon_mappings": 0, "libraries_anon": 0, "libraries_file": 0, "files_anon": 0,
             "files_file": 0, "other": 0}
    anon_maps: list[tuple[int, int]] = []
    name, size, rss, anon = None, 0, 0, 0

    def close() -> None:
        if name is None:
            return
        if name == "[heap]":
            parts["heap"] += rss
        elif name == "":
            parts["anon_mappings"] += rss
            anon_maps.append((size, rss))
        elif name.startswith("["):
            parts["other"] += rss
        else:
            kind = "libraries" if ".so" in name.rsplit("/", 1)[-1] else "files"
            parts[f"{kind}_anon"] += anon
            parts[f"{kind}_file"] += rss - anon
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            close()
            name, size, rss, anon = (head[5].strip() if len(head) > 5 else ""), 0, 0, 0
        elif line.startswith("Size:"):
            size = int(line.split()[1]) * 1024
        elif line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Anonymous:"):
            anon = int(line.split()[1]) * 1024
    close()
    anon_maps.sort(key=lambda m: m[1], reverse=True)
    parts["largest_anon"] = [list(m) for m in anon_maps[:LARGEST]]
    return parts


def process_breakdown(pid: int | str = "self") -> dict:
    with open(f"/proc/{pid}/smaps") as f:
        return smaps_breakdown(f.read())
