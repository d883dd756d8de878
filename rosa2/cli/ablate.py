"""``rosa2 ablate``: the Switch ablation (baseline, textgrad, rosa, rosa2 and the Switch pair) on
one model and dataset, under one parent run.

The command's defaults are a demo that fits a CPU: T_max = 4 with the switch at turn 2, so each
Switch arm runs one update on its first axis and two on the second. The paper's study (T_max 10,
switch at 5: ``rosa2.flows.ablation.ABLATION_METHODS``) is ``--max-turns 10 --method baseline textgrad
rosa rosa2 switch-w2p@5 switch-p2w@5``, or ``rosa2 sweep sweeps/motivation.yaml``."""

from __future__ import annotations

import argparse

from rosa2.config import TrackingConfig, from_args
from rosa2.cli.run import add_cell_arguments, base_cell, prepare_platform, print_outcome

DEMO_MAX_TURNS = 4
DEMO_METHODS = ("baseline", "textgrad", "rosa", "rosa2", "switch-w2p@2", "switch-p2w@2")


def cmd(args: argparse.Namespace) -> int:
    tracking = from_args(TrackingConfig, args)
    base = base_cell(args, "baseline")
    from rosa2.flows.ablation import ablation, ablation_cells

    methods = tuple(args.methods or DEMO_METHODS)
    contexts = tuple(args.update_contexts or ())
    ablation_cells(base, methods, contexts)  # a Switch turn outside 2..T_max-1 fails here, before anything starts
    with prepare_platform(tracking, args.verbose, [base]):
        outcome = ablation(base, tracking, methods, contexts, args.progress)
    print_outcome(outcome, tracking, args.json)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    add_cell_arguments(parser, default_methods=DEMO_METHODS, max_turns=DEMO_MAX_TURNS)
    parser.add_argument(
        "--update-contexts", nargs="+", choices=["generated", "next"],
        help="also sweep the parametric update's context for methods with weights (e.g. generated next)",
    )
    parser.set_defaults(func=cmd)
