"""The ``experiment`` flow: one cell (method × model × dataset × seed), and the group runner that
ablation, sweep and ``rosa2 run`` share (a parent run with one child per cell).

Resumable by construction: the cell key finds a finished MLflow run (skip) or an unfinished one
(resume into it); finished problems come from the local store; nothing is uploaded twice.

Honest ends: a cell (and a parent) is claimed by its key for as long as it runs
(:func:`rosa2.tasks.cells.claim`, a flock under the project home), so a second ``rosa2 run`` of it waits,
saying who holds it, then finds it finished; a claim whose holder died (``kill -9``) gets its
Prefect flow run marked Crashed by the next holder. A run the flow does not finish ends FAILED
(with the error as a tag) or KILLED (Ctrl-C, SIGTERM), never RUNNING (:func:`rosa2.tasks.tracking.ends_honestly`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from rosa2 import metrics, report
from rosa2.config import TrackingConfig
from rosa2.models import display_name
from rosa2.report import CellSummary
from rosa2.tasks import publish, sessions
from rosa2.tasks import tracking as tr
from rosa2.tasks.cells import Cell, ResultStore, claim, digest


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


def flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


def cell_run_name(cell: Cell) -> str:
    """The cell's flow-run name in the Prefect UI: method · model · dataset · seed."""
    return cell.run_name()


def cell_tags(cell: Cell, study: str) -> list[str]:
    """Tags to filter the Prefect runs list by (the UI's Tags filter): study, method, model, dataset."""
    return [f"study:{study}", f"method:{cell.method}", f"model:{display_name(cell.model.name)}",
            f"dataset:{Path(cell.data.dataset).name}"]


def _name_from_parameters() -> str:
    from prefect.runtime import flow_run

    return cell_run_name(flow_run.parameters["cell"])


def label_flow_run(tags: list[str], name: str | None = None) -> None:
    """Add ``tags`` to the flow run we are in (and rename it). Prefect takes a run's tags only from
    the caller's ``prefect.tags`` context at creation; set here, they hold however the flow was
    started (``rosa2 run``, a sweep, a pool worker, the nightly deployment). Best effort."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as pc:
            run = pc.read_flow_run(flow_run_id())
            pc.update_flow_run(run.id, name=name, tags=sorted({*run.tags, *tags}))
    except Exception as exc:  # noqa: BLE001 - a label must not stop a run
        get_run_logger().warning("could not tag this flow run %s: %s", tags, exc)


def publish_cell_page(outcome: CellOutcome) -> None:
    """The cell's markdown artifact on its flow run (Prefect UI, Artifacts tab): its table and a link
    to the MLflow run that holds the rest. One key per cell, so reruns are versions of one artifact."""
    from prefect.artifacts import create_markdown_artifact

    markdown = f"**MLflow run:** [{outcome.name}]({outcome.url})\n\n" + report.render([outcome.summary], outcome.name)
    create_markdown_artifact(markdown, key=f"rosa2-cell-{outcome.cell_key}", description=outcome.name)


def _say(message: str) -> None:
    """A claim we wait for: on the console whatever the log level, and in the flow run's logs."""
    import sys

    print(f"rosa2: {message}", file=sys.stderr, flush=True)
    get_run_logger().warning(message)


def crash_abandoned(previous: dict[str, Any], what: str, key: str) -> str | None:
    """The previous holder of the claim on ``key`` died holding it (``kill -9``, a lost machine):
    its Prefect flow run would stay RUNNING for good. Mark it Crashed; return its id (None when
    there was nothing to close). Best effort: Prefect unreachable leaves it as it was."""
    abandoned = previous.get("flow_run_id")
    if not abandoned or abandoned == flow_run_id():
        return None
    try:
        from prefect import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as pc:
            state = pc.read_flow_run(abandoned).state
            if state is not None and state.is_final():
                return None
            message = (
                f"process {previous.get('pid')} on {previous.get('host')} ended without finishing {what} {key} "
                f"(killed); taken over by flow run {flow_run_id()}"
            )
            pc.set_flow_run_state(abandoned, Crashed(message=message), force=True)
        get_run_logger().warning("flow run %s of %s %s was abandoned by its process: marked Crashed", abandoned, what, key)
        return abandoned
    except Exception as exc:  # noqa: BLE001 - closing someone else's leftovers must not stop this run
        get_run_logger().warning("could not mark the abandoned flow run %s Crashed: %s", abandoned, exc)
        return None


