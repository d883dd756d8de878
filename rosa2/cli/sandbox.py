"""``rosa2 sandbox``: build the image, run a program in the sandbox, check a HumanEval file.

- ``build [--force] [--method auto|dockerfile|debian]``: make the image (nothing when it exists).
- ``run FILE [--tests FILE] [--entry-point NAME] [--json]``: one evaluation; exit 0 when it passed.
- ``check --dataset PATH [--limit N] [--shuffle-tests]``: canonical solutions through the code
  reward, ending with the line ``N passed, M failed``; exit 0 when every solution passed (or,
  with ``--shuffle-tests``, when every solution failed another task's tests).
- ``bench``: sandbox against bare host subprocess, one JSON object (sandbox/bench.py).
- ``clean [--all]``: remove sandbox containers whose owning process is gone (or all of them).

Every command that starts containers removes them before it returns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rosa2.config import SandboxConfig, add_arguments, from_args
from rosa2.errors import Rosa2Error


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise Rosa2Error(f"cannot read {what} {path!r}: {exc.strerror}; expected a readable Python file") from exc


def cmd_build(args: argparse.Namespace) -> int:
    from rosa2.sandbox.image import build

    cfg = from_args(SandboxConfig, args)
    build(cfg.image, force=args.force, method=args.method, log=lambda line: print(f"[sandbox] {line}"))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rosa2.sandbox import Sandbox

    program = _read(args.file, "program")
    tests = _read(args.tests, "tests") if args.tests else None
    with Sandbox(from_args(SandboxConfig, args)) as pool:
        evaluation = pool.run(program, tests, args.entry_point)
    if args.json:
        print(json.dumps(evaluation.to_dict(), indent=2))
    else:
        if evaluation.output:
            print(evaluation.output, end="" if evaluation.output.endswith("\n") else "\n")
            if evaluation.output_truncated:
                print(f"[output truncated at {args.output_limit_bytes or SandboxConfig().output_limit_bytes} bytes]")
        for test in evaluation.tests:
            print(f"  {test['status']:<7} {test['name']}")
        if evaluation.error_text:
            print(evaluation.error_text, file=sys.stderr)
        print(f"{evaluation.outcome} ({evaluation.seconds:.2f} s)")
    return 0 if evaluation.passed else 1


def cmd_check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from rosa2.config import DataConfig
    from rosa2.data import load_problems
    from rosa2.sandbox import Sandbox, check

    problems = load_problems(DataConfig(dataset=args.dataset, limit=args.limit))
    expect_pass = not args.shuffle_tests
    check.pairs(problems, args.shuffle_tests)  # a file without canonical solutions fails before any container starts
    with Sandbox(from_args(SandboxConfig, args)) as pool, tqdm(
        total=len(problems), desc="sandbox check", unit="task", file=sys.stderr
    ) as bar:
        results = check.run(problems, pool, shuffle_tests=args.shuffle_tests, on_result=lambda p, r: bar.update())
    infra = 0
    for problem, result in results:
        if result.outcome == "sandbox_error":
            infra += 1
        if (result.reward > 0) != expect_pass:
            first = (result.error_text.strip().splitlines() or [""])[0]
            print(f"{problem.id}: {result.outcome} {first}"[:200])
    passed, failed = check.summary(results)
    if infra:
        print(f"{infra} evaluations were sandbox errors (infrastructure, not the solutions)", file=sys.stderr)
    print(f"{passed} passed, {failed} failed")
    ok = (failed == 0) if expect_pass else (passed == 0 and infra == 0)
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from rosa2.sandbox import bench

    return bench.main(args, from_args(SandboxConfig, args))


def cmd_clean(args: argparse.Namespace) -> int:
    from rosa2.sandbox import leftover_containers

    found = leftover_containers(all_owners=args.all)
    for container in found:
        container.remove(force=True)
    print(f"removed {len(found)} sandbox container(s)")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sandbox_command", metavar="ACTION", required=True)

    build = sub.add_parser("build", help="make the sandbox image (Dockerfile if a registry answers, else debootstrap)")
    build.add_argument("--force", action="store_true", help="rebuild even when the image exists")
    build.add_argument("--method", choices=["auto", "dockerfile", "debian"], default="auto",
                       help="auto: the Dockerfile when a registry answers quickly, else Debian packages (default: auto)")
    build.set_defaults(func=cmd_build)

    run = sub.add_parser("run", help="run a Python file (and its tests) in the sandbox")
    run.add_argument("file", help="the program (Python source)")
    run.add_argument("--tests", help="test source: HumanEval check(candidate), unittest TestCases, or plain asserts")
    run.add_argument("--entry-point", help="the function check(candidate) receives")
    run.add_argument("--json", action="store_true", help="print the whole evaluation as JSON")
    run.set_defaults(func=cmd_run)

    chk = sub.add_parser("check", help="run a HumanEval-format file's canonical solutions; ends with 'N passed, M failed'")
    chk.add_argument("--dataset", required=True, help="HumanEval-format .jsonl/.jsonl.gz file (or a dataset name)")
    chk.add_argument("--limit", type=int, help="the first N tasks only")
    chk.add_argument("--shuffle-tests", action="store_true",
                     help="judge each solution by the next task's tests instead of its own: all must fail")
    chk.set_defaults(func=cmd_check)

    from rosa2.sandbox import bench as bench_module

    ben = sub.add_parser("bench", help="per-evaluation cost of the sandbox against a bare host process (JSON)")
    bench_module.add_arguments(ben)
    ben.set_defaults(func=cmd_bench)

    clean = sub.add_parser("clean", help="remove sandbox containers left by processes that died")
    clean.add_argument("--all", action="store_true", help="remove every sandbox container, live owners included")
    clean.set_defaults(func=cmd_clean)

    for action in (build, run, chk, ben):
        add_arguments(action, SandboxConfig)
