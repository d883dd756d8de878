"""What a person sees in the Prefect UI, read back from a real Prefect server (rosa2.stack on
loopback): flow runs named method · model · dataset · seed (the parent by its study), tags to filter
by, a markdown artifact per cell that links its MLflow run, and a flow's logs stored on the server
when the console is quiet (INFO too: only the console is quieted, not the API handler)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rosa2.config import DataConfig, GenerationConfig, ModelConfig, SemanticConfig, SessionConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_cell(tiny_dir, method: str):
    from rosa2.tasks.cells import Cell

    return Cell(
        model=ModelConfig(name=str(tiny_dir), device="cpu"),
        session=SessionConfig(method=method, max_turns=2),
        data=DataConfig(dataset="embedded-math", limit=1),
        generation=GenerationConfig(max_new_tokens=8),
        semantic=SemanticConfig(max_new_tokens=16),
    )


def study_runs(study: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as pc:  # (sort and limit given: this server rejects null ones)
        return pc.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"study:{study}"])),
                                 sort=FlowRunSort.START_TIME_ASC, limit=50)


def test_flow_runs_say_what_they_run_and_each_cell_links_its_mlflow_run(platform, tiny_dir):
    from prefect import get_client
    from prefect.client.schemas.objects import Artifact

    from rosa2.flows.experiment import cells_flow
    from rosa2.tasks import tracking as tr

    tracking = dataclasses.replace(platform, study="prefect-views")
    outcome = cells_flow([tiny_cell(tiny_dir, "baseline")], tracking, "rosa2 run baseline", False)

    runs = {r.name: r for r in study_runs("prefect-views")}
    cell_name = f"baseline · {tiny_dir.name} · embedded-math · s0"
    assert set(runs) == {"prefect-views · rosa2 run baseline", cell_name}, sorted(runs)
    parent, child = runs["prefect-views · rosa2 run baseline"], runs[cell_name]
    labels = {"study:prefect-views", "method:baseline", f"model:{tiny_dir.name}", "dataset:embedded-math"}
    assert labels <= set(child.tags), child.tags
    assert labels | {"kind:run"} <= set(parent.tags), parent.tags
    with get_client(sync_client=True) as pc:
        assert pc.read_task_run(child.parent_task_run_id).flow_run_id == parent.id  # the cell is the parent's child

        # the cell's artifact: on the cell's flow run, its table, a link to its MLflow run
        cell = outcome.cells[0]
        # (the route, not read_artifacts: prefect 3.8.8 sends null filters that its server rejects)
        response = pc.request("GET", "/artifacts/{key}/latest", path_params={"key": f"rosa2-cell-{cell.cell_key}"})
    response.raise_for_status()
    artifact = Artifact.model_validate(response.json())
    assert artifact.flow_run_id == child.id
    mlflow_url = tr.run_url(tracking, tr.client(tracking).get_run(cell.run_id))
    assert artifact.type == "markdown"
    assert f"]({mlflow_url})" in artifact.data, artifact.data[:500]
    assert "Table 1" in artifact.data and "| baseline |" in artifact.data


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_quiet_console_still_sends_the_flows_logs_to_the_server(command, platform_servers, tiny_dir, tmp_path):
    """Default (quiet) console: warnings on the terminal, INFO not; the server stores both."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tracking, _ = platform_servers
    study = f"quiet-{command}"
    if command == "run":
        argv = ["run", "--model", str(tiny_dir), "--model-device", "cpu", "--method", "baseline", "--dataset", "embedded-math",
                "--limit", "1", "--max-turns", "2", "--max-new-tokens", "8"]
    else:
        grid = tmp_path / "grid.yaml"
        grid.write_text(
            f"models: [{tiny_dir}]\ndatasets: [embedded-math]\nmethods: [baseline]\nseeds: [0]\n"
            "session: {max_turns: 2}\ndata: {limit: 1}\ngeneration: {max_new_tokens: 8}\nmodel: {device: cpu}\n"
        )
        argv = ["sweep", str(grid)]
    home = tmp_path / "home"
    env = {**os.environ, "ROSA2_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    env.pop("PREFECT_LOGGING_LEVEL", None)
    out = subprocess.run(
        [sys.executable, "-m", "rosa2", *argv, "--study", study, "--no-progress",
         "--mlflow-uri", tracking.mlflow_uri, "--prefect-api-url", tracking.prefect_api_url],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # a tiny random model never writes \boxed{} in 8 tokens: the cell warns that its answers were cut
    caution = "answers cut before the answer"
    assert caution in out.stderr, out.stderr[-3000:]
    assert "Finished in state" not in out.stderr and "| INFO " not in out.stderr, out.stderr[-3000:]

    with temporary_settings({PREFECT_API_URL: tracking.prefect_api_url}):
        runs = study_runs(study)
        assert runs, f"no flow run tagged study:{study}"
        with get_client(sync_client=True) as pc:
            logs = pc.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])),
                                limit=200, offset=0, sort=LogSort.TIMESTAMP_ASC)
    warnings = [log.message for log in logs if log.level == 30]
    assert any(caution in m for m in warnings), warnings
    info = [log.message for log in logs if log.level == 20]
    assert any("Finished in state Completed" in m for m in info), info
