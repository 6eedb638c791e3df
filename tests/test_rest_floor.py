"""A server whose resident prompt twins leave level 0 short of one max_model_len request
rests at a floor: the first rung that pays for them. The floor's arithmetic, the budget
that allows it, and the controller that never serves below it (policy, manual requests)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kv_resize.budget import BudgetError, KVBudget
from morphserve.errors import MorphServeError
from morphserve.runtime.kv_sizing import plan_budget, rest_floor

BLOCK = 1000


def test_the_floor_is_the_first_level_whose_kv_holds_a_max_model_len_request():
    caps = [1, 3, 5, 8, 12]  # usable blocks by level
    assert rest_floor(caps, 128, 1024, twin_rungs=4) == 3  # 8 x 128 = 1024
    assert rest_floor(caps, 128, 100, twin_rungs=4) == 0
    assert rest_floor(caps, 128, 100) == 0  # no twins: level 0 holds it, as before


def test_without_twins_a_short_level_0_is_refused_as_before():
    with pytest.raises(MorphServeError, match="leaves 128 KV tokens at full precision, fewer than max_model_len 1024"):
        rest_floor([1, 3, 5, 8, 12], 128, 1024)


@pytest.mark.parametrize("caps, advice", [([1, 3, 5, 8, 12], "only from level 3, .* set prompt_twin_layers above"),
                                          ([1, 1, 1, 1, 1], "at no level; hold fewer prompt twins")])
def test_a_floor_that_would_quantize_every_twinned_layer_is_refused(caps, advice):
    with pytest.raises(MorphServeError, match=f"with 3 prompt twins resident .* {advice}"):
        rest_floor(caps, 128, 1024, twin_rungs=3)


def test_the_budget_checks_its_blocks_at_its_floor():
    budget = KVBudget(10 * BLOCK, 9 * BLOCK, (2 * BLOCK, 2 * BLOCK), BLOCK, floor=1)
    assert budget.total_blocks(0) == 1 and budget.total_blocks(1) == 3
    with pytest.raises(BudgetError, match="leaves no KV block after .* at level 0"):
        KVBudget(10 * BLOCK, 9 * BLOCK, (2 * BLOCK, 2 * BLOCK), BLOCK)
    with pytest.raises(BudgetError, match="outside 0..2"):
        KVBudget(10 * BLOCK, 9 * BLOCK, (2 * BLOCK, 2 * BLOCK), BLOCK, floor=3)


def test_twins_may_leave_level_0_without_blocks_but_not_every_level(tmp_path):
    savings = [3 * BLOCK] * 4
    # 20 blocks of budget, 15 of weights, 6 of twins: level 0 has none, level 1 two
    budget = plan_budget(savings, None, tmp_path, 5 * BLOCK, BLOCK, rank_weights=15 * BLOCK,
                         resident_twin_bytes=6 * BLOCK)
    assert budget.total_blocks(0) == 0 and budget.floor == 1 and budget.total_blocks(1) == 2
    with pytest.raises(MorphServeError, match="memory_budget_gb: .*leaves no KV block"):
        plan_budget(savings, None, tmp_path, 5 * BLOCK, BLOCK, rank_weights=15 * BLOCK,
                    resident_twin_bytes=60 * BLOCK)
    with pytest.raises(MorphServeError, match="leaves no KV block"):  # no twins: level 0 must hold blocks
        plan_budget(savings, None, tmp_path, 0, BLOCK, rank_weights=15 * BLOCK)


def _controller_at(level: int, floor: int, targets):
    from tests.test_policy_rungs import _controller
    from tests.test_transition_plans import LADDER

    c, worker = _controller(level, targets)
    c.floor, c.ladder = floor, LADDER
    c.config = SimpleNamespace(restore_mode="sync", compress_mode="sync")
    c.manual_limit = SimpleNamespace(wait_s=lambda now: 0.0)
    return c, worker


def test_the_policy_is_held_at_the_floor_and_a_no_op_restore_is_not_accepted():
    c, _ = _controller_at(5, 2, [0, 0, 4])
    c._decide()  # 5 -> 0 asked, 2 served
    assert c.moves.level == 2 and c.moves.restoring is None
    accepted = c.loop.state
    c._decide()  # 2 -> 0 asked again: nothing moves, and no cooldown starts
    assert c.moves.level == 2 and c.loop.state is accepted
    assert "held at the floor 2" in c.recorder.decisions[-1]["reason"]
    c._decide()
    assert c.moves.level == 4 and c.loop.state.level == 4
    assert c.wants_idle_ticks()


def test_a_server_at_its_floor_wants_no_idle_ticks():
    c, _ = _controller_at(2, 2, [])
    assert not c.wants_idle_ticks()
    c.floor = 0
    assert c.wants_idle_ticks()  # level 2 above a floor of 0: a restore could still come


def test_a_policy_that_moves_while_idle_gets_idle_ticks_at_its_floor():
    c, _ = _controller_at(2, 2, [])
    c.loop.policy.moves_while_idle = lambda: True  # idle_rest: next_request
    assert c.wants_idle_ticks()
    c.forced_level = 2  # a manual level: the policy is not in charge
    assert not c.wants_idle_ticks()


def test_a_manual_level_below_the_floor_is_refused_with_the_reason():
    c, _ = _controller_at(3, 2, [])
    out = c.set_level_request(1)
    assert out["status"] == 400 and "in 2..6" in out["error"] and "prompt twins" in out["error"]
    assert c.moves.level == 3 and c.forced_level is None


def test_the_report_names_a_floor_beside_the_blocks_it_rests_with():
    from morphserve.evaluation.render import _kv

    assert _kv({"level0": 0, "rest": 8, "floor": 5, "max_level": 62}) == "8 (floor 5) → 62"
    assert _kv({"level0": 26, "rest": 26, "floor": 0, "max_level": 80}) == "26 → 80"
    assert _kv({"level0": 26, "max_level": 80}) == "26 → 80"  # a run recorded before floors


class _FloorServer:
    """The control routes the evaluation's warm-up calls, as a server with a floor answers them."""

    def __init__(self, floor: int, top: int):
        self.floor, self.top, self.level, self.posted, self.completed = floor, top, floor, [], 0

    def request(self, url: str, body: dict | None = None, method: str | None = None, timeout: float = 120) -> dict:
        if url.endswith("/morphserve/level"):
            level = body["level"]
            self.posted.append(level)
            if level is not None:
                if level < self.floor:
                    return {"ok": False, "status": 400, "error": "below the floor"}
                self.level = level
        return {"tiers": ["bf16", "w8a8"], "floor": self.floor, "level": self.level}


