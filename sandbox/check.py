"""The code reward checked against a HumanEval-format dataset's canonical solutions.

Every canonical solution must pass its own tests (the sandbox and the program assembly accept
correct code), and each solution judged by another task's tests must fail (the tests reject
wrong code: the candidate is the solution's own function, called by the other task's ``check``).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from rosa2.errors import Rosa2Error
from rosa2.records import Problem, RewardResult
from rosa2.rewards.code import CodeReward
from rosa2.sandbox.client import Sandbox


def canonical(problem: Problem) -> str:
    solution = problem.metadata.get("canonical_solution")
    if not isinstance(solution, str):
        raise Rosa2Error(f"problem {problem.id!r} has no canonical_solution; `sandbox check` needs a HumanEval-format file")
    return solution


def pairs(problems: list[Problem], shuffle_tests: bool) -> list[tuple[Problem, str]]:
    """(problem whose tests judge, response) for each problem. With ``shuffle_tests`` problem i's
    solution meets the tests of problem i+1 (a derangement: never its own)."""
    if shuffle_tests and len(problems) < 2:
        raise Rosa2Error("--shuffle-tests needs at least 2 problems (check --limit)")
    out = []
    for i, problem in enumerate(problems):
        if not shuffle_tests:
            out.append((problem, canonical(problem)))
            continue
        other = problems[(i + 1) % len(problems)]
        judged = dataclasses.replace(problem, id=f"{problem.id}<-{other.id}", tests=other.tests)
        out.append((judged, canonical(problem)))
    return out


def run(
    problems: list[Problem],
    pool: Sandbox,
    *,
    shuffle_tests: bool = False,
    on_result: Callable[[Problem, RewardResult], None] | None = None,
) -> list[tuple[Problem, RewardResult]]:
    """Score every pair on ``pool``, ``pool_size`` at a time; results in the problems' order."""

    def one(item: tuple[Problem, str]) -> tuple[Problem, RewardResult]:
        problem, response = item
        result = CodeReward(problem, pool=pool).score(response)
        if on_result is not None:
            on_result(problem, result)
        return problem, result

    with ThreadPoolExecutor(max_workers=pool.cfg.pool_size) as workers:
        return list(workers.map(one, pairs(problems, shuffle_tests)))


def summary(results: Iterable[tuple[Problem, RewardResult]]) -> tuple[int, int]:
    """(passed, failed)."""
    rewards = [r.reward for _, r in results]
    passed = sum(r > 0 for r in rewards)
    return passed, len(rewards) - passed
