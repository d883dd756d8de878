"""The first user message x_1 for each domain. The wording is fixed here, in one place, so every
method and dataset of a study asks the same way (and the fingerprint changes if it ever does)."""

from __future__ import annotations

import string
from typing import Sequence

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = (
    "Answer with the letter of the correct option, and put the letter within \\boxed{{}} "
    "(for example \\boxed{{{first}}})."
)
CODE_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function (its signature, "
    "body and any imports it needs) in a single ```python code block."
)


def math_prompt(question: str) -> str:
    return f"{question.strip()}\n\n{MATH_INSTRUCTION}"


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    options = "\n".join(f"{letter}) {str(text).strip()}" for letter, text in zip(string.ascii_uppercase, choices))
    return f"{question.strip()}\n\n{options}\n\n{CHOICE_INSTRUCTION.format(first='A')}"


def code_prompt(stub: str) -> str:
    return f"{CODE_INSTRUCTION}\n\n```python\n{stub.rstrip()}\n```"
