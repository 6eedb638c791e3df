"""Transitions between ladder levels with a stand-in worker and vLLM's real block pool
(pure Python, no engine): plans that both compress and decompress run every step, and a
manual level inside a background restore's range is reached, not refused."""

from __future__ import annotations

import pytest

from kv_resize.elastic_pool import ElasticBlockPool
from morphserve.offline.ladder import Ladder, Rung
from morphserve.runtime.policy_loop import PolicyLoop
from morphserve.runtime.recorder import Recorder
from morphserve.runtime.transitions import Transitions

# Three layers whose W8A8 order (1, 2, 0) differs from their W4A16 order (2, 0, 1).
LADDER = Ladder([Rung(1, "w8a8", 50), Rung(2, "w8a8", 50), Rung(0, "w8a8", 50),
                 Rung(2, "w4a16", 20), Rung(0, "w4a16", 20), Rung(1, "w4a16", 20)])


def capacity(level: int) -> int:
    return 10 + 5 * level


class Worker:
    """The workers' side of the RPCs Transitions makes, over a layer -> tier map."""

    def __init__(self, tiers: dict[int, str]):
        self.tiers = dict(tiers)
        self.restoring: list[tuple[int, str]] = []
        self.calls: list[str] = []

    def __call__(self, method: str, *args):
        self.calls.append(method)
        return [getattr(self, method)(*args)]

    def _result(self) -> dict:
        return {"fp_bytes_freed": 1, "bytes_freed": 1, "rss_delta": 0, "seconds": 0.0,
                "tiers": {str(i): t for i, t in self.tiers.items()}}

    def morphserve_apply(self, quantize, restore):
        for layer, tier in list(restore) + list(quantize):
            self.tiers.pop(layer) if tier == "bf16" else self.tiers.__setitem__(layer, tier)
        return self._result()

    def morphserve_tiers(self):
        return {str(i): t for i, t in self.tiers.items()}

    def morphserve_restore_begin(self, layers):
        self.restoring = [tuple(x) for x in layers]
        return {"started": len(layers)}

    def morphserve_restore_commit(self, limit=None):
        """Installs one prepared layer per boundary, as a slow preparing thread would."""
        committed = []
        if self.restoring:
            layer, tier = self.restoring.pop(0)
            self.tiers.pop(layer) if tier == "bf16" else self.tiers.__setitem__(layer, tier)
            committed.append(layer)
        return {"committed": committed, "done": not self.restoring, "error": None,
                "tiers": self.morphserve_tiers()}

    def morphserve_restore_cancel(self):
        self.restoring = []
        return {"tiers": self.morphserve_tiers()}

    def morphserve_kv_release(self, first, last):
        return {"advised": last - first + 1, "rss_delta": 0}


class View:
    def sync_capacity_view(self, blocks: int) -> None:
        self.visible = blocks


def _moves(level: int, tiers: dict[int, str] | None = None) -> tuple[Transitions, Worker, ElasticBlockPool]:
    from vllm.v1.core.block_pool import BlockPool

    from morphserve.vllm.scheduler import VllmBlockStore

    store = VllmBlockStore(BlockPool(num_gpu_blocks=capacity(LADDER.top) + 1, enable_caching=True, hash_block_size=16))
    worker = Worker(LADDER.config(level) if tiers is None else tiers)
    moves = Transitions(LADDER, worker, None, View(), capacity, Recorder(None), PolicyLoop(None), "wait")
    moves.set_tiers(worker.morphserve_tiers())
    moves.pool = ElasticBlockPool(store, capacity(moves.level))
    return moves, worker, moves.pool


def test_a_plan_that_compresses_and_decompresses_runs_both():
    """A background restore 5 -> 0 called off after layer 0 went back to bf16 leaves
    {1: w8a8, 2: w4a16}; level 3 then needs layer 0 compressed *and* layer 2 decompressed."""
    moves, worker, pool = _moves(5, tiers={1: "w8a8", 2: "w4a16"})
    assert moves.level == 2  # the highest rung every layer has reached
    plan = LADDER.plan(moves.config, 3)
    assert plan.compress and plan.decompress
    result = moves.to(3, reason="manual")
    assert result["ok"] and result["changed"]
    assert worker.tiers == LADDER.config(3) and moves.level == 3
    assert pool.limit == capacity(3)
    record = result["transition"]
    assert record["quantized_layer_ids"] == [0] and record["restored_layer_ids"] == [2]


@pytest.mark.parametrize("target", [1, 3, 5])
def test_a_manual_level_during_a_drained_background_restore_is_reached(target):
    """The restore to 0 has shrunk the pool to level 0's capacity and released its pages; a
    manual level between 0 and the top must get its blocks back, not fail and pin."""
    moves, worker, pool = _moves(LADDER.top)
    started = moves.to(0, reason="policy", background=True)
    assert started["restoring"] and pool.limit == pool.committed == capacity(0)
    result = moves.to(target, reason="manual")
    assert result["ok"] and moves.restoring is None
    assert worker.tiers == LADDER.config(target) and moves.level == target
    assert pool.limit == capacity(target) and pool.visible == capacity(target)


def test_a_background_compression_grows_the_pool_only_once_every_layer_is_in():
    """The layers' freed bytes pay for the layers prepared ahead (quant_layers.restore_prep),
    so no block may appear before the last layer is installed."""
    moves, worker, pool = _moves(0)
    started = moves.to(3, reason="policy", background_compress=True)
    assert started["compressing"] and not started["changed"] and worker.calls[-1] == "morphserve_restore_begin"
    assert moves.kv_state()["compressing_to"] == 3 and moves.kv_state()["restoring_to"] is None
    for installed in (1, 2):
        moves.commit_restore()
        assert len(worker.tiers) == installed and pool.limit == capacity(0)
    moves.commit_restore()
    assert moves.restoring is None and worker.tiers == LADDER.config(3) and moves.level == 3
    assert pool.limit == capacity(3) and moves.scheduler.visible == capacity(3)
    assert moves.recorder.by_direction == {"quantize": 1, "restore": 0}
    assert moves.recorder.recent[-1]["mode"] == "background" and moves.recorder.recent[-1]["steps"] == 3


