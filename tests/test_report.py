"""Reports from hand-built results: the tables' numbers, paired gains vs baseline, both uplift
readings, what the arms did, warnings, seed averaging (and only seeds), plots."""

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
    return ProblemResult(pid, method, seconds=seconds, max_turns=max_turns, turns=turns)


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


def test_table1_has_accuracy_and_gain_over_baseline_paired_over_problems():
    text = report.table1(cells())
    assert "| m | baseline | 25.0 |" in text
    # p1 tied, p2 and p3 won, p4 tied: +50 points, bootstrap interval over the 4 problems, 2↑ 0↓
    assert "| m | rosa2 | 75.0 (+50.0 [+0.0, +100.0], 2↑ 0↓) |" in text


def test_a_gain_without_per_problem_outcomes_says_it_is_unpaired():
    bare = [report.CellSummary(c.model, c.dataset, c.method, c.seed, {k: v for k, v in c.summary.items() if k != "solved_by_problem"})
            for c in cells()]
    assert "| m | rosa2 | 75.0 (+50.0, unpaired) |" in report.table1(bare)


def test_table2_shows_both_uplift_readings_and_table4_numbers():
    t2, t4 = report.table2(cells()), report.table4(cells())
    assert "Uplift (Eq. 19)" in t2 and "Share corrected (Tab. 2 caption)" in t2
    # rosa2: failed turn 1 on p2..p4, solved 2 of them -> Eq. 19 66.7 %; of the 3 solved, 2 failed turn 1
    # -> caption 66.7 % too; avg turn (1+2+3)/3 = 2.00
    assert "| m | rosa2 | 66.7 | 66.7 | 2.00 |" in t2
    assert "| m | baseline | 0.0 | 0.0 | 1.00 |" in t2
    assert "| m | rosa2 | 2.5 | 100 |" in t4  # (2+2+2+4)/4 s, 100 MB


def test_the_readings_part_where_the_paper_does():
    # 20 problems: 3 solved at turn 1, 7 later, 10 never: Acc 50 %, Eq. 19 41.2 %, caption 70 %
    rs = [result(f"a{i}", "baseline", 1) for i in range(3)] + [result(f"b{i}", "baseline", 2) for i in range(7)]
    rs += [result(f"c{i}", "baseline", None) for i in range(10)]
    cell = report.CellSummary("Qwen3-8B", "math", "baseline", 0, summarize(rs, 3))
    assert "| Qwen3-8B | baseline | 41.2 | 70.0 | 1.70 |" in report.table2([cell])
    assert "| Qwen3-8B | baseline | 50.0 |" in report.table1([cell])


def test_seeds_are_averaged_with_std():
    base, rosa2 = cells()
    # seed 1 of rosa2 solves only p1 (at turn 1)
    seed1 = [result("p1", "rosa2", 1)] + [result(p, "rosa2", None) for p in ("p2", "p3", "p4")]
    other = report.CellSummary("m", "math", "rosa2", 1, summarize(seed1, 3))
    text = report.table1([base, rosa2, other])
    # per problem the share of seeds that solved it: p2, p3 half won each -> +25.0, 2 problems ahead
    assert "| m | rosa2 | 50.0 ± 35.4 (+25.0 [+0.0, +50.0], 2↑ 0↓) |" in text


def params(**knobs: str) -> dict[str, str]:
    return {"model.name": "m", "data.dataset": "math", "generation.seed": "0", "adapt.update_context": "generated",
            "generation.max_new_tokens": "64", "tracking.study": "s", **knobs}


def test_variants_are_rows_of_their_own_not_seeds():
    base, rosa2 = cells()
    weak = [result("p1", "rosa", 1)] + [result(p, "rosa", None) for p in ("p2", "p3", "p4")]
    mixed = [
        report.CellSummary("m", "math", "baseline", 0, base.summary, params=params()),
        report.CellSummary("m", "math", "rosa", 0, rosa2.summary, params=params()),
        report.CellSummary("m", "math", "rosa", 0, summarize(weak, 3), params=params(**{"adapt.update_context": "next"})),
        # a second seed of the 'next' variant is averaged with it; the study name is no knob
        report.CellSummary("m", "math", "rosa", 1, summarize(weak, 3),
                           params=params(**{"adapt.update_context": "next", "generation.seed": "1", "tracking.study": "t"})),
    ]
    text = report.table1(mixed)
    assert "| m | baseline | 25.0 |" in text  # the baseline has one variant: no knob in its name
    assert "| m | rosa (update_context=generated) | 75.0 (+50.0 [+0.0, +100.0], 2↑ 0↓) |" in text
    assert "| m | rosa (update_context=next) | 25.0 ± 0.0 (+0.0 [+0.0, +0.0], 0↑ 0↓) |" in text
    assert "40.0" not in text and "50.0 ± 35.4" not in text  # never averaged as if seeds
    assert report.differing_knobs(mixed) == ["adapt.update_context"]
    page = report.render(mixed)
    assert "Knobs that differ between cells: adapt.update_context" in page
    assert "| m | math | rosa (update_context=next) |" in report.table3(mixed)


def test_baselines_that_differ_in_a_knob_are_matched_by_it():
    base, rosa2 = cells()
    short = report.CellSummary("m", "math", "baseline", 0, base.summary, params=params())
    long_base = [result(p, "baseline", 1) for p in ("p1", "p2")] + [result(p, "baseline", None) for p in ("p3", "p4")]
    long = report.CellSummary("m", "math", "baseline", 0, summarize(long_base, 3), params=params(**{"generation.max_new_tokens": "512"}))
    mine = [report.CellSummary("m", "math", "rosa2", 0, rosa2.summary, params=params(**{"generation.max_new_tokens": t}))
            for t in ("64", "512")]
    text = report.table1([short, long, *mine])
    assert "| m | baseline (max_new_tokens=512) | 50.0 |" in text
    assert "| m | rosa2 (max_new_tokens=64) | 75.0 (+50.0 [+0.0, +100.0], 2↑ 0↓) |" in text  # vs the 64-token baseline
    assert "| m | rosa2 (max_new_tokens=512) | 75.0 (+25.0 " in text and ", 1↑ 0↓) |" in text


