"""``rosa2 chat``: a person is the user of Algorithm 1 (test-time co-adaptation, live).

The person asks a question; each answer is shown and the person accepts it (empty line or ``y``)
or rejects it (``n``, or any other text, which becomes the feedback x_{t+1}). After a rejection
the streams of the chosen method run — a status line on the terminal says which one and for how
long — then the refined message x*_{t+1} and ‖Δθ‖² are shown and the model answers again.

Commands are never sent to the model: ``/help``, ``/save DIR`` (the transcript as JSON and the
adapter θ), ``/new`` (a new problem: the adapter is reset), ``/quit``. What the person types while
the model works is set aside, not taken for the verdict on an answer they have not seen yet.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from rosa2.cli.session import add_engine_arguments, build_engine, engine_configs
from rosa2.environment import Environment, Scorer, Step
from rosa2.errors import Rosa2Error
from rosa2.report import plural
from rosa2.records import Problem, RewardResult, TurnRecord

ACCEPT = ("", "y", "yes")
REJECT_SILENTLY = ("n", "no")
TRANSCRIPT = "transcript.json"
HELP = """\
commands (never sent to the model):
  /help       this list
  /save DIR   write the conversation so far to DIR/transcript.json and the adapter θ to DIR/adapter/
  /new        start a new problem (the adapter is reset)
  /quit       leave (Ctrl-D too)
at "accept?": Enter or y accepts the answer, n rejects it, any other text rejects it and is your feedback"""


class NewProblem(Exception):
    """The person typed /new during a session."""


class Quit(Exception):
    """The person typed /quit (or closed the input)."""


class Status:
    """One status line on a terminal while the person waits ("refining your message… 12 s"),
    rewritten every second by a thread and erased when the work ends. Off a terminal it writes
    nothing (a log keeps only the results). Nested phases keep the outer line."""

    def __init__(self, stream: TextIO, interval: float = 1.0) -> None:
        self.stream = stream
        self.interval = interval
        self.active = False

    @contextmanager
    def show(self, label: str) -> Iterator[None]:
        if self.active or not self.stream.isatty():
            yield
            return
        self.active = True
        done = threading.Event()
        start = time.monotonic()

        def draw() -> None:
            while True:
                self.stream.write(f"\r\x1b[2K{label}… {time.monotonic() - start:.0f} s")
                self.stream.flush()
                if done.wait(self.interval):
                    break
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

        thread = threading.Thread(target=draw, name="chat-status", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.active = False

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def shown(*args: Any, **kwargs: Any) -> Any:
            with self.show(label):
                return fn(*args, **kwargs)

        return shown


def set_aside_typed_ahead(stream: TextIO) -> str:
    """Read and drop what was typed on the terminal since the last prompt (complete lines, and a
    line still being typed), so the answer shown next is never judged by words written before it
    appeared. Returns the complete lines, to tell the person. Nothing to do off a terminal: piped
    input is a script, read line by line."""
    if not stream.isatty():
        return ""
    import termios

    fd = stream.fileno()
    chunks = []
    while select.select([fd], [], [], 0)[0]:
        data = os.read(fd, 4096)
        if not data:
            break
        chunks.append(data)
    termios.tcflush(fd, termios.TCIFLUSH)
    return b"".join(chunks).decode(errors="replace").strip()


class Chat:
    """The person's side: prompts, commands, the transcript, saving."""

    def __init__(self, engine: Any, stream: TextIO, args: argparse.Namespace) -> None:
        self.engine = engine
        self.stream = stream
        self.args = args
        self.conversations: list[dict[str, Any]] = []

    def read(self, prompt: str, *, allow_empty: bool) -> str:
        """One line from the person; commands are handled here and never returned."""
        while True:
            print(prompt, end="", flush=True)
            line = self.stream.readline()
            if not line:
                print()
                raise Quit
            line = line.strip()
            command, _, rest = line.partition(" ")
            if command == "/quit":
                raise Quit
            if command == "/new":
                raise NewProblem
            if command == "/help":
                print(HELP)
            elif command == "/save":
                self.save(rest.strip())
            elif command.startswith("/") and command[1:].isalpha():
                print(f"unknown command {command}; /help lists the commands")
            elif line or allow_empty:
                return line
            else:
                print("an empty message cannot be answered; type a question (or /help)")

    def verdict(self, response: str, turn: int) -> str:
        print(f"\nmodel (turn {turn}): {response}\n")
        if typed := set_aside_typed_ahead(self.stream):
            print(f"(set aside what you typed while the model worked: {typed!r}; judge the answer above)")
        return self.read("accept? [Enter/y = yes · n = no · or type feedback] > ", allow_empty=True)

    def record(self, turn: TurnRecord) -> None:
        self.conversations[-1]["turns"].append(asdict(turn))
        show_update(turn)

    def save(self, directory: str) -> None:
        if not directory:
            print("usage: /save DIR (the transcript goes to DIR/transcript.json, the adapter to DIR/adapter/)")
            return
        path = Path(directory).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            adapter, note = self._save_adapter(path / "adapter")
            transcript = {
                "method": self.engine.session.method, "model": self.engine.policy.source, "merged_adapter": self.args.adapter,
                "adapter": adapter, "conversations": self.conversations,
            }
            (path / TRANSCRIPT).write_text(json.dumps(transcript, indent=1, ensure_ascii=False) + "\n")
        except OSError as exc:
            print(f"could not save to {path}: {exc}")
            return
        print(f"saved {path / TRANSCRIPT}" + (f" and the adapter {adapter}" if adapter else f"; {note}"))

    def _save_adapter(self, path: Path) -> tuple[str | None, str]:
        """(where θ was saved, or None and why not)."""
        if self.args.adapter is not None:
            return None, (f"no adapter saved: θ here is fitted on top of {self.args.adapter} merged into the model, "
                          "so it would not load onto the base model alone")
        if self.engine.lora(create=False) is None:
            return None, f"no adapter yet (method {self.engine.session.method} updates θ after a rejected answer)"
        try:
            return str(self.engine.save_adapter(path)), ""
        except Rosa2Error as exc:
            return None, f"no adapter saved: {exc}"


