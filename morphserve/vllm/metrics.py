"""MorphServe's Prometheus metrics on vLLM's own /metrics.

The numbers live in the engine-core process (the controller); /metrics is served by the
API server. A custom collector in prometheus_client's default registry (the one vLLM
serves unless PROMETHEUS_MULTIPROC_DIR is set) exports the last state it was given, and a
middleware refreshes that state from the engine core, by utility-method name, right
before each /metrics scrape. So the figures are as fresh as the scrape. A refresh that
fails or times out exports no stale figures: `morphserve_up` drops to 0, the error is
counted in `morphserve_scrape_errors_total` and logged, and vLLM's own metrics are still
served.
"""

from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("morphserve")
SCRAPE_TIMEOUT_S = 5.0

class MorphServeCollector:
    def __init__(self):
        self.state: dict = {}
        self.up = False
        self.scrape_errors = 0
        self._last_warning = float("-inf")

    def refresh_failed(self, error: BaseException) -> None:
        self.state, self.up = {}, False
        self.scrape_errors += 1
        if time.monotonic() - self._last_warning > 60:  # one line a minute, not one per scrape
            self._last_warning = time.monotonic()
            log.warning("MorphServe: /metrics could not read the engine's state (%s: %s); its gauges are "
                        "omitted until it answers", type(error).__name__, error)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        yield GaugeMetricFamily("morphserve_up", "1 if the last scrape read MorphServe's state from the engine",
                                value=1 if self.up else 0)
        yield CounterMetricFamily("morphserve_scrape_errors", "Scrapes that could not read the engine's state",
                                  value=self.scrape_errors)
        s = self.state
        if not s.get("active"):
            return
        try:  # built in full first: a bad figure must not break vLLM's own /metrics page
            families = list(self._families(s))
        except Exception as e:
            log.warning("MorphServe: could not export its metrics: %s: %s", type(e).__name__, e)
            return
        yield from families

    def _families(self, s: dict):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        yield CounterMetricFamily("morphserve_errors", "Failed transitions (each layer left whole, level pinned)",
                                  value=s.get("errors", 0))
        level = s.get("level", s["quantized_layers"])
        yield GaugeMetricFamily("morphserve_level", "Rung of the pack's ladder served now (0: every layer bf16; "
                                "the top is morphserve_max_level)", value=level)
        yield GaugeMetricFamily("morphserve_max_level", "Top rung of the served ladder (2 x layers with two tiers)",
                                value=s.get("max_level", s.get("levels", 0)))
        yield GaugeMetricFamily("morphserve_floor", "Lowest rung served (0, or above it where resident prompt "
                                "twins leave level 0 short of max_model_len)", value=s.get("floor", 0))
        layers = GaugeMetricFamily("morphserve_layers", "Decoder layers computing in each tier now", labels=["tier"])
        counts = s.get("tier_counts") or {}
        layers.add_metric(["bf16"], s.get("swappable_layers", 0) - sum(counts.values()))
        for tier, n in sorted(counts.items()):
            layers.add_metric([tier], n)
        yield layers
        yield GaugeMetricFamily("morphserve_quantized_layers", "Deprecated name of morphserve_level (kept one "
                                "release)", value=level)
        yield GaugeMetricFamily("morphserve_kv_capacity_blocks", "KV blocks usable now (elastic pool)",
                                value=s["kv_capacity_blocks"])
        target = s.get("policy_target")
        yield GaugeMetricFamily("morphserve_policy_target", "Level the policy last asked for",
                                value=target if target is not None else level)
        memory = GaugeMetricFamily("morphserve_memory_bytes", "The budget equation's terms and the worker's RSS",
                                   labels=["kind"])
        for kind, value in (s.get("memory") or {}).items():
            if kind.endswith("_bytes") and isinstance(value, (int, float)):  # None: not measured this time
                memory.add_metric([kind[: -len("_bytes")]], value)
        yield memory
        between = s.get("boundary_us") or {}
        yield CounterMetricFamily("morphserve_step_boundary_seconds", "The controller's time between two steps, "
                                  "moves made there included (vLLM's worker waits for it)",
                                  value=between.get("total_s", 0.0))
        yield CounterMetricFamily("morphserve_step_boundaries", "Step and arrival boundaries the controller "
                                  "worked at", value=between.get("n", 0))
        counter = CounterMetricFamily("morphserve_transitions", "Completed transitions", labels=["direction"])
        for direction, n in s.get("transitions_by_direction", {}).items():
            counter.add_metric([direction], n)
        yield counter
        h = s.get("transition_seconds")
        if h and h.get("buckets"):
            yield HistogramMetricFamily("morphserve_transition_seconds", "Duration of a transition",
                                        buckets=[(le, n) for le, n in h["buckets"]], sum_value=h["sum"])


COLLECTOR = MorphServeCollector()
_registered = False


def install(app) -> None:
    """Register the collector and refresh it before each /metrics scrape."""
    global _registered
    if not _registered:
        from prometheus_client import REGISTRY

        REGISTRY.register(COLLECTOR)
        _registered = True

    @app.middleware("http")
    async def refresh_morphserve_metrics(request, call_next):
        if request.url.path.startswith("/metrics"):
            try:
                client = request.app.state.engine_client
                COLLECTOR.state = await asyncio.wait_for(
                    client.engine_core.call_utility_async("morphserve_state"), SCRAPE_TIMEOUT_S)
                COLLECTOR.up = True
            except Exception as e:  # vLLM's own metrics are still served
                COLLECTOR.refresh_failed(e)
        return await call_next(request)
