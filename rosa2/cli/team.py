"""``rosa2 team up|down|status``: the team topology on one machine (docs/architecture.md).

PostgreSQL (Debian's, under the project home, loopback only), Prefect server and MLflow on it,
and the work pool; then one ``rosa2 worker start --gpu N`` per GPU. infra/README.md has the same
topology across hosts.
"""

from __future__ import annotations

import argparse
import os

from rosa2.config import TrackingConfig, add_arguments, from_args


def cmd(args: argparse.Namespace) -> int:
    from rosa2 import stack, team

    tracking = from_args(TrackingConfig, args)
    if args.action == "down":
        rows = stack.down(tracking)
        for row in rows:
            print(row.line())
        print(f"postgres {'stopped' if team.down() else 'not running'}")
        return 0
    if args.action == "status":
        db = team.current()
        print(f"postgres {'up' if db else 'down'}" + (f"    127.0.0.1:{db.port} (databases mlflow, prefect)" if db else ""))
        rows = stack.status(tracking)
        for row in rows:
            print(row.line())
        return 0 if db and all(r.healthy for r in rows) else 1
    db = team.up(port=args.pg_port)
    print(f"postgres up    127.0.0.1:{db.port} (databases mlflow, prefect; data {db.root})")
    rows = stack.up(tracking, stack.StackConfig(database_url="team", team=args.auth))
    for row in rows:
        print(row.line())
        if row.detail == "already running":
            print(f"  warning: {row.name} was already answering at {row.url}; it may not be the PostgreSQL-backed "
                  "one: `rosa2 stack down` first, or choose other URLs")
    os.environ["PREFECT_API_URL"] = tracking.prefect_api_url
    from rosa2.flows.scaleout import ensure_pool

    ensure_pool(args.pool)
    print(f"work pool {args.pool!r} ready. Start one worker per GPU, e.g.:\n"
          f"  rosa2 worker start --pool {args.pool} --gpu 0 --prefect-api-url {tracking.prefect_api_url} "
          f"--mlflow-uri {tracking.mlflow_uri}")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    from rosa2.team import DEFAULT_PORT

    parser.add_argument("action", choices=["up", "down", "status"], help="start, stop or show the team topology")
    parser.add_argument("--pg-port", type=int, default=DEFAULT_PORT, help=f"PostgreSQL port on 127.0.0.1 (default {DEFAULT_PORT})")
    parser.add_argument("--pool", default="rosa2-gpu", help="work pool to create (default: 'rosa2-gpu')")
    parser.add_argument("--auth", action="store_true",
                        help="MLflow basic auth and Prefect's API auth string (needed to listen beyond loopback)")
    add_arguments(parser, TrackingConfig, skip=("study", "adapters"))
    parser.set_defaults(func=cmd)
