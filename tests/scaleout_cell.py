"""A small cell flow for the scale-out tests: real model, real MLflow run, real per-problem results.

It stands in for the platform's ``experiment`` flow with the same tracking contract (one MLflow
run per cell key, reused by a retry, ``results.jsonl``, ``rosa2.complete``), generates greedy
answers with the tiny random model, and appends one line per attempt to a ledger file, so a test
can count how often each cell really ran and on which worker.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefect import flow

from rosa2.config import GenerationConfig, ModelConfig, TrackingConfig
from rosa2.records import ProblemResult, TurnRecord


@flow(name="rosa2-toy-cell")
def toy_cell(model_dir: str, method: str, seed: int, study: str, ledger: str, problems: int = 3,
             pause_s: float = 0.0) -> list[dict]:
    import torch

    from rosa2 import models
    from rosa2.policy import Policy
    from rosa2.tasks import tracking
    from rosa2.tasks.cells import digest

    torch.set_num_threads(1)  # same arithmetic in every process: results comparable across runners
    key = digest({"model": model_dir, "method": method, "seed": seed, "problems": problems})
    worker = os.environ.get("ROSA2_WORKER", "local")
    with open(ledger, "a") as fh:
        fh.write(json.dumps({"key": key, "seed": seed, "worker": worker, "event": "start", "t": time.time()}) + "\n")
    mc = tracking.client(TrackingConfig(mlflow_uri=os.environ["MLFLOW_TRACKING_URI"]))
    exp = tracking.experiment_id(mc, study)
    run, _ = tracking.open_run(mc, exp, tracking.TAG_CELL, key, f"{method} seed {seed}", "cell")
    if tracking.is_complete(run):
        return [r.to_dict() for r in tracking.download_results(mc, run.info.run_id)]
    tracking.set_tags(mc, run.info.run_id, {f"rosa2.worker.{worker}": "ran"})
    policy = Policy(models.load(ModelConfig(name=model_dir, device="cpu")), GenerationConfig(max_new_tokens=8))
    results = []
    for i in range(problems):
        start = time.perf_counter()
        prompt = f"What is {seed} + {i}? ({method})"
        reply = policy.generate([{"role": "user", "content": prompt}])
        solved = str(seed + i) in reply.text
        turn = TurnRecord(
            turn=1, reward=1.0 if solved else -1.0, response=reply.text, message=prompt, feedback="",
            refined_feedback="", words_on=False, weights_on=False, delta_theta_sq=0.0, delta_x_sq=0.0,
            semantic_fallback=False, tokens=reply.tokens, seconds_generate=reply.seconds, seconds_parametric=0.0,
            seconds_semantic=0.0, seconds_reward=0.0, peak_memory_bytes=0,
        )
        results.append(ProblemResult(
            problem_id=f"s{seed}-p{i}", method=method, seconds=time.perf_counter() - start, max_turns=1, turns=[turn],
        ))
        time.sleep(pause_s)
    tracking.log_results(mc, run.info.run_id, results)
    tracking.set_tags(mc, run.info.run_id, {tracking.TAG_COMPLETE: "true"})
    tracking.finish(mc, run.info.run_id)
    with open(ledger, "a") as fh:
        fh.write(json.dumps({"key": key, "seed": seed, "worker": worker, "event": "end", "t": time.time()}) + "\n")
    return [r.to_dict() for r in results]


def ledger_rows(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