def test_table3_and_warnings_say_what_each_arm_did():
    def turn_of(t: int, reward: float, cls: str, status: str, prediction: str) -> TurnRecord:
        record = turn(t, reward, words=bool(cls))
        record.semantic_class, record.semantic_fallback = cls, bool(cls) and cls != "refined"
        record.answer_status, record.prediction = status, prediction
        return record

    def problem(pid: str, classes: list[str], statuses: list[str], predictions: list[str]) -> ProblemResult:
        turns = [turn_of(t, -1.0, c, s, p) for t, (c, s, p) in enumerate(zip(classes, statuses, predictions), 1)]
        return ProblemResult(pid, "textgrad", seconds=1.0, max_turns=3, turns=turns)

    fell = [problem("p1", ["copied", "truncated", ""], ["no_answer", "truncated", "truncated"], ["1", "1", "2"]),
            problem("p2", ["copied", "refined", ""], ["truncated", "truncated", "truncated"], ["3", "4", "4"])]
    cell = report.CellSummary("m", "math", "textgrad", 0, summarize(fell, 3))
    t3 = report.table3([cell])
    assert "Refined %" in t3 and "Fallback %" in t3 and "Answer change %" in t3 and "No answer %" in t3
    # refined 1 of 4; fallback 3 of 4; critic cut 1 of 4; answers changed on 2 of 4 rejected turns; 6 of 6 unscorable
    assert "| m | math | textgrad | 25.0 (1/4) | 75.0 (3/4) | 25.0 (1/4) | 50.0 (2/4) | 100.0 (6/6) |" in t3
    page = report.render([cell])
    assert "**Warnings**" in page
    assert "- textgrad · m · math · seed 0: words stream fell back on 3 of 4 refinements (copied 2, truncated 1)" in page
    assert "- textgrad · m · math · seed 0: answers cut before the answer on 5 of 6 turns: raise --max-new-tokens" in page
    assert "**Warnings**" not in report.render(cells())  # arms that did their job: no warning section


def test_one_list_of_finals_and_curves_is_what_summarize_gives_and_tracking_logs():
    from rosa2 import metrics
    from rosa2.tasks import tracking as tr

    summary = cells()[1].summary
    for key in metrics.FINALS:
        assert summary[key] is None or isinstance(summary[key], (int, float)), key
    for key in metrics.CURVES:
        assert isinstance(summary[key], list) and len(summary[key]) == summary["max_turns"], key
    assert tr.FINAL_METRICS == ("accuracy_pct", "correction_uplift_pct", "correction_share_pct", "avg_turn",
                                "avg_turn_with_failures", "avg_time_s", "peak_memory_mb")
    assert tr.STEP_METRICS == ("by_turn/accuracy_pct", "by_turn/delta_theta_sq", "by_turn/delta_x_sq")
    # the report's tables show finals only
    table_metrics = {"accuracy", "correction_uplift", "correction_share", "avg_turn", "avg_time_s", "peak_memory_mb"}
    assert table_metrics <= set(metrics.FINALS)
    # a curve is the summary's list under its own name; no other shape is read
    assert report.curve({"accuracy_at_turn_by_turn": [1.0], "per_turn": {"accuracy_at_turn": [1.0]}}, "accuracy_at_turn") == []
    assert report.curve({"delta_x_sq": [None, 2]}, "delta_x_sq")[1] == 2.0


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


def test_a_summary_read_back_from_mlflow_keeps_its_per_problem_outcomes(tmp_path):
    from mlflow import MlflowClient

    from rosa2.tasks import tracking as tr

    base, rosa2 = cells()
    finals, curves = tr.metrics_of(rosa2.summary)
    assert "solved_by_problem" not in finals and "solved_by_problem" not in curves  # no metric, and no crash
    assert finals["semantic_refined"] == 5 and finals["no_answer_rate_pct"] != finals["no_answer_rate_pct"]  # NaN for None
    mc = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mc.create_experiment("s", artifact_location=(tmp_path / "artifacts").as_uri())
    run_ids = []
    for cell in (base, rosa2):
        run_id = mc.create_run(exp).info.run_id
        tr.log_metrics(mc, run_id, cell.summary)
        tr.log_summary_extras(mc, run_id, cell.summary)
        run_ids.append(run_id)
    back = [report.CellSummary(c.model, c.dataset, c.method, c.seed, tr.summary_from_run(mc, mc.get_run(r)))
            for c, r in zip((base, rosa2), run_ids)]
    assert back[1].summary["solved_by_problem"] == {"p1": 1, "p2": 2, "p3": 3, "p4": None}
    assert report.render(back) == report.render([base, rosa2])  # paired gains, rates and warnings survive it
    bare = mc.create_run(exp).info.run_id  # a run logged before the extras existed
    tr.log_metrics(mc, bare, rosa2.summary)
    assert "solved_by_problem" not in tr.summary_from_run(mc, mc.get_run(bare))


def test_counts_read_in_the_right_number():
    from rosa2.report import plural

    assert (plural(1, "cell"), plural(2, "cell"), plural(0, "turn")) == ("1 cell", "2 cells", "0 turns")
