"""Scale-out of a sweep on existing engines (docs/architecture.md): a Prefect work pool or Ray.

A sweep is a list of cells (method × model × dataset × seed); each cell is one run of a cell
flow (by default the platform's ``experiment`` flow). This module only decides *where* cells run:

- ``local``: one after another in this process (the reference for the other two);
- ``pool``: one flow run per cell of a deployment on a Prefect work pool; the workers that poll
  the pool (one per GPU, ``rosa2 worker start``) take them. A worker's ``--limit`` is how many
  cells fit on its GPU at once, so a GPU never runs two sessions that do not fit. When a worker
  dies mid-cell its flow run turns ``Crashed`` (or, when the host died, stops sending heartbeats);
  Prefect automations put such a run back to ``AwaitingRetry`` and another worker runs it again
  (the cell flow resumes its MLflow run);
- ``ray``: one Prefect task per cell on ``prefect_ray.RayTaskRunner``, each placed with
  ``remote_options(num_gpus=...)`` so Ray's scheduler packs cells onto GPUs.

No scheduler of our own: placement, retry and limits are Prefect's and Ray's.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_client, task
from prefect.client.schemas.objects import StateType

from rosa2 import env
from rosa2.config import ConfigError
from rosa2.errors import Rosa2Error

RUNNERS = ("local", "pool", "ray")
CELL_TAG = "rosa2-cell"
FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED}
CRASH_GRACE_S = 60  # a Crashed cell is final only if no retry automation picked it up by then


@dataclass
class ScaleoutConfig:
    """Where a sweep's cells run; the ``scaleout:`` section of a sweep file."""

    runner: str = field(default="local", metadata={"help": "local | pool | ray"})
    entrypoint: str = field(
        default="flows/experiment.py:experiment",
        metadata={"help": "The cell flow, path:function relative to the project root (same path on every host)"},
    )
    pool: str = field(default="rosa2-gpu", metadata={"help": "Prefect work pool (runner=pool)"})
    deployment: str = field(default="rosa2-cell", metadata={"help": "Deployment name of the cell flow on the pool"})
    max_attempts: int = field(default=3, metadata={"help": "Attempts per cell on the pool when workers are lost"})
    lost_after_s: int = field(
        default=90,
        metadata={"help": "A running cell with no heartbeat for this long is put back to AwaitingRetry (>= 40: heartbeats come every 30 s)"},
    )
    poll_s: float = field(default=5.0, metadata={"help": "How often the sweep checks its cells' states"})
    num_gpus: float = field(default=1.0, metadata={"help": "GPUs per cell on Ray (runner=ray); 0 on CPU hosts"})
    ray_address: str | None = field(
        default=None, metadata={"help": "Ray cluster ('ray://head:10001' or 'auto'); None starts a local Ray"}
    )

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ConfigError(f"scaleout.runner={self.runner!r} is not allowed; expected one of {list(RUNNERS)}")
        path, _, func = self.entrypoint.partition(":")
        if not path.endswith(".py") or not func.isidentifier():
            raise ConfigError(f"scaleout.entrypoint={self.entrypoint!r} is not allowed; expected 'path/to/file.py:flow_function'")
        if self.lost_after_s < 40:
            raise ConfigError(f"scaleout.lost_after_s={self.lost_after_s!r} must be >= 40 (heartbeats come every 30 s)")
        if self.max_attempts < 1:
            raise ConfigError(f"scaleout.max_attempts={self.max_attempts!r} must be >= 1")
        if self.num_gpus < 0:
            raise ConfigError(f"scaleout.num_gpus={self.num_gpus!r} must be >= 0")
        if self.poll_s <= 0:
            raise ConfigError(f"scaleout.poll_s={self.poll_s!r} must be > 0")


def cell_key(parameters: dict[str, Any]) -> str:
    """A deterministic key of a cell's parameters: the same cell is never created twice."""
    from fastapi.encoders import jsonable_encoder

    return hashlib.sha256(json.dumps(jsonable_encoder(parameters), sort_keys=True).encode()).hexdigest()[:24]


