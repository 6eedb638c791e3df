"""The suite's report: one Markdown table row per cell x system (every row of the
suite, none selected), the equal-work check, and one figure."""

from __future__ import annotations

import math
from pathlib import Path


def _num(x: float | None, fmt: str) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return format(x, fmt)


def cell(s: dict, fmt: str = ".2f", pct: bool = False) -> str:
    """median [low, high] over the repetitions."""
    if not s or s.get("median") is None:
        return "-"
    f = (lambda v: _num(None if v is None else v * 100, ".0f") + "%") if pct else (lambda v: _num(v, fmt))
    if s["n"] == 1 or s["low"] == s["high"]:
        return f(s["median"])
    return f"{f(s['median'])} [{f(s['low'])}, {f(s['high'])}]"


def _verdict(v: dict, fmt: str = ".2f", pct: bool = False, suffix: str = "") -> str:
    if not v or v.get("median") is None:
        return "-"
    word = {"better": "**better**", "worse": "worse", "tie": "tie"}.get(v["verdict"], v["verdict"])
    return f"{cell(v, fmt, pct)}{suffix} {word}"


def _kv(kv: dict) -> str:
    if not kv:
        return "-"
    if "max_level" in kv:  # a server with a floor rests there, not at level 0
        floor = f" (floor {kv['floor']})" if kv.get("floor") else ""
        return f"{kv.get('rest', kv['level0'])}{floor} → {kv['max_level']}"
    return str(kv["level0"])


def table(report: dict) -> str:
    lines = ["| window | budget | system | completed | SLO violations | vs FP16 (fewer) | P95 TTFT (s) | "
             "P95 TTFT speed-up vs FP16 | P95 TPOT (s) | throughput (tok/s) | KV blocks | preemptions | "
             "worker CPU s | peak RSS anon + file (MiB) | "
             "perplexity increase | targets (90% fewer / 2x / ⅓ quality) |",
             "|" + "---|" * 16]
    for c in report["cells"]:
        for name, row in c["systems"].items():
            vs = row.get("vs_baseline", {})
            t = row.get("targets")
            targets = "-" if not t else " / ".join(
                "-" if t[k] is None else ("yes" if t[k] else "no")
                for k in ("violations_90pct_fewer", "ttft_p95_2x", "quality_third_of_static"))
            lines.append(
                f"| {c['window']} | {c['budget']} | {name} | {cell(row['completed'], '.0f')}/{row['requests']} | "
                f"{cell(row['slo_violations'], '.0f')} | {_verdict(vs.get('violations_fewer'), pct=True)} | "
                f"{cell(row['ttft_p95'])} | {_verdict(vs.get('ttft_p95_speedup'), suffix='x')} | "
                f"{cell(row['tpot_p95'], '.3f')} | {cell(row['throughput_tok_s'], '.1f')} | {_kv(row['kv_blocks'])} | "
                f"{cell(row.get('preemptions'), '.0f')} | "  # absent from reports made before vllm_counters
                f"{cell(row.get('worker_cpu_s'), '.1f')} | "  # and before process_work
                f"{cell(row['peak_rss_total_mib'], '.0f')} | {cell(row['ppl_increase'], pct=True)} | {targets} |")
    return "\n".join(lines)


def _met(value) -> str:
    return {True: "yes", False: "**no**", None: "-", "yes": "yes", "tie": "tie", "no": "**no**"}.get(value, str(value))


def _ttft_met(t: dict) -> str:
    if not t.get("vacuous"):
        return _met(t["met"])
    p50 = t["p50"]
    return (f"vacuous, both ∞ (median TTFT {_num(p50['morphserve'], '.2f')} / {_num(p50['best_static'], '.2f')} s)")


def _rules_verdict(entry: dict) -> str:
    if entry["all_met"] is None:
        return f"not judged ({entry.get('unjudged', 'a rule could not be evaluated')})"
    return "yes" if entry["all_met"] else "**no**"


def versus_static_table(entries: list[dict]) -> str:
    """The leading table: each row's MorphServe against that row's best static system
    (rules in morphserve.evaluation.versus_static). A suite with more than one MorphServe
    system (a held level beside the policy, say) gets a row per system, named."""
    several = len({e.get("system") for e in entries}) > 1
    lines = [("| MorphServe system " if several else "") +
             "| window | budget | regime | best static | violations: MorphServe / best static | "
             "P95 TTFT (s): MorphServe / best static (ratio, <= 1.25x) | perplexity increase: MorphServe / W8A8 | "
             "peak RSS (MiB): MorphServe / FP16 | capacity-beyond: <= 50% violations / <= 1/3 W4A16 quality | "
             "every rule met |", "|" + "---|" * (11 if several else 10)]
    for e in entries:
        v, t, q, m = e["violations"], e["ttft_p95"], e["quality"], e["memory"]
        beyond = e.get("beyond")
        extra = "-" if not beyond else f"{_met(beyond['violations_met'])} / {_met(beyond['quality_met'])}"
        pct = lambda x: "-" if x is None else f"{x * 100:.1f}%"  # noqa: E731
        ratio = "" if t["ratio"] is None else f" ({_num(t['ratio'], '.2f')}x)"
        lines.append(
            (f"| {e.get('system')} " if several else "") +
            f"| {e['window']} | {e['budget']} | {e['regime']} | {e['best_static']} | "
            f"{cell(v['morphserve'], '.0f')} / {cell(v['best_static'], '.0f')}: {_met(v['met'])} | "
            f"{cell(t['morphserve'])} / {cell(t['best_static'])}{ratio}: {_ttft_met(t)} | "
            f"{pct(q['morphserve'])} / {pct(q['w8a8'])}: {_met(q['met'])} | "
            f"{_num(m['morphserve'], '.0f')} / {_num(m['fp16'], '.0f')}: {_met(m['met'])} | {extra} | "
            f"{_rules_verdict(e)} |")
    return "\n".join(lines)


def equal_work(report: dict) -> str:
    lines = []
    for c in report["cells"]:
        status = "identical" if not c["equal_work_problems"] else "; ".join(c["equal_work_problems"])
        lines.append(f"- {c['window']} / {c['budget']}: {c['runs']} runs, {c['requests']} requests each, trace "
                     f"sha256 {c['trace_sha256'][:12]}, prompt and output lengths {status}")
    return "\n".join(lines)


def figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    fig, axes = plt.subplots(2, len(cells), figsize=(3.2 * len(cells), 6), squeeze=False)
    for j, c in enumerate(cells):
        names = list(c["systems"])
        for i, (key, label) in enumerate((("slo_violations", "SLO violations"), ("ttft_p95", "P95 TTFT (s)"))):
            ax = axes[i][j]
            med = [c["systems"][n][key]["median"] for n in names]
            low = [c["systems"][n][key]["low"] for n in names]
            high = [c["systems"][n][key]["high"] for n in names]
            finite = [v for v in med + high if v is not None and math.isfinite(v)]
            cap = (max(finite) * 1.2) if finite else 1.0
            clip = [min(v, cap) if v is not None else 0 for v in med]
            err = [[max(0, m - min(lo, cap)) for m, lo in zip(clip, low)],
                   [max(0, min(hi, cap) - m) for m, hi in zip(clip, high)]]
            ax.bar(names, clip, yerr=err, capsize=3, color="tab:blue")
            ax.set_title(f"{c['window']}\n{c['budget']}" if i == 0 else "", fontsize=8)
            if j == 0:
                ax.set_ylabel(label)
            ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.suptitle("median and range over repetitions (failed requests count as infinite TTFT)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
