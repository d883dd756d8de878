"""The environment of Algorithm 1: scores y_t (reward ±1) and plays the simulated user.

``reset(problem)`` gives the first message x_1; ``step(response, turn)`` gives (r_t, x_{t+1},
RewardResult). The next message depends on the feedback mode (docs/algorithm.md §4):

* ``none``   — an empty message: the semantic stream must synthesise one;
* ``sparse`` — a fixed "that is not correct, try again" message;
* ``rich``   — the reward's ``error_text`` (code: the failing test or traceback), else sparse.

The simulated user never reveals the reference answer: rich text that contains the gold answer of
a math or choice problem is replaced by the sparse message.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

from rosa2.config import FEEDBACK_MODES, RewardConfig, SandboxConfig, _check_choice
from rosa2.errors import Rosa2Error
from rosa2.records import Problem, RewardResult

SPARSE_MESSAGE = "That is not correct. Please try again."

Scorer = Callable[[str], RewardResult]


class Step(NamedTuple):
    reward: float  # +1 accepted, -1 rejected
    message: str  # x_{t+1}, "" when solved or feedback='none'
    result: RewardResult


class Environment:
    """Base environment: subclasses say how a problem's answers are scored (``scorer``)."""

    name = "environment"

    def __init__(self, feedback: str = "sparse") -> None:
        _check_choice("feedback", feedback, FEEDBACK_MODES)
        self.feedback = feedback
        self.problem: Problem | None = None
        self._score: Scorer | None = None

    def scorer(self, problem: Problem) -> Scorer:
        raise NotImplementedError

    def reset(self, problem: Problem) -> str:
        """Start a problem; return the first user message x_1."""
        self.problem = problem
        self._score = self.scorer(problem)
        return problem.prompt

    def step(self, response: str, turn: int) -> Step:
        """Score y_t; on failure say x_{t+1} as the feedback mode dictates."""
        if self._score is None or self.problem is None:
            raise Rosa2Error("environment.step was called before reset(problem)")
        result = self._score(response)
        reward = 1.0 if result.reward > 0 else -1.0
        return Step(reward, "" if reward > 0 else self.next_message(result), result)

    def next_message(self, result: RewardResult) -> str:
        if self.feedback == "none":
            return ""
        text = result.error_text.strip() if self.feedback == "rich" else ""
        if not text or self._reveals_gold(text):
            return SPARSE_MESSAGE
        return text

    def _reveals_gold(self, text: str) -> bool:
        assert self.problem is not None
        gold = normalise(self.problem.answer or "")
        # code feedback is test output by design, and it is what `rich` exists to pass on
        if self.problem.domain == "code" or not gold:
            return False
        return re.search(rf"(?<![\w]){re.escape(gold)}(?![\w])", text.lower()) is not None


# ---------------------------------------------------------------------------------------------
# Exact match: the self-contained environment for tests and for the CLI without rosa2.rewards

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:/\d+)?")


def normalise(text: str) -> str:
    return re.sub(r"[\s$]|\\[,!;]|\.$", "", text).lower().replace("\\left", "").replace("\\right", "")


def extract_answer(response: str) -> str:
    """The last ``\\boxed{...}``, else the last number, else the whole stripped response."""
    boxed = _BOXED.findall(response)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(response)
    if numbers:
        return numbers[-1].replace(",", "")
    return response.strip()


def exact_match(problem: Problem) -> Scorer:
    """Score a response by normalised string equality of its extracted answer with the gold."""
    if problem.answer is None:
        raise Rosa2Error(f"problem {problem.id!r} has no answer; exact match needs one")
    gold = problem.answer.strip()

    def score(response: str) -> RewardResult:
        prediction = extract_answer(response)
        ok = normalise(prediction) == normalise(gold)
        return RewardResult(reward=1.0 if ok else -1.0, prediction=prediction, gold=gold, outcome="exact-match")

    return score


class ExactMatchEnvironment(Environment):
    name = "exact match"

    def scorer(self, problem: Problem) -> Scorer:
        return exact_match(problem)


class RewardEnvironment(Environment):
    """Scores with ``rosa2.rewards.reward_for`` (math-verify, choice letters, the code sandbox)."""

    name = "rosa2.rewards"

    def __init__(self, feedback: str = "sparse", sandbox: SandboxConfig | None = None, reward: RewardConfig | None = None) -> None:
        super().__init__(feedback)
        self.sandbox = sandbox
        self.reward = reward

    def scorer(self, problem: Problem) -> Scorer:
        from rosa2.rewards import reward_for

        return reward_for(problem, self.sandbox, self.reward).score


def rewards_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("rosa2.rewards") is not None


def environment_for(
    problem: Problem,
    feedback: str = "sparse",
    sandbox_cfg: SandboxConfig | None = None,
    reward: RewardConfig | None = None,
) -> Environment:
    """The environment the platform uses for ``problem``: ``rosa2.rewards`` scoring (part of the
    package, so scores never silently fall back to exact match)."""
    if rewards_available():
        return RewardEnvironment(feedback, sandbox_cfg, reward)
    raise Rosa2Error(f"scoring {problem.domain!r} problems needs rosa2.rewards, which is not available")


def as_dict(result: RewardResult) -> dict[str, Any]:
    """The reward fields a turn record keeps in ``detail`` (gold logged, never shown to the model)."""
    return {"gold": result.gold, "outcome": result.outcome, "scored": result.scored, **result.detail}


# why a turn scored as it did (TurnRecord.answer_status), whatever the domain
ANSWER_STATUSES = ("correct", "wrong", "no_answer", "truncated")
_NO_ANSWER = {"no_answer", "truncated", "empty", "syntax_error"}


def answer_status(result: RewardResult, hit_budget: bool) -> str:
    """correct | wrong | no_answer | truncated for one scored turn.

    ``truncated``: no answer could be read and the reply used its whole token budget (the answer
    was cut off, the knob is max_new_tokens); ``no_answer``: no answer although the reply ended on
    its own; ``wrong``: an answer (any outcome of a judged answer: wrong, failed tests, a timeout)."""
    if result.reward > 0:
        return "correct"
    if result.outcome in _NO_ANSWER:
        return "truncated" if hit_budget or result.outcome == "truncated" else "no_answer"
    return "wrong"
