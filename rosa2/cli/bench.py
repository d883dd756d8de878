"""``rosa2 bench``: batched against one-at-a-time sessions, and each stream's cost, as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from rosa2.config import add_arguments, from_args


def cmd(args: argparse.Namespace) -> int:
    from rosa2.bench import BenchConfig, run_bench

    cfg = from_args(BenchConfig, args)  # bad values fail here, before any model loads
    report = run_bench(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=1))
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    from rosa2.bench import BenchConfig

    add_arguments(parser, BenchConfig)
    parser.set_defaults(func=cmd)