def from_mapping(data: Any, where: str) -> ScaleoutConfig:
    """The ``scaleout:`` section of a sweep file; errors name ``where`` (file:line) and the field."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(ScaleoutConfig)]
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: scaleout must be a mapping of {names}")
    for key in data:
        if key not in names:
            raise ConfigError(f"{where}: unknown field scaleout.{key!r}; expected one of {names}")
    try:
        return ScaleoutConfig(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _load_cell_flow(cfg: ScaleoutConfig, root: Path) -> Any:
    from prefect.flows import load_flow_from_entrypoint

    path, _, func = cfg.entrypoint.partition(":")
    source = root / path
    if not source.is_file():
        raise ConfigError(f"scaleout.entrypoint={cfg.entrypoint!r}: {source} does not exist")
    return load_flow_from_entrypoint(f"{source}:{func}")


# --------------------------------------------------------------------------------------------
# Work pool: a process pool, a deployment of the cell flow, and the lost-cell automation


POOL_CELL = "flows/scaleout.py:pool_cell"


@flow(name="rosa2-pool-cell")
def pool_cell(entrypoint: str, parameters: dict[str, Any], max_attempts: int = 3) -> Any:
    """One cell on a pool worker: tags this flow run with the worker (and so the GPU) that ran each
    attempt, then runs the cell flow's body in this flow run, so that one flow run is one cell and
    a lost worker's retry is the same run (``run_count`` 2), not an orphaned child."""
    import os

    from prefect.runtime import flow_run

    worker = os.environ.get("ROSA2_WORKER", "unnamed")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(run.id, tags=sorted({*run.tags, f"worker:{worker}", f"attempt:{run.run_count}"}))
    if run.run_count > max_attempts:  # Failed, not Crashed: the retry automations leave it alone
        raise Rosa2Error(f"cell lost its worker {run.run_count - 1} times (max_attempts={max_attempts}); "
                         "look for a cell that kills its host (out of memory?) in the workers' logs")
    # the deployment's pull step set the working directory to the project on this host; the
    # parameters crossed the API as JSON: the cell flow's signature turns them back into configs
    cell_flow = _load_cell_flow(ScaleoutConfig(entrypoint=entrypoint), Path.cwd())
    return cell_flow.fn(**cell_flow.validate_parameters(parameters))


def ensure_pool(name: str) -> None:
    """A process work pool: its workers start each cell as a subprocess on their own host."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def prepare_pool(cfg: ScaleoutConfig, root: Path | None = None) -> str:
    """Create (idempotently) the work pool, the deployment of :func:`pool_cell` and the automation
    that retries cells whose worker died. Returns the deployment's ``flow-name/deployment-name``."""
    root = root or env.source_root()
    _load_cell_flow(cfg, root)  # fail here, not on a worker, when the cell flow does not load
    ensure_pool(cfg.pool)
    # Workers run the code at the same path on their host (a shared checkout or the worker image).
    # (Flow.deploy would do the same, but under prefect 3.8.8 + fastapi 0.154 its check for online
    # workers gets a 422 from the server; RunnerDeployment.apply registers without that check.)
    deployment_id = pool_cell.from_source(source=str(root), entrypoint=POOL_CELL).to_deployment(
        name=cfg.deployment, work_pool_name=cfg.pool, tags=[CELL_TAG]
    ).apply()
    ensure_retry_automation(deployment_id, cfg.lost_after_s)
    return f"{pool_cell.name}/{cfg.deployment}"


def ensure_retry_automation(deployment_id: Any, lost_after_s: int) -> None:
    """Put a cell of this deployment back to ``AwaitingRetry`` when its worker is lost, so any live
    worker of the pool runs it again. Two ways a worker is lost: its flow-run process reports
    ``Crashed`` (the worker process died under it), or the flow run stops sending heartbeats (the
    whole host died). ``pool_cell`` bounds the attempts."""
    from prefect.automations import Automation
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    final = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"}
    scope = {
        "match": {"prefect.resource.id": "prefect.flow-run.*"},
        "match_related": {"prefect.resource.id": f"prefect.deployment.{deployment_id}"},
        "for_each": {"prefect.resource.id"},
    }
    triggers = {
        "crashed": EventTrigger(**scope, expect={"prefect.flow-run.Crashed"}, posture=Posture.Reactive, threshold=1),
        "silent": EventTrigger(**scope, after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *final},
                               posture=Posture.Proactive, threshold=1, within=lost_after_s),
    }
    for kind, trigger in triggers.items():
        name = f"rosa2-retry-{kind}-cells-{deployment_id}"
        try:
            Automation.read(name=name)
            continue
        except ValueError:
            pass
        Automation(
            name=name,
            description=f"Put cells whose worker was lost ({kind}) back to AwaitingRetry",
            trigger=trigger,
            actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
                                        message=f"worker lost ({kind}): retried on another worker")],
        ).create()


def _run_name(parameters: dict[str, Any]) -> str | None:
    """The pool run's name in the Prefect UI (method · model · dataset · seed) when it runs a cell."""
    from rosa2.tasks.cells import Cell

    cell = parameters.get("cell")
    return cell.run_name() if isinstance(cell, Cell) else None


