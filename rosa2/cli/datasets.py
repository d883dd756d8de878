"""``rosa2 datasets``: the known datasets, or (``--show NAME``) the problems exactly as the model sees them."""

from __future__ import annotations

import argparse
import dataclasses
import json

from rosa2.config import DataConfig, add_arguments, from_args


def cmd(args: argparse.Namespace) -> int:
    from rosa2 import data
    from rosa2.data.layouts import LAYOUTS

    if not args.show:
        width = max(len(n) for n in data.KNOWN)
        for spec in data.KNOWN.values():
            print(f"{spec.name:<{width}}  {spec.domain:<6}  {spec.source:<52}  {spec.description}")
        print("\nAlso: --show NAME:PATH (a local .jsonl/.jsonl.gz/.parquet file read with the layout of a known "
              "dataset or a layout below), --show PATH (layout recognised by its fields), or any hub id owner/name.\n")
        for layout in LAYOUTS.values():
            print(f"layout {layout.name:<14} {layout.domain:<6}  fields: {layout.fields}")
        return 0
    cfg = from_args(DataConfig, args, dataset=args.show, limit=args.limit or 3)
    problems = data.load_problems(cfg)
    if args.json:
        for problem in problems:
            print(json.dumps(dataclasses.asdict(problem), ensure_ascii=False, default=str))
        return 0
    for problem in problems:
        gold = problem.answer if problem.answer is not None else f"tests for {problem.entry_point}()"
        print(f"=== {problem.id}  [{problem.domain}]  gold: {gold}\n{problem.prompt}\n")
    print(f"{len(problems)} problem(s), fingerprint {data.fingerprint(problems)}")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--show", metavar="DATASET", help="print problems of this dataset (a name, NAME:PATH, a file or a hub id)")
    parser.add_argument("--json", action="store_true", help="with --show: one Problem record per line as JSON")
    add_arguments(parser, DataConfig, skip=("dataset",))
    parser.set_defaults(func=cmd)
