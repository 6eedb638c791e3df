"""The API key never reaches a terminal, a log or `--help`."""

from __future__ import annotations

import argparse

import pytest

from morphserve.cli import commands as cli, serve
from morphserve.replay import run as replay
from tests.test_hardening_fakes import isolated_cache, make_model, make_pack  # noqa: F401

SECRET = "sekrit-7f3a"


@pytest.mark.parametrize("argv, expected", [
    (["--port", "8000", "--api-key", SECRET, "--max-model-len", "2048"],
     ["--port", "8000", "--api-key", "***", "--max-model-len", "2048"]),
    (["--api-key=" + SECRET], ["--api-key=***"]),
    (["--api-key", "k1", SECRET, "--port", "1"], ["--api-key", "***", "***", "--port", "1"]),  # vLLM takes several
    (["--hf-token", SECRET, "--api-key"], ["--hf-token", "***", "--api-key"]),  # a trailing flag: nothing to hide
    (["--model", "m", "--additional-config", '{"pack": "p"}'], ["--model", "m", "--additional-config", '{"pack": "p"}']),
    (["--api_key", SECRET, "--hf_token=" + SECRET], ["--api_key", "***", "--hf_token=***"]),  # vLLM maps _ to -
    (["--api-k", SECRET, "--apix", "1"], ["--api-k", "***", "--apix", "1"]),  # an argparse abbreviation
])
def test_redact_argv(argv, expected):
    before = list(argv)
    assert serve.redact_argv(argv) == expected
    assert argv == before  # the command that runs keeps its real values


def test_serve_dry_run_prints_no_secret(tmp_path, capsys):
    model = make_model(tmp_path / "model")
    pack = make_pack(tmp_path / "pack", model)
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(
        ["serve", str(model), "--pack", str(pack), "--dry-run", "--api-key", SECRET, f"--api-key={SECRET}"])
    assert serve.run(args, extra) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out and SECRET not in err
    assert "--api-key ***" in out and "--api-key=***" in out and "--api-key ***" in err


def test_replay_help_does_not_show_the_key(monkeypatch, capsys):
    monkeypatch.setenv("VLLM_API_KEY", SECRET)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["replay", "--help"])
    out = capsys.readouterr().out
    assert SECRET not in out and "$VLLM_API_KEY if set" in out


def test_replay_still_takes_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", SECRET)
    args, _ = cli.build_parser().parse_known_args(["replay", "--trace", "azure-code", "--out", "x"])
    assert replay.api_key(args) == SECRET
    given = argparse.Namespace(api_key="other")
    assert replay.api_key(given) == "other"
