"""MorphServe as a real package: `python -m build` makes a wheel whose contents are
checked, and the wheel installed (not editable) into a fresh venv runs `prepare`, `serve`
and `replay --trace azure-code` from a folder that is not the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from morphserve.harness.servers import free_port, start_server, stop_server
from tests.engine_utils import REPO

pytestmark = [pytest.mark.engine, pytest.mark.quant]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # build's isolated environment takes setuptools and wheel from the package index, as pip does
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [whl] = out.glob("morphserve-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("morphserve/cli/commands.py", "morphserve/vllm/command.py", "morphserve/offline/data/NOTICE",
                   "morphserve/offline/data/wikitext-2/valid.txt", "morphserve/offline/data/wikitext-2/test.txt",
                   "morphserve/offline/data/traces/azure_llm_2023_code.csv", "morphserve/offline/data/traces/azure_llm_2023_conv.csv",
                   "morphserve/evaluation/runner.py", "policies/presets/default.yaml", "quant_layers/gptq_job.py",
                   "kv_resize/elastic_pool.py"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "scripts/", "evaluations/", "docs/")) for n in names)
    meta = [n for n in names if n.endswith("entry_points.txt")]
    entry_points = zipfile.ZipFile(wheel).read(meta[0]).decode()
    assert "[vllm.general_plugins]" in entry_points and "morphserve.vllm.plugin:register" in entry_points


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new venv with the wheel installed normally. Its heavy dependencies (vLLM, torch)
    come from the project's venv through a folder of links that leaves out MorphServe's
    own editable install, so only the wheel's copy can be imported."""
    root = tmp_path_factory.mktemp("fresh")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    deps = root / "deps"
    deps.mkdir()
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p).exists()))
    for entry in site.iterdir():
        if entry.name.lower().startswith(("morphserve", "__editable__")) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    [fresh_site] = (venv / "lib").glob("python*/site-packages")
    (fresh_site / "deps.pth").write_text(str(deps) + "\n")
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    return venv


def _run(venv: Path, cwd: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MORPHSERVE_SHARED", "PYTHONPATH")}
    env["MORPHSERVE_CACHE"] = str(cwd / "cache")
    return subprocess.run([str(venv / "bin" / "morphserve"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_installed_wheel_prepares_serves_and_replays_from_anywhere(fresh_venv, model_dir, w4_pack_dir, tmp_path):
    where = subprocess.run([str(fresh_venv / "bin" / "python"), "-c", "import morphserve; print(morphserve.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(fresh_venv) in where, where  # the wheel's copy, not the checkout
    # prepare with its packaged calibration and evaluation text (GPTQ skipped: an existing twin;
    # few tokens: what is checked is that the wheel's own data files are found and used)
    pack = tmp_path / "pack"
    proc = _run(fresh_venv, tmp_path, "prepare", str(model_dir), "--out", str(pack), "--quantized",
                str(w4_pack_dir / "quantized"), "--lis-tokens", "32", "--lis-window", "32", "--eval-tokens", "255",
                "--eval-window", "256")
    assert proc.returncode == 0, proc.stderr[-3000:]
    quality = json.loads((pack / "quality.json").read_text())
    assert quality["eval_text"].endswith("morphserve/offline/data/wikitext-2/test.txt") and str(fresh_venv) in quality["eval_text"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_KVCACHE_SPACE", "PYTHONPATH")}
    env["MORPHSERVE_CACHE"] = str(tmp_path / "cache")
    server = start_server([str(fresh_venv / "bin" / "morphserve"), "serve", str(model_dir), "--pack", str(pack),
                           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
                           "--kv-cache-memory-bytes", str(200 * 2**20), "--served-model-name", "model"],
                          env, tmp_path / "server.log", port, cwd=tmp_path)  # not the checkout: `-m` would import it
    try:
        proc = _run(fresh_venv, tmp_path, "replay", "--trace", "azure-code", "--window", "570:3", "--rate-scale", "0.02",
                    "--length-scale", "0.1", "--url", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "replay"),
                    "--tokenizer", str(model_dir), "--no-plot")
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((tmp_path / "replay" / "summary.json").read_text())
        assert summary["requests"] >= 1 and summary["completed"] == summary["requests"]
    finally:
        stop_server(server)
