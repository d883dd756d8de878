"""``rosa2 stack up|down|status``: the local Prefect and MLflow servers on loopback."""

from __future__ import annotations

import argparse

from rosa2.config import TrackingConfig, add_arguments, from_args


def cmd(args: argparse.Namespace) -> int:
    from rosa2 import stack

    tracking = from_args(TrackingConfig, args)
    if args.action == "up":
        rows = stack.up(tracking, from_args(stack.StackConfig, args))
    elif args.action == "down":
        rows = stack.down(tracking)
    else:
        rows = stack.status(tracking)
    for row in rows:
        print(row.line())
    if args.action == "up":
        print(f"MLflow UI: {tracking.mlflow_uri}   Prefect UI: {tracking.prefect_api_url.removesuffix('/api')}")
    return 0 if args.action == "down" or all(r.healthy for r in rows) else 1


def register(parser: argparse.ArgumentParser) -> None:
    from rosa2.stack import StackConfig

    parser.add_argument("action", choices=["up", "down", "status"], help="start, stop or show the servers")
    add_arguments(parser, TrackingConfig, skip=("study", "adapters"))
    add_arguments(parser, StackConfig)
    parser.set_defaults(func=cmd)
