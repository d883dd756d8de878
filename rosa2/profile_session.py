"""Cost of the streams: seconds per turn (generate / semantic / parametric / reward) and peak memory
of sessions per method, on one loaded model, in one process.

    python -m rosa2.profile_session [--methods baseline,rosa2] [--max-turns 3] [--json] [engine options]

Every engine and critic option of ``rosa2 session`` is taken (``--help`` lists them), with short
answers and critiques by default; ``--critic-max-new-tokens`` is ``--semantic-max-new-tokens``.
``--model tiny-random`` profiles a random two-layer model (the code paths, in seconds).

Methods run in the order given on the same loaded model (``SessionEngine.with_session``), baseline
first by default so its peak is not inflated by memory the adapted methods allocated. Peak memory
is the engine's per-turn figure (CUDA: peak allocated; CPU: the process's peak RSS, VmHWM, reset
at every turn), maximised over the method's turns. Problems are arithmetic the embedded model
gets wrong, scored by exact match, so every session runs its streams.
"""

from __future__ import annotations

import argparse
import json
from statistics import fmean
from typing import Any

from rosa2.config import ConfigError, add_engine_arguments, engine_configs
from rosa2.records import Problem, ProblemResult

PROBLEMS = [
    Problem(id="mul-37-43", prompt="What is 37 * 43? Answer with the number only.", domain="math", answer="1591"),
    Problem(id="mul-128-19", prompt="What is 128 * 19? Answer with the number only.", domain="math", answer="2432"),
]
PHASES = ("generate", "semantic", "parametric", "reward")
# the engine's options here: one session at a time, the methods by --methods
DEFAULTS = {"session": {"max_turns": 3}, "generation": {"max_new_tokens": 48}, "semantic": {"max_new_tokens": 128}}
SKIP = {"session": ("method", "parallel_sessions")}
ALIASES = {"semantic": {"max_new_tokens": ("--semantic-max-new-tokens", "--critic-max-new-tokens")}}


def profile(results: list[ProblemResult]) -> dict[str, Any]:
    """Mean seconds per turn per phase (over all turns, and over the turns where it ran) and peak."""
    turns = [t for r in results for t in r.turns]
    row: dict[str, Any] = {"turns": len(turns), "tokens_per_turn": fmean(t.tokens for t in turns)}
    for phase in PHASES:
        values = [getattr(t, f"seconds_{phase}") for t in turns]
        ran = [v for v in values if v > 0]
        row[f"{phase}_s_per_turn"] = fmean(values)
        row[f"{phase}_s_when_run"] = fmean(ran) if ran else 0.0
    row["peak_memory_mb"] = max(r.peak_memory_bytes for r in results) / 2**20
    row["seconds_per_problem"] = fmean(r.seconds for r in results)
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rosa2.profile_session", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="baseline,rosa2", help="methods to profile, comma-separated, in this order (default: baseline,rosa2)")
    parser.add_argument("--problems", type=int, default=2, help=f"how many of the {len(PROBLEMS)} problems (default: 2)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_engine_arguments(parser, defaults=DEFAULTS, skip=SKIP, aliases=ALIASES)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from rosa2 import models
    from rosa2.bench import TINY
    from rosa2.environment import ExactMatchEnvironment
    from rosa2.session import SessionEngine, peak_memory_bytes

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"--methods {args.methods!r} names no method")
    runs = [engine_configs(args, session={"method": m}) for m in methods]  # validate all first
    configs = runs[0]
    model = models.tiny_random(seed=configs["generation"].seed) if configs["model"].name == TINY else configs["model"]
    engine = SessionEngine(**{**configs, "model": model})
    report: dict[str, Any] = {
        "device": str(engine.policy.device),
        "model": engine.policy.source,
        "rss_after_load_mb": peak_memory_bytes(engine.policy.device) / 2**20,
        "methods": {},
    }
    for run in runs:
        session = run["session"]
        runner = engine.with_session(session)
        results = [runner.run(p, ExactMatchEnvironment(session.feedback)) for p in PROBLEMS[: args.problems]]
        report["methods"][session.method] = profile(results)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"device {report['device']} · model {report['model']} · after load {report['rss_after_load_mb']:.0f} MiB")
    print("| method | turns | generate s/turn | semantic s/turn (when run) | parametric s/turn (when run) | reward s/turn | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for method, row in report["methods"].items():
        print(
            f"| {method} | {row['turns']} | {row['generate_s_per_turn']:.2f} "
            f"| {row['semantic_s_per_turn']:.2f} ({row['semantic_s_when_run']:.2f}) "
            f"| {row['parametric_s_per_turn']:.2f} ({row['parametric_s_when_run']:.2f}) "
            f"| {row['reward_s_per_turn']:.3f} | {row['peak_memory_mb']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
