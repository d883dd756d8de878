"""Prefect tasks that record a cell in MLflow and publish reports (MLflow + Prefect artifacts).

A failure to reach MLflow never loses results: they are already in the local store (written by
``run sessions``); the error says so, and the same command run again uploads them into the same
run. Network failures are retried by Prefect first.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from prefect import task
from prefect.cache_policies import NONE

from rosa2 import metrics, report
from rosa2.config import TrackingConfig
from rosa2.errors import Rosa2Error
from rosa2.models import display_name
from rosa2.records import ProblemResult
from rosa2.tasks import tracking, traces
from rosa2.tasks.cells import Cell, ResultStore
from rosa2.tasks.sessions import PreparedDataset, retry_infrastructure_only

F = TypeVar("F", bound=Callable[..., Any])


class TrackingUnavailable(tracking.TrackingError):
    infrastructure = True  # retried by Prefect, then reported with where the results are


def _kept_locally(store: ResultStore) -> Callable[[F], F]:
    """Turn any MLflow/network failure into one clear error that says the results are safe."""

    def wrap(fn: F) -> F:
        @wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Rosa2Error:
                raise
            except _unreachable() as exc:
                raise TrackingUnavailable(
                    f"MLflow did not accept the upload ({type(exc).__name__}: {str(exc)[:300]}). Finished problems "
                    f"are kept in {store.root}; run the same command again to upload them (nothing is recomputed)"
                ) from exc

        return inner  # type: ignore[return-value]

    return wrap


def _unreachable() -> tuple[type[BaseException], ...]:
    """What a down or failing tracking server raises (a bug of ours is not one of them)."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.RequestException, OSError)


@dataclass
class CellRun:
    run_id: str
    experiment_id: str
    url: str
    complete: bool  # already finished and uploaded: skip the cell


def cell_run(tracking_cfg: TrackingConfig, cell: Cell, cell_key: str, parent_run_id: str | None) -> CellRun:
    """Find the cell's run by its key (resume or skip) or create it, tagged, in one call."""
    mc = tracking.client(tracking_cfg)
    exp_id = tracking.experiment_id(mc, tracking_cfg.study)
    existing = tracking.find_run(mc, exp_id, tracking.TAG_CELL, cell_key)
    if tracking.is_complete(existing):
        return CellRun(existing.info.run_id, exp_id, tracking.run_url(tracking_cfg, existing), True)
    run, _ = tracking.open_run(mc, exp_id, tracking.TAG_CELL, cell_key, cell.name(), "cell", parent_run_id)
    return CellRun(run.info.run_id, exp_id, tracking.run_url(tracking_cfg, run), False)


def group_run(tracking_cfg: TrackingConfig, key: str, name: str, kind: str) -> CellRun:
    """The parent run of a sweep / ablation / multi-method run (found again by its key on rerun)."""
    mc = tracking.client(tracking_cfg)
    exp_id = tracking.experiment_id(mc, tracking_cfg.study)
    run, _ = tracking.open_run(mc, exp_id, tracking.TAG_PARENT_KEY, key, name, kind)
    return CellRun(run.info.run_id, exp_id, tracking.run_url(tracking_cfg, run), tracking.is_complete(run))


