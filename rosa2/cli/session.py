"""``rosa2 session``: one co-adaptation session (Algorithm 1) on one question, turn by turn."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from rosa2.cli import adapter_source
from rosa2.report import plural
from rosa2 import config
from rosa2.config import ConfigError, engine_configs


def add_engine_arguments(parser: argparse.ArgumentParser, skip_session: tuple[str, ...] = ()) -> None:
    """The engine's options for one session at a time (nothing to batch: no --parallel-sessions),
    with ``--adapter``; :func:`rosa2.config.engine_configs` builds the configs from them."""
    config.add_engine_arguments(parser, skip={"session": (*skip_session, "parallel_sessions")})
    adapter_source.add_argument(parser)


def build_engine(args: argparse.Namespace, configs: dict[str, Any]) -> Any:
    """The SessionEngine of ``configs``, on the model with ``--adapter`` merged in when one is given
    (its input checked, and the adapter found, before the model loads)."""
    from rosa2.session import SessionEngine, validate

    model = configs["model"]
    if args.adapter is not None:
        validate(model, configs["session"], configs["adapt"], configs["semantic"])
        model = adapter_source.load_model(model, args.adapter)
    return SessionEngine(**{**configs, "model": model})


def _short(text: str, width: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def print_turn(record: Any) -> None:
    verdict = "accepted" if record.reward > 0 else "rejected"
    print(f"--- turn {record.turn}: {verdict} (prediction {record.prediction!r}, {record.tokens} tokens)")
    print(f"user:      {_short(record.message)}")
    print(f"model:     {_short(record.response)}")
    if record.words_on:
        fallback = " (fallback: no tags in the critic's reply)" if record.semantic_fallback else ""
        print(f"refined:   {_short(record.refined_feedback)}  ‖Δx‖²={record.delta_x_sq:.4g}{fallback}")
    elif record.reward < 0 and record.feedback:
        print(f"feedback:  {_short(record.feedback)}")
    if record.weights_on:
        print(f"‖Δθ‖²:     {record.delta_theta_sq:.4g}")
    seconds = (record.seconds_generate, record.seconds_semantic, record.seconds_parametric, record.seconds_reward)
    print("seconds:   generate %.2f · semantic %.2f · parametric %.2f · reward %.2f" % seconds)


def cmd(args: argparse.Namespace) -> int:
    from rosa2.environment import environment_for
    from rosa2.records import Problem

    for option in ("question", "answer"):  # an empty x_1 or gold cannot be scored: refuse before any work
        if not getattr(args, option).strip():
            raise ConfigError(f"--{option} is empty; give the {'first user message' if option == 'question' else 'reference answer'}")
    configs = engine_configs(args)  # every ConfigError fires here, before any model loads
    if args.save_adapter and args.adapter is not None:
        raise ConfigError(
            f"--save-adapter with --adapter {args.adapter}: this session's θ is fitted on top of the merged adapter, "
            "so it would not load onto the base model alone; drop one of the two"
        )
    problem = Problem(id="cli", prompt=args.question, domain=args.domain, answer=args.answer)
    environment = environment_for(problem, configs["session"].feedback)
    print(f"scoring with {environment.name}", file=sys.stderr)

    engine = build_engine(args, configs)
    on_turn = (lambda r: print(json.dumps(asdict(r)), flush=True)) if args.json else print_turn
    result = engine.run(problem, environment, on_turn=on_turn)
    summary = {k: v for k, v in result.to_dict().items() if k != "turns"}
    summary["scoring"] = environment.name
    if args.save_adapter:
        summary["adapter"] = str(engine.save_adapter(args.save_adapter))
    if args.json:
        print(json.dumps({"summary": summary}))
    else:
        outcome = f"solved at turn {result.turn_solved}" if result.solved else f"not solved in {plural(result.turns_used, 'turn')}"
        print(f"=== {result.method}: {outcome}, {result.seconds:.1f} s, peak memory {result.peak_memory_bytes / 2**20:.0f} MiB")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question", required=True, help="the first user message x_1")
    parser.add_argument("--answer", required=True, help="the reference answer (never shown to the model)")
    parser.add_argument("--domain", choices=["math", "choice"], default="math", help="how the answer is scored")
    parser.add_argument("--json", action="store_true", help="one JSON object per turn, then {'summary': ...}")
    parser.add_argument("--save-adapter", metavar="DIR", help="save the session's adapter θ here (PEFT layout)")
    add_engine_arguments(parser)
    parser.set_defaults(func=cmd)
