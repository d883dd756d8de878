"""``rosa2 sweep FILE``: a YAML grid (models × datasets × methods × seeds), one parent run with
one child per cell; rerun it after a crash and finished cells are skipped."""

from __future__ import annotations

import argparse

from rosa2.config import TrackingConfig, from_args
from rosa2.cli.run import add_tracking_arguments, check_inputs, prepare_platform, print_outcome


def cmd(args: argparse.Namespace) -> int:
    from rosa2.flows import sweep as sweep_module

    spec = sweep_module.load(args.file)  # bad fields fail here, before any server or model
    tracking = spec.tracking(from_args(TrackingConfig, args))
    if args.study:  # the command line wins over the file's study
        tracking = from_args(TrackingConfig, args, adapters=tracking.adapters)
    if args.check:  # models, critics and datasets too: a missing directory or file fails here, not at 2 a.m.
        for note in sweep_module.check_sources(spec):
            print(f"{args.file}: {note}")
        from rosa2.report import plural

        print(f"{args.file}: {plural(len(spec.cells()), 'cell')}, study {tracking.study!r}")
        return 0
    check_inputs(spec.cells(), args.file)  # every model and dataset of the grid, before any run starts
    with prepare_platform(tracking, args.verbose):
        outcome = sweep_module.sweep(spec, tracking, args.progress)
    print_outcome(outcome, tracking, args.json)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="sweep YAML (see flows/sweep.py for the fields)")
    parser.add_argument("--check", action="store_true", help="only validate the file, its local models, critics and dataset files (hub ids are listed as not checked) and count its cells")
    add_tracking_arguments(parser)
    parser.set_defaults(func=cmd)
