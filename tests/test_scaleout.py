"""Scale-out on loopback (issue 6): the team topology (PostgreSQL + Prefect server + MLflow on it),
two process workers on one work pool, a worker killed mid-cell, and the same cells on Ray.

Real servers, real workers, real MLflow runs, the tiny random model. The sweep and Ray tests run
the platform's own ``sweep`` / ``experiment`` flows; the kill test runs tests/scaleout_cell.py,
a cell with the same tracking contract that can be made slow enough to be killed in its middle.
The throughput of one worker against two is measured by test_scaleout_bench.py.
"""

from __future__ import annotations

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
EXPERIMENT = "flows/experiment.py:experiment"
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
        """The worker's host dies: SIGKILL to the worker's group and to every process below it.
        Prefect starts each cell in a session of its own, so the group alone leaves the cell running
        (it used to die only on its next write to the dead worker's pipe, which a quiet cell never makes)."""
        import psutil

        if self.proc.poll() is None:
            cells = psutil.Process(self.proc.pid).children(recursive=True)
            os.killpg(self.proc.pid, signal.SIGKILL)
            for process in cells:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
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


def _experiment_cell(topology: dict, seed: int):
    """A real cell on the tiny model: 2 embedded math problems, 2 turns, 8 tokens."""
    from rosa2.config import DataConfig, GenerationConfig, ModelConfig, SessionConfig
    from rosa2.tasks.cells import Cell

    return Cell(model=ModelConfig(name=topology["model"], device="cpu"), session=SessionConfig(method="baseline", max_turns=2),
                data=DataConfig(dataset="embedded-math", limit=2), generation=GenerationConfig(max_new_tokens=8, seed=seed))


def _tracking(topology: dict, study: str):
    import dataclasses

    return dataclasses.replace(topology["tracking"], study=study, adapters="none")


def _cell_flow_runs() -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    from rosa2.flows.scaleout import CELL_TAG

    with get_client(sync_client=True) as client:  # (sort given: this server rejects a null one)
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[CELL_TAG])),
                                     sort=FlowRunSort.START_TIME_ASC, limit=200)


def _pool_cfg(**kw):
    from rosa2.flows.scaleout import ScaleoutConfig

    return ScaleoutConfig(**{"runner": "pool", "entrypoint": CELL, "pool": POOL, "lost_after_s": LOST_AFTER_S,
                             "poll_s": 1.0, **kw})


def _mlflow_runs(study: str) -> dict[str, list]:
    from mlflow import MlflowClient

    from rosa2.tasks.tracking import TAG_CELL

    mc = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = mc.get_experiment_by_name(study)
    by_key: dict[str, list] = {}
    for run in mc.search_runs([exp.experiment_id], max_results=1000):
        by_key.setdefault(run.data.tags[TAG_CELL], []).append(run)
    return by_key


def test_config_names_bad_values():
    from rosa2.flows.scaleout import ScaleoutConfig

    with pytest.raises(ConfigError, match="runner='slurm'.*local.*pool.*ray"):
        ScaleoutConfig(runner="slurm")
    with pytest.raises(ConfigError, match="entrypoint='experiment'"):
        ScaleoutConfig(entrypoint="experiment")
    with pytest.raises(ConfigError, match="lost_after_s=10"):
        ScaleoutConfig(lost_after_s=10)
    from rosa2.flows.sweep import parse

    grid = "models: [embedded]\ndatasets: [embedded-math]\nmethods: [baseline]\nseeds: [0]\n"
    with pytest.raises(ConfigError, match=r"s\.yaml:5: unknown field scaleout\.'gpus'"):
        parse(grid + "scaleout: {runner: ray, gpus: 1}\n", "s.yaml")
    with pytest.raises(ConfigError, match=r"s\.yaml:5: scaleout\.runner='slurm'"):
        parse(grid + "scaleout: {runner: slurm}\n", "s.yaml")
    assert parse(grid + "scaleout: {runner: ray, num_gpus: 0.5}\n", "s.yaml").scaleout.num_gpus == 0.5


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


