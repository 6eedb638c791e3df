"""scripts/profile_server_path.py's summary of py-spy's raw profiles, as pure logic."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from morphserve.harness import proc_stat

spec = importlib.util.spec_from_file_location("profile_server_path",
                                              Path(__file__).parent.parent / "scripts/profile_server_path.py")
profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile)


def test_samples_are_counted_by_what_their_stacks_pass_through(tmp_path):
    run = tmp_path / "morph-1"
    run.mkdir()
    (run / "core.txt").write_text(
        "run_busy_loop (core.py:1);MessageQueue.acquire_read (shm_broadcast.py:843) 90\n"
        "run_busy_loop (core.py:1);post_step (morphserve/vllm/patches.py:9);on_step_boundary (x.py:1) 6\n"
        "run_busy_loop (core.py:1);schedule (scheduler.py:3) 4\n")
    (run / "worker.txt").write_text(
        "execute_model (w.py:1);forward (m.py:2);onednn_mm (_custom_ops.py:3758) 70\n"
        "execute_model (w.py:1);forward (m.py:2);cpu_attention_with_kv_cache (_custom_ops.py:3927) 20\n"
        "HeapTrimmer.trim_once (morphserve/runtime/heap_trimmer.py:72) 10\n")
    (run / "cpu_seconds.json").write_text(json.dumps({"core": 1.5, "worker": 9.0}))
    [row] = profile.summarize(tmp_path)
    assert (row["core_samples"], row["core_waiting_on_worker"], row["core_own_code"], row["core_step_hooks"]) == \
        (100, 90, 6, 6)
    assert (row["worker_samples"], row["worker_forward"], row["worker_own_code"]) == (100, 90, 10)
    assert (row["worker_onednn_mm"], row["worker_attention"], row["cpu_seconds"]) == (70, 20, {"core": 1.5, "worker": 9.0})


def test_summarizing_a_folder_without_profiles_is_one_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["profile_server_path.py", "--summarize", str(tmp_path)])
    assert profile.main() == 2
    assert "error: no profile" in capsys.readouterr().err


def test_cpu_over_the_replay_keeps_user_and_kernel_time_apart():
    # a real /proc/PID/stat layout, with a process name that holds a space and a parenthesis
    line = ("4242 (VLLM::Worker (x)) S 1 4242 4242 0 -1 4194560 {minflt} 0 {majflt} 0 {utime} {stime} 0 0 20 0 "
            "9 0 100 1000 200 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0")
    before = {"worker": profile.as_counters(proc_stat.parse(line.format(minflt=100, majflt=1, utime=700, stime=50), 100))}
    after = {"worker": profile.as_counters(proc_stat.parse(line.format(minflt=2600, majflt=1, utime=7900, stime=250), 100))}
    cpu = profile.over_replay(before, after)
    assert cpu["worker"] == 74.0
    assert cpu["detail"]["worker"] == {"user": 72.0, "system": 2.0, "minor_faults": 2500, "major_faults": 0}


def test_an_unknown_system_is_one_error_before_any_server_starts(tmp_path, capsys, monkeypatch):
    spy = tmp_path / "py-spy"
    spy.write_text("")
    monkeypatch.setattr("sys.argv", ["profile_server_path.py", "--py-spy", str(spy), "--out", str(tmp_path / "p"),
                                     "--systems", "plain,morph-fast"])
    assert profile.main() == 2
    assert "error: --systems takes names from plain, morph, morph-notrim" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_the_trimmer_is_off_only_in_the_notrim_server():
    import json as _json
    trims = {}
    for system in ("morph", "morph-notrim"):
        cmd = profile.server_cmd(system, "m", "p", 1, Path("t.jsonl"))
        config = _json.loads(cmd[cmd.index("--additional-config") + 1])
        trims[system] = config["morphserve"]["heap_trim_interval_s"]
    assert trims == {"morph": 0.5, "morph-notrim": 0.0}


PERF_REPORT = """# Total Lost Samples: 0
#
# Samples: 1K  of event 'cpu-clock'
#
# Overhead       Samples  Shared Object      Symbol
# ........  ............  .................  ...............................
#
    47.37%           630  libtorch_cpu.so    [.] at::native::add_kernel
     6.77%            90  [kernel.kallsyms]  [k] clear_page_erms
     1.50%            20  python3.11         [.] _PyEval_EvalFrameDefault
"""


def test_a_perf_report_reads_as_samples_per_library_and_symbol():
    rows = profile.parse_perf_report(PERF_REPORT)
    assert rows == {"total": 1000, "libtorch_cpu.so at::native::add_kernel": 630,
                    "[kernel.kallsyms] clear_page_erms": 90, "python3.11 _PyEval_EvalFrameDefault": 20}


def test_perf_reports_differ_by_symbol_largest_change_first():
    a = profile.parse_perf_report(PERF_REPORT)
    b = dict(a, **{"[kernel.kallsyms] clear_page_erms": 400, "libmorph.so morph_hook": 5})
    del b["python3.11 _PyEval_EvalFrameDefault"]
    rows = profile.perf_difference(a, b)
    assert rows[0] == ("[kernel.kallsyms] clear_page_erms", 90, 400, 310)
    assert rows[1] == ("python3.11 _PyEval_EvalFrameDefault", 20, 0, -20)
    assert rows[2] == ("libmorph.so morph_hook", 0, 5, 5)
    assert all(r[0] != "total" for r in rows)
