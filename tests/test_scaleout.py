"""Scale-out on loopback (issue 6): the team topology (PostgreSQL + Prefect server + MLflow on it),
two process workers on one work pool, a worker killed mid-cell, and the same sweep on Ray.

Real servers, real workers, real MLflow runs; the cell flow is tests/scaleout_cell.py (the tiny
random model). Throughput figures go to ``$ROSA2_SCALEOUT_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rosa2.config import ConfigError
from tests.scaleout_cell import ledger_rows

ROOT = Path(__file__).resolve().parents[1]
CELL = "tests/scaleout_cell.py:toy_cell"
POOL = "scaleout-test"
LOST_AFTER_S = 40  # heartbeats every 30 s: a dead worker's cell is back in the queue ≤ 45 s later


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def topology():
    """PostgreSQL (rosa2.team) + Prefect server + MLflow on it, under a throw-away project home."""
    from rosa2 import models, stack, team
    from rosa2.config import TrackingConfig

    # not under pytest's tmp (mode 0700): the 'postgres' user runs the cluster and must reach it
    home = Path(tempfile.mkdtemp(prefix="rosa2-team-"))
    home.chmod(0o755)
    saved = {k: os.environ.get(k) for k in ("ROSA2_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    model_dir = home / "tiny"
    tiny = models.tiny_random(seed=0)
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    os.environ["ROSA2_HOME"] = str(home)
    tracking = TrackingConfig(
        mlflow_uri=f"http://127.0.0.1:{_free_port()}", prefect_api_url=f"http://127.0.0.1:{_free_port()}/api"
    )
    db = team.up(port=_free_port())
    try:
        stack.up(tracking, stack.StackConfig(database_url="team"))
        os.environ["PREFECT_API_URL"] = tracking.prefect_api_url
        os.environ["MLFLOW_TRACKING_URI"] = tracking.mlflow_uri
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: tracking.prefect_api_url}):
            yield {"home": home, "tracking": tracking, "db": db, "model": str(model_dir)}
    finally:
        stack.down(tracking)
        team.down()
        shutil.rmtree(home, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Worker:
    """``rosa2 worker start`` in its own process group, like a GPU host of its own."""

    def __init__(self, topology: dict, name: str) -> None:
        tracking = topology["tracking"]
        log = open(topology["home"] / f"worker-{name}.log", "ab")
        self.name = name
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "rosa2"), "worker", "start", "--pool", POOL, "--name", name,
             "--prefect-api-url", tracking.prefect_api_url, "--mlflow-uri", tracking.mlflow_uri],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=topology["home"],
            env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"},
        )

    def kill(self) -> None:
        """The host dies: the worker and the cell it runs, at once."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def _cells(topology: dict, seeds: range, study: str, ledger: Path, pause_s: float = 0.0) -> list[dict]:
    return [
        {"model_dir": topology["model"], "method": "baseline", "seed": s, "study": study, "ledger": str(ledger),
         "pause_s": pause_s}
        for s in seeds
    ]


def _pool_cfg(**kw):
    from flows.scaleout import ScaleoutConfig

    return ScaleoutConfig(runner="pool", entrypoint=CELL, pool=POOL, lost_after_s=LOST_AFTER_S, poll_s=1.0, **kw)


def _mlflow_runs(study: str) -> dict[str, list]:
    from mlflow import MlflowClient

    from tasks.tracking import TAG_CELL

    mc = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = mc.get_experiment_by_name(study)
    by_key: dict[str, list] = {}
    for run in mc.search_runs([exp.experiment_id], max_results=1000):
        by_key.setdefault(run.data.tags[TAG_CELL], []).append(run)
    return by_key


def _report(figures: dict) -> None:
    target = os.environ.get("ROSA2_SCALEOUT_REPORT")
    print("scale-out figures:", json.dumps(figures))
    if target:
        with open(target, "a") as fh:
            fh.write(json.dumps(figures) + "\n")


def test_config_names_bad_values():
    from flows.scaleout import ScaleoutConfig

    with pytest.raises(ConfigError, match="runner='slurm'.*local.*pool.*ray"):
        ScaleoutConfig(runner="slurm")
    with pytest.raises(ConfigError, match="entrypoint='experiment'"):
        ScaleoutConfig(entrypoint="experiment")
    with pytest.raises(ConfigError, match="lost_after_s=10"):
        ScaleoutConfig(lost_after_s=10)


