"""The ``ablation`` flow: baseline, textgrad, rosa, rosa2 and the Switch pair (switch-w2p@k,
switch-p2w@k, k = 5 as in the paper) on one model and dataset, optionally across the parametric
stream's ``update_context`` (DESIGN §2: 'generated' is the paper's reading, 'next' our variant)."""

from __future__ import annotations

import dataclasses

from prefect import flow

from rosa2.config import SessionConfig, TrackingConfig
from tasks.cells import Cell
from flows.experiment import GroupOutcome, run_group

ABLATION_METHODS = ("baseline", "textgrad", "rosa", "rosa2", "switch-w2p@5", "switch-p2w@5")


def ablation_cells(base: Cell, methods: tuple[str, ...] = ABLATION_METHODS, update_contexts: tuple[str, ...] = ()) -> list[Cell]:
    """One cell per method; a Switch turn beyond T_max is brought down to T_max (at least 2)."""
    cells = []
    for method in methods:
        name, _, k = method.partition("@")
        if k and not 2 <= int(k) <= base.session.max_turns:
            method = f"{name}@{max(2, base.session.max_turns)}"
        cell = base.replace(session=dataclasses.replace(base.session, method=method))
        uses_weights = any(SessionConfig(method=method, max_turns=base.session.max_turns).streams_at(t)[1] for t in range(1, base.session.max_turns + 1))
        contexts = update_contexts if uses_weights and update_contexts else (base.adapt.update_context,)
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
