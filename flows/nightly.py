"""The nightly deployment: a sweep file run on a cron schedule by the Prefect server.

``register`` puts a deployment with its schedule on the server (the ephemeral API cannot
schedule: ``rosa2 stack up`` first). Runs then need an executor: ``rosa2 deploy --serve`` runs
them in that process, or ``--work-pool NAME`` hands them to a process work pool's worker (one
per GPU host, docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from rosa2.config import ConfigError, TrackingConfig
from rosa2.flows import sweep as sweep_module

DEPLOYMENT = "nightly"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def spec_file(spec_path: str) -> Path:
    """``spec_path`` as given, or, when relative and not found there, under the project root (where
    ``sweeps/`` ships): infra/prefect.yaml names ``sweeps/nightly.yaml`` whatever the worker's cwd."""
    path = Path(spec_path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return PROJECT_ROOT / path if (PROJECT_ROOT / path).exists() else path


@flow(name="nightly", log_prints=True)
def nightly(spec_path: str, progress: bool = False) -> dict[str, Any]:
    """Run the sweep in ``spec_path`` (re-read every night, so edits apply to the next run)."""
    spec = sweep_module.load(spec_file(spec_path))
    outcome = sweep_module.sweep(spec, None, progress)
    return {"parent_run_id": outcome.run_id, "cells": len(outcome.cells), "skipped": sum(c.skipped for c in outcome.cells)}


def schedule(cron: str, timezone: str = "UTC") -> Any:
    from prefect.schedules import Cron

    try:
        return Cron(cron, timezone=timezone)
    except ValueError as exc:
        raise ConfigError(
            f"cron={cron!r} (timezone {timezone!r}) is not allowed: {str(exc).splitlines()[0]}; expected five fields, e.g. '0 2 * * *'"
        ) from None


def deployment(spec_path: str | Path, cron: str, name: str = DEPLOYMENT, timezone: str = "UTC") -> Any:
    """The RunnerDeployment (not yet on a server)."""
    when = schedule(cron, timezone)
    spec = sweep_module.load(spec_path)  # fail now, not at 2 a.m.
    return nightly.to_deployment(
        name=name, schedule=when,
        parameters={"spec_path": str(Path(spec_path).resolve())},
        tags=["rosa2", "nightly", f"study:{spec.tracking(TrackingConfig()).study}"],
        description=f"rosa2 sweep {Path(spec_path).name} on cron '{cron}' ({timezone})",
    )


def register(spec_path: str | Path, cron: str, tracking: TrackingConfig, name: str = DEPLOYMENT,
             timezone: str = "UTC", work_pool: str | None = None) -> Any:
    """Register the nightly deployment with its schedule on the Prefect server; returns its id."""
    from rosa2 import stack

    stack.require(tracking, ("prefect",))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: tracking.prefect_api_url}):
        return deployment(spec_path, cron, name, timezone).apply(work_pool_name=work_pool)