@pytest.fixture(scope="module")
def workers(topology):
    """Two workers on one pool, as two GPU hosts would run them (--slots 1 each)."""
    started = {name: Worker(topology, name) for name in ("w1", "w2")}
    yield started
    for worker in started.values():
        worker.stop()


def test_two_workers_split_a_sweep_every_cell_once(topology, workers):
    """The platform's sweep flow with ``scaleout: {runner: pool}``: four cells, two workers."""
    from rosa2.flows.sweep import parse, sweep
    from rosa2.tasks.tracking import TAG_CELL, TAG_KIND

    text = (f"study: split\nmodels: [{topology['model']}]\ndatasets: [embedded-math]\nmethods: [baseline]\n"
            "seeds: [0, 1, 2, 3]\nsession: {max_turns: 2}\ndata: {limit: 2}\ngeneration: {max_new_tokens: 8}\n"
            "model: {device: cpu}\ntracking: {adapters: none}\n"
            f"scaleout: {{runner: pool, entrypoint: '{EXPERIMENT}', pool: {POOL}, lost_after_s: {LOST_AFTER_S}, poll_s: 1}}\n")
    spec = parse(text, "split.yaml")
    outcome = sweep(spec, topology["tracking"], progress=False)
    assert len(outcome.cells) == 4
    assert all(c.skipped for c in outcome.cells), "the parent ran a cell itself instead of gathering it from the pool"
    runs = [r for r in _cell_flow_runs() if r.parameters.get("entrypoint") == EXPERIMENT]
    assert len(runs) == 4 and all(r.state_name == "Completed" and r.run_count == 1 for r in runs), \
        [(r.name, r.state_name, r.run_count) for r in runs]
    workers_used = {t for r in runs for t in r.tags if t.startswith("worker:")}
    assert workers_used == {"worker:w1", "worker:w2"}, "one worker did all the work"
    for name in ("w1", "w2"):  # --slots 1: a worker never runs two cells at once
        spans = sorted((r.start_time, r.end_time) for r in runs if f"worker:{name}" in r.tags)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), f"{name} overlapped two cells"
    from mlflow import MlflowClient

    mc = MlflowClient(topology["tracking"].mlflow_uri)
    exp = mc.get_experiment_by_name("split")
    cells = mc.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'cell'")
    assert sorted(r.data.tags[TAG_CELL] for r in cells) == sorted(c.cell_key for c in outcome.cells), "a cell ran twice"
    assert all(r.info.status == "FINISHED" for r in cells)
    # resumable: the same sweep again creates no flow run and no MLflow run
    again = sweep(spec, topology["tracking"], progress=False)
    assert [c.run_id for c in again.cells] == [c.run_id for c in outcome.cells]
    assert len([r for r in _cell_flow_runs() if r.parameters.get("entrypoint") == EXPERIMENT]) == 4
    assert len(mc.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'cell'")) == 4


def test_a_worker_killed_mid_cell_is_retried_elsewhere(topology, workers):
    import threading

    from rosa2.flows.scaleout import run

    ledger = topology["home"] / "lost.jsonl"
    victim: list[int] = []

    def kill_w1_mid_cell() -> None:  # a plain thread: the sweep itself runs in the test's thread
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            started = [r["seed"] for r in ledger_rows(ledger) if r["worker"] == "w1"]
            if started:
                time.sleep(2)  # inside the cell: model loaded, problems under way (3 s each)
                workers["w1"].kill()
                victim.append(started[0])
                return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_w1_mid_cell, daemon=True)
    killer.start()
    lost = run(_cells(topology, range(10, 12), "lost-worker", ledger, pause_s=3.0), _pool_cfg())
    killer.join(5)
    assert victim, "w1 never started a cell"
    assert [r["state"] for r in lost] == ["Completed"] * 2
    by_seed = {r["parameters"]["seed"]: r for r in lost}
    assert by_seed[victim[0]]["run_count"] == 2
    assert {"worker:w1", "worker:w2"} <= set(by_seed[victim[0]]["tags"])
    attempts = [(r["worker"], r["event"]) for r in ledger_rows(ledger) if r["seed"] == victim[0]]
    assert attempts[0] == ("w1", "start") and attempts[-2:] == [("w2", "start"), ("w2", "end")], attempts
    assert ("w1", "end") not in attempts, "the cell of the killed worker went on running"
    runs = _mlflow_runs("lost-worker")
    assert len(runs) == 2
    for versions in runs.values():
        assert len(versions) == 1, "the retry made a second MLflow run instead of resuming the first"
        assert versions[0].info.status == "FINISHED" and versions[0].data.tags["rosa2.complete"] == "true"


