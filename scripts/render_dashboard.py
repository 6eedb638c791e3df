"""Draw the panels of a Grafana dashboard JSON from a live Prometheus, with matplotlib.

No Grafana is installable here, so this draws the same panels: each panel's PromQL
queries are sent unchanged to Prometheus' own `query_range` API (Prometheus evaluates
them; nothing is re-implemented), laid out by the panels' gridPos.

    python scripts/render_dashboard.py --dashboard examples/grafana/morphserve-dashboard.json \
        --prometheus http://127.0.0.1:9090 --start 1700000000 --end 1700000300 --out dash.png
"""

from __future__ import annotations

import argparse
import json
import math
import urllib.parse
import urllib.request
from pathlib import Path


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {body.get('error')}")
    return body["data"]["result"]


def _legend(fmt: str, labels: dict) -> str:
    out = fmt or "{{__name__}}"
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def render(dashboard: dict, prometheus: str, start: float, end: float, out: Path, step: float = 2.0) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    rows = math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 3.2 * rows), squeeze=False)
    counts = {}
    for ax, panel in zip(axes.flat, panels):
        n = 0
        for target in panel["targets"]:
            for series in query_range(prometheus, target["expr"], start, end, step):
                ts = [float(t) - start for t, _ in series["values"]]
                vs = [float(v) for _, v in series["values"]]
                ax.plot(ts, vs, label=_legend(target.get("legendFormat", ""), series["metric"]))
                n += 1
        counts[panel["title"]] = n
        ax.set_title(panel["title"], fontsize=10)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if unit == "bytes":
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 2**20:.0f} MiB"))
        elif unit == "s":
            ax.set_ylabel("s")
        if n:
            ax.legend(fontsize=7, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    fig.suptitle(f"{dashboard.get('title', 'dashboard')} (panels drawn from Prometheus query_range)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dashboard", type=Path, required=True, help="Grafana dashboard JSON")
    ap.add_argument("--prometheus", required=True, help="Prometheus base URL")
    ap.add_argument("--start", type=float, required=True, help="unix seconds")
    ap.add_argument("--end", type=float, required=True, help="unix seconds")
    ap.add_argument("--step", type=float, default=2.0, help="query resolution in seconds")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args()
    counts = render(json.loads(args.dashboard.read_text()), args.prometheus, args.start, args.end, args.out, args.step)
    print(json.dumps(counts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
