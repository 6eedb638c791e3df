"""`prepare --force` replaces a pack atomically: a crash at any moment leaves a whole pack
(the old one or the new one) at PACK_DIR, never nothing."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from morphserve.offline import prepare
def _pack(folder: Path, label: str) -> Path:
    (folder / "quantized").mkdir(parents=True)
    (folder / "manifest.json").write_text(label)
    (folder / "quantized" / "model.safetensors").write_text(label)
    return folder


def _label(folder: Path) -> str:
    return (folder / "manifest.json").read_text()


@pytest.fixture
def old_and_new(tmp_path) -> tuple[Path, Path]:
    out = _pack(tmp_path / "pack", "old")
    tmp = _pack(tmp_path / f".pack.partial-{os.getpid()}", "new")
    return tmp, out


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def test_publish_replaces_the_pack_and_leaves_no_siblings(old_and_new):
    tmp, out = old_and_new
    prepare._publish(tmp, out)
    assert _label(out) == "new"
    assert (out / "quantized" / "model.safetensors").read_text() == "new"
    assert _siblings(out) == []


def test_publish_into_a_new_folder(tmp_path):
    tmp = _pack(tmp_path / ".pack.partial-1", "new")
    out = tmp_path / "pack"
    prepare._publish(tmp, out)
    assert _label(out) == "new" and _siblings(out) == []


def test_a_crash_while_publishing_leaves_a_whole_pack(old_and_new, monkeypatch):
    """The process dies at its second rename: with two renames that is the moment the old
    pack has moved away and the new one is not yet in place."""
    tmp, out = old_and_new
    real, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(src, dst)

    def dying_rmtree(*args, **kwargs):  # or it dies while deleting the old pack
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", dying_replace)
    monkeypatch.setattr(shutil, "rmtree", dying_rmtree)
    try:
        prepare._publish(tmp, out)
    except KeyboardInterrupt:
        pass
    assert out.is_dir() and _label(out) in ("old", "new")
    assert (out / "quantized" / "model.safetensors").read_text() == _label(out)


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux-only")
def test_exchange_swaps_two_folders(tmp_path):
    a, b = _pack(tmp_path / "a", "A"), _pack(tmp_path / "b", "B")
    assert prepare._exchange(a, b)
    assert _label(a) == "B" and _label(b) == "A"


def test_without_renameat2_the_two_step_fallback_still_publishes(old_and_new, monkeypatch):
    tmp, out = old_and_new
    monkeypatch.setattr(prepare, "_exchange", lambda a, b: False)
    prepare._publish(tmp, out)
    assert _label(out) == "new" and _siblings(out) == []
