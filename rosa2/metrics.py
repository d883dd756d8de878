"""Metrics over session results (DESIGN §3): pure functions of ``list[ProblemResult]``.

Problems with ``scored=False`` (gold unparseable, infrastructure failure) are excluded from every
metric and counted in ``excluded``. ``None`` stands for "undefined" (e.g. the uplift when no
problem failed at turn 1); trackers turn it into NaN.
"""

from __future__ import annotations

from statistics import fmean
from typing import Any, Callable, Iterable

from rosa2.records import ProblemResult, TurnRecord

# per-turn means: name -> (value of a record, whether the record counts)
PER_TURN: dict[str, tuple[Callable[[TurnRecord], float], Callable[[TurnRecord], bool]]] = {
    # ‖Δθ‖² and ‖Δx‖² average over the turns where the stream ran (ROSA2 Figure 3's dynamics),
    # not over turns that ended the session
    "delta_theta_sq": (lambda r: r.delta_theta_sq, lambda r: r.weights_on),
    "delta_x_sq": (lambda r: r.delta_x_sq, lambda r: r.words_on),
    "reward": (lambda r: r.reward, lambda r: True),
    "tokens": (lambda r: r.tokens, lambda r: True),
    "seconds_generate": (lambda r: r.seconds_generate, lambda r: True),
    "seconds_parametric": (lambda r: r.seconds_parametric, lambda r: True),
    "seconds_semantic": (lambda r: r.seconds_semantic, lambda r: True),
    "seconds_reward": (lambda r: r.seconds_reward, lambda r: True),
    "seconds": (
        lambda r: r.seconds_generate + r.seconds_parametric + r.seconds_semantic + r.seconds_reward,
        lambda r: True,
    ),
}


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return fmean(values) if values else None


def solved_by(result: ProblemResult, turn: int) -> bool:
    return result.turn_solved is not None and result.turn_solved <= turn


def accuracy_at(results: list[ProblemResult], turn: int) -> float | None:
    """Accuracy@turn: solved at any turn ≤ ``turn`` / problems (seed Eq. 18)."""
    return _mean(float(solved_by(r, turn)) for r in results)


def correction_uplift(results: list[ProblemResult], max_turns: int) -> float | None:
    """Of the problems failed at turn 1, the share solved by turn K (seed Eq. 19); None if none failed."""
    failed_first = [r for r in results if not solved_by(r, 1)]
    return _mean(float(solved_by(r, max_turns)) for r in failed_first)


def per_turn_means(results: list[ProblemResult], max_turns: int) -> dict[str, list[float | None]]:
    """For each PER_TURN quantity, a list over turns 1..K of its mean over the records that count."""
    records = [t for r in results for t in r.turns]
    return {
        name: [_mean(value(t) for t in records if t.turn == k and counts(t)) for k in range(1, max_turns + 1)]
        for name, (value, counts) in PER_TURN.items()
    }


def summarize(results: list[ProblemResult], max_turns: int | None = None) -> dict[str, Any]:
    """Every metric of one experiment cell. ``max_turns`` (K) defaults to the results' T_max."""
    scored = [r for r in results if r.scored]
    k = max_turns or max((r.max_turns for r in results), default=1)
    solved = [r for r in scored if solved_by(r, k)]
    return {
        "problems": len(scored),
        "excluded": len(results) - len(scored),
        "max_turns": k,
        "solved": len(solved),
        "accuracy": accuracy_at(scored, k),
        "accuracy_at_turn": [accuracy_at(scored, t) for t in range(1, k + 1)],
        "correction_uplift": correction_uplift(scored, k),
        "avg_turn": _mean(r.turn_solved for r in solved),  # type: ignore[misc]
        "avg_turn_with_failures": _mean(r.turn_solved if solved_by(r, k) else k for r in scored),  # type: ignore[misc]
        "avg_time_s": _mean(r.seconds for r in scored),
        "peak_memory_mb": max(r.peak_memory_bytes for r in scored) / 2**20 if scored else None,
        **per_turn_means(scored, k),
    }
