"""scripts/bench_huge_pages.py: each side's environment and its refusal where the kernel
gives no huge pages, as pure logic (no engine)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from morphserve.runtime import huge_pages

spec = importlib.util.spec_from_file_location("bench_huge_pages",
                                              Path(__file__).parent.parent / "scripts/bench_huge_pages.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_4k_side_drops_both_switches_and_the_huge_side_sets_both(monkeypatch):
    monkeypatch.setattr(huge_pages, "kernel_mode", lambda sysfs=None: "madvise")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    small = bench.side_env("4k")
    assert "THP_MEM_ALLOC_ENABLE" not in small and "GLIBC_TUNABLES" not in small
    huge = bench.side_env("huge")
    assert huge["THP_MEM_ALLOC_ENABLE"] == "1" and huge["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_a_kernel_without_huge_pages_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(huge_pages, "kernel_mode", lambda sysfs=None: "never")
    assert bench.main(["--model", "m", "--pack", "p"]) == 2
    assert capsys.readouterr().err.strip() == "error: this kernel gives no transparent huge pages (THP mode: never)"


def test_sides_alternate_each_round_and_a_failed_child_stops_the_run(capsys):
    order = []

    def measure(side):
        order.append(side)
        return {"side": side}

    runs = bench.alternated(2, ("4k", "huge"), measure)
    assert order == ["4k", "huge", "4k", "huge"] and runs == {"4k": [{"side": "4k"}] * 2, "huge": [{"side": "huge"}] * 2}
    assert bench.alternated(2, ("4k", "huge"), lambda side: None if side == "huge" else {}) == 1
    assert "the huge child of round 1 failed" in capsys.readouterr().err
