"""Multiple-choice reward (GPQA-diamond, MMLU-Redux, SuperGPQA): +1 when the chosen letter is the gold.

The letter is read, most explicit form first, from: the last ``\\boxed{C}`` (also ``\\boxed{(C)}``,
``\\boxed{\\text{C}}``, ``\\boxed{C) ...}``); the last "answer is C" / "Answer: (C)" / "correct
option is C"; the last parenthesised "(C)"; the last standalone capital letter among the problem's
options. "A" and "I" followed by a lower-case word are read as English ("the answer is a number",
"A good choice..."), not as options.

``extraction`` (``RewardConfig``): ``paper`` reads the last ``\\boxed{}`` letter only (the
paper's strict scoring); ``flexible`` (default) reads every form above and, for an answer that
names no explicit letter, its final value: the last number of the response when it equals exactly
one option's value, else an option whose whole text ends the response. A final number that matches
no option is a ``wrong`` answer (it is one), not a missing one.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

from rosa2.config import EXTRACTIONS, _check_choice
from rosa2.errors import Rosa2Error
from rosa2.records import Problem, RewardResult
from rosa2.rewards.math import last_boxed

_BOX_LETTER = re.compile(r"^\s*(?:\\text\s*\{\s*|\\textbf\s*\{\s*|\\mathrm\s*\{\s*)?\(?\s*([A-Za-z])\s*\)?(?:\s*\}|\b)")
_ANSWER_IS = re.compile(
    r"(?:final\s+answer|correct\s+answer|answer|correct\s+(?:option|choice))\s*(?:is|:|=)?\s*(?:option\s+)?"
    r"[\*\s]*[\(\[]?\s*\**([A-Za-z])\**[\)\]]?(?![\w'-])",
    re.IGNORECASE,
)
_PAREN = re.compile(r"\(([A-Z])\)")
_STANDALONE = re.compile(r"(?<![\w\\'-])([A-Z])(?![\w'-])")
_ENGLISH = re.compile(r"\s+[a-z]")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
# ``rich`` feedback for an answer in no recognisable form (it names no letter: that could leak the gold)
NO_LETTER = "Your reply does not name an option. End with the letter of your choice within \\boxed{}."


def _english(text: str, m: re.Match[str]) -> bool:
    """"A"/"I" (any case) followed by a lower-case word is the article or pronoun, not an option."""
    return m.group(1).upper() in "AI" and _ENGLISH.match(text, m.end(1)) is not None


def letters(n: int) -> str:
    if not 2 <= n <= 26:
        raise Rosa2Error(f"a multiple-choice problem needs 2..26 options, got {n}")
    return string.ascii_uppercase[:n]


def _number(text: str) -> float | None:
    text = text.replace(",", "").strip()
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def _norm(text: str) -> str:
    return re.sub(r"[\s$.*]+", " ", text).strip().lower()


def value_choice(response: str, choices: Sequence[str], allowed: str) -> tuple[str | None, str | None]:
    """(letter, final value) of an answer given as a value instead of a letter: the last number of
    the response when it equals exactly one option's number, else the one option whose whole text
    ends the response. (None, value) when the final number matches no option (a wrong answer);
    (None, None) when the response gives no final value."""
    numbers = _NUMBER.findall(response)
    value = _number(numbers[-1]) if numbers else None
    hits = [allowed[i] for i, c in enumerate(choices) if value is not None and _number(str(c)) == value]
    if len(hits) == 1:
        return hits[0], numbers[-1]
    tail = _norm(response)[-200:]
    ends = [allowed[i] for i, c in enumerate(choices) if _norm(str(c)) and tail.endswith(_norm(str(c)))]
    if len(ends) == 1:
        return ends[0], None
    return None, (numbers[-1] if numbers and not hits else None)


def extract_choice(response: str, allowed: str, choices: Sequence[str] | None = None, extraction: str = "flexible") -> tuple[str | None, str]:
    """(the chosen letter or None, which form it came from).

    With ``choices`` under ``flexible`` extraction, a response with no explicit letter form (boxed,
    "answer is", parenthesised) is read by its final value before a standalone capital letter is."""
    boxed, _ = last_boxed(response)
    if boxed is not None:
        m = _BOX_LETTER.match(boxed)
        if m and m.group(1).upper() in allowed:
            return m.group(1).upper(), "boxed"
    if extraction == "paper":
        return None, ""
    for m in reversed(list(_ANSWER_IS.finditer(response))):
        if m.group(1).upper() in allowed and not _english(response, m):
            return m.group(1).upper(), "answer_is"
    for m in reversed(list(_PAREN.finditer(response))):
        if m.group(1) in allowed:
            return m.group(1), "parenthesised"
    if choices is not None:
        letter, _ = value_choice(response, choices, allowed)
        if letter is not None:
            return letter, "value"
    for m in reversed(list(_STANDALONE.finditer(response))):
        letter = m.group(1)
        if letter not in allowed:
            continue
        if _english(response, m):
            continue
        return letter, "standalone"
    return None, ""


class ChoiceReward:
    """The reward for a Problem of domain ``choice``: its ``answer`` is the gold letter and
    ``metadata['choices']`` the option texts, in the order they were lettered in the prompt."""

    def __init__(self, problem: Problem, *, extraction: str = "flexible") -> None:
        choices = problem.metadata.get("choices")
        if not isinstance(choices, (list, tuple)):
            raise Rosa2Error(f"problem {problem.id!r}: metadata['choices'] must list the options, got {choices!r}")
        _check_choice("extraction", extraction, EXTRACTIONS)  # RewardConfig's own check
        self.allowed = letters(len(choices))
        self.choices = [str(c) for c in choices]
        self.gold = (problem.answer or "").strip().upper()
        self.problem_id = problem.id
        self.extraction = extraction

    def score(self, response: str) -> RewardResult:
        if self.gold not in self.allowed or len(self.gold) != 1:
            return RewardResult(-1.0, None, self.gold, scored=False, outcome="gold_unparseable",
                                detail={"why": f"gold {self.gold!r} is not one of the letters {self.allowed}"})
        if not (response or "").strip():
            return RewardResult(-1.0, None, self.gold, outcome="empty", error_text=NO_LETTER, detail={"why": "empty response"})
        letter, form = extract_choice(response, self.allowed, self.choices, self.extraction)
        if letter is None and self.extraction == "flexible":
            _, value = value_choice(response, self.choices, self.allowed)
            if value is not None:  # a final value that is no option's: an answer, and a wrong one
                return RewardResult(-1.0, value, self.gold, outcome="wrong", error_text=NO_LETTER,
                                    detail={"form": "value", "why": f"the final value {value} matches no option"})
        if letter is None:
            return RewardResult(-1.0, None, self.gold, outcome="no_answer", error_text=NO_LETTER,
                                detail={"why": f"no option letter ({', '.join(self.allowed)}) found in the response"})
        correct = letter == self.gold
        return RewardResult(1.0 if correct else -1.0, letter, self.gold, outcome="correct" if correct else "wrong",
                            detail={"form": form})

    def score_many(self, responses: Sequence[str]) -> list[RewardResult]:
        return [self.score(r) for r in responses]
