"""``rosa2 ablate``: the Switch ablation (baseline, textgrad, rosa, rosa2, switch-w2p@5,
switch-p2w@5) on one model and dataset, under one parent run."""

from __future__ import annotations

import argparse

from rosa2.config import TrackingConfig, from_args
from rosa2.cli.run import add_cell_arguments, base_cell, prepare_platform, print_outcome


def cmd(args: argparse.Namespace) -> int:
    tracking = from_args(TrackingConfig, args)
    base = base_cell(args, "baseline")
    with prepare_platform(tracking, args.verbose):
        from flows.ablation import ABLATION_METHODS, ablation

        methods = tuple(args.methods or ABLATION_METHODS)
        contexts = tuple(args.update_contexts or ())
        outcome = ablation(base, tracking, methods, contexts, args.progress)
    print_outcome(outcome, tracking, args.json)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    add_cell_arguments(parser)
    parser.add_argument(
        "--update-contexts", nargs="+", choices=["generated", "next"],
        help="also sweep the parametric update's context for methods with weights (e.g. generated next)",
    )
    parser.set_defaults(func=cmd)
