"""Math reward throughput: ``.venv/bin/python benchmarks/rewards_math.py`` prints one JSON object.

Measures, on the problems of ``--dataset`` (MATH-500 from ../shared/data when present, else the
embedded set), with responses that alternate a correct and a wrong boxed answer:

- ``cold_start_s``: the first gold parse, which starts the worker processes;
- ``single``: one new reward per problem (its gold parsed once) and ``score`` per response, in
  sequence, as the session loop calls it;
- ``batch``: ``score_many`` of ``--batch`` responses per problem, spread over the workers;
- ``in_process``: math-verify called directly in this process's main thread (no workers, no
  outer kill), the floor the worker hop is measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from rosa2.config import DataConfig
from rosa2.data import load_problems
from rosa2.rewards.math import MathReward, judge, parse_gold, verifier_pool, warm_up

SHARED_MATH500 = Path(__file__).resolve().parents[2] / "shared" / "data" / "math500.jsonl"


def responses_for(answer: str, n: int) -> list[str]:
    right = f"Step by step... so the final answer is $\\boxed{{{answer}}}$."
    wrong = f"Step by step... so the final answer is $\\boxed{{{answer} + 1}}$."
    return [right if i % 2 == 0 else wrong for i in range(n)]


def run(dataset: str, problems: int, batch: int) -> dict[str, object]:
    items = load_problems(DataConfig(dataset=dataset, limit=problems))
    pool = verifier_pool()

    start = time.perf_counter()
    MathReward(items[0]).score("\\boxed{0}")
    cold = time.perf_counter() - start

    start = time.perf_counter()
    single = [MathReward(p).score(r) for p in items for r in responses_for(p.answer or "", 2)]
    single_s = time.perf_counter() - start

    start = time.perf_counter()
    batched = [res for p in items for res in MathReward(p).score_many(responses_for(p.answer or "", batch))]
    batch_s = time.perf_counter() - start

    warm_up()  # import math-verify here too, outside the timing, as the workers did
    start = time.perf_counter()
    for p in items:
        blob, _ = parse_gold(p.answer or "", 5) or (b"", "")
        for r in responses_for(p.answer or "", 2):
            judge(blob, "\\boxed{" + r.split("\\boxed{", 1)[1].rsplit("}", 1)[0] + "}", False, 5, 5)
    in_process_s = time.perf_counter() - start

    return {
        "dataset": dataset,
        "problems": len(items),
        "workers": pool.size,
        "cpus": os.cpu_count(),
        "cold_start_s": round(cold, 3),
        "single": {"rewards": len(single), "seconds": round(single_s, 3), "rewards_per_s": round(len(single) / single_s, 1),
                   "correct": sum(r.reward > 0 for r in single)},
        "batch": {"rewards": len(batched), "batch": batch, "seconds": round(batch_s, 3),
                  "rewards_per_s": round(len(batched) / batch_s, 1), "correct": sum(r.reward > 0 for r in batched)},
        "in_process": {"rewards": 2 * len(items), "seconds": round(in_process_s, 3),
                       "rewards_per_s": round(2 * len(items) / in_process_s, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = f"math-500:{SHARED_MATH500}" if SHARED_MATH500.is_file() else "embedded-math"
    parser.add_argument("--dataset", default=default, help=f"math dataset (default: {default})")
    parser.add_argument("--problems", type=int, default=200, help="problems to use (default: 200)")
    parser.add_argument("--batch", type=int, default=8, help="responses per problem for score_many (default: 8)")
    args = parser.parse_args()
    print(json.dumps(run(args.dataset, args.problems, args.batch), indent=2))


if __name__ == "__main__":
    main()
