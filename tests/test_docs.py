"""Every command a newcomer would copy from the README or docs/ works.

A command block (```bash, or a bare ``` block whose first command is one of ours) is run by
this test unless the line before it marks it `<!-- docs-test: long: WHY -->` (a long run, a
server, a pack the checkout does not have). Every command in every block, marked or not, is
checked against the real parsers: a `morphserve` subcommand and its flags, a script's flags
(from its own --help), a Makefile target, and `vllm serve`'s MorphServe config. So a renamed
flag or a moved script fails here, not in a reader's terminal. docs/history/ is a record of
past runs and is not checked.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
LONG = re.compile(r"<!--\s*docs-test:\s*long:\s*(.+?)\s*-->")
OUR_PROGRAMS = re.compile(r"^(\$ )?(\S+=\S+\s+)*(\.venv/bin/)?(morphserve|python\S*|vllm|make)(\s|$)")


@dataclass
class Block:
    page: str
    line: int
    text: str
    long: str | None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        body = "\n".join(lines[start + 1:j])
        first = next((ln for ln in body.split("\n") if ln.strip() and not ln.lstrip().startswith("#")), "")
        if lang in SHELL_LANGS or (lang == "" and OUR_PROGRAMS.match(first.strip())):
            prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            marker = LONG.search(prev)
            out.append(Block(page.relative_to(REPO).as_posix(), start + 1, body, marker.group(1) if marker else None))
        i = j + 1
    return out


BLOCKS = [b for page in PAGES for b in _blocks(page)]


def _commands(text: str) -> list[list[str]]:
    """Each simple command of a block, as words: continuations joined, comments dropped,
    split at && ; | &, leading VAR=value assignments removed. In a transcript (lines
    starting `$ `) only those lines are commands; the rest is their output."""
    if any(ln.startswith("$ ") for ln in text.split("\n")):
        text = "\n".join(ln[2:] for ln in text.split("\n") if ln.startswith("$ "))
    joined = re.sub(r"\\\n", " ", text)
    commands = []
    for line in joined.split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words, current = list(lexer), []
        for w in [*words, ";"]:
            if w and set(w) <= set(";&|"):
                while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(w)
    return commands


@functools.lru_cache(maxsize=None)
def _script_help(script: str) -> str:
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{script} --help failed: {proc.stderr[-500:]}"
    return proc.stdout


@functools.lru_cache(maxsize=None)
def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))


def _placeholder(word: str) -> str:
    return "X" if "$" in word else word


def check_command(words: list[str]) -> str | None:
    """None if the command parses, else why not. Programs that are not ours are not checked."""
    prog, args = words[0], [_placeholder(w) for w in words[1:]]
    name = prog.rsplit("/", 1)[-1]
    if name.startswith("python") and args[:2] == ["-m", "morphserve.cli"]:
        name, args = "morphserve", args[2:]
    if name == "morphserve":
        from morphserve.cli.commands import build_parser

        parser = build_parser()
        try:
            ns, extra = parser.parse_known_args(args)
        except SystemExit as e:
            if e.code == 0:  # --help
                return None
            return f"morphserve {' '.join(args)}: the parser refused it (exit {e.code})"
        if extra and not getattr(ns, "passthrough", False):
            return f"morphserve {' '.join(args)}: unknown arguments {extra}"
        return None
    if name.startswith("python") and args and args[0].startswith("scripts/"):
        script = args[0]
        if not (REPO / script).is_file():
            return f"{script} does not exist"
        help_text = _script_help(script)
        unknown = [a.split("=")[0] for a in args[1:] if a.startswith("--")
                   and not re.search(rf"(?<![\w-]){re.escape(a.split('=')[0])}(?![\w-])", help_text)]
        return f"{script}: no such flag {unknown}" if unknown else None
    if name == "make":
        missing = [a for a in args if not a.startswith("-") and "=" not in a and a not in _make_targets()]
        return f"make: no target {missing}" if missing else None
    if name == "vllm" and args[:1] == ["serve"] and "--additional-config" in args:
        raw = args[args.index("--additional-config") + 1]
        try:
            cfg = json.loads(raw)["morphserve"]
        except (ValueError, KeyError) as e:
            return f"vllm serve --additional-config is not MorphServe JSON: {e}"
        from morphserve.runtime import config as runtime_config

        try:
            runtime_config.parse(cfg)
        except Exception as e:  # the config's own validation error names the key
            return f"vllm serve --additional-config: {e}"
    return None


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_every_command_parses(block: Block):
    problems = [p for words in _commands(block.text) if (p := check_command(words))]
    assert not problems, f"{block.id}:\n" + "\n".join(problems)


RUN = [b for b in BLOCKS if b.long is None]


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.id)
def test_every_short_block_runs(block: Block):
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{block.id} exited {proc.returncode}:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"


def test_the_checker_catches_what_it_should():
    assert check_command(["morphserve", "doctor", "--no-such-flag"])
    assert check_command(["morphserve", "prepaer", "M"])
    assert check_command([".venv/bin/python", "scripts/soak.py", "--durration", "6"])
    assert check_command(["python", "scripts/nowhere.py"])
    assert check_command(["make", "tset"])
    assert check_command(["vllm", "serve", "M", "--additional-config", '{"morphserve": {"pak": "p"}}'])
    assert check_command([".venv/bin/morphserve", "serve", "M", "--pack", "P", "--port", "8000"]) is None
    assert _commands("A=1 B=2 .venv/bin/morphserve doctor --json | head -3 # note") == [
        [".venv/bin/morphserve", "doctor", "--json"], ["head", "-3"]]


def test_the_front_page_answers_first():
    """The first screen (60 lines) has the measured table, the machine and the commands."""
    first = "\n".join((REPO / "README.md").read_text().split("\n")[:60])
    for needed in ("static W8A8", "SLO violations", "AMX", "make demo", "make test", "vllm serve",
                   "docs/RESULTS.md", "morphserve doctor"):
        assert needed in first, needed


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_reaches_a_file_and_heading():
    broken = []
    for page in [*PAGES, *sorted((REPO / "docs" / "history").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                headings = {_anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                if anchor not in headings:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
