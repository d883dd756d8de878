"""``rosa2 chat``: a person is the user of Algorithm 1 (test-time co-adaptation, live).

The person asks a question; each answer is shown and the person accepts it (empty line or ``y``)
or rejects it (``n``, or any other text, which becomes the feedback x_{t+1}). After a rejection
the streams of the chosen method run: the refined message x*_{t+1} and ‖Δθ‖² are shown, and the
model answers again. ``/new`` starts a new problem (the adapter is reset), ``/quit`` exits.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Callable, TextIO

from rosa2.cli.session import add_engine_arguments, engine_configs
from rosa2.environment import Environment, Scorer, Step
from rosa2.records import Problem, RewardResult, TurnRecord

ACCEPT = ("", "y", "yes")
REJECT_SILENTLY = ("n", "no")


class NewProblem(Exception):
    """The person typed /new during a session."""


class Quit(Exception):
    """The person typed /quit (or closed the input)."""


def read_line(stream: TextIO, prompt: str) -> str:
    print(prompt, end="", flush=True)
    line = stream.readline()
    if not line:
        raise Quit
    line = line.strip()
    if line == "/quit":
        raise Quit
    if line == "/new":
        raise NewProblem
    return line


class HumanEnvironment(Environment):
    """The environment of Algorithm 1 with a person in it: their verdict is the reward ±1 and
    their words are x_{t+1} (no reference answer exists)."""

    name = "a person"

    def __init__(self, stream: TextIO, show: Callable[[str], None] = print) -> None:
        super().__init__("rich")
        self.stream = stream
        self.show = show

    def scorer(self, problem: Problem) -> Scorer:
        return lambda response: RewardResult(reward=0.0)  # the verdict is read in step()

    def step(self, response: str, turn: int) -> Step:
        self.show(f"\nmodel (turn {turn}): {response}\n")
        verdict = read_line(self.stream, "accept? [Enter/y = yes · n = no · or type feedback] > ")
        if verdict.lower() in ACCEPT:
            return Step(1.0, "", RewardResult(reward=1.0))
        feedback = "" if verdict.lower() in REJECT_SILENTLY else verdict
        return Step(-1.0, feedback, RewardResult(reward=-1.0, error_text=feedback))


def show_update(record: TurnRecord) -> None:
    if record.reward > 0:
        print(f"accepted at turn {record.turn}. Ask a new question (or /quit).")
        return
    if not (record.words_on or record.weights_on):
        print(f"turn limit reached ({record.turn}); ask a new question (or /quit).")
        return
    if record.words_on:
        fallback = " (critic gave no tags: raw message kept)" if record.semantic_fallback else ""
        print(f"refined message: {record.refined_feedback}  (‖Δx‖²={record.delta_x_sq:.4g}){fallback}")
    if record.weights_on:
        print(f"‖Δθ‖² = {record.delta_theta_sq:.4g}")


def cmd(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    configs = engine_configs(args)  # bad input fails before the model loads

    from rosa2.session import SessionEngine

    stream = stream or sys.stdin
    engine = SessionEngine(**configs)
    session = configs["session"]
    print(f"rosa2 chat · method {session.method} · up to {session.max_turns} turns · /new, /quit")
    environment = HumanEnvironment(stream)
    for number in itertools.count(1):
        try:
            question = read_line(stream, "\nyou> ")
            if question:
                engine.run(Problem(id=f"chat-{number}", prompt=question, domain="chat"), environment, on_turn=show_update)
        except NewProblem:
            print("new problem: the adapter is reset.")
        except Quit:
            break
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, skip_session=("feedback",))
    parser.set_defaults(func=cmd)
