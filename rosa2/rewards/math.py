"""Math reward: math-verify, ±1, mirroring the paper's ``MathVerifyRewardModel.get_reward``.

The answer is the last ``\\boxed{...}`` of the response (the prompt asks for it). ``extraction``
decides what happens without one: ``paper`` (the paper's ``compute_score``) scores it -1
``no_answer``; ``flexible`` accepts the anchored forms math-verify understands ("the final answer
is $x$", "Answer: x"), which suits small models and demos but scores higher than the paper would. The
gold is parsed once (in a worker) and its parsed form travels pickled with every check, and both
parses and comparisons run in worker processes (``rosa2.rewards.pool``) so math-verify's SIGALRM
timeouts work from any thread, with an outer wall-clock kill for hangs that no alarm interrupts.

Outcomes (``RewardResult.outcome``): ``correct`` (+1); ``wrong``, ``no_answer``, ``truncated``,
``empty``, ``timeout`` (all -1); ``gold_unparseable`` and ``error`` (a worker failed: infrastructure)
with ``scored=False``: excluded from metrics, never counted as solved. ``error_text`` (what ``rich``
feedback passes on) says what was wrong with the form of the answer, never anything of the gold.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from typing import Any, Sequence

from rosa2.config import EXTRACTIONS, _check_choice
from rosa2.errors import Rosa2Error
from rosa2.records import Problem, RewardResult
from rosa2.rewards.pool import Job, WorkerPool, shared_pool

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_log = logging.getLogger(__name__)

# what the simulated user may say about the form of an answer (``rich`` feedback)
FORM_FEEDBACK = {
    "empty": "Your reply was empty. Solve the problem and put the final answer within \\boxed{}.",
    "truncated": "Your reply was cut off before the final \\boxed{} answer was closed. Be more concise.",
    "no_answer": "Your reply has no final answer in \\boxed{}. Put the final answer within \\boxed{}.",
}


def last_boxed(text: str) -> tuple[str | None, bool]:
    """(content of the last ``\\boxed{...}``, whether a last ``\\boxed{`` was left unclosed)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None, False
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i], False
    return None, True


# ---------------------------------------------------------------------------------------------
# What runs inside a worker (main thread): math-verify with its own alarms, plus a note of them.


