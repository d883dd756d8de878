"""Cost of the streams: seconds per turn (generate / semantic / parametric / reward) and peak memory
of sessions per method, on one loaded model, in one process.

    python -m rosa2.profile_session [--methods baseline,rosa2] [--max-turns 3] [--json]

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

from rosa2.config import GenerationConfig, ModelConfig, SemanticConfig, SessionConfig
from rosa2.records import Problem, ProblemResult

PROBLEMS = [
    Problem(id="mul-37-43", prompt="What is 37 * 43? Answer with the number only.", domain="math", answer="1591"),
    Problem(id="mul-128-19", prompt="What is 128 * 19? Answer with the number only.", domain="math", answer="2432"),
]
PHASES = ("generate", "semantic", "parametric", "reward")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rosa2.profile_session", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--methods", default="baseline,rosa2")
    parser.add_argument("--problems", type=int, default=2, help=f"how many of the {len(PROBLEMS)} problems")
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--critic-max-new-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from rosa2.environment import ExactMatchEnvironment
    from rosa2.session import SessionEngine, peak_memory_bytes

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sessions = [SessionConfig(method=m, max_turns=args.max_turns) for m in methods]  # validate all first
    engine = SessionEngine(
        ModelConfig(name=args.model),
        sessions[0],
        semantic=SemanticConfig(max_new_tokens=args.critic_max_new_tokens),
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens),
    )
    report: dict[str, Any] = {
        "device": str(engine.policy.device),
        "model": engine.policy.source,
        "rss_after_load_mb": peak_memory_bytes(engine.policy.device) / 2**20,
        "methods": {},
    }
    for session in sessions:
        runner = engine.with_session(session)
        results = [runner.run(p, ExactMatchEnvironment("sparse")) for p in PROBLEMS[: args.problems]]
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