def _summary_from_tracking(tracking: TrackingConfig, cell: Cell, run_id: str) -> CellSummary:
    mc = tr.client(tracking)
    return publish.cell_summary(cell, tr.summary_from_run(mc, mc.get_run(run_id)), run_id)


@flow(name="experiment", flow_run_name=_name_from_parameters, validate_parameters=False, log_prints=True)
def experiment(cell: Cell, tracking: TrackingConfig, parent_run_id: str | None = None, progress: bool = True) -> CellOutcome:
    """One cell: prepare dataset → run sessions → evaluate code → aggregate → log."""
    label_flow_run(cell_tags(cell, tracking.study))
    store = ResultStore()
    dataset = sessions.prepare_dataset(cell.data)
    key = cell.key(dataset.fingerprint)
    # one process at a time per cell: a second run of it waits here, then finds it finished
    with claim(key, "cell", on_wait=_say, flow_run_id=flow_run_id()) as previous:
        crash_abandoned(previous, "cell", key)
        run = publish.open_cell(tracking, cell, key, parent_run_id)
        if run.complete:
            get_run_logger().info("cell %s already finished in %s: skipped", key, run.url)
            summary = _summary_from_tracking(tracking, cell, run.run_id)
            outcome = CellOutcome(cell.name(), key, run.run_id, run.url, True, summary, flow_run_url())
        else:
            with tr.ends_honestly(tracking, run.run_id):  # FAILED / KILLED, never left RUNNING
                with tr.system_metrics(run.run_id):  # GPU utilisation and memory, on GPU hosts only
                    results = sessions.run_sessions(cell, dataset.problems, store, tracking.adapters, progress)
                results = sessions.evaluate_code(cell, dataset.problems, results, store)
                summary = sessions.aggregate(results, cell.session.max_turns)
                for caution in metrics.warnings(summary, cell.method):  # on the Prefect server too, however quiet the console
                    get_run_logger().warning("%s: %s", cell.name(), caution)
                publish.log_cell(tracking, run.run_id, cell, key, dataset, results, summary, store)
            outcome = CellOutcome(cell.name(), key, run.run_id, run.url, False,
                                  publish.cell_summary(cell, summary, run.run_id), flow_run_url())
    publish_cell_page(outcome)
    return outcome


def group_key(kind: str, cells: list[Cell]) -> str:
    return digest({"kind": kind, "cells": [c.params() for c in cells]})


def run_group(cells: list[Cell], tracking: TrackingConfig, name: str, kind: str, progress: bool = True,
              scaleout: Any = None) -> GroupOutcome:
    """Cells as child runs of one parent run, then one report on the parent (call inside a flow).

    ``scaleout`` (a :class:`rosa2.flows.scaleout.ScaleoutConfig`) fans the cells out to a work pool or
    Ray first; the loop below then only gathers their summaries (finished cells are skipped)."""
    key = group_key(kind, cells)
    label_flow_run(sorted({f"kind:{kind}", *(t for c in cells for t in cell_tags(c, tracking.study))}), f"{tracking.study} · {name}")
    with claim(key, kind, on_wait=_say, flow_run_id=flow_run_id()) as previous:
        crash_abandoned(previous, kind, key)
        parent = publish.open_group(tracking, key, name, kind)
        with tr.ends_honestly(tracking, parent.run_id):  # a cell that fails or is killed ends its parent too
            if scaleout is not None and scaleout.runner != "local":
                from rosa2.flows import scaleout as fan_out

                fan_out.run([{"cell": c, "tracking": tracking, "parent_run_id": parent.run_id, "progress": False} for c in cells], scaleout)
            outcomes = [experiment(cell, tracking, parent.run_id, progress) for cell in cells]
            summaries = [o.summary for o in outcomes]
            markdown = publish.publish_report(tracking, parent.run_id, summaries, name)
            publish.close_group(tracking, parent.run_id)
    return GroupOutcome(name, parent.run_id, parent.url, outcomes, markdown, flow_run_url())


@flow(name="cells", validate_parameters=False, log_prints=True)
def cells_flow(cells: list[Cell], tracking: TrackingConfig, name: str = "rosa2 run", progress: bool = True) -> GroupOutcome:
    """Several cells under one parent (``rosa2 run`` with several methods)."""
    return run_group(cells, tracking, name, "run", progress)
