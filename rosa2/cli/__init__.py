"""The ``rosa2`` command. Each subcommand lives in its own module, imported only when chosen,
so ``rosa2 --help`` stays fast and a command never pays for another's heavy imports."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings

from rosa2.errors import Rosa2Error

# name -> (module with register(parser), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("rosa2.cli.doctor", "Check everything a run needs and print the fix for what is missing"),
    "generate": ("rosa2.cli.generate", "Generate one answer from a model (the embedded SmolLM2 by default)"),
    "datasets": ("rosa2.cli.datasets", "List the known datasets, or print a dataset's problems as the model sees them"),
    "team": ("rosa2.cli.team", "Bring the team topology up on this machine: PostgreSQL, Prefect and MLflow on it, a work pool"),
    "worker": ("rosa2.cli.worker", "Start a Prefect worker of a work pool, pinned to one GPU"),
    "session": ("rosa2.cli.session", "Run one co-adaptation session (Algorithm 1) on a question, turn by turn"),
    "chat": ("rosa2.cli.chat", "Chat with a model that co-adapts to your feedback live (you accept or reject each answer)"),
    "stack": ("rosa2.cli.stack", "Start, stop or show the local Prefect and MLflow servers (loopback)"),
    "run": ("rosa2.cli.run", "Run experiment cells (one per method) through Prefect and MLflow; print the table"),
    "ablate": ("rosa2.cli.ablate", "Run the Switch ablation (six methods) on one model and dataset"),
    "sweep": ("rosa2.cli.sweep", "Run a YAML grid of models x datasets x methods x seeds (resumable)"),
    "deploy": ("rosa2.cli.deploy", "Register the nightly sweep deployment with a cron schedule on Prefect"),
    "report": ("rosa2.cli.report", "Print a study's tables (paper Tables 1, 2, 4); write plots; publish"),
    "adapters": ("rosa2.cli.adapters", "List, pull, show (per-layer norms) or promote session adapters"),
    "sandbox": ("rosa2.cli.sandbox", "Build the code sandbox image, run a program in it, check a HumanEval file"),
    "bench": ("rosa2.cli.bench", "Measure batched against one-at-a-time sessions and each stream's cost; print JSON"),
}


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rosa2",
        description="ROSA2 experiment platform: test-time co-adaptation of language models (Words & Weights).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).register(command)
            if not any(action.dest == "verbose" for action in command._actions):
                command.add_argument("--verbose", action="store_true", help="show the libraries' warnings and progress bars")
    return parser


def quiet_libraries() -> None:
    """What a user cannot act on stays off the terminal: transformers' and the hub's weight-loading
    bars, their info logs and their FutureWarnings. Set before they are imported; ``--verbose``
    keeps them. Our own progress bars and every error are untouched."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for module in ("transformers", "peft", "huggingface_hub", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if not getattr(args, "verbose", False):
        quiet_libraries()
    previous = _terminate_as_interrupt()
    try:
        return int(args.func(args) or 0)
    except Rosa2Error as exc:
        print(f"rosa2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rosa2 {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _terminate_as_interrupt() -> object | None:
    """SIGTERM (``kill``, a scheduler stopping the job) unwinds like Ctrl-C, so what a command holds
    is closed the same way (e.g. its MLflow run marked KILLED, not left RUNNING). Returns the
    handler to restore; None off the main thread, where signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


if __name__ == "__main__":
    sys.exit(main())
