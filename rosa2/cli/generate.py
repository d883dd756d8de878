"""``rosa2 generate``: one answer from a model, through its chat template."""

from __future__ import annotations

import argparse

from rosa2.cli import adapter_source
from rosa2.config import ConfigError, GenerationConfig, ModelConfig, add_arguments, from_args


def cmd(args: argparse.Namespace) -> int:
    from rosa2.policy import Policy

    if not args.prompt.strip():
        raise ConfigError("the prompt is empty; give the user message")
    model_cfg = from_args(ModelConfig, args, prefix="model_")
    gen_cfg = from_args(GenerationConfig, args)
    policy = Policy(adapter_source.load_model(model_cfg, args.adapter), gen_cfg)
    reply = policy.generate([{"role": "user", "content": args.prompt}])
    print(reply.text)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="What is 7 * 6? Answer with the number.", help="the user message")
    add_arguments(parser, ModelConfig, prefix="model_", aliases={"name": "--model"})
    adapter_source.add_argument(parser)
    add_arguments(parser, GenerationConfig)
    parser.set_defaults(func=cmd)