class _TimeoutNotes(logging.Handler):
    """math-verify swallows its alarm (it logs a warning and returns no match); we want to know."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Timeout" in record.getMessage():
            self.count += 1


_notes: _TimeoutNotes | None = None


def _timeouts_seen() -> _TimeoutNotes:
    global _notes
    if _notes is None:
        _notes = _TimeoutNotes()
        logger = logging.getLogger("math_verify")
        logger.addHandler(_notes)
        logger.propagate = False  # the notes replace math-verify's stderr chatter in workers
    return _notes


def _configs(anchored_only: bool) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [
        LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=not anchored_only),
        ExprExtractionConfig(try_extract_without_anchor=not anchored_only),
    ]


def warm_up() -> None:
    """Import math-verify (sympy, the LaTeX grammar) once per worker, before the first job."""
    from math_verify import parse

    parse("$\\frac{1}{2}$", _configs(False))


def parse_gold(gold: str, parse_timeout_s: int) -> tuple[bytes, str] | None:
    """Parse a gold answer; returns (its pickled parse, a readable form) or None when it does not parse."""
    from math_verify import parse

    text = gold if _BOXED.search(gold) else f"\\boxed{{{gold}}}"
    parsed = parse(text, _configs(False), parsing_timeout=parse_timeout_s or None)
    if not parsed:
        return None
    return pickle.dumps(parsed), str(parsed[0])


def judge(gold_blob: bytes, answer: str, anchored_only: bool, parse_timeout_s: int, verify_timeout_s: int) -> dict[str, Any]:
    """Parse ``answer`` and compare it with the pickled gold: {'correct', 'parsed', 'timeout'}."""
    from math_verify import parse, verify

    notes = _timeouts_seen()
    before = notes.count
    parsed = parse(answer, _configs(anchored_only), parsing_timeout=parse_timeout_s or None)
    correct = bool(parsed) and verify(pickle.loads(gold_blob), parsed, timeout_seconds=verify_timeout_s or None)
    return {
        "correct": correct,
        "parsed": str(parsed[0]) if parsed else None,
        "matched": parsed[-1] if parsed and isinstance(parsed[-1], str) else None,
        "timeout": notes.count > before,
    }


_WARMUP = ("rosa2.rewards.math:warm_up",)


def verifier_pool() -> WorkerPool:
    """The process-wide pool of math-verify workers (started on first use, shared by all rewards)."""
    return shared_pool(_WARMUP)


# ---------------------------------------------------------------------------------------------
# The parent side


@dataclass(frozen=True)
class MathLimits:
    parse_timeout_s: int = 5  # math-verify's own alarm per parse (0: off; the outer kill still holds)
    verify_timeout_s: int = 5  # math-verify's own alarm per comparison (0: off)
    wall_timeout_s: float = 30.0  # outer kill of the worker, whatever it is doing

    def __post_init__(self) -> None:
        if self.parse_timeout_s < 0 or self.verify_timeout_s < 0 or not self.wall_timeout_s > 0:
            raise Rosa2Error(f"math reward limits {self} must be >= 0 (alarms) and > 0 (wall clock)")


class MathVerifyRewardModel:
    """The paper's math reward: ``get_reward(response) -> +1.0`` when math-verify finds the
    response's final answer equal to the gold, else ``-1.0`` (the reward r_t that enters the target
    policy π* ∝ π·exp(r/β) of the parametric stream). ``score`` returns the full RewardResult."""

    def __init__(
        self, gold: str, limits: MathLimits | None = None, pool: WorkerPool | None = None, *, extraction: str = "flexible"
    ) -> None:
        _check_choice("extraction", extraction, EXTRACTIONS)  # RewardConfig's own check
        self.gold = gold
        self.extraction = extraction
        self.limits = limits or MathLimits()
        self.pool = pool or verifier_pool()
        self._gold_parse: tuple[bytes, str] | str | None = None  # (pickled parse, readable) or why it failed

    def get_reward(self, response: str) -> float:
        return self.score(response).reward

    def score(self, response: str) -> RewardResult:
        return self.score_many([response])[0]

    def score_many(self, responses: Sequence[str]) -> list[RewardResult]:
        """Score many responses to this problem at once, spread over the worker pool."""
        gold = self._parsed_gold()
        if isinstance(gold, str):
            return [self._result(-1.0, None, "gold_unparseable", gold, scored=False) for _ in responses]
        results: list[RewardResult | None] = []
        jobs, slots = [], []
        for response in responses:
            answer, early = self._extract(response or "")
            results.append(early)
            if early is None:
                jobs.append(Job("rosa2.rewards.math:judge", (gold[0], answer[0], answer[1],
                                self.limits.parse_timeout_s, self.limits.verify_timeout_s), self.limits.wall_timeout_s))
                slots.append((len(results) - 1, answer))
        for (index, (answer, anchored_only)), outcome in zip(slots, self.pool.run(jobs)):
            results[index] = self._judged(outcome, answer, anchored_only, gold[1])
        return results  # type: ignore[return-value]

    # -- steps ------------------------------------------------------------------------------

    def _parsed_gold(self) -> tuple[bytes, str] | str:
        if self._gold_parse is None:  # first use: parse once, keep the outcome either way
            if not (self.gold or "").strip():
                self._gold_parse = "gold answer is empty"
            else:
                job = Job("rosa2.rewards.math:parse_gold", (self.gold, self.limits.parse_timeout_s), self.limits.wall_timeout_s)
                outcome = self.pool.run([job])[0]
                if not outcome.ok and not outcome.timed_out:
                    raise Rosa2Error(f"the math-verify worker failed while parsing the gold {self.gold!r}: {outcome.error}")
                if outcome.ok and outcome.value is not None:
                    self._gold_parse = outcome.value
                else:
                    why = outcome.error or "math-verify extracted nothing"
                    self._gold_parse = f"gold answer {self.gold!r} does not parse ({why})"
                    _log.warning("%s: excluded from scoring", self._gold_parse)
        return self._gold_parse  # type: ignore[return-value]

    def _extract(self, response: str) -> tuple[tuple[str, bool], RewardResult | None]:
        """(what math-verify should read, anchored-only?) or an early -1 that needs no worker."""
        if not response.strip():
            return ("", False), self._result(-1.0, None, "empty", "empty response")
        boxed, unclosed = last_boxed(response)
        if unclosed:
            return ("", False), self._result(-1.0, None, "truncated", "the last \\boxed{ is never closed (truncated response?)")
        if boxed is not None:
            if not boxed.strip():
                return ("", False), self._result(-1.0, "", "no_answer", "the last \\boxed{} is empty")
            return (f"\\boxed{{{boxed}}}", False), None
        if self.extraction == "paper":  # the paper's compute_score: no \boxed{}, no answer
            return ("", False), self._result(-1.0, None, "no_answer", "no \\boxed{} answer in the response (extraction=paper)")
        return (response, True), None

    def _judged(self, outcome: Any, answer: str, anchored_only: bool, gold_parsed: str) -> RewardResult:
        if outcome.timed_out:
            return self._result(-1.0, None, "timeout", f"verification exceeded {self.limits.wall_timeout_s:g}s; worker killed")
        if not outcome.ok:
            return self._result(-1.0, None, "error", f"verification failed: {outcome.error}", scored=False)
        value = outcome.value
        shown = answer[len("\\boxed{"):-1] if not anchored_only else value["matched"]
        if value["correct"]:
            return self._result(1.0, shown, "correct", "", value, gold_parsed)
        if value["timeout"]:
            return self._result(-1.0, shown, "timeout", "math-verify's alarm fired while parsing or comparing", value, gold_parsed)
        if value["parsed"] is None:
            why = "no \\boxed{} answer in the response" if anchored_only else f"the boxed answer {shown!r} does not parse"
            return self._result(-1.0, shown, "no_answer", why, value, gold_parsed)
        return self._result(-1.0, shown, "wrong", "", value, gold_parsed)

    def _result(
        self, reward: float, prediction: str | None, outcome: str, why: str,
        value: dict[str, Any] | None = None, gold_parsed: str | None = None, scored: bool = True,
    ) -> RewardResult:
        detail: dict[str, Any] = {"gold_parsed": gold_parsed}
        if value is not None:
            detail["prediction_parsed"] = value["parsed"]
        if why:
            detail["why"] = why
        return RewardResult(reward=reward, prediction=prediction, gold=self.gold, scored=scored, outcome=outcome,
                            error_text=FORM_FEEDBACK.get(outcome, ""), detail=detail)


class MathReward(MathVerifyRewardModel):
    """The math reward for a Problem of domain ``math`` (its ``answer`` is the gold)."""

    def __init__(
        self, problem: Problem, limits: MathLimits | None = None, pool: WorkerPool | None = None, *, extraction: str = "flexible"
    ) -> None:
        if problem.answer is None:
            raise Rosa2Error(f"problem {problem.id!r} has no gold answer; a math reward needs one")
        super().__init__(problem.answer, limits, pool, extraction=extraction)
        self.problem_id = problem.id