class HumanEnvironment(Environment):
    """The environment of Algorithm 1 with a person in it: their verdict is the reward ±1 and
    their words are x_{t+1} (no reference answer exists)."""

    name = "a person"

    def __init__(self, verdict: Callable[[str, int], str]) -> None:
        super().__init__("rich")
        self.verdict = verdict

    def scorer(self, problem: Problem) -> Scorer:
        return lambda response: RewardResult(reward=0.0)  # the verdict is read in step()

    def step(self, response: str, turn: int) -> Step:
        verdict = self.verdict(response, turn)
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


def show_progress(engine: Any, status: Status) -> None:
    """Status lines around what the person waits for: an answer, the refinement of their message
    (the semantic stream) and the update of θ (the parametric stream), in the engine's own order."""
    engine._generate = status.wrap("writing an answer", engine._generate)
    engine._refine = status.wrap("refining your message", engine._refine)
    engine._update = status.wrap("updating the adapter", engine._update)


def cmd(args: argparse.Namespace, stream: TextIO | None = None) -> int:
    configs = engine_configs(args)  # bad input fails before the model loads
    stream = stream or sys.stdin
    engine = build_engine(args, configs)
    show_progress(engine, Status(sys.stderr))
    session = configs["session"]
    chat = Chat(engine, stream, args)
    print(f"rosa2 chat · method {session.method} · up to {plural(session.max_turns, 'turn')} · /help lists the commands")
    environment = HumanEnvironment(chat.verdict)
    for number in itertools.count(1):
        try:
            question = chat.read("\nyou> ", allow_empty=False)
            chat.conversations.append({"question": question, "turns": []})
            engine.run(Problem(id=f"chat-{number}", prompt=question, domain="chat"), environment, on_turn=chat.record)
        except NewProblem:
            print("new problem: the adapter is reset.")
        except Quit:
            break
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_engine_arguments(parser, skip_session=("feedback",))
    parser.set_defaults(func=cmd)
