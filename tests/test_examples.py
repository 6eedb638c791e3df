"""The shipped examples are valid: every example policy and suite loads, and every
metric the Grafana dashboard and the alert rules query is one vLLM 0.32 or MorphServe
actually exports (no server)."""

import json
import re
from pathlib import Path

import pytest
import yaml

from morphserve.evaluation.suite import load_suite
from policies.config import load_policy

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
NAME = re.compile(r"\b(vllm:[a-z_]+|morphserve_[a-z_]+)")


@pytest.mark.parametrize("path", sorted((EXAMPLES / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_example_policies_load(path):
    load_policy(str(path))


def test_example_suite_loads():
    suite = load_suite(EXAMPLES / "evaluation-suite.yaml")
    assert suite.repetitions >= 3


def _exported() -> set[str]:
    import vllm.v1.metrics.loggers as loggers

    names = set(re.findall(r'"(vllm:[a-z_]+)"', Path(loggers.__file__).read_text()))
    source = (REPO / "morphserve" / "vllm" / "metrics.py").read_text()
    names |= set(re.findall(r'"(morphserve_[a-z_]+)"', source))
    return names


def _base(name: str) -> str:
    for suffix in ("_bucket", "_total", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_dashboard_and_alerts_query_only_exported_metrics():
    exported = _exported()
    dashboard = json.loads((EXAMPLES / "grafana" / "morphserve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((EXAMPLES / "prometheus" / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {_base(n) for e in exprs for n in NAME.findall(e)}
    assert used and used <= exported, sorted(used - exported)
    titles = {p["title"] for p in dashboard["panels"]}
    for needed in ("Quantized layers and policy target", "KV capacity vs usage (blocks)", "Transitions per minute",
                   "Transition duration", "TTFT", "TPOT (inter-token latency)", "Requests running and waiting"):
        assert needed in titles