@pytest.mark.parametrize("floor", [0, 5])
def test_the_evaluations_warm_up_ends_at_the_floor_and_hands_back_to_the_policy(monkeypatch, floor):
    from morphserve.evaluation import systems
    from morphserve.evaluation.suite import System

    server = _FloorServer(floor, 30)
    monkeypatch.setattr(systems, "_request", server.request)
    monkeypatch.setattr(systems, "_complete", lambda base, n, max_tokens=16: None)
    monkeypatch.setattr(systems, "SETTLE_QUIET_S", 0.0)
    done = systems.warm_up(System(name="m", kind="morphserve", policy="default"), "http://x", 4, 30)
    assert server.posted == [30, floor, None] and server.level == floor and done["levels"] == [30, floor]
    assert done["policy_start_level"] == floor
    with pytest.raises(RuntimeError, match=f"outside the levels served here \\({floor}..30\\)"):
        systems.warm_up(System(name="m", kind="morphserve", policy="default", hold_level=31), "http://x", 4, 30)
    if floor:
        with pytest.raises(RuntimeError, match="outside the levels served here \\(5..30\\)"):
            systems.warm_up(System(name="m", kind="morphserve", policy="default", hold_level=4), "http://x", 4, 30)


def test_the_warm_up_waits_for_the_policys_idle_move_before_the_trace(monkeypatch):
    """A policy that moves up while idle (idle_rest: next_request) does so after the warm-up
    hands control back; the trace starts once the level has held still."""
    import itertools

    from morphserve.evaluation import systems
    from morphserve.evaluation.suite import System

    server = _FloorServer(0, 30)
    reads = itertools.count()

    def request(url, body=None, method=None, timeout=120):
        out = server.request(url, body, method, timeout)
        if url.endswith("state?memory=0") and server.posted[-1:] == [None] and next(reads) == 2:
            server.level = out["level"] = 30  # the idle move, seen on the third read after the hand-back
        return out

    monkeypatch.setattr(systems, "_request", request)
    monkeypatch.setattr(systems, "_complete", lambda base, n, max_tokens=16: None)
    monkeypatch.setattr(systems, "SETTLE_QUIET_S", 0.5)
    done = systems.warm_up(System(name="m", kind="morphserve", policy="default"), "http://x", 4, 30)
    assert done["policy_start_level"] == 30 and next(reads) >= 5  # read again after the move, until quiet


def test_a_refusal_in_the_engine_core_reaches_the_server_as_one_line(monkeypatch, tmp_path, capsys):
    """The engine core writes a user error to the file the server named and exits; the
    server prints it as one `error:` line. Other errors, and engines no server started, keep
    their exceptions."""
    from morphserve.vllm import server

    monkeypatch.delenv(server.REFUSAL_FILE_ENV, raising=False)
    server.relay_refusal(MorphServeError("no room"))  # an in-process engine: nothing happens here
    named = tmp_path / "refusal"
    monkeypatch.setenv(server.REFUSAL_FILE_ENV, str(named))
    server.relay_refusal(RuntimeError("a bug"))  # not a user error: left to vLLM
    assert not named.exists()
    with pytest.raises(SystemExit) as exited:
        server.relay_refusal(MorphServeError("no room for a max_model_len request"))
    assert exited.value.code == 2 and named.read_text() == "no room for a max_model_len request"

    def engine_core_refuses():  # what vLLM's frontend raises once the engine core has exited
        from pathlib import Path
        import os

        Path(os.environ[server.REFUSAL_FILE_ENV]).write_text("no room for a max_model_len request")
        raise RuntimeError("Engine core initialization failed. See root cause above.")

    assert server.run_refusing(engine_core_refuses) == 2
    assert capsys.readouterr().err == "error: no room for a max_model_len request\n"
    with pytest.raises(RuntimeError, match="a bug"):
        server.run_refusing(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))
    assert server.run_refusing(lambda: (_ for _ in ()).throw(MorphServeError("bad pack"))) == 2
    assert capsys.readouterr().err == "error: bad pack\n"
    assert server.run_refusing(lambda: None) == 0