def test_a_background_compression_called_off_part_way_serves_what_it_installed():
    """Retargeted after one layer: the layer installed stays, and the pool gets the blocks
    the level reached allows, not the target's."""
    moves, worker, pool = _moves(0)
    written: list[dict] = []
    moves.recorder.write = written.append
    moves.to(3, reason="policy", background_compress=True)
    moves.commit_restore()  # layer 1 (the first W8A8 rung) is in
    result = moves.to(1, reason="policy", background_compress=True)
    assert result["ok"] and moves.restoring is None and moves.level == 1
    assert worker.tiers == LADDER.config(1) and pool.limit == capacity(1)
    assert moves.recorder.by_direction == {"quantize": 0, "restore": 0}  # the cancelled one is only logged
    # logged like every other record: what it reached, and how long it ran (CI read a log
    # whose called-off record had no duration)
    assert [(r["outcome"], r["from"], r["to"]) for r in written] == [("cancelled", 0, 1)]
    assert written[0]["seconds"] > 0 and written[0]["reason"] == "policy"


def test_a_transition_the_engine_waited_for_teaches_the_policy_what_a_move_costs():
    """A synchronous move is timed into the step-time model (the policy counts it before
    moving for a prompt); a background one is not (the engine did not wait for it)."""
    from policies import make_tracker
    from policies.config import PolicyConfig

    moves, worker, pool = _moves(0)
    moves.policy.tracker = make_tracker(PolicyConfig(policy="demand"), LADDER.top)
    model = moves.policy.tracker.step_model
    record = moves.to(3, reason="manual")["transition"]
    assert model.move_layer_s["up"] == pytest.approx(record["seconds"] / 3)
    moves.to(0, reason="policy", background=True)
    while moves.restoring is not None:
        moves.commit_restore()
    assert "down" not in model.move_layer_s
    moves.to(2, reason="manual")
    moves.to(0, reason="manual")
    assert model.move_layer_s["down"] > 0


def _hold(pool: ElasticBlockPool, keep: set[int], upto: int) -> dict:
    """Blocks 1..upto handed out by vLLM's pool, then every one not in `keep` freed again."""
    vllm_pool = pool.store.vllm_pool
    blocks = {b.block_id: b for b in vllm_pool.get_new_blocks(upto)}
    assert sorted(blocks) == list(range(1, upto + 1))
    vllm_pool.free_blocks([b for i, b in blocks.items() if i not in keep])
    return {i: blocks[i] for i in keep}


@pytest.mark.parametrize("background", [False, True])
def test_a_restore_waiting_for_blocks_goes_part_way_and_finishes_when_they_free(background):
    """Block 18 in use above level 0's 10 blocks: the restore goes at once to level 2 (20
    blocks, the lowest that holds block 18), keeps 0 pending with the pool limited to 10,
    and reaches 0 once the block frees. Before, it waited at level 6 for all of it."""
    moves, worker, pool = _moves(LADDER.top)
    held = _hold(pool, {3, 18}, 18)
    result = moves.to(0, reason="quality", background=background)
    assert result["deferred"] and result["part_way"] == 2 and result["busy_blocks"] == 1
    assert moves.pending_level == 0 and pool.limit == capacity(0) and pool.committed == capacity(2)
    assert pool.visible == capacity(0) + 1 and moves.scheduler.visible == pool.visible  # block 18 only
    while moves.restoring is not None:
        moves.commit_restore()
    assert moves.level == 2 and worker.tiers == LADDER.config(2)
    record = moves.recorder.recent[-1]
    assert record["part_of"] == 0 and record["to"] == 2 and record["reason"] == "quality"
    if background:  # the last commit gave level 2's blocks back; the pending retry hides them again
        assert pool.limit == capacity(2)
    assert moves.to(0, reason="pending")["deferred"] and moves.level == 2  # 18 still in use: too few levels left
    assert pool.limit == capacity(0) and pool.visible == capacity(0) + 1
    pool.store.vllm_pool.free_blocks([held[18]])
    done = moves.to(0, reason="pending", background=background)
    while moves.restoring is not None:
        moves.commit_restore()
    assert done["ok"] and moves.level == 0 and moves.pending_level is None
    assert pool.limit == pool.committed == capacity(0) and worker.tiers == {}
    pool.check()


def test_a_restore_waits_where_it_is_when_no_level_far_enough_down_holds_the_blocks_in_use():
    """Block 38 in use: only level 6 (40 blocks) holds it, so the restore waits at 6 as before;
    with block 28 (level 4's 30 hold it) the move would be 2 levels, under PART_WAY_MIN_LEVELS."""
    from morphserve.runtime.transitions import PART_WAY_MIN_LEVELS

    assert PART_WAY_MIN_LEVELS == 4  # the second case's arithmetic
    for top_block in (38, 28):
        moves, worker, pool = _moves(LADDER.top)
        _hold(pool, {top_block}, top_block)
        result = moves.to(0, reason="quality")
        assert result["deferred"] and "part_way" not in result and moves.level == LADDER.top
        assert moves.pending_level == 0 and pool.limit == capacity(0)
        assert worker.tiers == LADDER.config(LADDER.top)
