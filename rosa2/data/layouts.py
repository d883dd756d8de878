"""Row layouts: how one dataset row (a dict, from a hub dataset or a local file) becomes a Problem.

A layout names the fields it needs; a row that lacks one is refused with the place it came from
(file and line, or hub id and row), the missing field and the fields the row does have. A local
file given without a layout is recognised by the fields of its first row (``detect``).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from rosa2.data import prompts
from rosa2.errors import Rosa2Error
from rosa2.records import Problem
from rosa2.rewards.math import last_boxed

Row = dict[str, Any]


class RowError(Rosa2Error):
    """A row that cannot become a Problem; the caller adds where the row came from."""


def field(row: Row, *names: str) -> Any:
    """The first of ``names`` present (and not None) in ``row``."""
    for name in names:
        if row.get(name) is not None:
            if isinstance(row[name], str) and not row[name].strip():
                raise RowError(f"field {name!r} is empty")  # a blank question or gold scores nothing
            return row[name]
    wanted = " or ".join(repr(n) for n in names)
    raise RowError(f"missing field {wanted} (the row has: {', '.join(sorted(row)) or 'no fields'})")


def _native_id(row: Row, index: int, *names: str) -> str:
    for name in names:
        if row.get(name) not in (None, ""):
            return str(row[name])
    return str(index)


def _meta(row: Row, *names: str) -> dict[str, Any]:
    return {n: row[n] for n in names if row.get(n) is not None}


# ---------------------------------------------------------------------------------------------
# math


def _math(row: Row, name: str, index: int) -> Problem:
    question, answer = field(row, "problem", "question"), field(row, "answer")
    return Problem(
        # not MATH-500's unique_id: local copies often drop it, and an id must not depend on the source
        id=f"{name}:{_native_id(row, index, 'id', 'idx')}",
        prompt=prompts.math_prompt(str(question)),
        domain="math",
        answer=str(answer).strip(),
        metadata={
            "dataset": name,
            "question": question,
            **_meta(row, "subject", "type", "level", "unique_id", "url", "year", "template", "language"),
        },
    )


def _math_solution(row: Row, name: str, index: int) -> Problem:
    answer, unclosed = last_boxed(str(field(row, "solution")))
    if answer is None:
        raise RowError("field 'solution' has no complete \\boxed{...} to take the answer from")
    return _math({**row, "answer": answer}, name, index)


def _gsm8k(row: Row, name: str, index: int) -> Problem:
    solution = str(field(row, "answer"))
    if "####" not in solution:
        raise RowError("field 'answer' has no '#### N' final answer (GSM8K layout)")
    final = solution.rsplit("####", 1)[1].strip().replace(",", "")
    problem = _math({**row, "answer": final}, name, index)
    problem.metadata["solution"] = solution
    return problem


# ---------------------------------------------------------------------------------------------
# multiple choice


def _choice(name: str, native: str, question: str, choices: list[str], gold: int, row: Row, *keep: str) -> Problem:
    if not 2 <= len(choices) <= 26 or not 0 <= gold < len(choices):
        raise RowError(f"needs 2..26 options and a gold among them, got {len(choices)} options and gold index {gold}")
    return Problem(
        id=f"{name}:{native}",
        prompt=prompts.choice_prompt(question, choices),
        domain="choice",
        answer=chr(ord("A") + gold),
        metadata={"dataset": name, "question": question, "choices": choices, **_meta(row, *keep)},
    )


def _gpqa(row: Row, name: str, index: int) -> Problem:
    correct = str(field(row, "Correct Answer")).strip()
    wrong = [str(field(row, f"Incorrect Answer {i}")).strip() for i in (1, 2, 3)]
    native = _native_id(row, index, "Record ID", "id")
    # GPQA stores the correct answer first: shuffle, deterministically per problem, so the gold
    # letter is spread over A-D and the same on every machine and run
    order = [correct, *wrong]
    random.Random(int(hashlib.sha256(native.encode()).hexdigest()[:16], 16)).shuffle(order)
    return _choice(name, native, str(field(row, "Question")), order, order.index(correct), row, "Subdomain", "High-level domain")


def _letter_or_index(value: Any, n: int) -> int:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z]", value.strip()):
        return ord(value.strip().upper()) - ord("A")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RowError(f"field 'answer' = {value!r} is neither an option index (0..{n - 1}) nor a letter") from None


def _mmlu_redux(row: Row, name: str, index: int) -> Problem:
    choices = [str(c) for c in field(row, "choices")]
    gold = _letter_or_index(field(row, "answer"), len(choices))
    native = _native_id(row, index, "id")
    if native == str(index) and row.get("subject"):
        native = f"{row['subject']}/{index}"
    return _choice(name, native, str(field(row, "question")), choices, gold, row, "subject", "error_type", "correct_answer")


def _supergpqa(row: Row, name: str, index: int) -> Problem:
    choices = [str(c) for c in field(row, "options")]
    gold = _letter_or_index(field(row, "answer_letter"), len(choices))
    native = _native_id(row, index, "uuid", "id")
    return _choice(name, native, str(field(row, "question")), choices, gold, row, "discipline", "field", "subfield", "difficulty")


# ---------------------------------------------------------------------------------------------
# code


def _code(row: Row, name: str, index: int, stub_field: str, test_style: str) -> Problem:
    stub = str(field(row, stub_field))
    return Problem(
        id=f"{name}:{_native_id(row, index, 'task_id')}",
        prompt=prompts.code_prompt(stub),
        domain="code",
        tests=str(field(row, "test")),
        entry_point=str(field(row, "entry_point")),
        metadata={
            "dataset": name,
            "stub": stub,
            "test_style": test_style,  # 'check': HumanEval check(candidate); 'unittest': TestCases
            **_meta(row, "task_id", "canonical_solution", "libs"),
        },
    )


def _humaneval(row: Row, name: str, index: int) -> Problem:
    return _code(row, name, index, "prompt", "check")


def _bigcodebench(row: Row, name: str, index: int) -> Problem:
    return _code(row, name, index, "complete_prompt", "unittest")


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    name: str
    domain: str
    convert: Callable[[Row, str, int], Problem]  # (row, dataset name, row index) -> Problem
    signature: tuple[str, ...]  # fields whose presence identifies the layout in a local file
    fields: str  # the fields it reads, for help and errors


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        # most specific first: ``detect`` takes the first whose signature the row carries
        Layout("humaneval", "code", _humaneval, ("task_id", "prompt", "test", "entry_point"), "task_id, prompt, test, entry_point"),
        Layout("bigcodebench", "code", _bigcodebench, ("complete_prompt", "test", "entry_point"), "task_id, complete_prompt, test, entry_point"),
        Layout("gpqa", "choice", _gpqa, ("Question", "Correct Answer"), "Question, Correct Answer, Incorrect Answer 1..3"),
        Layout("supergpqa", "choice", _supergpqa, ("question", "options", "answer_letter"), "question, options, answer_letter"),
        Layout("mmlu-redux", "choice", _mmlu_redux, ("question", "choices", "answer"), "question, choices, answer (index or letter)"),
        Layout("gsm8k", "math", _gsm8k, ("question", "answer", "####"), "question, answer (solution ending '#### N')"),
        Layout("math", "math", _math, ("problem|question", "answer"), "problem or question, answer"),
        Layout("math-solution", "math", _math_solution, ("problem", "solution"), "problem, solution (answer = its last \\boxed{})"),
    )
}


def _carries(row: Row, signature: tuple[str, ...]) -> bool:
    for key in signature:
        if key == "####":  # GSM8K: the answer field holds a worked solution ending '#### N'
            if "####" not in str(row.get("answer", "")):
                return False
        elif not any(row.get(k) is not None for k in key.split("|")):
            return False
    return True


def detect(row: Row, where: str) -> Layout:
    """The layout of a row from a local file or hub dataset, recognised by its fields."""
    for layout in LAYOUTS.values():
        if _carries(row, layout.signature):
            return layout
    known = "; ".join(f"{l.name}: {l.fields}" for l in LAYOUTS.values())
    raise Rosa2Error(
        f"{where}: cannot tell the layout from the fields {sorted(row)}; expected one of: {known}. "
        "Or name it: --dataset LAYOUT_OR_DATASET:PATH"
    )
