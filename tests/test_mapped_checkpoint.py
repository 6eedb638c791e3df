"""The masters really are file-backed: reading the real SmolLM2 checkpoint through a
MappedCheckpoint moves RssFile, not RssAnon, and leaving the block drops the pages."""

from __future__ import annotations

from morphserve.runtime.proc_memory import process_rss
from quant_layers.mapped_checkpoint import MappedCheckpoint
from quant_layers.twin import index_safetensors

MiB = 2**20


def test_reading_masters_costs_no_anonymous_memory(model_dir):
    ckpt = MappedCheckpoint(index_safetensors(model_dir))
    before = process_rss()
    with ckpt.reading() as reader:
        held = [reader.get(key) for key in ckpt.index]
        for t in held:
            t.sum()  # touch every page
        total = sum(t.numel() * t.element_size() for t in held)
        during = process_rss()
        del held, t  # any live view keeps the whole file map, and its touched pages, in RSS
    after = process_rss()
    assert total > 200 * MiB
    # All 256 MiB are held and touched, yet they are file pages, not anonymous copies.
    assert during["rss_anon_bytes"] - before["rss_anon_bytes"] < 20 * MiB
    assert during["rss_file_bytes"] - before["rss_file_bytes"] > 0.8 * total
    assert after["rss_file_bytes"] - before["rss_file_bytes"] < 20 * MiB


def test_fused_read_is_a_fresh_contiguous_buffer(model_dir):
    ckpt = MappedCheckpoint(index_safetensors(model_dir))
    keys = [f"model.layers.0.self_attn.{n}_proj.weight" for n in "qkv"]
    with ckpt.reading() as reader:
        fused = reader.fused(keys)
        parts = [reader.get(k) for k in keys]
        assert fused.shape[0] == sum(p.shape[0] for p in parts)
        assert fused.is_contiguous()
        assert fused[: parts[0].shape[0]].equal(parts[0])
    fused.add_(1)  # writable and owned: the file is untouched
    with ckpt.reading() as reader:
        assert not reader.get(keys[0]).equal(fused[: parts[0].shape[0]])
