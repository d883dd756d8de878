"""Multiple-choice reward (GPQA-diamond, MMLU-Redux, SuperGPQA): +1 when the chosen letter is the gold.

The letter is read, most explicit form first, from: the last ``\\boxed{C}`` (also ``\\boxed{(C)}``,
``\\boxed{\\text{C}}``, ``\\boxed{C) ...}``); the last "answer is C" / "Answer: (C)" / "correct
option is C"; the last parenthesised "(C)"; the last standalone capital letter among the problem's
options. "A" and "I" followed by a lower-case word are read as English ("the answer is a number",
"A good choice..."), not as options.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

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
# ``rich`` feedback for an answer in no recognisable form (it names no letter: that could leak the gold)
NO_LETTER = "Your reply does not name an option. End with the letter of your choice within \\boxed{}."


def _english(text: str, m: re.Match[str]) -> bool:
    """"A"/"I" (any case) followed by a lower-case word is the article or pronoun, not an option."""
    return m.group(1).upper() in "AI" and _ENGLISH.match(text, m.end(1)) is not None


def letters(n: int) -> str:
    if not 2 <= n <= 26:
        raise Rosa2Error(f"a multiple-choice problem needs 2..26 options, got {n}")
    return string.ascii_uppercase[:n]


def extract_choice(response: str, allowed: str) -> tuple[str | None, str]:
    """(the chosen letter or None, which form it came from)."""
    boxed, _ = last_boxed(response)
    if boxed is not None:
        m = _BOX_LETTER.match(boxed)
        if m and m.group(1).upper() in allowed:
            return m.group(1).upper(), "boxed"
    for m in reversed(list(_ANSWER_IS.finditer(response))):
        if m.group(1).upper() in allowed and not _english(response, m):
            return m.group(1).upper(), "answer_is"
    for m in reversed(list(_PAREN.finditer(response))):
        if m.group(1) in allowed:
            return m.group(1), "parenthesised"
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

    def __init__(self, problem: Problem) -> None:
        choices = problem.metadata.get("choices")
        if not isinstance(choices, (list, tuple)):
            raise Rosa2Error(f"problem {problem.id!r}: metadata['choices'] must list the options, got {choices!r}")
        self.allowed = letters(len(choices))
        self.gold = (problem.answer or "").strip().upper()
        self.problem_id = problem.id

    def score(self, response: str) -> RewardResult:
        if self.gold not in self.allowed or len(self.gold) != 1:
            return RewardResult(-1.0, None, self.gold, scored=False, outcome="gold_unparseable",
                                detail={"why": f"gold {self.gold!r} is not one of the letters {self.allowed}"})
        if not (response or "").strip():
            return RewardResult(-1.0, None, self.gold, outcome="empty", error_text=NO_LETTER, detail={"why": "empty response"})
        letter, form = extract_choice(response, self.allowed)
        if letter is None:
            return RewardResult(-1.0, None, self.gold, outcome="no_answer", error_text=NO_LETTER,
                                detail={"why": f"no option letter ({', '.join(self.allowed)}) found in the response"})
        correct = letter == self.gold
        return RewardResult(1.0 if correct else -1.0, letter, self.gold, outcome="correct" if correct else "wrong",
                            detail={"form": form})

    def score_many(self, responses: Sequence[str]) -> list[RewardResult]:
        return [self.score(r) for r in responses]
