"""The shipped sweep files (sweeps/) and deployments (infra/prefect.yaml): every file loads with the
sweep loader and holds the paper's protocol, every deployment's parameters bind to its flow, and
``rosa2 sweep FILE --check`` fails on a missing local model, critic or dataset file (offline)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from rosa2.flows import sweep as sweep_module
from rosa2.cli import main
from rosa2.config import ConfigError
from rosa2.data import KNOWN

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
PAPER_MODELS = [
    "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen3-0.6B", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-8B",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
]
PAPER_DATASETS = [
    "math", "math-500", "aime25", "gpqa-diamond", "mmlu-redux", "supergpqa", "humaneval", "bigcodebench-hard",
    "mt-aime24", "mt-math100", "m-imo",
]


def deployments() -> list[dict[str, Any]]:
    return yaml.safe_load((ROOT / "infra" / "prefect.yaml").read_text())["deployments"]


def bind_deployment(deployment: dict[str, Any]) -> inspect.BoundArguments:
    """Bind a deployment's parameters to its entrypoint flow as Prefect would call it: a scheduled
    run gets nothing but these parameters (all required ones must be there); an unscheduled one is
    called with more (``run_deployment(parameters=...)``), so these must at least be names it takes."""
    from prefect.flows import load_flow_from_entrypoint

    path, _, name = deployment["entrypoint"].partition(":")
    assert (ROOT / path).is_file(), f"{deployment['name']}: entrypoint {path} does not exist"
    flow = load_flow_from_entrypoint(f"{ROOT / path}:{name}")  # as a worker loads it, from the project root
    params = deployment.get("parameters") or {}
    signature = inspect.signature(flow.fn)
    if not deployment.get("schedules"):
        return signature.bind_partial(**params)
    bound = signature.bind(**params)
    if flow.should_validate_parameters:
        flow.validate_parameters(params)  # Prefect's own type check of what the scheduler will send
    return bound


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["name"])
def test_every_deployment_binds_to_its_flow(deployment):
    bound = bind_deployment(deployment)
    for key, value in bound.arguments.items():
        if key.endswith("_path"):  # files a deployment names must ship with the project
            from rosa2.flows.nightly import spec_file

            assert spec_file(value).is_file(), f"{deployment['name']}: {key}={value} does not exist"
            sweep_module.load(spec_file(value))


def test_the_binding_check_catches_the_old_nightly_deployment():
    old = {"name": "nightly", "entrypoint": "flows/sweep.py:sweep", "parameters": {"path": "sweeps/nightly.yaml"},
           "schedules": [{"cron": "0 2 * * *"}]}
    with pytest.raises(TypeError, match="spec|path"):  # sweep takes a SweepSpec, not a path
        bind_deployment(old)
    with pytest.raises(TypeError, match="path"):  # a parameter the flow does not take
        bind_deployment({**old, "entrypoint": "flows/nightly.py:nightly", "parameters": {"spec_path": "x", "path": "x"}})
    with pytest.raises(TypeError, match="spec_path"):  # a scheduled run gets nothing else: required ones must be there
        bind_deployment({**old, "entrypoint": "flows/nightly.py:nightly", "parameters": {}})
    nightly = next(d for d in deployments() if d["name"] == "nightly")
    assert nightly["entrypoint"] == "flows/nightly.py:nightly"
    assert nightly["parameters"]["spec_path"] == "sweeps/nightly.yaml"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_loads_and_checks_offline(path):
    spec = sweep_module.load(path)
    assert spec.cells()
    notes = sweep_module.check_sources(spec)  # nothing local is missing; hub ids only noted
    assert all("not checked" in note for note in notes)


def test_the_three_sweeps_are_shipped():
    assert {p.name for p in SWEEPS} >= {"table1.yaml", "motivation.yaml", "nightly.yaml"}


def test_table1_is_the_paper_grid_with_paper_parity_settings():
    spec = sweep_module.load(ROOT / "sweeps" / "table1.yaml")
    assert spec.models == PAPER_MODELS
    assert spec.datasets == PAPER_DATASETS and all(d in KNOWN for d in spec.datasets)
    assert spec.methods == ["baseline", "textgrad", "rosa", "rosa2"]
    cells = spec.cells()
    assert len(cells) == 6 * 11 * 4
    for cell in cells:
        assert (cell.session.feedback, cell.reward.extraction, cell.semantic.target) == ("sparse", "paper", "message")
        assert cell.generation.max_new_tokens >= 4096  # room for the R1 distills' reasoning before \boxed{}
    notes = sweep_module.check_sources(spec)
    assert "model Qwen/Qwen3-8B: hub id, not checked (offline; a local directory would have to exist here)" in notes
    assert "dataset math-500: on the hub, not checked (offline)" in notes


def test_motivation_switches_at_turn_5_of_10_on_the_system_prompt():
    spec = sweep_module.load(ROOT / "sweeps" / "motivation.yaml")
    assert set(spec.methods) == {"baseline", "textgrad", "rosa", "rosa2", "switch-w2p@5", "switch-p2w@5"}
    for cell in spec.cells():
        assert (cell.session.max_turns, cell.semantic.target, cell.reward.extraction) == (10, "system", "paper")
        assert cell.session.feedback == "sparse"
        if cell.method.startswith("switch"):
            assert cell.session.switch_turn == 5


def test_nightly_runs_on_the_embedded_model_and_needs_no_hub():
    spec = sweep_module.load(ROOT / "sweeps" / "nightly.yaml")
    assert spec.models == ["embedded"] and spec.datasets == ["embedded-math"]
    assert sweep_module.check_sources(spec) == []  # everything it needs is here
    assert len(spec.cells()) <= 8 and all(c.data.limit and c.data.limit <= 5 for c in spec.cells())


SWEEP = """\
models: [{model}]
datasets: [{dataset}]
methods: [baseline]
seeds: [0]
semantic: {{critic: {critic}}}
"""


@pytest.mark.parametrize("field, bad, named", [
    ("model", "/nonexistent/models/qwen", "/nonexistent/models/qwen"),
    ("dataset", "math:/nonexistent/data/math.jsonl", "/nonexistent/data/math.jsonl"),
    ("dataset", "/nonexistent/data/gsm8k.jsonl", "/nonexistent/data/gsm8k.jsonl"),
    ("critic", "/nonexistent/critic", "/nonexistent/critic"),
])
def test_check_fails_on_a_missing_local_model_critic_or_dataset(tmp_path, capsys, field, bad, named):
    values = {"model": "Qwen/Qwen3-8B", "dataset": "math-500", "critic": "base", field: bad}
    path = tmp_path / "bad.yaml"
    path.write_text(SWEEP.format(**values))
    with pytest.raises(ConfigError, match=named):
        sweep_module.check_sources(sweep_module.load(path))
    assert main(["sweep", str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and named in err and str(path) in err  # one line naming the file and the culprit


def test_check_passes_a_local_model_directory_and_dataset_file(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "tiny.jsonl"
    data.write_text('{"problem": "1 + 1?", "answer": "2"}\n')
    path = tmp_path / "ok.yaml"
    path.write_text(SWEEP.format(model=model, dataset=f"math-500:{data}", critic="Qwen/Qwen3-8B"))
    assert main(["sweep", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "semantic.critic Qwen/Qwen3-8B: hub id, not checked" in out  # hub ids are named, not failed
    assert str(model) not in out and "1 cell," in out
