"""What a person reads in MLflow's own views: one trace per turn grouped into a session per
(cell, problem), read back from the real server by session id; the runs table's metric names,
units, source tags and description; report plots with integer turn ticks that keep equal lines apart."""

from __future__ import annotations

import dataclasses
import math
import subprocess
from pathlib import Path

import pytest

from rosa2 import report
from rosa2.metrics import summarize
from rosa2.records import ProblemResult, TurnRecord

ROOT = Path(__file__).resolve().parents[1]


def _turn(t: int, reward: float, words: bool = False, weights: bool = False) -> TurnRecord:
    return TurnRecord(
        turn=t, reward=reward, response=f"y{t}", message=f"x{t}", feedback="no", refined_feedback="x*", words_on=words,
        weights_on=weights, delta_theta_sq=0.5 if weights else 0.0, delta_x_sq=0.25 if words else 0.0,
        semantic_fallback=False, tokens=7, seconds_generate=0.4, seconds_parametric=0.3 if weights else 0.0,
        seconds_semantic=0.2 if words else 0.0, seconds_reward=0.1, peak_memory_bytes=2**20,
        semantic_class="refined" if words else "", answer_status="correct" if reward > 0 else "wrong",
    )


def _results() -> list[ProblemResult]:
    return [
        ProblemResult("p1", "rosa2", seconds=1.0, max_turns=3, turns=[_turn(1, -1, True, True), _turn(2, 1)]),
        ProblemResult("p2", "rosa2", seconds=1.0, max_turns=3,
                      turns=[_turn(1, -1, True, True), _turn(2, -1, True, True), _turn(3, -1)]),
    ]


# --- metric names -------------------------------------------------------------------------------


def test_finals_and_curves_have_names_that_cannot_be_mistaken_and_come_back_as_the_summary():
    from rosa2.tasks import tracking as tr

    summary = summarize(_results(), 3)
    finals, curves = tr.metrics_of(summary)
    assert finals["accuracy_pct"] == pytest.approx(50.0) and "accuracy" not in finals
    assert finals["no_answer_rate_pct"] == 0.0 and finals["avg_time_s"] == 1.0 and finals["problems"] == 2
    assert curves["by_turn/accuracy_pct"] == pytest.approx([0.0, 50.0, 50.0])
    assert curves["by_turn/delta_theta_sq"][:2] == pytest.approx([0.5, 0.5])
    assert all(name.startswith(tr.BY_TURN) for name in curves)
    assert not set(finals) & set(curves) and not any(n.startswith(tr.BY_TURN) for n in finals)
    assert set(tr.FINAL_METRICS) <= set(finals) and set(tr.STEP_METRICS) <= set(curves)
    for name, value in finals.items():  # every name maps back to its summary key, in the summary's unit
        key, scale = tr.summary_key(name)
        expected = summary[key]
        assert (math.isnan(value) and expected is None) or value / scale == pytest.approx(expected), name
    for name, values in curves.items():
        key, scale = tr.summary_key(name)
        assert [v / scale for v in values] == pytest.approx([math.nan if v is None else v for v in summary[key]], nan_ok=True)
    # runs logged before the rename read back as they were
    assert tr.summary_key("accuracy") == ("accuracy", 1.0) and tr.summary_key("accuracy_at_turn") == ("accuracy_at_turn", 1.0)


# --- plots --------------------------------------------------------------------------------------


def _cells(accuracy: list[float], theta: list[float | None]) -> list[report.CellSummary]:
    return [
        report.CellSummary("m", "d", method, 0, {"accuracy_at_turn": accuracy, "delta_theta_sq": theta, "delta_x_sq": [None] * len(theta)})
        for method in ("baseline", "textgrad", "rosa", "rosa2")
    ]


def _is_int(value: float) -> bool:
    return float(value).is_integer()


def test_plots_have_integer_turn_ticks_and_equal_lines_stay_apart():
    import matplotlib.pyplot as plt

    fig = report.accuracy_figure(_cells([0.0, 0.0, 0.0], [0.0, 0.0, None]))
    (ax,) = fig.axes
    assert list(ax.get_xticks()) == [1, 2, 3] and all(_is_int(t) for t in ax.get_xticks())
    low, high = ax.get_ylim()
    assert low < 0 <= 100 < high  # all-zero accuracy on a 0-100 % axis, not -0.04..0.04
    lines = ax.get_lines()
    assert len(lines) == 4
    assert len({(line.get_marker(), line.get_linestyle()) for line in lines}) == 4  # equal curves, four looks
    assert len({tuple(line.get_xdata()) for line in lines}) == 4  # and nudged apart
    assert all(round(x) == t for line in lines for t, x in enumerate(line.get_xdata(), 1))  # still on their turn
    plt.close(fig)

    fig = report.dynamics_figure(_cells([0.5], [0.25]))  # one turn: the axis used to read 0.96, 0.98, 1.00...
    theta, words = fig.axes
    assert list(theta.get_xticks()) == [1] and list(words.get_xticks()) == [1]
    assert len(theta.get_lines()) == 4 and not words.get_lines()  # no words stream ran: nothing drawn, no NaN line
    low, high = words.get_ylim()
    assert high - low > 0.5
    plt.close(fig)


# --- against the real MLflow server -------------------------------------------------------------


