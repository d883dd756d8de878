"""Prefect tasks wrapping the core library: prepare dataset, run sessions, evaluate code, aggregate.

Tasks are plain functions with explicit inputs and outputs; retries, tags and caching sit on the
decorators. Only infrastructure errors (sandbox, network, Docker, a lost device) are retried — a
bad config or a model failure is not. The session task saves every finished problem to the local
:class:`~rosa2.tasks.cells.ResultStore` before moving on, and skips problems already there, so a retry,
a crash or a kill resumes where it stopped. The engine advances ``SessionConfig.parallel_sessions``
sessions at a time and each problem is saved as it leaves the batch, so a kill loses at most the
sessions in flight.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NONE

from rosa2 import env
from rosa2.config import ADAPTER_RETENTION, DataConfig
from rosa2.errors import Rosa2Error
from rosa2.records import Problem, ProblemResult
from rosa2.tasks.cells import Cell, ResultStore, _atomic_write, digest

GPU_TAG = "rosa2-gpu"  # `prefect concurrency-limit create rosa2-gpu <GPUs>` bounds sessions per host
INFRA_NAMES = ("SandboxError", "DockerException", "APIError", "OutOfMemoryError", "AcceleratorError")


def is_infrastructure(exc: BaseException) -> bool:
    """Errors worth retrying: the machine, not the model or the input (docs/sandbox.md: sandbox_error)."""
    if getattr(exc, "infrastructure", False):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return True
    return any(cls.__name__ in INFRA_NAMES for cls in type(exc).__mro__)


def retry_infrastructure_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is infrastructure."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify it, we do not handle it
        return is_infrastructure(exc)
    return False


# ---------------------------------------------------------------------------------------------
# prepare dataset


@dataclass
class PreparedDataset:
    name: str  # DataConfig.dataset as given
    fingerprint: str  # rosa2.data.fingerprint of the selected problems
    snapshot: Path  # <home>/datasets/<fingerprint>.jsonl: exactly what the cell saw
    problems: list[Problem]


def _data_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    data: DataConfig = parameters["data"]
    source = Path(data.dataset).expanduser()
    stat = source.stat() if source.is_file() else None
    # a local file that changed is a new dataset; names and hub ids are keyed by their selection
    # the home is in the key: the cached value points at a snapshot file under it
    file = stat and [stat.st_size, stat.st_mtime_ns]
    return "rosa2-data-" + digest({"data": dataclasses.asdict(data), "file": file, "home": str(env.home())})


def prepare(data: DataConfig) -> PreparedDataset:
    """Load and select the problems; snapshot them under their fingerprint (the lineage record)."""
    from rosa2.data import fingerprint, load_problems

    problems = load_problems(data)
    fp = fingerprint(problems)
    snapshot = env.home() / "datasets" / f"{fp}.jsonl"
    if not snapshot.is_file():
        _atomic_write(snapshot, "".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in problems))
    return PreparedDataset(data.dataset, fp, snapshot, problems)


prepare_dataset = task(
    prepare, name="prepare dataset", cache_key_fn=_data_cache_key, cache_expiration=timedelta(days=7),
    persist_result=True, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_infrastructure_only,
)


# ---------------------------------------------------------------------------------------------
# run sessions

_engines: dict[str, Any] = {}


def engine_for(cell: Cell) -> Any:
    """A session engine for the cell. The loaded model is reused across cells in-process: an engine
    per model × generation × sandbox, re-pointed at each cell's method and knobs (``with_session``).

    ``parallel_sessions`` is the engine's width (adapter slots, sessions advanced together); one
    loaded model serves every width."""
    from rosa2.config import flatten

    parallel = cell.session.parallel_sessions
    key = digest(flatten(model=cell.model, generation=cell.generation, sandbox=cell.sandbox, reward=cell.reward))
    engine = _engines.get(key)
    if engine is None:
        from rosa2.session import SessionEngine

        engine = SessionEngine(
            cell.model, cell.session, cell.adapt, cell.semantic, cell.generation, cell.sandbox, cell.reward, batch_size=parallel
        )
        _engines[key] = engine
        return engine
    return engine.with_session(cell.session, adapt=cell.adapt, semantic=cell.semantic, batch_size=parallel)


def keep_adapter(policy: str, result: ProblemResult, is_last: bool) -> bool:
    """Adapter retention (TrackingConfig.adapters): ``all`` every session the parametric stream ran
    in; ``corrected`` those that failed turn 1 and were solved later; ``final`` the cell's last
    session only (one adapter per cell to inspect); ``none``."""
    if policy not in ADAPTER_RETENTION:
        raise ValueError(policy)
    if not any(t.weights_on for t in result.turns) or policy == "none":
        return False
    if policy == "corrected":
        return result.solved and (result.turn_solved or 1) > 1
    return policy == "all" or is_last


def run_cell_sessions(
    cell: Cell,
    problems: list[Problem],
    store: ResultStore,
    adapters: str = "final",
    progress: bool = True,
    on_problem: Callable[[ProblemResult], None] | None = None,
) -> list[ProblemResult]:
    """Algorithm 1 over the cell's problems, skipping those already in the store; every finished
    problem is stored (and its adapter kept, per ``adapters``) the moment it finishes: the rest run
    ``parallel_sessions`` at a time (``run_many``) and are stored as they leave the batch. Results
    come back in problem order."""
    from tqdm import tqdm

    done: dict[int, ProblemResult] = {}
    todo: list[int] = []
    for index, problem in enumerate(problems):
        result = store.get(cell.problem_key(problem))
        if result is None:
            todo.append(index)
        else:
            done[index] = result
    bar = tqdm(total=len(problems), initial=len(done), desc=cell.name(), unit="problem", disable=not progress, file=sys.stderr, leave=True)
    engine: Any = None

    def finish(index: int, result: ProblemResult) -> None:
        key = cell.problem_key(problems[index])
        if keep_adapter(adapters, result, index == len(problems) - 1):
            engine.save_adapter(store.adapter_dir(key))  # the leaving session's slot, not yet reused
        store.put(key, result)
        done[index] = result
        if on_problem:
            on_problem(result)
        bar.update()
        bar.set_postfix(solved=sum(r.solved for r in done.values()))

    try:
        if todo:
            engine = engine_for(cell)
            index_of = {problems[i].id: i for i in todo}
            if len(index_of) != len(todo):
                raise Rosa2Error(f"problem ids repeat in cell {cell.name()!r}; results are matched to problems by id")
            try:
                # the engine picks each problem's environment (rewards, sandbox) for its domain
                engine.run_many([problems[i] for i in todo], on_result=lambda r: finish(index_of[r.problem_id], r))
            finally:
                engine.release()  # the slots' hooks off the shared model before the next cell
    finally:
        bar.close()
    return [done[i] for i in range(len(problems))]


run_sessions = task(
    run_cell_sessions, name="run sessions", tags=[GPU_TAG], cache_policy=NONE,
    retries=2, retry_delay_seconds=10, retry_condition_fn=retry_infrastructure_only,
)


# ---------------------------------------------------------------------------------------------
# evaluate code


def rescore_code(cell: Cell, problems: list[Problem], results: list[ProblemResult], store: ResultStore) -> list[ProblemResult]:
    """Score again, in the sandbox, the final answer of every code session whose last turn ended in
    ``sandbox_error`` (infrastructure: never scored as a model failure). A clean verdict replaces it;
    a second sandbox_error raises so Prefect retries the task."""
    from rosa2.environment import environment_for

    by_id = {p.id: p for p in problems}
    out = []
    for result in results:
        problem = by_id.get(result.problem_id)
        last = result.turns[-1] if result.turns else None
        if problem is None or problem.domain != "code" or last is None or last.detail.get("outcome") != "sandbox_error":
            out.append(result)
            continue
        environment = environment_for(problem, cell.session.feedback, cell.sandbox, cell.reward)
        environment.reset(problem)
        step = environment.step(last.response, last.turn)
        if step.result.outcome == "sandbox_error":
            raise ConnectionError(f"sandbox still failing for {problem.id}: {step.result.error_text[:200]}")
        last.reward, last.detail = step.reward, {**last.detail, "outcome": step.result.outcome, "rescored": True}
        result.scored = step.result.scored
        store.put(cell.problem_key(problem), result)
        out.append(result)
    return out


evaluate_code = task(
    rescore_code, name="evaluate code", cache_policy=NONE,
    retries=3, retry_delay_seconds=15, retry_condition_fn=retry_infrastructure_only,
)


# ---------------------------------------------------------------------------------------------
# aggregate


def summarize_cell(results: list[ProblemResult], max_turns: int) -> dict[str, Any]:
    """The cell's metrics (rosa2.metrics: Accuracy@K, Correction Uplift, Avg Turn, time, memory, curves)."""
    from rosa2.metrics import summarize

    return summarize(results, max_turns)


aggregate = task(summarize_cell, name="aggregate", cache_policy=NONE)
