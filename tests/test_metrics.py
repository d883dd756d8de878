"""Metrics (docs/metrics.md) on hand-made results whose values can be worked out by hand."""

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
    return ProblemResult(problem_id=pid, method="rosa2", seconds=seconds, max_turns=k, scored=scored, turns=turns)


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


# --- issue 13: both uplift readings, what the arms did, warnings, paired comparisons --------------

from rosa2.metrics import (  # noqa: E402
    correction_share, correction_uplift, paired_gain, paired_gain_of, solved_by_problem, warnings,
)


def test_the_two_uplift_readings_differ_as_in_the_paper():
    # 20 problems: 3 solved at turn 1, 7 corrected later, 10 never -> Acc@K 50 %
    results = [result(f"a{i}", 1) for i in range(3)] + [result(f"b{i}", 2 + i % 2) for i in range(7)]
    results += [result(f"c{i}", None) for i in range(10)]
    s = summarize(results, max_turns=3)
    assert s["accuracy"] == 0.5
    # Table 2's caption: of the 10 solved, 7 failed turn 1 -> 70 % (the paper's Qwen3-8B MATH case)
    assert s["correction_share"] == correction_share(results, 3) == 0.7
    # Eq. 19: of the 17 that failed turn 1, 7 were solved -> 41.2 %, which can never exceed Acc@K
    assert math.isclose(s["correction_uplift"], 7 / 17) and correction_uplift(results, 3) == s["correction_uplift"]
    assert summarize([result("x", None)], 3)["correction_share"] is None  # nothing solved


def arm_turn(t: int, reward: float, *, words: bool = False, cls: str = "", dx: float = 0.0, status: str = "",
             prediction: str | None = None, response: str = "y") -> TurnRecord:
    record = turn(t, reward, words=words, dx=dx)
    record.semantic_class, record.semantic_fallback = cls, words and cls != "refined"
    record.answer_status, record.prediction, record.response = status, prediction, response
    return record


def problem(pid: str, turns: list[TurnRecord], k: int = 3) -> ProblemResult:
    return ProblemResult(pid, "rosa2", seconds=1.0, max_turns=k, turns=turns)


def test_refinement_classes_rates_and_delta_x_over_refined_turns_only():
    nan = float("nan")
    results = [
        problem("p1", [arm_turn(1, -1, words=True, cls="refined", dx=4.0), arm_turn(2, -1, words=True, cls="copied", dx=nan),
                       arm_turn(3, -1)]),
        problem("p2", [arm_turn(1, -1, words=True, cls="copied", dx=nan), arm_turn(2, -1, words=True, cls="truncated", dx=nan),
                       arm_turn(3, -1)]),
        problem("p3", [arm_turn(1, -1, words=True, cls="empty", dx=nan), arm_turn(2, -1, words=True, cls="refined", dx=1.0),
                       arm_turn(3, 1)]),
    ]
    s = summarize(results, 3)
    assert (s["semantic_refinements"], s["semantic_refined"], s["semantic_copied"]) == (6, 2, 2)
    assert (s["semantic_empty"], s["semantic_truncated"], s["semantic_unclassified"]) == (1, 1, 0)
    assert s["semantic_refined_rate"] == 2 / 6
    assert s["semantic_fallback_rate"] == 4 / 6  # copied, copied, truncated, empty
    assert s["semantic_truncated_rate"] == 1 / 6
    # ‖Δx‖² per turn: only refined turns (NaN of fallbacks never averaged in, never a fake 0)
    assert s["delta_x_sq"][:2] == [4.0, 1.0]


def test_answer_change_and_no_answer_rates():
    results = [
        # rejected 42 -> 42 (same prediction) -> 41 (changed)
        problem("p1", [arm_turn(1, -1, status="wrong", prediction="42"), arm_turn(2, -1, status="wrong", prediction=" 42"),
                       arm_turn(3, -1, status="wrong", prediction="41")]),
        # code-like: no prediction, compare the stripped reply; then cut before the answer
        problem("p2", [arm_turn(1, -1, status="no_answer", response="def f(): pass "),
                       arm_turn(2, -1, status="no_answer", response="def f(): pass"),
                       arm_turn(3, -1, status="truncated", response="def f(): return")]),
        problem("p3", [arm_turn(1, 1, status="correct", prediction="7")]),  # solved at once: no rejected turn
    ]
    s = summarize(results, 3)
    assert (s["answer_change_turns"], s["answer_changed"]) == (4, 2)
    assert s["answer_change_rate"] == 0.5
    assert (s["scored_turns"], s["no_answer_turns"], s["truncated_turns"]) == (7, 3, 1)
    assert s["no_answer_rate"] == 3 / 7 and s["truncated_rate"] == 1 / 7