def test_team_database_is_postgres_on_loopback(topology):
    import psycopg

    db = topology["db"]
    assert db.prefect_url.startswith("postgresql+asyncpg://rosa2:") and "@127.0.0.1:" in db.prefect_url
    with psycopg.connect(db.url("prefect")) as conn, conn.cursor() as cur:
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone()[0] == "127.0.0.1"
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'flow_run'")
        assert cur.fetchone()[0] == 1, "Prefect server did not migrate its schema into PostgreSQL"
    with psycopg.connect(db.mlflow_uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'")
        assert cur.fetchone()[0] == 1, "MLflow did not put its backend store in PostgreSQL"


def test_two_workers_split_a_sweep_and_a_lost_worker_is_retried(topology):
    """One worker, then two, on one pool; then one of them dies in the middle of a cell."""
    from flows.scaleout import run

    home = topology["home"]
    ledger = home / "ledger.jsonl"
    first = Worker(topology, "w1")
    second = None
    try:
        # one worker: 4 cells, one at a time (--slots 1: never two sessions on one GPU)
        t0 = time.monotonic()
        one = run(_cells(topology, range(0, 4), "one-worker", ledger), _pool_cfg())
        t_one = time.monotonic() - t0
        assert [r["state"] for r in one] == ["Completed"] * 4
        spans = sorted((r["t"], r["event"]) for r in ledger_rows(ledger) if r["seed"] < 4)
        assert [e for _, e in spans] == ["start", "end"] * 4, "a worker with --slots 1 ran two cells at once"

        # two workers: 4 more cells split between them, every cell exactly once
        second = Worker(topology, "w2")
        t0 = time.monotonic()
        two = run(_cells(topology, range(4, 8), "two-workers", ledger), _pool_cfg())
        t_two = time.monotonic() - t0
        assert [r["state"] for r in two] == ["Completed"] * 4
        assert all(r["run_count"] == 1 for r in two)
        starts = [r for r in ledger_rows(ledger) if r["seed"] >= 4 and r["event"] == "start"]
        assert sorted(r["seed"] for r in starts) == [4, 5, 6, 7], "a cell ran twice or not at all"
        assert {r["worker"] for r in starts} == {"w1", "w2"}, "one worker did all the work"
        worker_tags = {t for r in two for t in r["tags"] if t.startswith("worker:")}
        assert worker_tags == {"worker:w1", "worker:w2"}
        runs = _mlflow_runs("two-workers")
        assert len(runs) == 4 and all(len(v) == 1 and v[0].info.status == "FINISHED" for v in runs.values())
        _report({
            "cells": 4, "one_worker_s": round(t_one, 1), "two_workers_s": round(t_two, 1),
            "cells_per_hour_one": round(4 * 3600 / t_one), "cells_per_hour_two": round(4 * 3600 / t_two),
            "speedup": round(t_one / t_two, 2), "cores": os.cpu_count(),
        })

        # kill w1 in the middle of a cell: the cell goes back to the pool and w2 finishes it
        from concurrent.futures import ThreadPoolExecutor

        cells = _cells(topology, range(8, 10), "lost-worker", ledger, pause_s=3.0)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(run, cells, _pool_cfg())
            deadline = time.monotonic() + 120
            while not any(r["worker"] == "w1" and r["seed"] >= 8 for r in ledger_rows(ledger)):
                assert time.monotonic() < deadline, "w1 never started a cell"
                assert not pending.done(), pending.result()
                time.sleep(0.5)
            time.sleep(2)  # inside the cell: model loaded, problems under way
            first.kill()
            victim = next(r["seed"] for r in ledger_rows(ledger) if r["worker"] == "w1" and r["seed"] >= 8)
            lost = pending.result(timeout=240)
        assert [r["state"] for r in lost] == ["Completed"] * 2
        by_seed = {r["parameters"]["seed"]: r for r in lost}
        assert by_seed[victim]["run_count"] == 2
        assert {"worker:w1", "worker:w2"} <= set(by_seed[victim]["tags"])
        attempts = [(r["worker"], r["event"]) for r in ledger_rows(ledger) if r["seed"] == victim]
        assert attempts == [("w1", "start"), ("w2", "start"), ("w2", "end")]
        runs = _mlflow_runs("lost-worker")
        assert len(runs) == 2
        for versions in runs.values():
            assert len(versions) == 1, "the retry made a second MLflow run instead of resuming the first"
            assert versions[0].info.status == "FINISHED" and versions[0].data.tags["rosa2.complete"] == "true"
    finally:
        first.stop()
        if second:
            second.stop()


@pytest.mark.timeout(240)
def test_ray_gives_the_same_per_problem_results_as_one_process(topology):
    from flows.scaleout import ScaleoutConfig, run

    ledger = topology["home"] / "ray-ledger.jsonl"

    def per_problem(results: list[list[dict]]) -> list[tuple]:
        return [(p["problem_id"], p["solved"], p["turns"][0]["response"]) for cell in results for p in cell]

    local = run(_cells(topology, range(4), "ray-local", ledger), ScaleoutConfig(runner="local", entrypoint=CELL))
    on_ray = run(_cells(topology, range(4), "ray-ray", ledger),
                 ScaleoutConfig(runner="ray", entrypoint=CELL, num_gpus=0))
    assert per_problem(on_ray) == per_problem(local)
    assert len(per_problem(local)) == 12
    assert all(r["worker"] == "local" for r in ledger_rows(ledger))
    with pytest.raises(ConfigError, match="num_gpus=1.0 per cell, but the Ray cluster has 0"):
        run(_cells(topology, range(1), "ray-gpu", ledger), ScaleoutConfig(runner="ray", entrypoint=CELL, num_gpus=1))
