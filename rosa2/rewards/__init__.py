"""Rewards: turn a response y_t into r_t = ±1 for the session loop (Algorithm 1, docs/algorithm.md §4).

``reward_for(problem)`` picks the reward for the problem's domain; every reward has
``score(response) -> RewardResult`` and ``score_many(responses)``. The reward r_t is what the
parametric stream's target policy π* ∝ π·exp(r/β) reweights with; the RewardResult also carries
the extracted prediction, the gold (logged, never shown to the model) and the error text that
``rich`` feedback hands to the next turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

from rosa2.errors import Rosa2Error
from rosa2.records import Problem, RewardResult

if TYPE_CHECKING:
    from rosa2.config import RewardConfig, SandboxConfig

DOMAINS = ("math", "choice", "code")


class Reward(Protocol):
    def score(self, response: str) -> RewardResult: ...

    def score_many(self, responses: Sequence[str]) -> list[RewardResult]: ...


def reward_for(problem: Problem, sandbox: "SandboxConfig | None" = None, reward: "RewardConfig | None" = None) -> Reward:
    """The reward for ``problem``: math-verify (math), the chosen letter (choice), or the unit
    tests in the Docker sandbox (code; ``sandbox`` configures it, defaults otherwise). ``reward``
    says how math and choice answers are read (``RewardConfig.extraction``: flexible | paper)."""
    from rosa2.config import RewardConfig

    extraction = (reward or RewardConfig()).extraction
    if problem.domain == "math":
        from rosa2.rewards.math import MathReward

        return MathReward(problem, extraction=extraction)
    if problem.domain == "choice":
        from rosa2.rewards.choice import ChoiceReward

        return ChoiceReward(problem, extraction=extraction)
    if problem.domain == "code":
        from rosa2.config import SandboxConfig
        from rosa2.rewards.code import CodeReward

        return CodeReward(problem, sandbox or SandboxConfig())
    raise Rosa2Error(f"problem {problem.id!r} has domain={problem.domain!r}; expected one of {list(DOMAINS)}")
