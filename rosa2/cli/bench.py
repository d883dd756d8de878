"""``rosa2 bench``: batched against one-at-a-time sessions, and each stream's cost, as JSON."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
Every engine and critic option of `rosa2 session` is here too (the same names), at bench's defaults;
the method is each arm's (rosa2, or baseline for the baseline arm) and B is --batch-size.
--model also takes 'tiny-random' (a random two-layer model with the embedded tokenizer, for tests).
The JSON records the bench's and the engine's configs under "config"."""


def cmd(args: argparse.Namespace) -> int:
    from rosa2.bench import bench_config, run_bench

    cfg = bench_config(args)  # bad values fail here, before any model loads
    report = run_bench(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=1))
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    from rosa2.bench import add_bench_arguments

    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_bench_arguments(parser)
    parser.set_defaults(func=cmd)
