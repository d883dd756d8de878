"""The one module that talks to MLflow (docs/architecture.md: log at boundaries, through one small module).

Layout of a study in MLflow:

- one experiment per study (``TrackingConfig.study``);
- one run per cell, tagged ``rosa2.cell_key`` (deterministic, see :mod:`rosa2.tasks.cells`) and, once
  everything is uploaded, ``rosa2.complete=true`` — a rerun finds the run by tag and either skips
  the cell or resumes into the same run, so no duplicate runs appear;
- sweep / ablation parents tagged ``rosa2.parent_key``; children carry ``mlflow.parentRunId``;
- per cell: params (every config field), final metrics, per-turn curves as steps, per-problem
  results + transcripts (``results.jsonl``) and a table, one MLflow trace per turn grouped into
  one MLflow session per problem (:mod:`rosa2.tasks.traces`), adapters under the retention policy,
  dataset lineage, plots and the report;
- every run: where it came from (git commit, dirty flag, user, command line: :func:`source_tags`)
  and a one-paragraph description (``mlflow.note.content``).

Metric names (:func:`mlflow_name`) say what a value is, so the runs table cannot be misread:

- final metrics under the summary's own names (``avg_turn``, ``avg_time_s``, ``peak_memory_mb``,
  counts), logged once at step 0;
- shares as percentages, named ``…_pct`` (``accuracy_pct``, ``correction_uplift_pct``,
  ``no_answer_rate_pct``...), as the report prints them; the summary dicts keep fractions;
- per-turn curves under ``by_turn/`` with step = turn (``by_turn/accuracy_pct``,
  ``by_turn/delta_theta_sq``, ``by_turn/seconds_semantic``...): never the name of a final, so a
  curve's last step never stands in for a final in the runs table.

Everything here uses an explicit :class:`MlflowClient` and run ids (no fluent active-run state),
so it is safe from Prefect's task threads.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rosa2 import metrics
from rosa2.config import TrackingConfig
from rosa2.errors import Rosa2Error
from rosa2.records import ProblemResult

TAG_CELL = "rosa2.cell_key"
TAG_PARENT_KEY = "rosa2.parent_key"
TAG_COMPLETE = "rosa2.complete"
TAG_KIND = "rosa2.kind"  # cell | sweep | ablation | report
TAG_PARENT = "mlflow.parentRunId"
TAG_ERROR = "rosa2.error"  # FAILED runs: the error's type and first line
TAG_ENDED_BY = "rosa2.ended_by"  # KILLED runs: SIGTERM, Ctrl-C...
RESULTS_FILE = "results.jsonl"
SUMMARY_EXTRAS_FILE = "summary_extras.json"  # summary entries that are no metric (per-problem outcomes)
TAG_DIRTY = "rosa2.git.dirty"  # "true" when the checkout had uncommitted changes to tracked files
TAG_COMMAND = "rosa2.command"  # the command line that created or resumed the run
TAG_NOTE = "mlflow.note.content"  # the run's description in the MLflow UI
BY_TURN = "by_turn/"  # per-turn curves, step = turn
PCT = "_pct"  # a share logged as a percentage
FRACTIONS = ("accuracy", "correction_uplift", "correction_share", "accuracy_at_turn")  # and every "*_rate"
CURVE_NAMES = {"accuracy_at_turn": "accuracy"}  # by_turn/accuracy_pct, not by_turn/accuracy_at_turn_pct


class TrackingError(Rosa2Error):
    """MLflow could not be reached or refused a write; local results are kept (the message says where)."""


def client(cfg: TrackingConfig) -> Any:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(cfg.mlflow_uri)  # for the few helpers that read the global URI (log_table)
    # a dead server should fail in seconds, not after minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return MlflowClient(tracking_uri=cfg.mlflow_uri)


def experiment_id(mc: Any, study: str) -> str:
    """The study's experiment, created on first use."""
    found = mc.get_experiment_by_name(study)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mc.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return mc.create_experiment(study, tags={"rosa2.study": study})
    except Exception:  # noqa: BLE001 - another process created it between our two calls
        found = mc.get_experiment_by_name(study)
        if found is None:
            raise
        return found.experiment_id


