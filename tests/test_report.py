"""Reports from hand-built results: the tables' numbers, gains vs baseline, seed averaging, plots."""

from __future__ import annotations

import pytest

from rosa2 import report
from rosa2.metrics import summarize
from rosa2.records import ProblemResult, TurnRecord


def turn(t: int, reward: float, *, weights: bool = False, words: bool = False, dtheta: float = 0.0, dx: float = 0.0) -> TurnRecord:
    return TurnRecord(
        turn=t, reward=reward, response=f"answer {t}", message="m", feedback="" if reward > 0 else "try again",
        refined_feedback="", words_on=words, weights_on=weights, delta_theta_sq=dtheta, delta_x_sq=dx,
        semantic_fallback=False, tokens=5, seconds_generate=0.1, seconds_parametric=0.0, seconds_semantic=0.0,
        seconds_reward=0.0, peak_memory_bytes=100 * 2**20,
    )


def result(pid: str, method: str, solved_at: int | None, max_turns: int = 3, seconds: float = 2.0, **kw) -> ProblemResult:
    last = solved_at or max_turns
    turns = [turn(t, 1.0 if t == solved_at else -1.0, **(kw if t < last else {})) for t in range(1, last + 1)]
    return ProblemResult(pid, method, solved_at is not None, solved_at, last, seconds, 100 * 2**20, max_turns, turns=turns)


def cells() -> list[report.CellSummary]:
    # baseline solves 1 of 4 at turn 1; rosa2 solves that one and two more at turn 2 and 3
    base = [result("p1", "baseline", 1), result("p2", "baseline", None), result("p3", "baseline", None), result("p4", "baseline", None)]
    rosa2 = [
        result("p1", "rosa2", 1),
        result("p2", "rosa2", 2, weights=True, words=True, dtheta=0.5, dx=2.0),
        result("p3", "rosa2", 3, weights=True, words=True, dtheta=0.25, dx=1.0),
        result("p4", "rosa2", None, seconds=4.0, weights=True, words=True, dtheta=0.25, dx=1.0),
    ]
    return [
        report.CellSummary("m", "math", "baseline", 0, summarize(base, 3)),
        report.CellSummary("m", "math", "rosa2", 0, summarize(rosa2, 3)),
    ]


def test_table1_has_accuracy_and_gain_over_baseline():
    text = report.table1(cells())
    assert "| m | baseline | 25.0 |" in text
    assert "| m | rosa2 | 75.0 (+50.0) |" in text


def test_table2_and_table4_numbers():
    t2, t4 = report.table2(cells()), report.table4(cells())
    # rosa2: failed turn 1 on p2..p4, solved 2 of them -> uplift 66.7 %; avg turn (1+2+3)/3 = 2.00
    assert "| m | rosa2 | 66.7 | 2.00 |" in t2
    assert "| m | baseline | 0.0 | 1.00 |" in t2
    assert "| m | rosa2 | 2.5 | 100 |" in t4  # (2+2+2+4)/4 s, 100 MB


def test_seeds_are_averaged_with_std():
    a, b = cells()[1], cells()[1]
    b = report.CellSummary(b.model, b.dataset, b.method, 1, {**b.summary, "accuracy": 0.25})
    text = report.table1([cells()[0], a, b])
    assert "| m | rosa2 | 50.0 ± 35.4 (+25.0) |" in text


def test_curves_and_plots(tmp_path):
    summary = cells()[1].summary
    assert report.curve(summary, "accuracy_at_turn") == pytest.approx([0.25, 0.5, 0.75])
    assert report.curve(summary, "delta_theta_sq")[0] == pytest.approx((0.5 + 0.25 + 0.25) / 3)
    files = report.write(cells(), tmp_path, title="unit")
    for name in ("accuracy_by_turn.png", "dynamics.png"):
        data = files[name].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert files["report.md"].read_text().startswith("# unit")


def test_switch_methods_sort_after_the_main_four_and_empty_report():
    mixed = cells() + [report.CellSummary("m", "math", "switch-w2p@2", 0, cells()[1].summary)]
    rows = [line for line in report.table1(mixed).splitlines() if line.startswith("| m |")]
    assert [r.split("|")[2].strip() for r in rows] == ["baseline", "rosa2", "switch-w2p@2"]
    assert "No finished cells" in report.render([])
