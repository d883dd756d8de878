"""``rosa2 deploy --cron "0 2 * * *" SWEEP.yaml``: register the nightly deployment (with its
schedule) on the Prefect server; ``--serve`` then runs the scheduled runs in this process."""

from __future__ import annotations

import argparse

from rosa2.config import TrackingConfig, add_arguments, from_args


def cmd(args: argparse.Namespace) -> int:
    from rosa2.flows import nightly

    tracking = from_args(TrackingConfig, args)
    deployment_id = nightly.register(args.file, args.cron, tracking, args.name, args.timezone, args.work_pool)
    print(f"deployment 'nightly/{args.name}' ({deployment_id}) runs {args.file} on cron '{args.cron}' ({args.timezone})")
    print(f"Prefect: {tracking.prefect_api_url.removesuffix('/api')}/deployments/deployment/{deployment_id}")
    if args.serve:
        from prefect import serve
        from prefect.settings import PREFECT_API_URL, temporary_settings

        print("serving: scheduled runs execute in this process (Ctrl-C stops)")
        with temporary_settings({PREFECT_API_URL: tracking.prefect_api_url}):
            serve(nightly.deployment(args.file, args.cron, args.name, args.timezone))
    elif not args.work_pool:
        print("runs need an executor: `rosa2 deploy ... --serve`, or --work-pool NAME with `prefect worker start --pool NAME`")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="sweep YAML the nightly run executes")
    parser.add_argument("--cron", required=True, help='cron schedule, e.g. "0 2 * * *" (02:00 every night)')
    parser.add_argument("--timezone", default="UTC", help="timezone of the schedule (default: UTC)")
    parser.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    parser.add_argument("--work-pool", default=None, help="Prefect work pool whose workers run it (default: none, use --serve)")
    parser.add_argument("--serve", action="store_true", help="after registering, run scheduled runs in this process")
    add_arguments(parser, TrackingConfig, skip=("study", "adapters"))
    parser.set_defaults(func=cmd)
