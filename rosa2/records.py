"""What a session produces: one record per turn, one result per problem (plain, JSON-able).

The session engine writes these, metrics read them, the platform logs them as JSONL artifacts and
tables. Keep them flat so a JSONL line round-trips with ``asdict`` / ``from_dict``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any


def digest(payload: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-able payload (sorted keys; anything else by its str): the one
    hash behind dataset fingerprints, problem and cell keys and snapshot names."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass
class TurnRecord:
    turn: int  # 1-based
    reward: float  # +1 accepted, -1 rejected
    response: str  # y_t
    message: str  # the user message the model answered at this turn (x_t, after refinement)
    feedback: str  # x_{t+1}: the simulated user's raw next message ("" when feedback=none or solved)
    refined_feedback: str  # x*_{t+1}: what entered the history (== feedback when words are off)
    words_on: bool  # semantic stream ran after this turn
    weights_on: bool  # parametric stream ran after this turn
    delta_theta_sq: float  # ‖Δθ‖² of the update made after this turn (0 when none)
    delta_x_sq: float  # ‖Δx‖² between feedback and refined_feedback (0 when words are off, NaN when not refined)
    semantic_fallback: bool  # words ran but the reply was not a refinement (semantic_class != refined): raw message kept
    tokens: int  # tokens generated for y_t
    seconds_generate: float
    seconds_parametric: float
    seconds_semantic: float
    seconds_reward: float
    peak_memory_bytes: int  # CUDA: peak allocated; CPU: peak RSS of the process
    prediction: str | None = None  # extracted answer, when the reward extracts one
    detail: dict[str, Any] = field(default_factory=dict)  # reward detail (gold, outcome, tests...)
    # what the words stream's reply was (rosa2.semantic.CLASSES): refined | copied | empty | truncated;
    # "" when it did not run. Only a refined reply entered the history as x*.
    semantic_class: str = ""
    # why the turn scored as it did: correct | wrong | no_answer | truncated (no answer and the reply
    # hit the token budget) — the reward's own outcome stays in detail["outcome"]
    answer_status: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TurnRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class ProblemResult:
    """One session: its turns, and what follows from them (``solved``, ``turn_solved``,
    ``turns_used``, ``peak_memory_bytes`` are read off the turns, so they cannot disagree)."""

    problem_id: str
    method: str
    # compute time this problem cost: over its turns, its share of every batched phase (generation,
    # critic, update: a batch's wall time divided among its rows) plus its own reward time. The
    # problems of a run add up to the run's time; for a batch of one it is the session's time.
    seconds: float
    max_turns: int
    scored: bool = True  # False when the gold answer did not parse: excluded from metrics
    turns: list[TurnRecord] = field(default_factory=list)
    wall_seconds: float = 0.0  # wall time from joining the batch to leaving it (sessions beside it overlap)

    @property
    def turn_solved(self) -> int | None:
        """1-based turn of the first accepted answer, None when never solved."""
        return next((r.turn for r in self.turns if r.reward > 0), None)

    @property
    def solved(self) -> bool:
        return self.turn_solved is not None

    @property
    def turns_used(self) -> int:
        return len(self.turns)

    @property
    def peak_memory_bytes(self) -> int:
        return max((r.peak_memory_bytes for r in self.turns), default=0)

    def to_dict(self) -> dict[str, Any]:
        """The fields and, for readers of the JSONL, the derived values."""
        derived = {"solved": self.solved, "turn_solved": self.turn_solved, "turns_used": self.turns_used,
                   "peak_memory_bytes": self.peak_memory_bytes}
        return {**asdict(self), **derived}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProblemResult":
        data = dict(data)
        turns = [TurnRecord.from_dict(t) for t in data.pop("turns", [])]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names}, turns=turns)


@dataclass
class Problem:
    """One benchmark item, whatever the dataset (docs/architecture.md)."""

    id: str
    prompt: str  # the first user message x_1, already formatted for the domain
    domain: str  # "math" | "choice" | "code"
    answer: str | None = None  # gold answer (math: LaTeX/number; choice: the letter)
    tests: str | None = None  # code: test source (HumanEval `check(candidate)` style)
    entry_point: str | None = None  # code: the function the tests call
    metadata: dict[str, Any] = field(default_factory=dict)  # dataset, subject, level, choices, source row...


@dataclass
class RewardResult:
    """A scored answer: ±1 and what the simulated user may say next (never the gold answer)."""

    reward: float  # +1.0 or -1.0
    prediction: str | None = None  # the extracted answer (math: boxed; choice: letter; code: None)
    gold: str | None = None  # the parsed gold (logged, never shown to the model)
    scored: bool = True  # False: gold unparseable or infrastructure failure -> excluded from metrics
    outcome: str = ""  # code: passed | failed | error | timeout | oom | syntax_error | sandbox_error
    error_text: str = ""  # what `rich` feedback hands to the next turn (failing test, traceback)
    detail: dict[str, Any] = field(default_factory=dict)