def test_ray_gives_the_same_per_problem_results_as_one_process(topology):
    """The same cells through RayTaskRunner (local Ray) and in this process, each from scratch."""
    import torch
    from mlflow import MlflowClient

    from rosa2.flows.scaleout import ScaleoutConfig, run
    from rosa2.tasks.tracking import download_results

    def cells(study: str) -> list[dict]:
        return [{"cell": _experiment_cell(topology, s), "tracking": _tracking(topology, study), "progress": False}
                for s in range(2)]

    def per_problem(outcomes) -> list[tuple]:
        mc = MlflowClient(topology["tracking"].mlflow_uri)
        return [(r.problem_id, r.solved, [t.response for t in r.turns])
                for o in outcomes for r in download_results(mc, o.run_id)]

    def fresh(name: str, cfg: ScaleoutConfig) -> list:
        # a fresh result store each (Ray's workers inherit the environment): no problem is reused
        os.environ["ROSA2_HOME"] = str(topology["home"] / name)
        try:
            return run(cells(name), cfg)
        finally:
            os.environ["ROSA2_HOME"] = str(topology["home"])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray's workers run one thread: the same arithmetic, the same greedy tokens
    try:
        local = fresh("ray-local", ScaleoutConfig(runner="local", entrypoint=EXPERIMENT))
    finally:
        torch.set_num_threads(threads)
    on_ray = fresh("ray-ray", ScaleoutConfig(runner="ray", entrypoint=EXPERIMENT, num_gpus=0))
    assert not any(o.skipped for o in local + on_ray)
    assert {o.cell_key for o in on_ray} == {o.cell_key for o in local}
    assert per_problem(on_ray) == per_problem(local)
    assert len(per_problem(local)) == 4


def test_infra_files_are_accepted():
    """compose.yaml by Docker Compose itself; prefect.yaml's cell deployment loads its flow."""
    import yaml

    compose = ROOT / "infra" / "compose.yaml"
    tool = next(([c] for c in ("docker-compose",) if shutil.which(c)), None)
    if tool is None and shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        tool = ["docker", "compose"]
    if tool is None:
        pytest.skip("no Docker Compose here (infra/setup.sh installs Debian's docker-compose as root)")
    secrets = {"ROSA2_PG_PASSWORD": "p", "PREFECT_API_AUTH_STRING": "a:b", "MLFLOW_TRACKING_USERNAME": "a",
               "MLFLOW_TRACKING_PASSWORD": "b"}
    base = {k: v for k, v in os.environ.items() if k not in secrets}
    ok = subprocess.run([*tool, "-p", "rosa2", "-f", str(compose), "config"], capture_output=True, text=True,
                        env={**base, **secrets})
    assert ok.returncode == 0, ok.stderr
    rendered = yaml.safe_load(ok.stdout)
    assert {"postgres", "mlflow", "prefect", "worker-gpu0"} <= set(rendered["services"])
    for name in ("prefect", "mlflow"):  # compose v1 renders "IP:HOST:CONTAINER", v2 a mapping
        port = rendered["services"][name]["ports"][0]
        assert (port["host_ip"] if isinstance(port, dict) else port.split(":")[0]) == "127.0.0.1"
    missing = subprocess.run([*tool, "-p", "rosa2", "-f", str(compose), "config", "-q"], capture_output=True,
                             text=True, env=base)
    assert missing.returncode != 0 and "ROSA2_PG_PASSWORD" in missing.stderr, "servers must not start without secrets"

    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())
    cell = next(d for d in spec["deployments"] if d["name"] == "rosa2-cell")
    path, func = cell["entrypoint"].split(":")
    assert load_flow_from_entrypoint(f"{ROOT / path}:{func}").name == "rosa2-pool-cell"
