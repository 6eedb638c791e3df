"""MorphServe's Prometheus metrics on vLLM's own /metrics.

The numbers live in the engine-core process (the controller); /metrics is served by the
API server. A custom collector in prometheus_client's default registry (the one vLLM
serves unless PROMETHEUS_MULTIPROC_DIR is set) exports the last state it was given, and a
middleware refreshes that state from the engine core, by utility-method name, right
before each /metrics scrape. So the figures are as fresh as the scrape.
"""

from __future__ import annotations

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TransitionHistogram:
    """Cumulative-bucket histogram of transition durations (engine side, plain Python)."""

    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.sum += seconds
        for i, le in enumerate(BUCKETS):
            if seconds <= le:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def as_dict(self) -> dict:
        cumulative, total = [], 0
        for c in self.counts:
            total += c
            cumulative.append(total)
        return {"buckets": [[str(le), n] for le, n in zip([*map(str, BUCKETS), "+Inf"], cumulative)],
                "sum": self.sum, "count": total}


class MorphServeCollector:
    def __init__(self):
        self.state: dict = {}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = self.state
        if not s.get("active"):
            return
        yield GaugeMetricFamily("morphserve_quantized_layers", "Decoder layers now served by their W4 twin",
                                value=s["quantized_layers"])
        yield GaugeMetricFamily("morphserve_kv_capacity_blocks", "KV blocks usable now (elastic pool)",
                                value=s["kv_capacity_blocks"])
        target = s.get("policy_target")
        yield GaugeMetricFamily("morphserve_policy_target", "Quantized layers the policy last asked for",
                                value=target if target is not None else s["quantized_layers"])
        memory = GaugeMetricFamily("morphserve_memory_bytes", "The budget equation's terms and the worker's RSS",
                                   labels=["kind"])
        for kind, value in (s.get("memory") or {}).items():
            if kind.endswith("_bytes"):
                memory.add_metric([kind[: -len("_bytes")]], value)
        yield memory
        counter = CounterMetricFamily("morphserve_transitions", "Completed transitions", labels=["direction"])
        for direction, n in s.get("transitions_by_direction", {}).items():
            counter.add_metric([direction], n)
        yield counter
        h = s.get("transition_seconds") or {"buckets": [], "sum": 0.0}
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
                COLLECTOR.state = await client.engine_core.call_utility_async("morphserve_state")
            except Exception:  # a scrape must not fail because the engine is busy or gone
                pass
        return await call_next(request)