@pytest.mark.slow
def test_a_cell_is_sessions_of_turn_traces_with_source_tags_units_and_a_description(platform, tiny_dir):
    from rosa2.flows.experiment import experiment
    from rosa2.config import DataConfig, GenerationConfig, ModelConfig, SemanticConfig, SessionConfig
    from rosa2.tasks import traces
    from rosa2.tasks import tracking as tr
    from rosa2.tasks.cells import Cell

    tracking = dataclasses.replace(platform, study="views-test")
    cell = Cell(
        model=ModelConfig(name=str(tiny_dir), device="cpu"), session=SessionConfig(method="rosa2", max_turns=2),
        data=DataConfig(limit=2), generation=GenerationConfig(max_new_tokens=8), semantic=SemanticConfig(max_new_tokens=16),
    )
    outcome = experiment(cell, tracking, None, False)
    mc = tr.client(tracking)
    run = mc.get_run(outcome.run_id)
    exp_id = run.info.experiment_id
    results = tr.download_results(mc, run.info.run_id)
    assert results and all(r.turns for r in results)
    assert any(t.words_on and t.weights_on for r in results for t in r.turns)  # every span kind is exercised

    # every turn is a trace; a problem's turns are one session, found by its id
    for result in results:
        session = traces.session_id(cell.method, result.problem_id, outcome.cell_key)
        found = mc.search_traces(locations=[exp_id], filter_string=f"metadata.`{traces.SESSION}` = '{session}'")
        found = sorted(found, key=lambda t: int(t.info.tags["rosa2.turn"]))
        assert len(found) == len(result.turns), session
        for trace, turn in zip(found, result.turns):
            assert trace.info.trace_metadata[traces.SESSION] == session
            assert trace.info.trace_metadata[traces.SOURCE_RUN] == run.info.run_id
            assert trace.info.tags["rosa2.reward"] == f"{turn.reward:+g}"
            spans = {s.name: s for s in trace.data.spans}
            expected = {f"turn {turn.turn}", "generate", "reward"} | ({"semantic"} if turn.words_on else set()) | (
                {"parametric"} if turn.weights_on else set())
            assert set(spans) == expected
            root = spans[f"turn {turn.turn}"]
            assert root.inputs["messages"][0]["content"] == turn.message
            assert root.outputs["choices"][0]["message"]["content"] == turn.response
            assert spans["generate"].get_attribute("tokens") == turn.tokens
            assert spans["reward"].outputs["reward"] == turn.reward
            if turn.weights_on:
                assert spans["parametric"].outputs["delta_theta_sq"] == pytest.approx(turn.delta_theta_sq)
            if turn.words_on:
                assert spans["semantic"].inputs["feedback"] == turn.feedback
                assert spans["semantic"].outputs["refined_feedback"] == turn.refined_feedback
            # the chips under the turn in the Sessions view: reward, ‖Δθ‖², critique (x* as rationale)
            feedback = {a.name: a for a in trace.info.assessments}
            assert set(feedback) == {"reward"} | ({"delta_theta_sq"} if turn.weights_on else set()) | (
                {"critique"} if turn.words_on else set())
            assert feedback["reward"].value == turn.reward
            if turn.weights_on:
                assert feedback["delta_theta_sq"].value == pytest.approx(turn.delta_theta_sq)
            if turn.words_on:
                assert feedback["critique"].rationale == f"x*: {turn.refined_feedback}"
            # the spans' times are the recorded seconds, back to back
            gen = spans["generate"]
            assert (gen.end_time_ns - gen.start_time_ns) / 1e9 == pytest.approx(turn.seconds_generate, abs=1e-6)
            assert spans["reward"].start_time_ns == gen.end_time_ns
    # uploading the cell again replaces its traces instead of doubling them
    turns = sum(len(r.turns) for r in results)
    assert traces.log_session_traces(mc, run.info.run_id, outcome.cell_key, results, sequential=True) == turns
    assert len(traces.run_traces(mc, exp_id, run.info.run_id)) == turns

    # source tags and the description
    tags = run.data.tags
    commit = tags["mlflow.source.git.commit"]  # the checkout's HEAD when the run started (others may commit since)
    assert len(commit) == 40
    assert subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit, "HEAD"]).returncode == 0
    assert tags[tr.TAG_DIRTY] in ("true", "false")
    assert tags["mlflow.user"] and tags["mlflow.source.name"] and tags[tr.TAG_COMMAND]
    note = tags[tr.TAG_NOTE]
    assert cell.name() in note and "Accuracy@2" in note and "by_turn/" in note

    # metric names: finals as percentages under _pct, curves under by_turn/ stepped by turn
    metrics = run.data.metrics
    recomputed = summarize(results, cell.session.max_turns)
    assert metrics["accuracy_pct"] == pytest.approx(100 * recomputed["accuracy"])
    assert "accuracy" not in metrics and "delta_theta_sq" not in metrics and "accuracy_at_turn" not in metrics
    _, curves = tr.metrics_of(recomputed)
    for name, values in curves.items():  # a point at each turn the curve has a value, none where it has not
        steps = sorted(m.step for m in mc.get_metric_history(run.info.run_id, name))
        assert steps == [t for t, v in enumerate(values, 1) if not math.isnan(v)], name
    assert sorted(m.step for m in mc.get_metric_history(run.info.run_id, "by_turn/accuracy_pct")) == [1, 2]
    assert sorted(m.step for m in mc.get_metric_history(run.info.run_id, "by_turn/delta_theta_sq")) == [1]  # no update after the last turn
    assert [m.step for m in mc.get_metric_history(run.info.run_id, "accuracy_pct")] == [0]
    back = tr.summary_from_run(mc, run)
    def nan(value):  # None (undefined) as NaN, so approx can compare it
        return [nan(v) for v in value] if isinstance(value, list) else math.nan if value is None else value

    for key in ("accuracy", "accuracy_at_turn", "delta_theta_sq", "delta_x_sq", "no_answer_rate", "correction_uplift"):
        # a curve without a single value has no metric in MLflow: it reads back as absent
        got = back[key] if key in back or not isinstance(recomputed[key], list) else [None] * len(recomputed[key])
        assert nan(got) == pytest.approx(nan(recomputed[key]), nan_ok=True), key
