"""``rosa2 run``: one experiment cell per method through Prefect and MLflow, then the table.

By default the four main methods on the embedded model and the embedded math set, a handful of
problems and turns (minutes on 2 CPU cores). Shared by ``rosa2 ablate`` and ``rosa2 sweep``: the
cell options, the server check and the end-of-run print.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any

from rosa2.config import BASE_METHODS, SMALL_CRITIC, TrackingConfig, add_arguments, add_engine_arguments, engine_configs, from_args

# A cell's sections (rosa2.tasks.cells.Cell's fields): the engine's, the dataset, the code sandbox
# and how answers are read
CELL_SECTIONS = ("model", "data", "session", "generation", "adapt", "semantic", "sandbox", "reward")
# The main job is sized for the embedded SmolLM2-135M on 2 CPU cores (measured, see README): its
# four-option number questions are at the model's level (27% at turn 1 over all 48, every answer
# scorable in ~11 tokens), where embedded-math's word problems score 0-2 of 16 with most answers cut
# before \boxed{}. 8 problems x 3 turns, all 8 sessions of a cell advanced together.
# Demo-size answers and critiques: on 2 CPU cores a TextGrad critic call (two per rejected turn,
# ~1k-token prompts) at the library default of 256 tokens made one textgrad problem take minutes;
# the demo's critic is config.SMALL_CRITIC (compact prompts, budgets from measured lengths); a
# letter answer takes ~11 tokens.
DEFAULT_MAX_TURNS = 3
CELL_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"dataset": "embedded-choice", "limit": 8},
    "session": {"max_turns": DEFAULT_MAX_TURNS, "parallel_sessions": 8},
    "generation": {"max_new_tokens": 48},
    "semantic": {**SMALL_CRITIC},
}


def add_cell_arguments(
    parser: argparse.ArgumentParser, methods: bool = True, *,
    default_methods: tuple[str, ...] = BASE_METHODS, max_turns: int = DEFAULT_MAX_TURNS,
) -> None:
    """Every config field as an option (the same help text as the MLflow params); a command gives
    its own default methods and T_max, which ``--help`` shows."""
    if methods:
        parser.add_argument(
            "--method", dest="methods", action="extend", nargs="+", metavar="M",
            help=f"methods to run, one cell each (default: {' '.join(default_methods)}); "
            "baseline | textgrad | rosa | rosa2 | switch-w2p@k | switch-p2w@k (2 <= k <= T_max - 1: "
            "the new axis first acts on turn k + 1)",
        )
    defaults = {**CELL_DEFAULTS, "session": {**CELL_DEFAULTS["session"], "max_turns": max_turns}}
    add_engine_arguments(parser, CELL_SECTIONS, defaults=defaults, skip={"session": ("method",)})
    add_tracking_arguments(parser)


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, TrackingConfig)
    parser.add_argument("--json", action="store_true", help="print the final metrics of every cell as JSON")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--verbose", action="store_true", help="show Prefect's task logs")


def base_cell(args: argparse.Namespace, method: str = "rosa2") -> Any:
    """The cell of the options (every section built and validated here), for ``method``."""
    from rosa2.tasks.cells import Cell

    return Cell(**engine_configs(args, CELL_SECTIONS, session={"method": method}))


def check_inputs(cells: Any, where: str = "") -> None:
    """Resolve every cell's model and dataset before any flow or MLflow run starts, so that a bad
    path is one line (and exit 2) with nothing logged anywhere, not a Prefect traceback and a run
    left behind. Local models must be transformers directories; local and embedded datasets are
    read in full (every row checked). Hub ids are only checked for form: they are fetched, and any
    failure recorded on the run (FAILED, with the error as a tag), inside the cell."""
    from rosa2 import models
    from rosa2.data import check
    from rosa2.errors import Rosa2Error

    prefix = f"{where}: " if where else ""
    done: set[Any] = set()
    for cell in cells:
        probes = [("model", cell.model.name, lambda c=cell: _check_model(c.model.name)),
                  ("dataset", (cell.data.dataset, cell.data.split), lambda c=cell: check(c.data))]
        if cell.semantic.critic not in ("base", "openai"):  # another model writes the critiques
            probes.append(("model", cell.semantic.critic, lambda c=cell: _check_model(c.semantic.critic)))
        for what, key, probe in probes:
            if (what, key) in done:
                continue
            done.add((what, key))
            try:
                probe()
            except Rosa2Error as exc:
                raise type(exc)(f"{prefix}{exc}") from None


def _check_model(name: str) -> None:
    """A model name resolves; a local directory's config and tokenizer load (seconds, no weights)."""
    from pathlib import Path

    from rosa2 import models

    source = models.resolve(name)
    if not Path(source).is_dir() or name in models.EMBEDDED_ALIASES:
        return  # a hub id (fetched inside the cell) or the embedded model (checked by its manifest)
    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(source)
        AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a broken directory
        detail = " ".join(str(exc).split())[:300]
        raise models.ModelError(f"model directory {source} cannot be loaded ({type(exc).__name__}: {detail})") from None


