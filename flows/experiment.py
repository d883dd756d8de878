"""The ``experiment`` flow: one cell (method × model × dataset × seed), and the group runner that
ablation, sweep and ``rosa2 run`` share (a parent run with one child per cell).

Resumable by construction: the cell key finds a finished MLflow run (skip) or an unfinished one
(resume into it); finished problems come from the local store; nothing is uploaded twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger

from rosa2.config import TrackingConfig
from rosa2.report import CellSummary
from tasks import publish, sessions
from tasks import tracking as tr
from tasks.cells import Cell, ResultStore, digest


@dataclass
class CellOutcome:
    name: str
    cell_key: str
    run_id: str
    url: str
    skipped: bool  # finished before: nothing ran, nothing was logged again
    summary: CellSummary
    prefect_url: str | None = None


@dataclass
class GroupOutcome:
    name: str
    run_id: str | None
    url: str | None
    cells: list[CellOutcome] = field(default_factory=list)
    report: str = ""
    prefect_url: str | None = None


def flow_run_url() -> str | None:
    """The Prefect UI page of the flow run we are in."""
    from prefect.runtime import flow_run

    return flow_run.ui_url


def _summary_from_tracking(tracking: TrackingConfig, cell: Cell, run_id: str) -> CellSummary:
    mc = tr.client(tracking)
    return publish.cell_summary(cell, tr.summary_from_run(mc, mc.get_run(run_id)), run_id)


@flow(name="experiment", validate_parameters=False, log_prints=True)
def experiment(cell: Cell, tracking: TrackingConfig, parent_run_id: str | None = None, progress: bool = True) -> CellOutcome:
    """One cell: prepare dataset → run sessions → evaluate code → aggregate → log."""
    store = ResultStore()
    dataset = sessions.prepare_dataset(cell.data)
    key = cell.key(dataset.fingerprint)
    run = publish.open_cell(tracking, cell, key, parent_run_id)
    if run.complete:
        get_run_logger().info("cell %s already finished in %s: skipped", key, run.url)
        summary = _summary_from_tracking(tracking, cell, run.run_id)
        return CellOutcome(cell.name(), key, run.run_id, run.url, True, summary, flow_run_url())
    with publish.killed_on_interrupt(tracking, run.run_id):
        with tr.system_metrics(run.run_id):  # GPU utilisation and memory, on GPU hosts only
            results = sessions.run_sessions(cell, dataset.problems, store, tracking.adapters, progress)
        results = sessions.evaluate_code(cell, dataset.problems, results, store)
        summary = sessions.aggregate(results, cell.session.max_turns)
        publish.log_cell(tracking, run.run_id, cell, key, dataset, results, summary, store)
    outcome_summary = publish.cell_summary(cell, summary, run.run_id)
    return CellOutcome(cell.name(), key, run.run_id, run.url, False, outcome_summary, flow_run_url())


def group_key(kind: str, cells: list[Cell]) -> str:
    return digest({"kind": kind, "cells": [c.params() for c in cells]})


def run_group(cells: list[Cell], tracking: TrackingConfig, name: str, kind: str, progress: bool = True,
              scaleout: Any = None) -> GroupOutcome:
    """Cells as child runs of one parent run, then one report on the parent (call inside a flow).

    ``scaleout`` (a :class:`flows.scaleout.ScaleoutConfig`) fans the cells out to a work pool or
    Ray first; the loop below then only gathers their summaries (finished cells are skipped)."""
    parent = publish.open_group(tracking, group_key(kind, cells), name, kind)
    if scaleout is not None and scaleout.runner != "local":
        from flows import scaleout as fan_out

        fan_out.run([{"cell": c, "tracking": tracking, "parent_run_id": parent.run_id, "progress": False} for c in cells], scaleout)
    with publish.killed_on_interrupt(tracking, parent.run_id):
        outcomes = [experiment(cell, tracking, parent.run_id, progress) for cell in cells]
    summaries = [o.summary for o in outcomes]
    markdown = publish.publish_report(tracking, parent.run_id, summaries, name)
    publish.close_group(tracking, parent.run_id)
    return GroupOutcome(name, parent.run_id, parent.url, outcomes, markdown, flow_run_url())


@flow(name="cells", validate_parameters=False, log_prints=True)
def cells_flow(cells: list[Cell], tracking: TrackingConfig, name: str = "rosa2 run", progress: bool = True) -> GroupOutcome:
    """Several cells under one parent (``rosa2 run`` with several methods)."""
    return run_group(cells, tracking, name, "run", progress)
