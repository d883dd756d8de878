"""Metrics (DESIGN §3) on hand-made results whose values can be worked out by hand."""

from __future__ import annotations

import math

from rosa2.metrics import summarize
from rosa2.records import ProblemResult, TurnRecord


def turn(t: int, reward: float, *, dtheta: float = 0.0, dx: float = 0.0, weights: bool = False, words: bool = False) -> TurnRecord:
    return TurnRecord(
        turn=t, reward=reward, response="y", message="x", feedback="", refined_feedback="",
        words_on=words, weights_on=weights, delta_theta_sq=dtheta, delta_x_sq=dx, semantic_fallback=False,
        tokens=10 * t, seconds_generate=1.0, seconds_parametric=0.5 if weights else 0.0,
        seconds_semantic=0.25 if words else 0.0, seconds_reward=0.25, peak_memory_bytes=t * 2**20,
    )


def result(pid: str, solved_at: int | None, k: int = 3, *, scored: bool = True, seconds: float = 10.0) -> ProblemResult:
    used = solved_at or k
    turns = [turn(t, 1.0 if t == solved_at else -1.0, dtheta=float(t), dx=2.0 * t, weights=t < used, words=t < used) for t in range(1, used + 1)]
    return ProblemResult(
        problem_id=pid, method="rosa2", solved=solved_at is not None, turn_solved=solved_at, turns_used=used,
        seconds=seconds, peak_memory_bytes=max(r.peak_memory_bytes for r in turns), max_turns=k, scored=scored, turns=turns,
    )


def test_accuracy_uplift_and_turns_on_hand_made_results():
    results = [
        result("a", 1, seconds=2.0),  # solved at once
        result("b", 2, seconds=4.0),  # corrected at turn 2
        result("c", 3, seconds=6.0),  # corrected at turn 3
        result("d", None, seconds=8.0),  # never
        result("e", 1, scored=False),  # gold did not parse: excluded everywhere
    ]
    s = summarize(results, max_turns=3)
    assert (s["problems"], s["excluded"], s["solved"]) == (4, 1, 3)
    assert s["accuracy"] == 0.75
    assert s["accuracy_at_turn"] == [0.25, 0.5, 0.75]
    assert math.isclose(s["correction_uplift"], 2 / 3)  # of b, c, d (failed at turn 1) two were solved
    assert s["avg_turn"] == 2.0  # (1 + 2 + 3) / 3
    assert s["avg_turn_with_failures"] == 2.25  # (1 + 2 + 3 + 3) / 4
    assert s["avg_time_s"] == 5.0
    assert s["peak_memory_mb"] == 3.0
    # per-turn means: turn 1 has a, b, c, d; turn 2 has b, c, d; turn 3 has c, d
    assert s["reward"] == [-0.5, -1 / 3, 0.0]
    assert s["tokens"] == [10, 20, 30]
    # ‖Δθ‖² averages over turns where the stream ran: turn 1 (b, c, d), turn 2 (c, d), none at 3
    assert s["delta_theta_sq"] == [1.0, 2.0, None]
    assert s["delta_x_sq"] == [2.0, 4.0, None]
    assert s["seconds_generate"] == [1.0, 1.0, 1.0]
    assert s["seconds"][0] == 1.0 + 0.25 + (3 * 0.75) / 4  # a ran no stream at turn 1


def test_a_shorter_k_cuts_accuracy_and_uplift():
    results = [result("a", 1), result("b", 3), result("c", None)]
    s = summarize(results, max_turns=2)
    assert s["accuracy"] == 1 / 3 and s["accuracy_at_turn"] == [1 / 3, 1 / 3]
    assert s["correction_uplift"] == 0.0
    assert s["avg_turn_with_failures"] == (1 + 2 + 2) / 3


def test_undefined_metrics_are_none_not_zero():
    s = summarize([result("a", 1), result("b", 1)], max_turns=3)
    assert s["correction_uplift"] is None  # nobody failed at turn 1
    nobody = summarize([result("a", None)], max_turns=3)
    assert nobody["avg_turn"] is None and nobody["accuracy"] == 0.0
    empty = summarize([result("x", 1, scored=False)], max_turns=3)
    assert empty["problems"] == 0 and empty["excluded"] == 1 and empty["accuracy"] is None
    assert empty["peak_memory_mb"] is None
