"""timeline.png: arrival rate, TTFT, quantized layers and KV capacity over time."""

from __future__ import annotations

from pathlib import Path


def plot_timeline(rows: list[dict], timeline: list[dict], slo_ttft: float, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    arrivals = [r["arrival_s"] for r in rows if r["arrival_s"] is not None]
    if arrivals:
        bins = max(1, int(max(arrivals) // 2) + 1)
        axes[0].hist(arrivals, bins=bins, range=(0, bins * 2), color="tab:gray")
    axes[0].set_ylabel("arrivals / 2 s")
    ok = [(r["arrival_s"], r["ttft_s"]) for r in rows if r["ok"]]
    axes[1].scatter([a for a, _ in ok], [t for _, t in ok], s=8)
    failed = [r["arrival_s"] for r in rows if not r["ok"]]
    if failed:
        axes[1].scatter(failed, [0] * len(failed), marker="x", color="red", label="failed")
    axes[1].axhline(slo_ttft, color="red", linestyle="--", linewidth=1, label=f"TTFT SLO {slo_ttft}s")
    axes[1].set_ylabel("TTFT (s)")
    axes[1].legend(loc="upper right", fontsize=8)
    if timeline:
        t = [s["t"] for s in timeline]
        axes[2].step(t, [s["quantized_layers"] for s in timeline], where="post", label="quantized layers")
        twin = axes[2].twinx()
        twin.step(t, [s["kv_capacity_blocks"] for s in timeline], where="post", color="tab:orange",
                  label="KV capacity (blocks)")
        twin.set_ylabel("KV blocks")
        axes[2].legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
    else:
        axes[2].text(0.5, 0.5, "no MorphServe state (plain vLLM)", ha="center", va="center",
                     transform=axes[2].transAxes)
    axes[2].set_ylabel("quantized layers")
    axes[2].set_xlabel("seconds into the trace window")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
