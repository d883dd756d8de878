"""Every turn of every session as an MLflow trace, one MLflow session per (cell, problem).

Built after the fact, when a cell is logged, from the recorded :class:`ProblemResult` /
:class:`TurnRecord` (``results.jsonl`` stays the portable record), so the session engines never
touch MLflow. One trace per turn, its metadata ``mlflow.trace.session`` = :func:`session_id` (the
experiment's Sessions view replays each problem's conversation) and ``mlflow.sourceRun`` = the
cell's run (its Traces tab lists them)::

    turn t                 inputs: x_t (as a chat message)   outputs: y_t (as a chat reply)
    ├── generate  (LLM)        y_t, tokens generated (mlflow.chat.tokenUsage)
    ├── reward    (EVALUATOR)  reward ±1, the extracted answer, why it scored so, the gold
    ├── semantic  (LLM)        when the words stream ran: x_{t+1} → critique → x*_{t+1}, ‖Δx‖²
    └── parametric (TASK)      when the weights stream ran: ‖Δθ‖²

Each turn also carries MLflow feedback assessments, the chips under the turn in the Sessions view:
``reward`` (±1; rationale: why it scored so), ``delta_theta_sq`` when θ moved, ``critique`` when
the words stream ran (rationale: x*_{t+1}, which is the next turn's user message). The reward,
answer status and ‖Δθ‖² are trace tags too (columns of the Traces view). Times are
the recorded seconds of each phase, laid back to back in the order the engines run them; a
problem's first turn starts at the cell run's start time (after the previous problem's end when
the cell ran its sessions one at a time), since the records keep durations, not clock times.
"""

from __future__ import annotations

import math
from typing import Any

from rosa2.records import ProblemResult, TurnRecord
from rosa2.tasks.tracking import TrackingError

SESSION = "mlflow.trace.session"
SOURCE_RUN = "mlflow.sourceRun"
PHASES = ("generate", "reward", "semantic", "parametric")  # as rosa2.session runs them within a turn


class TraceUploadError(TrackingError):
    """Fewer traces reached the server than turns were recorded (the cell stays incomplete; a rerun uploads them again)."""


def session_id(method: str, problem_id: str, cell_key: str) -> str:
    """One conversation: ``rosa2 · embedded-choice/3 · 1a2b3c4d`` (method, problem, start of the cell key)."""
    return f"{method} · {problem_id} · {cell_key[:8]}"


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def _phase_io(turn: TurnRecord) -> dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """Per phase that ran: (inputs, outputs, attributes)."""
    detail = turn.detail or {}
    phases = {
        "generate": (
            {"message": turn.message},
            {"response": turn.response},
            {"tokens": turn.tokens, "mlflow.chat.tokenUsage": {"output_tokens": turn.tokens, "total_tokens": turn.tokens}},
        ),
        "reward": (
            {"response": turn.response},
            {"reward": turn.reward, "prediction": turn.prediction, "answer_status": turn.answer_status,
             "gold": detail.get("gold")},
            {"outcome": detail.get("outcome", "")},
        ),
    }
    if turn.words_on:
        phases["semantic"] = (
            {"feedback": turn.feedback},
            {"critique": detail.get("critique"), "refined_feedback": turn.refined_feedback, "class": turn.semantic_class},
            {"delta_x_sq": _number(turn.delta_x_sq), "semantic_fallback": turn.semantic_fallback,
             "critic_reply": detail.get("critic_reply")},
        )
    if turn.weights_on:
        phases["parametric"] = ({"reward": turn.reward}, {"delta_theta_sq": turn.delta_theta_sq}, {"delta_theta_sq": turn.delta_theta_sq})
    return phases


SPAN_TYPES = {"generate": "LLM", "reward": "EVALUATOR", "semantic": "LLM", "parametric": "TASK"}


def _seconds(turn: TurnRecord, phase: str) -> float:
    return float(getattr(turn, f"seconds_{phase}"))