def test_rates_are_none_when_nothing_to_count():
    s = summarize([result("a", 1)], 3)  # no words-on turn, no status recorded, no rejected turn
    for name in ("semantic_refined_rate", "semantic_fallback_rate", "semantic_truncated_rate", "answer_change_rate",
                 "no_answer_rate", "truncated_rate"):
        assert s[name] is None, name


def test_warnings_name_the_cause_and_the_knob():
    summary = {"semantic_refinements": 6, "semantic_refined": 1, "semantic_copied": 3, "semantic_truncated": 2,
               "semantic_empty": 0, "scored_turns": 24, "no_answer_turns": 20, "truncated_turns": 20}
    fell, cut = warnings(summary, "rosa2")
    assert fell.startswith("words stream fell back on 5 of 6 refinements (copied 3, truncated 2): the critic cannot")
    assert "--semantic-critic" in fell and "in effect this rosa2 cell is rosa" in fell
    assert cut == "answers cut before the answer on 20 of 24 turns: raise --max-new-tokens"
    # mostly cut: the budget and the loop stop are named beside the stronger critic
    cut_words = warnings({**summary, "semantic_copied": 0, "semantic_truncated": 5}, "textgrad")[0]
    assert "(truncated 5)" in cut_words and "--semantic-update-tokens" in cut_words and "--semantic-loop-tokens" in cut_words
    assert "--semantic-critic" in cut_words and "in effect this textgrad cell is baseline" in cut_words
    # exactly half is not "more than half"; a working arm has no warning
    assert warnings({"semantic_refinements": 6, "semantic_refined": 3, "scored_turns": 24, "no_answer_turns": 12}) == []
    unformatted = warnings({"scored_turns": 10, "no_answer_turns": 9, "truncated_turns": 1})
    assert len(unformatted) == 1 and "no answer found on 9 of 10 turns" in unformatted[0] and "reward.extraction" in unformatted[0]


def test_warnings_from_a_real_summary():
    nan = float("nan")
    results = [problem(f"p{i}", [arm_turn(1, -1, words=True, cls="copied", dx=nan, status="truncated"),
                                 arm_turn(2, -1, status="truncated")], k=2) for i in range(3)]
    found = warnings(summarize(results, 2), "textgrad")
    assert len(found) == 2 and "fell back on 3 of 3" in found[0] and "is baseline" in found[0]
    assert "cut before the answer on 6 of 6" in found[1]


def test_solved_by_problem_travels_with_the_summary():
    results = [result("a", 1), result("b", 3), result("c", None), result("d", 1, scored=False)]
    assert summarize(results, 2)["solved_by_problem"] == {"a": 1, "b": None, "c": None}  # b only at turn 3 > K
    assert solved_by_problem(results, 3) == {"a": 1, "b": 3, "c": None}


def test_paired_gain_on_hand_made_results():
    method = [result("p1", 1), result("p2", 2), result("p3", 3), result("p4", 2), result("p5", None), result("only-m", 1)]
    baseline = [result("p5", 1), result("p4", None), result("p3", None), result("p2", None), result("p1", 1)]
    gain = paired_gain(method, baseline, 3)
    # p1 tie, p2..p4 won, p5 lost; 'only-m' has no pair and is left out
    assert (gain.won, gain.lost, gain.tied, gain.problems) == (3, 1, 1, 5)
    assert math.isclose(gain.gain, 2 / 5)
    assert -1.0 <= gain.low < gain.gain < gain.high <= 1.0
    assert gain.low < 0 < gain.high  # 3 won / 1 lost of 5 is not significant
    assert paired_gain(method, baseline, 3) == gain  # fixed seed: the same interval every time
    # a cut K changes the outcome: by turn 1 the method wins nothing
    assert paired_gain(method, baseline, 1).won == 0
    # every problem won: the interval collapses onto the gain
    sure = paired_gain_of({"a": 1.0, "b": 1.0}, {"a": 0.0, "b": 0.0})
    assert (sure.gain, sure.low, sure.high, sure.won) == (1.0, 1.0, 1.0, 2)
    assert paired_gain_of({"a": 1.0}, {"b": 0.0}) is None  # nothing in common


def test_a_result_reads_solved_turns_and_peak_off_its_turns_and_round_trips():
    r = result("p", solved_at=2)
    assert (r.solved, r.turn_solved, r.turns_used, r.peak_memory_bytes) == (True, 2, 2, 2 * 2**20)
    r.turns[1].reward = -1.0  # a re-score (evaluate_code) changes the turn: the result follows
    assert (r.solved, r.turn_solved) == (False, None)
    data = r.to_dict()
    assert (data["solved"], data["turns_used"], data["peak_memory_bytes"]) == (False, 2, 2 * 2**20)
    assert ProblemResult.from_dict(data).to_dict() == data
    assert ProblemResult("q", "rosa2", seconds=0.0, max_turns=1).peak_memory_bytes == 0