def log_cell_run(
    tracking_cfg: TrackingConfig,
    run_id: str,
    cell: Cell,
    cell_key: str,
    dataset: PreparedDataset,
    results: list[ProblemResult],
    summary: dict[str, Any],
    store: ResultStore,
) -> None:
    """Everything a cell records, then ``rosa2.complete=true`` last (so a partial upload is redone)."""
    mc = tracking.client(tracking_cfg)
    tracking.log_params(mc, run_id, cell.params(tracking_cfg))
    tracking.set_tags(mc, run_id, {
        "rosa2.method": cell.method, "rosa2.model": cell.model.name, "rosa2.dataset": cell.data.dataset,
        "rosa2.seed": cell.seed, "rosa2.fingerprint": dataset.fingerprint,
    })
    tracking.log_metrics(mc, run_id, summary)
    cautions = metrics.warnings(summary, cell.method)
    if cautions:  # an arm that is not what its name says, or answers that could not be scored: in the runs table
        tracking.set_tags(mc, run_id, {"rosa2.warnings": " | ".join(cautions)[:4900]})
    tracking.set_tags(mc, run_id, {tracking.TAG_NOTE: cell_note(cell, summary, cautions)})
    tracking.log_summary_extras(mc, run_id, summary)  # per-problem outcomes: paired gains from MLflow
    tracking.log_results(mc, run_id, results)
    traces.log_session_traces(mc, run_id, cell_key, results, sequential=cell.session.parallel_sessions == 1)
    tracking.log_lineage(mc, run_id, dataset.name, dataset.fingerprint, dataset.snapshot, cell.data.dataset)
    by_id = {p.id: p for p in dataset.problems}
    for result in results:
        adapter = store.adapter_dir(cell.problem_key(by_id[result.problem_id]))
        if adapter.is_dir():
            tracking.log_adapter(mc, run_id, adapter, result.problem_id)
    cells = [cell_summary(cell, summary, run_id)]
    with tempfile.TemporaryDirectory() as tmp:
        tracking.log_files(mc, run_id, report.write(cells, tmp, title=cell.name()))
    tracking.set_tags(mc, run_id, {tracking.TAG_COMPLETE: "true"})
    tracking.finish(mc, run_id)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def cell_note(cell: Cell, summary: dict[str, Any], cautions: list[str]) -> str:
    """The run's description (``mlflow.note.content``): what ran, what came out, where to look."""
    first = (summary.get("accuracy_at_turn") or [None])[0]
    lines = [
        f"**{cell.name()}**: {summary.get('problems', 0)} problems, up to {cell.session.max_turns} turns, "
        f"feedback {cell.session.feedback}.",
        f"Accuracy@{summary.get('max_turns', cell.session.max_turns)} {_pct(summary.get('accuracy'))} "
        f"(turn 1: {_pct(first)}); correction uplift (Eq. 19) {_pct(summary.get('correction_uplift'))}.",
        "Shares are percentages (`*_pct`); per-turn curves are `by_turn/*` (step = turn); each problem's "
        "conversation is an MLflow session of one trace per turn (Traces tab, or the experiment's Sessions view); "
        f"`{tracking.RESULTS_FILE}` holds every turn.",
    ]
    lines += [f"Warning: {c}" for c in cautions]
    return "\n\n".join(lines)


def group_note(cells: list[report.CellSummary], title: str) -> str:
    """A parent run's description: its cells' accuracy, and where the tables are."""
    rows = [f"- {c.method} · {c.model} · {c.dataset} · seed {c.seed}: accuracy {_pct(c.summary.get('accuracy'))}" for c in cells]
    return "\n".join([f"**{title}**: {report.plural(len(cells), 'cell')} (child runs); tables and plots in `report.md`.", "", *rows])


def cell_summary(cell: Cell, summary: dict[str, Any], run_id: str | None = None) -> report.CellSummary:
    """The report's view of a cell; its flat params let the report keep variants of a method apart."""
    dataset = Path(cell.data.dataset).name
    return report.CellSummary(display_name(cell.model.name), dataset, cell.method, cell.seed, summary, run_id, params=cell.params())


def publish(tracking_cfg: TrackingConfig, run_id: str | None, cells: list[report.CellSummary], title: str) -> str:
    """Render the report; log it (and its plots) to ``run_id`` and as a Prefect markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    markdown = report.render(cells, title)
    if run_id is not None:
        mc = tracking.client(tracking_cfg)
        with tempfile.TemporaryDirectory() as tmp:
            tracking.log_files(mc, run_id, report.write(cells, tmp, title=title))
        tracking.set_tags(mc, run_id, {tracking.TAG_NOTE: group_note(cells, title)})
    key = "".join(c if c.isalnum() else "-" for c in f"rosa2-report-{tracking_cfg.study}".lower())
    create_markdown_artifact(markdown, key=key, description=title)
    return markdown


def finish_group(tracking_cfg: TrackingConfig, run_id: str) -> None:
    mc = tracking.client(tracking_cfg)
    tracking.set_tags(mc, run_id, {tracking.TAG_COMPLETE: "true"})
    tracking.finish(mc, run_id)


@contextmanager
def killed_on_interrupt(tracking_cfg: TrackingConfig, run_id: str) -> Iterator[None]:
    """Ctrl-C (or SIGTERM turned into KeyboardInterrupt) inside the block marks ``run_id`` KILLED in
    MLflow instead of leaving it RUNNING forever; the rerun resumes it (``open_run`` sets RUNNING)
    and finished problems come from the local store. Best effort: a down server changes nothing."""
    try:
        yield
    except KeyboardInterrupt:
        try:
            tracking.finish(tracking.client(tracking_cfg), run_id, "KILLED")
        except Exception:  # noqa: BLE001 - the interrupt is what the user must see
            pass
        raise


_INFRA = dict(cache_policy=NONE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_infrastructure_only)


def _guarded(fn: Callable[..., Any], name: str) -> Any:
    @wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        store = kwargs.get("store") or next((a for a in args if isinstance(a, ResultStore)), ResultStore())
        return _kept_locally(store)(fn)(*args, **kwargs)

    return task(inner, name=name, **_INFRA)


open_cell = _guarded(cell_run, "open cell run")
open_group = _guarded(group_run, "open parent run")
log_cell = _guarded(log_cell_run, "log cell")
publish_report = _guarded(publish, "publish report")
close_group = _guarded(finish_group, "close parent run")
