"""The platform against a real MLflow server and a real Prefect server on loopback (rosa2.stack):
a cell's metrics and artifacts, report = metrics recomputed from the per-problem artifact,
adapters, sweeps with one child per cell, kill-and-resume, the nightly deployment, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rosa2 import report
from rosa2.config import (
    ConfigError, DataConfig, GenerationConfig, ModelConfig, SemanticConfig, SessionConfig, TrackingConfig, flatten,
)
from rosa2.metrics import summarize

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_cell(tiny_dir, method: str, seed: int = 0):
    from rosa2.tasks.cells import Cell

    return Cell(
        model=ModelConfig(name=str(tiny_dir), device="cpu"),
        session=SessionConfig(method=method, max_turns=2),
        data=DataConfig(limit=2),
        generation=GenerationConfig(max_new_tokens=8, seed=seed),
        semantic=SemanticConfig(max_new_tokens=16),
    )


def client(tracking):
    from rosa2.tasks import tracking as tr

    return tr.client(tracking)


def test_cell_logs_metrics_artifacts_adapters_and_the_report_matches_the_results(platform, tiny_dir):
    from rosa2.flows.experiment import experiment
    from rosa2.cli.adapters import layer_norms, list_adapters, pull
    from rosa2.cli.report import study_cells
    from rosa2.tasks import tracking as tr

    tracking = dataclasses.replace(platform, study="cell-test", adapters="all")
    cell = tiny_cell(tiny_dir, "rosa")
    outcome = experiment(cell, tracking, None, False)
    assert not outcome.skipped
    mc = client(tracking)
    run = mc.get_run(outcome.run_id)

    # params: every config field, flattened
    expected = flatten(**cell.configs(), tracking=tracking)
    assert set(expected) <= set(run.data.params)
    assert run.data.params["adapt.beta"] == str(cell.adapt.beta)
    # final metrics and per-turn curves as steps 1..K, a point where the curve has a value
    for name in tr.FINAL_METRICS:
        assert name in run.data.metrics, name
    steps = sorted(m.step for m in mc.get_metric_history(run.info.run_id, "by_turn/accuracy_pct"))
    assert steps == [1, 2], steps
    theta = {m.step: m.value for m in mc.get_metric_history(run.info.run_id, "by_turn/delta_theta_sq")}
    assert set(theta) == {1} and theta[1] > 0  # rosa updated the weights after a rejected first turn, not after the last
    assert "by_turn/delta_x_sq" not in run.data.metrics  # rosa has no words stream: no ‖Δx‖² point at all
    # artifacts: results + transcripts, table, lineage, plots, report, adapters (weights only)
    names = {a.path for a in mc.list_artifacts(run.info.run_id)}
    assert {"results.jsonl", "results_table.json", "report.md", "accuracy_by_turn.png", "dynamics.png", "dataset", "adapters"} <= names
    lineage = json.loads(Path(mc.download_artifacts(run.info.run_id, "dataset/lineage.json")).read_text())
    assert lineage["fingerprint"] == run.data.tags["rosa2.fingerprint"]
    assert run.inputs.dataset_inputs[0].dataset.digest == lineage["fingerprint"]
    results = tr.download_results(mc, run.info.run_id)
    assert len(results) == 2 and all(r.turns and r.turns[0].response is not None for r in results)

    # the report's numbers equal the metrics recomputed from the per-problem artifact
    recomputed = summarize(results, cell.session.max_turns)
    from_mlflow = study_cells(tracking)
    assert len(from_mlflow) == 1
    mine = dataclasses.replace(from_mlflow[0], summary=recomputed)
    assert report.render(from_mlflow, "t") == report.render([mine], "t")
    assert from_mlflow[0].summary["accuracy"] == pytest.approx(recomputed["accuracy"])
    assert report.curve(from_mlflow[0].summary, "accuracy_at_turn") == pytest.approx(recomputed["accuracy_at_turn"])

    # adapters: listed, pulled, loaded onto the base model, promoted with an alias
    rows = list_adapters(mc, tracking.study)
    assert {r["problem"] for r in rows} == {tr.safe_name(r.problem_id) for r in results}
    path = pull(mc, run.info.run_id, results[0].problem_id, Path(os.environ["ROSA2_HOME"]) / "pulled")
    assert (path / "adapter_model.safetensors").is_file() and not list(path.glob("model*.safetensors"))
    from rosa2 import models

    norms = layer_norms(models.load(ModelConfig(name=str(tiny_dir), device="cpu")), path)
    assert norms and sum(b for _, _, b, _ in norms) > 0
    version = tr.register_adapter(mc, run.info.run_id, results[0].problem_id, "tiny-adapter", "champion")
    assert mc.get_model_version_by_alias("tiny-adapter", "champion").version == version.version

    # rerun: the finished cell is skipped, no second run appears
    again = experiment(cell, tracking, None, False)
    assert again.skipped and again.run_id == outcome.run_id
    exp = mc.get_experiment_by_name(tracking.study)
    assert len(mc.search_runs([exp.experiment_id])) == 1


SWEEP = """\
study: {study}
models: [{model}]
datasets: [embedded-math]
methods: [baseline, rosa2]
seeds: [0]
session: {{max_turns: 2}}
data: {{limit: 2}}
generation: {{max_new_tokens: 8}}
semantic: {{max_new_tokens: 16}}
model: {{device: cpu}}
"""


def test_sweep_creates_a_parent_with_one_child_per_cell(platform, tiny_dir, tmp_path):
    from rosa2.flows import sweep as sweep_module
    from rosa2.tasks import tracking as tr

    path = tmp_path / "grid.yaml"
    path.write_text(SWEEP.format(study="sweep-test", model=tiny_dir))
    spec = sweep_module.load(path)
    outcome = sweep_module.sweep(spec, platform, False)
    mc = client(platform)
    exp = mc.get_experiment_by_name("sweep-test")
    runs = mc.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(tr.TAG_KIND) == "sweep"]
    children = [r for r in runs if r.data.tags.get(tr.TAG_KIND) == "cell"]
    assert len(parents) == 1 and parents[0].info.run_id == outcome.run_id
    assert len(children) == 2
    assert {c.data.tags[tr.TAG_PARENT] for c in children} == {outcome.run_id}
    assert {c.data.params["session.method"] for c in children} == {"baseline", "rosa2"}
    assert "report.md" in {a.path for a in mc.list_artifacts(outcome.run_id)}
    assert "| baseline |" in outcome.report and "| rosa2 |" in outcome.report
    # the report is a Prefect artifact too
    # (prefect 3.8.8's client filter sends nulls that this server's validation rejects: plain HTTP)
    import urllib.request

    with urllib.request.urlopen(f"{platform.prefect_api_url}/artifacts/rosa2-report-sweep-test/latest", timeout=30) as response:
        artifact = json.loads(response.read())
    assert artifact["type"] == "markdown" and "Table 1" in artifact["data"]


def _sweep_process(path: Path, tracking: TrackingConfig, home: Path) -> subprocess.Popen:
    env = {**os.environ, "ROSA2_HOME": str(home), "MLFLOW_TRACKING_URI": tracking.mlflow_uri,
           "PREFECT_API_URL": tracking.prefect_api_url, "PREFECT_HOME": str(home / "prefect")}
    return subprocess.Popen(
        [sys.executable, "-m", "rosa2", "sweep", str(path), "--json", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_kill_a_sweep_and_rerun_it_skips_finished_cells_without_duplicates(platform_servers, tiny_dir, tmp_path):
    from rosa2.tasks import tracking as tr

    tracking, _ = platform_servers
    study = "resume-test"
    path = tmp_path / "grid.yaml"
    grid = SWEEP.format(study=study, model=tiny_dir).replace("methods: [baseline, rosa2]", "methods: [baseline]")
    path.write_text(grid.replace("seeds: [0]", "seeds: [0, 1, 2]"))
    home = tmp_path / "home"
    mc = client(tracking)

    def complete_cells():
        exp = mc.get_experiment_by_name(study)
        if exp is None:
            return []
        return [r for r in mc.search_runs([exp.experiment_id]) if r.data.tags.get(tr.TAG_KIND) == "cell" and tr.is_complete(r)]

    proc = _sweep_process(path, tracking, home)
    deadline = time.monotonic() + 600  # generous: 2 shared cores may be busy with other work
    while not complete_cells() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert proc.poll() is None, "the sweep ended before it could be killed: " + proc.stderr.read()[-2000:]
    assert complete_cells(), "no cell finished within the deadline"
    proc.send_signal(signal.SIGKILL)  # the process we started, by its id
    proc.wait()
    first = complete_cells()
    assert 1 <= len(first) < 3
    first_ids = {r.info.run_id for r in first}

    proc = _sweep_process(path, tracking, home)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    cells = json.loads(out[out.index("{"):])["cells"]
    assert len(cells) == 3
    skipped = [c for c in cells if c["skipped"]]
    assert len(skipped) >= len(first_ids)  # finished cells were not run again

    exp = mc.get_experiment_by_name(study)
    runs = mc.search_runs([exp.experiment_id])
    cell_runs = [r for r in runs if r.data.tags.get(tr.TAG_KIND) == "cell"]
    keys = [r.data.tags[tr.TAG_CELL] for r in cell_runs]
    assert len(keys) == len(set(keys)) == 3, "duplicate or missing cell runs"
    assert all(tr.is_complete(r) for r in cell_runs)
    assert first_ids <= {r.info.run_id for r in cell_runs}
    assert len([r for r in runs if r.data.tags.get(tr.TAG_KIND) == "sweep"]) == 1
    # every problem of every cell is stored once under the home
    assert len(list((home / "results" / "problems").rglob("*.json"))) == 6


def test_nightly_deployment_is_registered_with_its_cron_schedule(platform, tiny_dir, tmp_path):
    from prefect import get_client

    from rosa2.flows import nightly

    path = tmp_path / "grid.yaml"
    path.write_text(SWEEP.format(study="nightly-test", model=tiny_dir))
    deployment_id = nightly.register(path, "0 2 * * *", platform)
    with get_client(sync_client=True) as pc:
        deployment = pc.read_deployment(deployment_id)
    assert deployment.name == "nightly"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.parameters == {"spec_path": str(path.resolve())}
    with pytest.raises(ConfigError, match="cron='every night'"):
        nightly.register(path, "every night", platform)


def test_run_says_which_server_is_down_and_how_to_start_it(tmp_path):
    from conftest import free_port

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    out = subprocess.run([sys.executable, "-m", "rosa2", "run", "--limit", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "mlflow at http://127.0.0.1" in out.stderr and "prefect at http://127.0.0.1" in out.stderr
    assert "rosa2 stack up" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "text, match",
    [
        ("models: [embedded]\ndatasets: [embedded-math]\nmethods: [rosa]\nseeds: [0]\ncolour: red\n", r":5: unknown field 'colour'"),
        ("models: [embedded]\ndatasets: [embedded-math]\nmethods: [rosa]\nseeds: [0]\nadapt:\n  beta: 1\n  betta: 2\n", r":7: unknown field adapt.'betta'"),
        ("models: [embedded]\ndatasets: [embedded-math]\nmethods: [rosa]\nseeds: [0]\nadapt:\n  beta: -1\n", r":6: adapt: beta=-1"),
        ("models: [embedded]\ndatasets: [embedded-math]\nmethods: [rosa]\nseeds: [0]\nadapt:\n  eta: fast\n", r":6: adapt.eta='fast' is not allowed; expected float"),
        ("models: [embedded]\ndatasets: [embedded-math]\nmethods:\n  - rosa\n  - rosa3\nseeds: [0]\n", r":5: methods: method='rosa3'"),
        ("models: [embedded]\ndatasets: [embedded-math]\nmethods: [rosa]\nseeds: [zero]\n", r":4: seeds=\['zero'\]"),
        ("models: [embedded]\ndatasets: [embedded-math]\nmethods: [rosa]\nseeds: [0]\nsession: {method: rosa2}\n", r"session.'method'; set by the grid list 'methods'"),
        ("models: [embedded]\nmethods: [rosa]\nseeds: [0]\n", r"missing field 'datasets'"),
        # 17.5: a key given twice is named at its second line, not silently the last one kept
        ("models: [embedded]\ndatasets: [embedded-math]\nmethods: [rosa]\nseeds: [0]\nseeds: [1]\n", r":5: 'seeds' is given twice \(first at line 4\)"),
        ("models: [embedded]\ndatasets: [embedded-math]\nmethods: [rosa]\nseeds: [0]\nadapt:\n  beta: 1\n  eta: 2\n  beta: 3\n", r":8: adapt.'beta' is given twice \(first at line 6\)"),
    ],
)
def test_sweep_file_errors_name_the_field_and_line(text, match, tmp_path):
    from rosa2.flows import sweep as sweep_module

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        sweep_module.load(path)
    assert str(path) in str(info.value)


def test_sweep_file_grid_expands_to_cells(tmp_path):
    from rosa2.flows import sweep as sweep_module

    path = tmp_path / "grid.yaml"
    path.write_text(SWEEP.format(study="s", model="embedded").replace("seeds: [0]", "seeds: [0, 1, 2]"))
    spec = sweep_module.load(path)
    cells = spec.cells()
    assert len(cells) == 6
    assert {(c.method, c.seed) for c in cells} == {(m, s) for m in ("baseline", "rosa2") for s in (0, 1, 2)}
    assert all(c.session.max_turns == 2 and c.data.limit == 2 for c in cells)
    assert len({c.key("fp") for c in cells}) == 6  # deterministic and distinct keys
    assert cells[0].key("fp") == sweep_module.load(path).cells()[0].key("fp")
    assert spec.tracking().study == "s"


def test_mlflow_down_mid_run_keeps_results_and_the_rerun_uploads_them(platform, tiny_dir, tmp_path):
    from conftest import free_port
    from rosa2.flows.experiment import experiment
    from rosa2 import stack
    from rosa2.tasks import publish, sessions
    from rosa2.tasks.cells import ResultStore

    own = dataclasses.replace(platform, mlflow_uri=f"http://127.0.0.1:{free_port()}", study="offline-test")
    server_home = tmp_path / "mlflow-home"
    stack.start("mlflow", own, stack.StackConfig(start_timeout_s=180), home=server_home)
    try:
        cell = tiny_cell(tiny_dir, "baseline")
        store = ResultStore()
        dataset = sessions.prepare(cell.data)
        key = cell.key(dataset.fingerprint)
        run = publish.cell_run(own, cell, key, None)
        results = sessions.run_cell_sessions(cell, dataset.problems, store, progress=False)
        summary = sessions.summarize_cell(results, cell.session.max_turns)
        stack.stop("mlflow", own, home=server_home)  # the tracking server goes away mid-run
        with pytest.raises(publish.TrackingUnavailable, match="kept in .*run the same command again"):
            publish._kept_locally(store)(publish.log_cell_run)(own, run.run_id, cell, key, dataset, results, summary, store)
        stored = {p: p.stat().st_mtime_ns for p in store.root.rglob("*.json")}
        assert len([p for p in stored if "problems" in p.parts]) == 2

        stack.start("mlflow", own, stack.StackConfig(start_timeout_s=180), home=server_home)
        outcome = experiment(cell, own, None, False)
        assert outcome.run_id == run.run_id and not outcome.skipped  # resumed into the same run
        assert {p: p.stat().st_mtime_ns for p in stored} == stored  # nothing recomputed or rewritten
        mc = client(own)
        assert len(mc.search_runs([mc.get_experiment_by_name("offline-test").experiment_id])) == 1
        assert "results.jsonl" in {a.path for a in mc.list_artifacts(run.run_id)}
    finally:
        stack.stop("mlflow", own, home=server_home)


def test_ctrl_c_marks_the_cell_run_killed_and_the_rerun_resumes_it(platform, tiny_dir, monkeypatch):
    from rosa2.flows.experiment import experiment
    from rosa2.tasks import sessions

    tracking = dataclasses.replace(platform, study="interrupt-test")
    cell = tiny_cell(tiny_dir, "baseline")
    run_sessions = sessions.run_sessions

    def interrupted(*args, **kwargs):  # what Ctrl-C raises in the middle of the sessions
        raise KeyboardInterrupt

    monkeypatch.setattr(sessions, "run_sessions", interrupted)
    with pytest.raises(KeyboardInterrupt):
        experiment(cell, tracking, None, False)
    mc = client(tracking)
    exp_id = mc.get_experiment_by_name("interrupt-test").experiment_id
    (run,) = mc.search_runs([exp_id])
    assert run.info.status == "KILLED"  # not left RUNNING in the UI

    monkeypatch.setattr(sessions, "run_sessions", run_sessions)
    outcome = experiment(cell, tracking, None, False)
    assert outcome.run_id == run.info.run_id and not outcome.skipped
    (after,) = mc.search_runs([exp_id])
    assert after.info.status == "FINISHED"


def test_ablation_has_the_six_methods_and_sweeps_update_contexts(tiny_dir):
    from rosa2.flows.ablation import ABLATION_METHODS, ablation_cells

    long = tiny_cell(tiny_dir, "baseline").replace(session=SessionConfig(method="baseline", max_turns=10))
    assert [c.method for c in ablation_cells(long)] == list(ABLATION_METHODS)
    both = ablation_cells(long, update_contexts=("generated", "next"))
    contexts = [(c.method, c.adapt.update_context) for c in both]
    assert ("rosa", "next") in contexts and ("baseline", "next") not in contexts and len(both) == 6 + 4
