"""Runs that end honestly (issue 17.4, 14.2), against a real MLflow server and a real Prefect server
on loopback: SIGTERM marks the cell and its parent KILLED; an error after the start marks the run
FAILED with the error as a tag; after ``kill -9`` the rerun marks the abandoned flow run Crashed;
two runs of one cell at once make one run and compute each problem once; bad model / dataset paths
fail before anything is logged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TIMEOUT = 600  # generous: 2 shared cores may be busy with other work


def _env(tracking, home: Path) -> dict[str, str]:
    return {**os.environ, "ROSA2_HOME": str(home), "MLFLOW_TRACKING_URI": tracking.mlflow_uri,
            "PREFECT_API_URL": tracking.prefect_api_url, "PREFECT_HOME": str(home / "prefect")}


def _run_args(tiny_dir, study: str, methods=("baseline",), limit: int = 2) -> list[str]:
    return [sys.executable, "-m", "rosa2", "run", "--method", *methods, "--model", str(tiny_dir), "--model-device", "cpu",
            "--limit", str(limit), "--max-turns", "2", "--max-new-tokens", "8", "--semantic-max-new-tokens", "8",
            "--study", study, "--json", "--no-progress"]


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _runs(mc, study: str) -> list:
    exp = mc.get_experiment_by_name(study)
    return [] if exp is None else list(mc.search_runs([exp.experiment_id]))


def _wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = TIMEOUT, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _prefect(tracking, path: str, body: dict | None = None):
    url = tracking.prefect_api_url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture()
def mc(platform_servers):
    from rosa2.tasks import tracking as tr

    return tr.client(platform_servers[0])


def test_sigterm_marks_the_cell_and_its_parent_killed(platform_servers, tiny_dir, tmp_path, mc):
    tracking, _ = platform_servers
    study = "sigterm-test"
    proc = _start(_run_args(tiny_dir, study, ("baseline", "rosa2"), limit=50), _env(tracking, tmp_path / "home"))
    try:
        _wait_for(lambda: any(r.data.tags.get("rosa2.kind") == "cell" and r.info.status == "RUNNING" for r in _runs(mc, study)),
                  proc, what="the first cell run started")
        time.sleep(2)  # inside the sessions
        proc.send_signal(signal.SIGTERM)  # what a scheduler does to stop a job
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "rosa2 run: interrupted" in err
    runs = _runs(mc, study)
    kinds = {r.data.tags.get("rosa2.kind"): r for r in runs}
    assert set(kinds) == {"run", "cell"}, [(r.data.tags.get("rosa2.kind"), r.info.status) for r in runs]
    assert [r.info.status for r in runs] == ["KILLED", "KILLED"], [(r.data.tags.get("rosa2.kind"), r.info.status) for r in runs]
    assert all(r.data.tags.get("rosa2.ended_by") == "SIGTERM" for r in runs)
    assert all(r.info.end_time for r in runs)


def test_a_run_that_fails_after_starting_ends_failed_with_the_error_as_a_tag(platform_servers, tiny_dir, tmp_path, mc):
    import shutil

    tracking, _ = platform_servers
    study = "failed-test"
    model = tmp_path / "no-weights"  # passes the early check (config and tokenizer load), fails in the cell
    shutil.copytree(tiny_dir, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    out = subprocess.run(_run_args(model, study, ("baseline", "rosa")), cwd=ROOT, env=_env(tracking, tmp_path / "home"),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("rosa2 run: error: could not load model"), out.stderr[-3000:]
    runs = _runs(mc, study)
    statuses = sorted((r.data.tags.get("rosa2.kind"), r.info.status) for r in runs)
    assert statuses == [("cell", "FAILED"), ("run", "FAILED")], statuses
    for run in runs:
        assert run.data.tags["rosa2.error"].startswith("ModelError: could not load model"), run.data.tags
        assert "\n" not in run.data.tags["rosa2.error"]
    assert not [r for r in runs if r.info.status == "RUNNING"]


@pytest.mark.parametrize("option, value, message", [
    ("--model", "/nonexistent/model", "model '/nonexistent/model' is neither"),
    ("--model", str(ROOT / "tests"), "has no config.json"),
    ("--model", "BROKEN", "cannot be loaded (ValueError"),  # a config.json, but no tokenizer
    ("--dataset", "/nonexistent/problems.jsonl", "dataset file '/nonexistent/problems.jsonl' does not exist"),
])
def test_bad_model_or_dataset_paths_fail_before_any_flow_or_mlflow_run(platform_servers, tiny_dir, tmp_path, mc, option, value, message):
    tracking, _ = platform_servers
    study = f"preflight-{option.strip('-')}-{len(message)}"
    before = _prefect(tracking, "/flow_runs/count", {})
    if value == "BROKEN":
        value = str(tmp_path / "broken")
        Path(value).mkdir()
        Path(value, "config.json").write_text(json.dumps({"model_type": "llama"}))
    args = [*_run_args(tiny_dir, study), option, value]  # the last --model / --dataset wins
    start = time.monotonic()
    out = subprocess.run(args, cwd=ROOT, env=_env(tracking, tmp_path / "home"), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"rosa2 run: error: {out.stderr.strip().split('error: ', 1)[1]}"], out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert mc.get_experiment_by_name(study) is None  # nothing logged to MLflow
    assert _prefect(tracking, "/flow_runs/count", {}) == before  # no flow run started
    assert time.monotonic() - start < 120


def test_kill_9_then_the_rerun_marks_the_abandoned_flow_run_crashed(platform_servers, tiny_dir, tmp_path, mc):
    tracking, _ = platform_servers
    study = "kill9-test"
    home = tmp_path / "home"
    args, env = _run_args(tiny_dir, study, limit=50), _env(tracking, home)
    proc = _start(args, env)

    def holder():
        for path in (home / "locks").glob("*.lock") if (home / "locks").is_dir() else []:
            text = path.read_text()
            if text.strip() and json.loads(text).get("flow_run_id") and _runs(mc, study):
                return json.loads(text)
        return None

    try:
        record = _wait_for(holder, proc, what="the cell was claimed and its run opened")
    finally:
        proc.send_signal(signal.SIGKILL)  # the process we started, by its id
        proc.wait()
    abandoned = record["flow_run_id"]
    assert record["pid"] == proc.pid
    assert _prefect(tracking, f"/flow_runs/{abandoned}")["state"]["type"] == "RUNNING"  # what kill -9 leaves
    (run,) = _runs(mc, study)
    assert run.info.status == "RUNNING"

    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    state = _prefect(tracking, f"/flow_runs/{abandoned}")["state"]
    assert state["type"] == "CRASHED", state
    assert f"process {proc.pid}" in state["message"]
    (after,) = _runs(mc, study)  # resumed into the same run, finished
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"


def test_two_runs_of_one_cell_at_once_make_one_run_and_compute_each_problem_once(platform_servers, tiny_dir, tmp_path, mc):
    from rosa2.tasks import tracking as tr

    tracking, _ = platform_servers
    study = "concurrent-test"
    home = tmp_path / "home"
    args, env = _run_args(tiny_dir, study, limit=6), _env(tracking, home)
    procs = [_start(args, env) for _ in range(2)]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    cells = [json.loads(out[out.index("{"):])["cells"][0] for out, _ in outs]
    assert sorted(c["skipped"] for c in cells) == [False, True]  # one computed it, the other found it finished
    waited = [err for _, err in outs if "is being run by pid" in err]
    assert len(waited) == 1 and "waiting for it to finish" in waited[0]
    (run,) = _runs(mc, study)
    assert {c["mlflow_run"] for c in cells} == {tr.run_url(tracking, run)}
    assert run.info.status == "FINISHED"
    history = mc.get_metric_history(run.info.run_id, "accuracy_pct")
    assert [m.step for m in history] == [0], "the cell's metrics were uploaded more than once"
    assert len(tr.download_results(mc, run.info.run_id)) == 6
    assert len(list((home / "results" / "problems").rglob("*.json"))) == 6


def test_eight_openers_of_one_cell_key_under_its_claim_share_one_run(platform_servers, mc, tmp_path):
    """What the experiment flow does before it opens a cell's run; without the claim the eight
    find-then-create calls race and make several runs (measured: 8 runs of 8, three times of three)."""
    from rosa2.tasks import publish
    from rosa2.tasks.cells import Cell, claim

    tracking, _ = platform_servers
    tracking = type(tracking)(**{**tracking.__dict__, "study": "open-race-test"})
    barrier = threading.Barrier(8)
    got: list[str] = []
    errors: list[BaseException] = []
    waits: list[str] = []

    def open_one() -> None:
        try:
            barrier.wait()
            with claim("race-key", home=tmp_path, on_wait=waits.append):
                got.append(publish.cell_run(tracking, Cell(), "race-key", None).run_id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    (run,) = _runs(mc, "open-race-test")
    assert got == [run.info.run_id] * 8
    assert waits and all("cell race-key is being run by pid" in w for w in waits)


def test_a_claim_says_who_holds_it_and_is_released_by_death(tmp_path):
    from rosa2.tasks.cells import CellBusy, claim

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rosa2.tasks.cells import claim\n"
         f"with claim('k1', home={str(tmp_path)!r}, flow_run_id='fr-1'):\n    print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CellBusy, match=rf"cell k1 is being run by pid {holder.pid} on "):
            with claim("k1", wait=False, home=tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with claim("k1", wait=False, home=tmp_path) as previous:  # the kernel dropped the dead holder's lock
        assert previous["pid"] == holder.pid and previous["flow_run_id"] == "fr-1"
    with claim("k1", wait=False, home=tmp_path) as previous:
        assert previous == {}  # a holder that finished leaves nothing to clean up
