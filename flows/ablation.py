"""The ``ablation`` flow: baseline, textgrad, rosa, rosa2 and the Switch pair on one model and
dataset, optionally across the parametric stream's ``update_context`` (docs/algorithm.md §2: 'generated' is
the paper's reading, 'next' our variant).

The defaults are the paper's motivation study (Sec. 2.1): T_max = 10, switch at k = 5. A Switch
arm needs 2 <= k <= T_max - 1 (at k the new axis first acts on turn k + 1; no update follows the
last turn), and the flow never rewrites k: a cell whose Switch could not switch is refused before
anything runs, since it would silently duplicate a single-axis curve."""

from __future__ import annotations

import dataclasses

from prefect import flow

from rosa2.config import ConfigError, SessionConfig, TrackingConfig
from rosa2.session import uses_streams
from rosa2.tasks.cells import Cell
from rosa2.flows.experiment import GroupOutcome, run_group

ABLATION_MAX_TURNS = 10
ABLATION_METHODS = ("baseline", "textgrad", "rosa", "rosa2", "switch-w2p@5", "switch-p2w@5")


def ablation_cells(base: Cell, methods: tuple[str, ...] = ABLATION_METHODS, update_contexts: tuple[str, ...] = ()) -> list[Cell]:
    """One cell per method (× update context for methods with weights), each method checked
    against the base cell's T_max: a Switch turn outside 2..T_max-1 is a ConfigError naming both."""
    cells = []
    for method in methods:
        try:
            session = dataclasses.replace(base.session, method=method)
        except ConfigError as exc:
            raise ConfigError(f"ablation: {exc}") from None
        cell = base.replace(session=session)
        contexts = update_contexts if uses_streams(session)[1] and update_contexts else (base.adapt.update_context,)
        cells += [cell.replace(adapt=dataclasses.replace(cell.adapt, update_context=c)) for c in contexts]
    return cells


@flow(name="ablation", validate_parameters=False, log_prints=True)
def ablation(
    base: Cell, tracking: TrackingConfig, methods: tuple[str, ...] = ABLATION_METHODS,
    update_contexts: tuple[str, ...] = (), progress: bool = True,
) -> GroupOutcome:
    """The Switch ablation under one parent run (``rosa2.kind=ablation``), then the report."""
    cells = ablation_cells(base, methods, update_contexts)
    return run_group(cells, tracking, f"ablation {base.model.name} · {base.data.dataset}", "ablation", progress)