def log_turn(experiment_id: str, run_id: str, session: str, method: str, result: ProblemResult, turn: TurnRecord,
             start_ns: int) -> tuple[str, int]:
    """Log one turn's trace starting at ``start_ns``; returns (trace id, its end in ns)."""
    import mlflow

    phases = _phase_io(turn)
    end_ns = start_ns + sum(_ns(_seconds(turn, p)) for p in PHASES)
    tags = {
        "rosa2.method": method, "rosa2.problem_id": result.problem_id, "rosa2.turn": str(turn.turn),
        "rosa2.reward": f"{turn.reward:+g}", "rosa2.answer_status": turn.answer_status or "-",
        "rosa2.delta_theta_sq": f"{turn.delta_theta_sq:.4g}",
    }
    root = mlflow.start_span_no_context(
        f"turn {turn.turn}", span_type="CHAT_MODEL", experiment_id=experiment_id, start_time_ns=start_ns,
        inputs={"messages": [{"role": "user", "content": turn.message}]},
        attributes={"turn": turn.turn, "max_turns": result.max_turns, "problem_id": result.problem_id},
        tags=tags, metadata={SESSION: session, SOURCE_RUN: run_id},
    )
    at = start_ns
    for phase in PHASES:
        if phase not in phases:
            continue
        inputs, outputs, attributes = phases[phase]
        span = mlflow.start_span_no_context(
            phase, span_type=SPAN_TYPES[phase], parent_span=root, inputs=inputs, attributes=attributes, start_time_ns=at,
        )
        at += _ns(_seconds(turn, phase))
        span.end(outputs=outputs, end_time_ns=at)
    root.end(
        outputs={"choices": [{"index": 0, "message": {"role": "assistant", "content": turn.response}}]},
        attributes={"reward": turn.reward, "answer_status": turn.answer_status, "delta_theta_sq": turn.delta_theta_sq,
                    "next_message": turn.refined_feedback},
        end_time_ns=end_ns,
    )
    return root.trace_id, end_ns


def log_assessments(trace_id: str, turn: TurnRecord) -> None:
    """The turn's reward, ‖Δθ‖² and critique as feedback on its (already uploaded) trace."""
    import mlflow
    from mlflow.entities import AssessmentSource

    def source(name: str, kind: str = "CODE") -> Any:
        return AssessmentSource(source_type=kind, source_id=name)

    why = turn.answer_status or "scored"
    if turn.prediction is not None:
        why += f": answer {turn.prediction}"
    mlflow.log_feedback(trace_id=trace_id, name="reward", value=turn.reward, source=source("rosa2 reward"), rationale=why)
    if turn.weights_on:
        mlflow.log_feedback(trace_id=trace_id, name="delta_theta_sq", value=turn.delta_theta_sq, source=source("rosa2 parametric stream"))
    if turn.words_on:
        critique = (turn.detail or {}).get("critique") or f"({turn.semantic_class or 'no critique'})"
        mlflow.log_feedback(
            trace_id=trace_id, name="critique", value=str(critique), source=source("rosa2 semantic stream", "LLM_JUDGE"),
            rationale=f"x*: {turn.refined_feedback}", metadata={"class": turn.semantic_class, "raw_feedback": turn.feedback},
        )


def run_traces(mc: Any, experiment_id: str, run_id: str) -> list[Any]:
    """The traces of a cell run (metadata only, every page)."""
    found, token = [], None
    while True:
        page = mc.search_traces(locations=[experiment_id], run_id=run_id, include_spans=False, max_results=500, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def log_session_traces(mc: Any, run_id: str, cell_key: str, results: list[ProblemResult], sequential: bool) -> int:
    """Every turn of ``results`` as a trace of ``run_id`` (those of an earlier, partial upload of
    the same run are replaced). Returns the number of traces; raises :class:`TraceUploadError` when
    the server does not hold them all afterwards."""
    import mlflow

    run = mc.get_run(run_id)
    experiment_id = run.info.experiment_id
    old = [t.info.trace_id for t in run_traces(mc, experiment_id, run_id)]
    for start in range(0, len(old), 100):
        mc.delete_traces(experiment_id, trace_ids=old[start:start + 100])
    at = run.info.start_time * 1_000_000
    logged_turns = []
    for result in results:
        session = session_id(result.method, result.problem_id, cell_key)
        end = at
        for turn in result.turns:
            trace_id, end = log_turn(experiment_id, run_id, session, result.method, result, turn, end)
            logged_turns.append((trace_id, turn))
        if sequential:
            at = end
    mlflow.flush_trace_async_logging()  # assessments need their trace on the server
    for trace_id, turn in logged_turns:
        log_assessments(trace_id, turn)
    expected = sum(len(r.turns) for r in results)
    logged = len(run_traces(mc, experiment_id, run_id))
    if logged != expected:
        raise TraceUploadError(
            f"{logged} of {expected} turn traces reached MLflow for run {run_id} (see MLflow's warnings above); "
            "run the same command again to upload them (nothing is recomputed)"
        )
    return expected
