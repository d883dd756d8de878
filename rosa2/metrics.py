"""Metrics over session results (docs/metrics.md): pure functions of ``list[ProblemResult]``.

Problems with ``scored=False`` (gold unparseable, infrastructure failure) are excluded from every
metric and counted in ``excluded``. ``None`` stands for "undefined" (e.g. the uplift when no
problem failed at turn 1, a rate whose denominator is 0); trackers turn it into NaN.

Besides the paper's metrics, a summary says whether each arm did what its name says (issue 13):
how the words stream's refinements went (refined / copied / empty / truncated), how often a
rejected answer changed at the next turn, and how many turns had no answer to score.
:func:`warnings` turns those counts into one-line warnings naming the cause and the knob.
Comparisons between methods are paired over problems (:func:`paired_gain`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Callable, Iterable, Mapping

from rosa2.records import ProblemResult, TurnRecord

# per-turn means: name -> (value of a record, whether the record counts)
PER_TURN: dict[str, tuple[Callable[[TurnRecord], float], Callable[[TurnRecord], bool]]] = {
    # ‖Δθ‖² and ‖Δx‖² average over the turns where the stream ran (ROSA2 Figure 3's dynamics),
    # not over turns that ended the session
    "delta_theta_sq": (lambda r: r.delta_theta_sq, lambda r: r.weights_on),
    # ‖Δx‖² only where a refined x* entered the history: a fallback keeps the raw message (NaN)
    "delta_x_sq": (lambda r: r.delta_x_sq, lambda r: semantic_class(r) == "refined" and not math.isnan(r.delta_x_sq)),
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
    """Of the problems failed at turn 1, the share solved by turn K (seed Eq. 19); None if none failed.

    Eq. 19 bounds Acc@K from below (Acc@K ≥ uplift · (1 − Acc@1)); the paper's Table 2 numbers do
    not satisfy it, see :func:`correction_share`."""
    failed_first = [r for r in results if not solved_by(r, 1)]
    return _mean(float(solved_by(r, max_turns)) for r in failed_first)


def correction_share(results: list[ProblemResult], max_turns: int) -> float | None:
    """Of the problems solved by turn K, the share that failed turn 1 (the reading of the paper's
    Table 2 caption, which fits its numbers: 70 % uplift at 50 % accuracy); None if none was solved."""
    solved = [r for r in results if solved_by(r, max_turns)]
    return _mean(float(not solved_by(r, 1)) for r in solved)


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


# --- did the arm do what its name says ----------------------------------------------------------

SEMANTIC_CLASSES = ("refined", "copied", "empty", "truncated")
NO_ANSWER = ("no_answer", "truncated")  # answer_status values that mean "nothing to score"


def semantic_class(record: TurnRecord) -> str:
    """What the words stream's reply after this turn was; "" when the stream did not run.

    Records written before refinements were classified carry only ``semantic_fallback``: a
    refinement then, and ``unclassified`` for a fallback whose cause was not recorded."""
    if not record.words_on:
        return ""
    return record.semantic_class or ("unclassified" if record.semantic_fallback else "refined")


def semantic_counts(results: list[ProblemResult]) -> dict[str, Any]:
    """Counts and rates of the words stream's refinements over words-on turns."""
    classes = [semantic_class(t) for r in results for t in r.turns if t.words_on]
    total, refined = len(classes), classes.count("refined")
    return {
        "semantic_refinements": total,
        "semantic_refined": refined,
        **{f"semantic_{name}": classes.count(name) for name in SEMANTIC_CLASSES[1:]},
        "semantic_unclassified": classes.count("unclassified"),
        "semantic_refined_rate": _rate(refined, total),
        "semantic_fallback_rate": _rate(total - refined, total),  # everything that did not enter H as x*
        "semantic_truncated_rate": _rate(classes.count("truncated"), total),
    }


def answer_key(record: TurnRecord) -> str:
    """What "the same answer" means: the extracted answer when there is one, else the reply text."""
    return record.prediction.strip() if record.prediction is not None else record.response.strip()


def answer_counts(results: list[ProblemResult]) -> dict[str, Any]:
    """How answers moved after a rejection, and how many turns could not be scored."""
    rejected = changed = 0
    for r in results:
        for before, after in zip(r.turns, r.turns[1:]):
            if before.reward < 0:
                rejected += 1
                changed += answer_key(before) != answer_key(after)
    statuses = [t.answer_status for r in results for t in r.turns if t.answer_status]
    no_answer = sum(s in NO_ANSWER for s in statuses)
    return {
        "answer_change_turns": rejected,  # rejected turns that have a next turn
        "answer_changed": changed,
        "answer_change_rate": _rate(changed, rejected),
        "scored_turns": len(statuses),  # turns with an answer_status
        "no_answer_turns": no_answer,  # no_answer or truncated
        "truncated_turns": statuses.count("truncated"),
        "no_answer_rate": _rate(no_answer, len(statuses)),
        "truncated_rate": _rate(statuses.count("truncated"), len(statuses)),
    }


def solved_by_problem(results: list[ProblemResult], max_turns: int) -> dict[str, int | None]:
    """``{problem_id: turn solved (≤ K) or None}`` over scored problems: what paired comparisons need."""
    return {r.problem_id: r.turn_solved if solved_by(r, max_turns) else None for r in results if r.scored}


# --- paired comparisons (the same problems under two methods) ------------------------------------

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class PairedGain:
    """Accuracy@K of a method minus that of a baseline on the problems both ran."""

    gain: float  # mean over problems of (method − baseline), in [−1, 1]
    low: float  # 95 % paired-bootstrap interval of the gain
    high: float
    won: int  # problems the method solved (more often) and the baseline did not
    lost: int
    tied: int
    problems: int  # problems in both


