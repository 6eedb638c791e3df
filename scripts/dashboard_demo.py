"""The Grafana dashboard shown working: a real Prometheus scrapes a live `morphserve
serve` every second while a trace window replays against it; then every panel of
examples/grafana/morphserve-dashboard.json is drawn from Prometheus (render_dashboard.py).

    python scripts/dashboard_demo.py --model .cache/models/SmolLM2-135M-Instruct \
        --pack out/smollm2-pack --out docs/figures/dashboard.png

Needs a Prometheus binary (Debian: `apt-get install prometheus`); Grafana itself is not
installable here, which is why the panels are drawn with matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from render_dashboard import render  # noqa: E402

from morphserve.runtime.kv_sizing import model_weight_bytes  # noqa: E402
from morphserve.harness.servers import free_port, start_server, stop_server  # noqa: E402

PROM_CONFIG = """global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: morphserve
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def _wait(url: str, timeout: float = 60) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: {url} did not answer within {timeout:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="bf16 model folder")
    ap.add_argument("--pack", type=Path, required=True, help="its MorphServe pack")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write (a .json of the series count goes beside it)")
    ap.add_argument("--policy", default="default", help="MorphServe policy preset or YAML")
    ap.add_argument("--budget-mb", type=float, default=329, help="weights + KV, in 10^6 bytes")
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--window", default="1640:40", metavar="START:DURATION")
    ap.add_argument("--rate-scale", type=float, default=1 / 7)
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--output-scale", type=float, default=0.5)
    ap.add_argument("--prometheus-bin", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    args = ap.parse_args()
    if not Path(args.prometheus_bin).exists():
        raise SystemExit(f"error: no Prometheus at {args.prometheus_bin}; install it (Debian: apt-get install prometheus)")
    tmp = Path(tempfile.mkdtemp(prefix="morphserve-dash-"))
    port, prom_port = free_port(), free_port()
    budget = int(args.budget_mb * 10**6)
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_PLUGINS")}
    env["VLLM_LOGGING_LEVEL"] = "WARNING"
    cmd = [sys.executable, "-m", "morphserve.cli", "serve", str(args.model), "--pack", str(args.pack),
           "--policy", args.policy, "--memory-budget-gb", repr(budget / 2**30),
           "--kv-cache-memory-bytes", str(budget - model_weight_bytes(args.model)), "--max-model-len", "2048",
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "model"]
    (tmp / "prometheus.yml").write_text(PROM_CONFIG.format(port=port))
    print(f"starting morphserve serve on :{port} and Prometheus on :{prom_port} (files in {tmp})", flush=True)
    server = start_server(cmd, env, tmp / "server.log", port)
    with open(tmp / "prometheus.log", "w") as log:
        prom = subprocess.Popen([args.prometheus_bin, f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{prom_port}"
    try:
        _wait(base + "/-/ready")
        start = time.time()
        time.sleep(5)  # a few idle scrapes first
        replay = [sys.executable, "-m", "morphserve.cli", "replay", "--trace", args.trace, "--window", args.window,
                  "--rate-scale", repr(args.rate_scale), "--length-scale", repr(args.length_scale),
                  "--output-scale", repr(args.output_scale), "--url", f"http://127.0.0.1:{port}",
                  "--out", str(tmp / "replay"), "--tokenizer", str(args.model), "--no-plot"]
        subprocess.run(replay, check=True)
        time.sleep(15)  # the restore after the burst, and a few more scrapes
        end = time.time()
        counts = render(json.loads((REPO / "examples/grafana/morphserve-dashboard.json").read_text()), base,
                        start, end, args.out)
    finally:
        stop_server(server)
        prom.terminate()
        prom.wait(timeout=30)
    args.out.with_suffix(".json").write_text(json.dumps({"start": start, "end": end, "series_per_panel": counts,
                                                          "window": args.window, "trace": args.trace}, indent=1) + "\n")
    print(json.dumps(counts, indent=1))
    missing = [title for title, n in counts.items() if not n]
    if missing:
        print(f"error: no data for panel(s): {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
