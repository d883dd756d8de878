"""Code reward: the response's program runs against the problem's unit tests in the Docker sandbox.

r_t = +1 only when every test passes (docs/algorithm.md §4, docs/sandbox.md); the RewardResult's ``error_text`` (the first
failing test with what the candidate returned, or the traceback) is what ``rich`` feedback hands
to the next turn. A sandbox (infrastructure) failure is retried by the sandbox and, if it
persists, gives ``scored=False``: it is never counted as the model's failure.

The core names no sandbox: what runs the program is a :class:`CodeRunner`, given as ``pool`` or,
by default, the one installed under the entry point ``rosa2.code_runners:docker`` (pyproject),
which is the platform's Docker sandbox (``rosa2.sandbox.shared``). The sandbox imports this module
(its ``check`` and ``bench`` score through the reward); this module never imports the sandbox.

The program is assembled as HumanEval expects: the stub (imports, helpers, signature and
docstring, ``metadata["stub"]``) followed by the model's code, which is either a whole program
that (re)defines the entry point or the continuation of the stub's function body.
"""

from __future__ import annotations

import ast
import functools
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence

from rosa2.config import SandboxConfig
from rosa2.errors import Rosa2Error
from rosa2.records import Problem, RewardResult

# A fenced block; a missing closing fence (a truncated reply) runs to the end.
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
_PYTHON_TAGS = ("", "python", "python3", "py")
OUTPUT_KEPT = 2000  # characters of the program's output kept in the detail


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The code in a reply: among its fenced blocks (Python or untagged), the last that defines
    ``entry_point``, else the last one; with no fence, the reply itself."""
    blocks = [m.group(2) for m in _FENCE.finditer(response) if m.group(1).lower() in _PYTHON_TAGS]
    if not blocks:
        return response.strip("\n")
    if entry_point:
        defining = [b for b in blocks if _defines(b, entry_point)]
        if defining:
            return defining[-1]
    return blocks[-1]


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _compiles(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def assemble(stub: str, code: str, entry_point: str | None) -> tuple[str, str]:
    """(program, form): how the model's ``code`` joins the problem's ``stub``.

    - ``full``: the code defines the entry point; it follows the stub, whose imports and helper
      functions it may use, and its definition replaces the stub's.
    - ``body``: the code continues the stub's function body (indented lines, HumanEval's format).
    - ``dedented-body``: body lines written flush left; indented under the stub's signature.
    """
    stub = stub.rstrip() + "\n" if stub.strip() else ""
    if not stub or not entry_point or _defines(code, entry_point):
        # dedent: a whole program indented as a block (a markdown list item) is still top level
        return stub + ("\n" if stub else "") + textwrap.dedent(code), "full"
    first = next((line for line in code.splitlines() if line.strip()), "")
    if first[:1] in (" ", "\t") or not first:
        return stub + code, "body"
    indented = stub + textwrap.indent(code, "    ")
    if _compiles(indented):
        return indented, "dedented-body"
    return stub + "\n" + code, "full"


class Evaluation(Protocol):
    """What a runner reports for one program and its tests (``rosa2.sandbox.Evaluation`` is one)."""

    outcome: str  # passed | failed | error | timeout | oom | syntax_error | sandbox_error (infrastructure)
    error_text: str  # the first failing test with what the candidate returned, or the traceback
    tests: list[dict[str, Any]]  # one per test: name, status ("passed", ...), error
    output: str  # the program's stdout+stderr
    output_truncated: bool
    seconds: float
    attempts: int  # runs it took (infrastructure failures are retried)
    recycled: bool  # the isolation unit (container) was replaced after this run

    @property
    def passed(self) -> bool: ...


class CodeRunner(Protocol):
    """Runs a program, then its tests, isolated from the host; thread-safe (``score_many`` calls
    it from ``cfg.pool_size`` threads). ``trusted``: source the judge defines itself (the stub)."""

    cfg: SandboxConfig

    def run(self, program: str, tests: str | None = None, entry_point: str | None = None, *, trusted: str | None = None) -> Evaluation: ...


RUNNERS = "rosa2.code_runners"  # entry-point group: name -> factory(SandboxConfig) -> CodeRunner
DEFAULT_RUNNER = "docker"


@functools.cache
def _runner_factory(name: str = DEFAULT_RUNNER) -> Callable[[SandboxConfig], CodeRunner]:
    from importlib.metadata import entry_points

    found = list(entry_points(group=RUNNERS, name=name))
    if not found:
        raise Rosa2Error(f"no code runner {name!r} is installed (entry point group {RUNNERS!r}): reinstall rosa2 "
                         "(`pip install -e .`, as infra/setup.sh does), or give CodeReward a runner (pool=)")
    return found[0].load()


def default_runner(cfg: SandboxConfig) -> CodeRunner:
    """The runner a code reward uses when given none: the installed ``docker`` runner's factory
    applied to ``cfg`` (rosa2's own is ``rosa2.sandbox.shared``, one warm pool per configuration
    per process, so many problems and parallel sessions share its containers)."""
    return _runner_factory()(cfg)


class CodeReward:
    """``score(response) -> RewardResult`` for one code problem (HumanEval, BigCodeBench).

    The program runs on ``pool`` (any :class:`CodeRunner`) when given, else on
    ``default_runner(sandbox_cfg)``, looked up at the first ``score``: building a reward starts
    nothing.
    """

    def __init__(self, problem: Problem, sandbox_cfg: SandboxConfig | None = None, *, pool: CodeRunner | None = None) -> None:
        if problem.domain != "code":
            raise Rosa2Error(f"CodeReward got problem {problem.id!r} with domain={problem.domain!r}; expected 'code'")
        if not (problem.tests or "").strip():
            raise Rosa2Error(f"code problem {problem.id!r} has no tests; a code reward needs the problem's unit tests")
        self.problem = problem
        self.cfg = pool.cfg if pool is not None else (sandbox_cfg or SandboxConfig())
        self.pool = pool
        self.stub = str(problem.metadata.get("stub") or "")

    def program(self, response: str) -> tuple[str, str]:
        """(the program the sandbox runs, how it was assembled)."""
        code = extract_code(response, self.problem.entry_point)
        return assemble(self.stub, code, self.problem.entry_point)

    def score(self, response: str) -> RewardResult:
        program, form = self.program(response)
        # The stub is the problem's text: the judge defines its helpers itself (see Sandbox.run).
        evaluation = (self.pool or default_runner(self.cfg)).run(program, self.problem.tests, self.problem.entry_point, trusted=self.stub or None)
        tests = evaluation.tests
        output = evaluation.output
        return RewardResult(
            reward=1.0 if evaluation.passed else -1.0,
            prediction=None,
            gold=None,
            scored=evaluation.outcome != "sandbox_error",
            outcome=evaluation.outcome,
            error_text=evaluation.error_text,
            detail={
                "outcome": evaluation.outcome,
                "assembly": form,
                "tests": tests,
                "tests_passed": sum(t["status"] == "passed" for t in tests),
                "tests_total": len(tests),
                "output": output if len(output) <= OUTPUT_KEPT else output[:OUTPUT_KEPT] + "...",
                "output_truncated": evaluation.output_truncated or len(output) > OUTPUT_KEPT,
                "seconds": evaluation.seconds,
                "attempts": evaluation.attempts,
                "recycled": evaluation.recycled,
            },
        )

    def score_many(self, responses: Sequence[str]) -> list[RewardResult]:
        """Scores in the order given, evaluated in parallel across the pool's containers."""
        if len(responses) <= 1:
            return [self.score(r) for r in responses]
        with ThreadPoolExecutor(max_workers=min(len(responses), self.cfg.pool_size)) as workers:
            return list(workers.map(self.score, responses))