def prepare_platform(tracking: TrackingConfig, verbose: bool = False, cells: Any = ()) -> Any:
    """Check the cells' inputs (:func:`check_inputs`), then both servers (one message naming what is
    down); a context that points Prefect at ours."""
    from rosa2 import stack

    check_inputs(cells)
    stack.require(tracking)
    os.environ["MLFLOW_TRACKING_URI"] = tracking.mlflow_uri
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # print_outcome names every run once
    quiet_console(verbose)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: tracking.prefect_api_url})


def quiet_console(verbose: bool = False) -> None:
    """Unless ``verbose``, Prefect's console handler shows only warnings and errors. Only that
    handler: the loggers keep their INFO level, so the API handler still sends every record of a
    flow run (state changes, our warnings) to the server's logs, however quiet the terminal. Set on
    the live handler, so it holds whether or not Prefect was imported before."""
    if verbose:
        return
    import logging

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # Prefect's handlers exist from here on (else on first use of a flow)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(logging.WARNING)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def print_outcome(outcome: Any, tracking: TrackingConfig, as_json: bool) -> None:
    """The table (or JSON of the final metrics) and where everything is."""
    cells = getattr(outcome, "cells", None) or [outcome]
    if as_json:
        print(json.dumps({
            "study": tracking.study,
            "cells": [
                {"name": c.name, "method": c.summary.method, "model": c.summary.model, "dataset": c.summary.dataset,
                 "seed": c.summary.seed, "skipped": c.skipped, "mlflow_run": c.url,
                 "metrics": {k: _clean(v) for k, v in c.summary.summary.items()}}
                for c in cells
            ],
        }, indent=1))
        return
    from rosa2 import report

    print(report.render([c.summary for c in cells], title=f"study {tracking.study}"))
    for c in cells:
        print(f"  {c.name}: {'skipped (finished before) ' if c.skipped else ''}{c.url}")
    if getattr(outcome, "url", None):
        print(f"MLflow parent run: {outcome.url}")
    if getattr(outcome, "prefect_url", None):
        print(f"Prefect flow run:  {outcome.prefect_url}")


def run_cells(args: argparse.Namespace) -> tuple[list[str], list[Any]]:
    """(methods, one cell per method) from the options; every other session option is kept."""
    methods = args.methods or list(BASE_METHODS)
    base = base_cell(args, methods[0])
    return methods, [base.replace(session=dataclasses.replace(base.session, method=m)) for m in methods]


def cmd(args: argparse.Namespace) -> int:
    tracking = from_args(TrackingConfig, args)
    methods, cells = run_cells(args)
    with prepare_platform(tracking, args.verbose, cells):
        from rosa2.flows.experiment import cells_flow, experiment

        if len(cells) == 1:
            outcome = experiment(cells[0], tracking, None, args.progress)
        else:
            outcome = cells_flow(cells, tracking, f"rosa2 run {' '.join(methods)}", args.progress)
    print_outcome(outcome, tracking, args.json)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    add_cell_arguments(parser)
    parser.set_defaults(func=cmd)