def paired_gain_of(
    method: Mapping[str, float], baseline: Mapping[str, float],
    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
) -> PairedGain | None:
    """The paired gain from per-problem outcomes in [0, 1] (1 = solved by K; a mean over seeds
    when several ran), matched by problem id; None when no problem is in both.

    The interval resamples problems with replacement (percentile bootstrap, fixed seed)."""
    import numpy as np

    common = sorted(set(method) & set(baseline))
    if not common:
        return None
    diffs = np.array([float(method[p]) - float(baseline[p]) for p in common])
    means = diffs[np.random.default_rng(seed).integers(0, len(diffs), (resamples, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedGain(
        float(diffs.mean()), float(low), float(high),
        int((diffs > 0).sum()), int((diffs < 0).sum()), int((diffs == 0).sum()), len(common),
    )


def paired_gain(
    method: list[ProblemResult], baseline: list[ProblemResult], max_turns: int | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
) -> PairedGain | None:
    """Gain of Accuracy@K of ``method`` over ``baseline`` on the same problems (matched by
    ``problem_id``; unscored problems left out), with a paired-bootstrap 95 % interval and the
    problems won / lost / tied. K defaults to the larger T_max of the two."""
    k = max_turns or max((r.max_turns for r in [*method, *baseline]), default=1)

    def outcomes(results: list[ProblemResult]) -> dict[str, float]:
        return {pid: float(turn is not None) for pid, turn in solved_by_problem(results, k).items()}

    return paired_gain_of(outcomes(method), outcomes(baseline), resamples, seed)




def per_turn_means(results: list[ProblemResult], max_turns: int) -> dict[str, list[float | None]]:
    """For each PER_TURN quantity, a list over turns 1..K of its mean over the records that count."""
    records = [t for r in results for t in r.turns]
    return {
        name: [_mean(value(t) for t in records if t.turn == k and counts(t)) for k in range(1, max_turns + 1)]
        for name, (value, counts) in PER_TURN.items()
    }


# The headline scalars and per-turn curves of a summary (:func:`summarize`), the one list of them:
# the report's tables and plots read them, rosa2.tasks.tracking logs them under their MLflow
# names (``accuracy_pct``, ``by_turn/accuracy_pct``) and shows them as the runs table's columns.
# A curve is a list over turns 1..K (None at a turn with nothing to average), never another shape.
FINALS = (
    "accuracy", "correction_uplift", "correction_share", "avg_turn", "avg_turn_with_failures", "avg_time_s",
    "peak_memory_mb",
)
CURVES = ("accuracy_at_turn", "delta_theta_sq", "delta_x_sq")


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
        "correction_uplift": correction_uplift(scored, k),  # Eq. 19
        "correction_share": correction_share(scored, k),  # Table 2's caption
        "avg_turn": _mean(r.turn_solved for r in solved),  # type: ignore[misc]
        "avg_turn_with_failures": _mean(r.turn_solved if solved_by(r, k) else k for r in scored),  # type: ignore[misc]
        "avg_time_s": _mean(r.seconds for r in scored),
        "peak_memory_mb": max(r.peak_memory_bytes for r in scored) / 2**20 if scored else None,
        **semantic_counts(scored),
        **answer_counts(scored),
        **per_turn_means(scored, k),
        # not a metric (MLflow skips it; rosa2.tasks.tracking keeps it beside the run): paired comparisons
        "solved_by_problem": solved_by_problem(scored, k),
    }


# names of a method whose words stream did nothing, for the warning
_WITHOUT_WORDS = {"textgrad": "baseline", "rosa2": "rosa"}


def warnings(summary: dict[str, Any], method: str | None = None) -> list[str]:
    """One-line warnings about a cell whose numbers do not mean what its name says: the words
    stream fell back on more than half its refinements, or more than half the scored turns had no
    answer (cut by the token budget, or no answer in the expected form). Each names the knob."""
    out = []
    total, refined = int(summary.get("semantic_refinements") or 0), int(summary.get("semantic_refined") or 0)
    if total and total - refined > total / 2:
        causes = ", ".join(
            f"{name} {int(summary.get(f'semantic_{name}') or 0)}" for name in (*SEMANTIC_CLASSES[1:], "unclassified")
            if summary.get(f"semantic_{name}")
        )
        base = (method or "").split("@")[0]
        effect = (
            f"in effect this {method} cell is {_WITHOUT_WORDS[base]}" if base in _WITHOUT_WORDS
            else "in effect this cell ran without its words stream"
        )
        fell = total - refined
        if int(summary.get("semantic_truncated") or 0) > fell / 2:
            knob = ("the critic's replies were cut before the closing tag, by their budget (--semantic-update-tokens) or "
                    "where they began to repeat themselves (--semantic-loop-tokens) — when they ramble or loop (turn detail "
                    "critic_reply), use a stronger --semantic-critic, else raise the budget")
        else:
            knob = "the critic cannot write feedback — use a stronger --semantic-critic"
        out.append(f"words stream fell back on {fell} of {total} refinements ({causes}): {knob}; {effect}")
    scored, missing = int(summary.get("scored_turns") or 0), int(summary.get("no_answer_turns") or 0)
    truncated = int(summary.get("truncated_turns") or 0)
    if scored and missing > scored / 2:
        if truncated > missing / 2:
            out.append(f"answers cut before the answer on {truncated} of {scored} turns: raise --max-new-tokens")
        else:
            out.append(
                f"no answer found on {missing} of {scored} turns ({truncated} of them cut by the token budget): the "
                "replies lack the answer form the reward reads — check reward.extraction ('paper' reads only the "
                "last \\boxed{}) and the prompt"
            )
    return out
