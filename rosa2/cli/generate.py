"""``rosa2 generate``: one answer from a model, through its chat template."""

from __future__ import annotations

import argparse

from rosa2.cli import adapter_source
from rosa2.config import ConfigError, add_engine_arguments, engine_configs

SECTIONS = ("model", "generation")


def cmd(args: argparse.Namespace) -> int:
    from rosa2.policy import Policy

    if not args.prompt.strip():
        raise ConfigError("the prompt is empty; give the user message")
    configs = engine_configs(args, SECTIONS)
    policy = Policy(adapter_source.load_model(configs["model"], args.adapter), configs["generation"])
    reply = policy.generate([{"role": "user", "content": args.prompt}])
    print(reply.text)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="What is 7 * 6? Answer with the number.", help="the user message")
    add_engine_arguments(parser, SECTIONS)
    adapter_source.add_argument(parser)
    parser.set_defaults(func=cmd)