def find_run(mc: Any, exp_id: str, tag: str, value: str) -> Any | None:
    """The run carrying ``tag=value`` (the oldest, should a race ever have made two)."""
    runs = mc.search_runs([exp_id], filter_string=f"tags.`{tag}` = '{value}'", order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def is_complete(run: Any) -> bool:
    return run is not None and run.data.tags.get(TAG_COMPLETE) == "true"


def open_run(mc: Any, exp_id: str, tag: str, key: str, name: str, kind: str, parent_run_id: str | None = None) -> tuple[Any, bool]:
    """(run, created): the run for ``key``, created with its tags in one call when none exists.
    Either way it carries the :func:`source_tags` of this process (a resumed run: the resuming command).

    Finding and creating are two calls: callers that may race on one key hold its claim
    (:func:`rosa2.tasks.cells.claim`, as the experiment flow does), or two runs can appear."""
    run = find_run(mc, exp_id, tag, key)
    if run is not None:
        _resume(mc, run)
        set_tags(mc, run.info.run_id, source_tags())
        return run, False
    tags = {**source_tags(), tag: key, TAG_KIND: kind}
    if parent_run_id:
        tags[TAG_PARENT] = parent_run_id
    return mc.create_run(exp_id, tags=tags, run_name=name), True


def _resume(mc: Any, run: Any) -> None:
    """A found run is running again; what its last attempt left (error tags) no longer applies."""
    if run.info.status != "RUNNING":
        mc.update_run(run.info.run_id, status="RUNNING")
    for stale in (TAG_ERROR, TAG_ENDED_BY):
        if stale in run.data.tags:
            mc.delete_tag(run.info.run_id, stale)


def _git(*args: str) -> str | None:
    import subprocess

    from rosa2 import env

    try:
        done = subprocess.run(["git", "-C", str(env.source_root()), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """Where a run came from, under MLflow's own source tags where it has one: the checkout's git
    commit, branch and whether tracked files had uncommitted changes (``rosa2.git.dirty``), the
    user, the program and the whole command line. Outside a git checkout the git tags are left out."""
    import getpass
    import shlex
    import sys

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container's bare uid)
        user = str(os.getuid())
    tags = {
        "mlflow.user": user,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
        TAG_COMMAND: shlex.join(sys.argv)[:5000],
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        status = _git("status", "--porcelain", "--untracked-files=no")
        tags[TAG_DIRTY] = "unknown" if status is None else "true" if status else "false"
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
    return tags


def first_line(exc: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message`` (what a run's error tag shows in the runs table)."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__
    return line[:limit]


def _ended(cfg: TrackingConfig, run_id: str, status: str, tags: dict[str, str]) -> None:
    try:
        mc = client(cfg)
        set_tags(mc, run_id, tags)
        mc.set_terminated(run_id, status)
    except Exception:  # noqa: BLE001 - best effort: the error that ended the run is what the user must see
        pass


@contextmanager
def ends_honestly(cfg: TrackingConfig, run_id: str) -> Iterator[None]:
    """A run that the block does not finish never stays RUNNING.

    - an error: FAILED, with ``rosa2.error`` = the error's type and first line;
    - Ctrl-C, SIGTERM (which Prefect turns into its ``TerminationSignal`` inside a flow, a
      ``BaseException`` that ``except KeyboardInterrupt`` misses), ``SystemExit``: KILLED, with
      ``rosa2.ended_by`` saying which.

    The exception goes on. The rerun resumes the run (``open_run`` sets it RUNNING again and drops
    the tags); finished problems come from the local store. A tracking server that cannot be
    reached is not written to (its own error says where the results are kept)."""
    try:
        yield
    except TrackingError as exc:
        if not getattr(exc, "infrastructure", False):
            _ended(cfg, run_id, "FAILED", {TAG_ERROR: first_line(exc)})
        raise
    except Exception as exc:
        _ended(cfg, run_id, "FAILED", {TAG_ERROR: first_line(exc)})
        raise
    except BaseException as exc:
        name = type(exc).__name__
        how = "SIGTERM" if name == "TerminationSignal" else "Ctrl-C or SIGTERM" if name == "KeyboardInterrupt" else name
        _ended(cfg, run_id, "KILLED", {TAG_ENDED_BY: how})
        raise


def _finite(value: Any) -> float:
    # MLflow stores NaN; None (e.g. avg_turn when nothing was solved) becomes NaN so the name exists
    return float("nan") if value is None else float(value)


def _is_fraction(key: str) -> bool:
    return key in FRACTIONS or key.endswith("_rate")


def mlflow_name(key: str, per_turn: bool = False) -> str:
    """The MLflow name of a summary entry: ``accuracy`` → ``accuracy_pct``, the per-turn
    ``accuracy_at_turn`` → ``by_turn/accuracy_pct``, ``delta_theta_sq`` (a curve) → ``by_turn/delta_theta_sq``."""
    name = CURVE_NAMES.get(key, key) if per_turn else key
    name += PCT if _is_fraction(key) else ""
    return BY_TURN + name if per_turn else name


# the headline names in the runs table: rosa2.metrics' finals and curves under their MLflow names
# (every summary scalar and curve is logged; a curve has a point per turn it has a value at)
FINAL_METRICS = tuple(mlflow_name(key) for key in metrics.FINALS)
STEP_METRICS = tuple(mlflow_name(key, per_turn=True) for key in metrics.CURVES)


def summary_key(name: str) -> tuple[str, float]:
    """(summary key, factor the MLflow value was multiplied by): the inverse of :func:`mlflow_name`.
    Names logged before ``by_turn/`` and ``_pct`` existed come back as they were (factor 1)."""
    per_turn = name.startswith(BY_TURN)
    key = name.removeprefix(BY_TURN)
    scale = 1.0
    if key.endswith(PCT) and _is_fraction(key[: -len(PCT)]):
        key, scale = key[: -len(PCT)], 100.0
    if per_turn:
        key = {v: k for k, v in CURVE_NAMES.items()}.get(key, key)
    return key, scale


def _scaled(key: str, value: float) -> float:
    return value * 100.0 if _is_fraction(key) else value


def metrics_of(summary: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(final scalars, per-turn curves) under their MLflow names (:func:`mlflow_name`), shares in
    percent, from a :func:`rosa2.metrics.summarize` dict."""
    finals, curves = {}, {}
    for key, value in summary.items():
        if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
            finals[mlflow_name(key)] = _scaled(key, _finite(value))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) or v is None for v in value):
            curves[mlflow_name(key, per_turn=True)] = [_scaled(key, _finite(v)) for v in value]
    return finals, curves


def log_params(mc: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, "None" if v is None else str(v)[:6000]) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mc.log_batch(run_id, params=items[start:start + 100])


def log_metrics(mc: Any, run_id: str, summary: dict[str, Any]) -> None:
    """Finals at step 0 (NaN where undefined) and the per-turn curves with step = turn (1-based),
    a point only where the curve has a value: MLflow's views drop a metric whose last step is NaN."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    finals, curves = metrics_of(summary)
    items = [Metric(k, v, now, 0) for k, v in finals.items()]
    items += [Metric(k, v, now, turn) for k, values in curves.items() for turn, v in enumerate(values, 1) if not math.isnan(v)]
    for start in range(0, len(items), 1000):
        mc.log_batch(run_id, metrics=items[start:start + 1000])


def set_tags(mc: Any, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    mc.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_results(mc: Any, run_id: str, results: list[ProblemResult]) -> None:
    """Per-problem results and transcripts as ``results.jsonl``, plus a flat table for the UI."""
    from rosa2.tasks.cells import results_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / RESULTS_FILE
        path.write_text(results_jsonl(results))
        mc.log_artifact(run_id, str(path))
    table = {
        "problem_id": [r.problem_id for r in results],
        "solved": [r.solved for r in results],
        "turn_solved": [r.turn_solved if r.turn_solved is not None else -1 for r in results],
        "turns_used": [r.turns_used for r in results],
        "scored": [r.scored for r in results],
        "seconds": [round(r.seconds, 3) for r in results],
        "final_prediction": [str(r.turns[-1].prediction) if r.turns else "" for r in results],
        "final_response": [r.turns[-1].response[:500] if r.turns else "" for r in results],
    }
    mc.log_table(run_id, table, "results_table.json")


def download_results(mc: Any, run_id: str) -> list[ProblemResult]:
    from rosa2.tasks.cells import read_results_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        local = mc.download_artifacts(run_id, RESULTS_FILE, tmp)
        return read_results_jsonl(Path(local).read_text())


def log_lineage(mc: Any, run_id: str, name: str, fingerprint: str, snapshot: Path, source: str) -> None:
    """Dataset lineage: an MLflow dataset input (name, digest = fingerprint, source) and the snapshot."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    # the source is the snapshot (exactly the problems the cell saw); the name says where it came from
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local file
        warnings.simplefilter("ignore")
        dataset = MetaDataset(resolve_dataset_source(str(snapshot)), name=name, digest=fingerprint)
    tags = [InputTag("mlflow.data.context", "eval"), InputTag("rosa2.source", source[:500])]
    mc.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])
    with tempfile.TemporaryDirectory() as tmp:
        lineage = Path(tmp) / "lineage.json"
        lineage.write_text(json.dumps({"dataset": name, "fingerprint": fingerprint, "source": source, "snapshot": snapshot.name}, indent=1))
        mc.log_artifact(run_id, str(lineage), "dataset")
    mc.log_artifact(run_id, str(snapshot), "dataset")


def log_files(mc: Any, run_id: str, files: dict[str, Path], artifact_path: str | None = None) -> None:
    for path in files.values():
        mc.log_artifact(run_id, str(path), artifact_path)


def log_adapter(mc: Any, run_id: str, directory: Path, problem_id: str) -> None:
    """Adapter weights only (``save_pretrained`` of the adapter), under ``adapters/<problem id>``."""
    mc.log_artifacts(run_id, str(directory), f"adapters/{safe_name(problem_id)}")


def safe_name(problem_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in problem_id)


def finish(mc: Any, run_id: str, status: str = "FINISHED") -> None:
    mc.set_terminated(run_id, status)


def run_url(cfg: TrackingConfig, run: Any) -> str:
    return f"{cfg.mlflow_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def experiment_url(cfg: TrackingConfig, exp_id: str) -> str:
    return f"{cfg.mlflow_uri.rstrip('/')}/#/experiments/{exp_id}"


def cell_runs(mc: Any, study: str) -> list[Any]:
    """Finished cell runs of a study (for reports and adapter look-ups)."""
    exp = mc.get_experiment_by_name(study)
    if exp is None:
        raise TrackingError(f"study {study!r} has no MLflow experiment at {mc.tracking_uri}; run a cell first")
    return list(mc.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'cell' and tags.`{TAG_COMPLETE}` = 'true'",
        order_by=["attributes.start_time ASC"], max_results=5000,
    ))


def summary_from_run(mc: Any, run: Any) -> dict[str, Any]:
    """A summary dict rebuilt from a run's logged metrics (finals + per-turn curves), under the
    summary's own keys and in its units (fractions), whatever names the run was logged with. A
    turn a curve has no point at (nothing to average there) is None, as in the summary."""
    summary: dict[str, Any] = {}
    curves: dict[str, dict[int, float]] = {}
    for name in run.data.metrics:
        key, scale = summary_key(name)
        history = mc.get_metric_history(run.info.run_id, name)
        steps = {m.step: m.value / scale for m in history if m.step > 0}
        if steps or name.startswith(BY_TURN):
            curves[key] = steps
        else:
            value = history[-1].value
            summary[key] = None if math.isnan(value) else value / scale
    for key, steps in curves.items():
        turns = max([int(summary.get("max_turns") or 0), *steps])
        summary[key] = [None if math.isnan(steps.get(t, math.nan)) else steps[t] for t in range(1, turns + 1)]
    summary.update(read_summary_extras(mc, run.info.run_id))
    return summary


def summary_extras(summary: dict[str, Any]) -> dict[str, Any]:
    """The parts of a summary that are no metric (e.g. ``solved_by_problem``, a dict per problem)."""
    return {k: v for k, v in summary.items() if isinstance(v, dict)}


def log_summary_extras(mc: Any, run_id: str, summary: dict[str, Any]) -> None:
    """``summary_extras.json`` beside the metrics, so a summary read back from MLflow keeps them."""
    extras = summary_extras(summary)
    if not extras:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SUMMARY_EXTRAS_FILE
        path.write_text(json.dumps(extras))
        mc.log_artifact(run_id, str(path))


def read_summary_extras(mc: Any, run_id: str) -> dict[str, Any]:
    """What :func:`log_summary_extras` wrote; {} for runs logged before it existed."""
    if not any(a.path == SUMMARY_EXTRAS_FILE for a in mc.list_artifacts(run_id)):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(mc.download_artifacts(run_id, SUMMARY_EXTRAS_FILE, tmp)).read_text())


@contextmanager
def system_metrics(run_id: str) -> Iterator[None]:
    """MLflow's system metrics (GPU utilisation and memory) while a cell runs — on GPU hosts only."""
    try:
        import torch

        gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        gpu = False
    if not gpu:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def register_adapter(
    mc: Any, run_id: str, problem_id: str, name: str, alias: str, model_dir: Path | None = None, base_model: str | None = None,
) -> Any:
    """Promote a session's adapter to the Model Registry under ``name`` with ``alias``.

    With ``model_dir`` (the adapter as an MLflow model, ``rosa2.cli.adapter_source.mlflow_model``)
    that model is logged under the run's ``models/<problem id>`` and registered, so
    ``mlflow.transformers.load_model("models:/NAME@ALIAS")`` loads the version; without it the bare
    adapter folder is. ``base_model`` (the base the adapter was fitted to, by its hub id when known)
    is the version's ``base_model`` tag; the run's ``model.name`` param stands in without it."""
    from mlflow.exceptions import MlflowException

    run = mc.get_run(run_id)
    artifact = f"{'models' if model_dir is not None else 'adapters'}/{safe_name(problem_id)}"
    if model_dir is not None:
        mc.log_artifacts(run_id, str(model_dir), artifact)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact}"
    try:
        mc.create_registered_model(name, tags={"rosa2.kind": "adapter"})
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    version = mc.create_model_version(
        name, source=source, run_id=run_id,
        tags={"rosa2.problem_id": problem_id, "base_model": base_model or run.data.params.get("model.name", "")},
    )
    mc.set_registered_model_alias(name, alias, version.version)
    return version
