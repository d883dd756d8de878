"""The platform's overhead: ``rosa2 run`` (Prefect flow + tasks, MLflow logging, local result store,
report and plots) against calling the core loop directly on the same cell, in one invocation.

Both sides run as fresh processes (imports, model load, dataset load, the sessions), one after the
other, with greedy decoding, so they do the same model work; the platform side gets an empty
project home so nothing is skipped. Needs the servers (``rosa2 stack up``).

    .venv/bin/python benchmarks/platform_overhead.py --method rosa2 --limit 3 --max-turns 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def direct(args: argparse.Namespace) -> None:
    """The core loop alone: load, then ``SessionEngine.run`` over the problems."""
    from rosa2.config import DataConfig, GenerationConfig, ModelConfig, SemanticConfig, SessionConfig
    from rosa2.data import load_problems
    from rosa2.metrics import summarize
    from rosa2.session import SessionEngine

    session = SessionConfig(method=args.method, max_turns=args.max_turns)
    engine = SessionEngine(
        ModelConfig(name=args.model), session, None, SemanticConfig(max_new_tokens=args.semantic_max_new_tokens),
        GenerationConfig(max_new_tokens=args.max_new_tokens),
    )
    results = [engine.run(p) for p in load_problems(DataConfig(dataset=args.dataset, limit=args.limit))]
    print(json.dumps({"accuracy": summarize(results, args.max_turns)["accuracy"]}))


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return seconds, out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="rosa2")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--dataset", default="embedded-math")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--max-turns", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--semantic-max-new-tokens", type=int, default=64)
    parser.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct:
        direct(args)
        return

    from rosa2 import models

    # the same model directory for both sides, whatever the project home
    model = str(models.ensure_embedded()) if args.model in models.EMBEDDED_ALIASES else args.model
    common = ["--method", args.method, "--model", model, "--dataset", args.dataset, "--limit", str(args.limit),
              "--max-turns", str(args.max_turns), "--max-new-tokens", str(args.max_new_tokens),
              "--semantic-max-new-tokens", str(args.semantic_max_new_tokens)]
    with tempfile.TemporaryDirectory(prefix="rosa2-bench-") as home:
        env = {**os.environ, "ROSA2_HOME": home}
        t_direct, out_direct = timed([sys.executable, __file__, "--direct", *common], env)
        study = f"bench-{int(time.time())}"
        t_platform, out_platform = timed([sys.executable, "-m", "rosa2", "run", *common, "--study", study, "--json", "--no-progress"], env)
    acc_direct = json.loads(out_direct.strip().splitlines()[-1])["accuracy"]
    acc_platform = json.loads(out_platform[out_platform.index("{"):])["cells"][0]["metrics"]["accuracy"]
    load = os.getloadavg()
    print(json.dumps({
        "cell": {"method": args.method, "model": args.model, "dataset": args.dataset, "limit": args.limit,
                 "max_turns": args.max_turns, "max_new_tokens": args.max_new_tokens,
                 "semantic_max_new_tokens": args.semantic_max_new_tokens},
        "direct_s": round(t_direct, 2), "platform_s": round(t_platform, 2),
        "overhead_s": round(t_platform - t_direct, 2), "ratio": round(t_platform / t_direct, 3),
        "same_accuracy": acc_direct == acc_platform, "loadavg_1m": round(load[0], 2), "cpus": os.cpu_count(),
    }, indent=1))


if __name__ == "__main__":
    main()