def _run_on_pool(cells: list[dict[str, Any]], cfg: ScaleoutConfig) -> list[dict[str, Any]]:
    from prefect.deployments import run_deployment

    deployment = prepare_pool(cfg)
    runs = [
        run_deployment(
            deployment, parameters={"entrypoint": cfg.entrypoint, "parameters": cell, "max_attempts": cfg.max_attempts},
            timeout=0, tags=[CELL_TAG], flow_run_name=_run_name(cell),
            idempotency_key=f"{deployment}:{cfg.entrypoint}:{cell_key(cell)}",  # a rerun finds the same runs
        )
        for cell in cells
    ]
    pending = {run.id for run in runs}
    crashed_since: dict[Any, float] = {}
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(cfg.poll_s)
            for run_id in list(pending):
                state = client.read_flow_run(run_id).state_type
                if state == StateType.CRASHED:
                    crashed_since.setdefault(run_id, time.monotonic())
                else:
                    crashed_since.pop(run_id, None)
                if state in FINAL or time.monotonic() - crashed_since.get(run_id, float("inf")) > CRASH_GRACE_S:
                    pending.discard(run_id)
        finals = [client.read_flow_run(run.id) for run in runs]
    failed = [f"{run.name} ({run.id}): {run.state_name}" for run in finals if run.state_type != StateType.COMPLETED]
    if failed:
        # never fall back to running them here: this host may have no GPU
        raise Rosa2Error(f"{len(failed)} of {len(cells)} cells did not complete on pool {cfg.pool!r}: "
                         f"{'; '.join(failed)}; see their logs in the Prefect UI, then run the sweep again")
    return [
        {"parameters": cell, "flow_run_id": str(run.id), "state": run.state_name, "run_count": run.run_count,
         "tags": sorted(run.tags)}
        for cell, run in zip(cells, finals)
    ]


# --------------------------------------------------------------------------------------------
# Ray and local: the cell flow called from a task


@task(tags=[CELL_TAG])
def run_cell(entrypoint: str, root: str, parameters: dict[str, Any]) -> Any:
    """One cell: the cell flow as a nested flow run, wherever the task runner placed this task."""
    return _load_cell_flow(ScaleoutConfig(entrypoint=entrypoint), Path(root))(**parameters)


def _run_on_ray(cells: list[dict[str, Any]], cfg: ScaleoutConfig) -> list[Any]:
    from prefect_ray.context import remote_options

    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if cfg.num_gpus > have:
        raise ConfigError(
            f"scaleout.num_gpus={cfg.num_gpus!r} per cell, but the Ray cluster has {have} GPUs; "
            "set num_gpus: 0 on CPU hosts"
        )
    root = str(env.source_root())
    with remote_options(num_gpus=cfg.num_gpus):
        futures = [run_cell.submit(cfg.entrypoint, root, cell) for cell in cells]
    return [f.result() for f in futures]


def ray_runner(cfg: ScaleoutConfig) -> Any:
    """The RayTaskRunner for ``cfg``: its cluster, or a local Ray that sees the project's code."""
    from prefect_ray import RayTaskRunner

    if cfg.ray_address:
        return RayTaskRunner(address=cfg.ray_address)
    return RayTaskRunner(
        init_kwargs={
            "include_dashboard": False,
            "runtime_env": {"env_vars": {"PYTHONPATH": str(env.source_root())}},
        }
    )


@flow(name="rosa2-scaleout")
def scaleout(cells: list[dict[str, Any]], cfg: ScaleoutConfig | None = None) -> list[Any]:
    """Run every cell once where ``cfg.runner`` says; returns what each cell returned (local, ray)
    or each cell's flow run summary (pool: results live in MLflow, written by the cell)."""
    cfg = cfg or ScaleoutConfig()
    if cfg.runner == "pool":
        return _run_on_pool(cells, cfg)
    if cfg.runner == "ray":
        return _run_on_ray(cells, cfg)
    root = str(env.source_root())
    return [run_cell(cfg.entrypoint, root, cell) for cell in cells]


def run(cells: list[dict[str, Any]], cfg: ScaleoutConfig | None = None) -> list[Any]:
    """Entry point for the sweep flow and the CLI: picks the task runner the config asks for."""
    cfg = cfg or ScaleoutConfig()
    chosen = scaleout.with_options(task_runner=ray_runner(cfg)) if cfg.runner == "ray" else scaleout
    return chosen(cells, cfg)
