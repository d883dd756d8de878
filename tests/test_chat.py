"""`rosa2 chat` as a person meets it (issue 14 item 7): driven through a pseudo-terminal, so the
status line, the commands and the typed-ahead input go through a real tty line discipline."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROSA2 = str(Path(sys.executable).parent / "rosa2")


class Terminal:
    """The master side of a pty whose slave is the chat's stdin, stdout and stderr."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.seen = ""  # everything the terminal showed
        self.mark = 0  # expect() searches from here

    def expect(self, pattern: str, timeout: float = 180) -> str:
        """Read until ``pattern`` (a regex) shows after the last match; return what showed meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.seen[self.mark:])
            if match:
                shown = self.seen[self.mark : self.mark + match.end()]
                self.mark += match.end()
                return shown
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"{pattern!r} never showed; the terminal showed:\n{self.seen[self.mark:][-3000:]}")
            if select.select([self.master], [], [], min(left, 1.0))[0]:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the child closed the pty
                    pass

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        os.close(self.master)


@pytest.fixture()
def terminal(tiny_dir):
    term = Terminal([ROSA2, "chat", "--model", str(tiny_dir), "--model-device", "cpu", "--max-turns", "3",
                     "--max-new-tokens", "8", "--semantic-max-new-tokens", "16"])
    yield term
    term.close()


def test_a_person_chats_through_a_terminal(terminal, tmp_path):
    term = terminal
    term.expect(r"rosa2 chat · method rosa2 .*/help")
    term.expect(r"you> ")

    term.type("/help\n")  # handled by the chat, never sent to the model
    shown = term.expect(r"you> ")
    assert "/save DIR" in shown and "/new" in shown and "/quit" in shown and "model (turn" not in shown

    term.type("\n")
    assert "an empty message cannot be answered" in term.expect(r"you> ")
    term.type("/bogus\n")
    assert "unknown command /bogus" in term.expect(r"you> ")

    term.type("What is 2 + 2?\n")
    term.expect(r"model \(turn 1\): ")
    term.expect(r"accept\? .*> ")
    # the verdict, then a line typed ahead while the streams run: it must not become turn 2's verdict
    term.type("wrong, think again\nstray words\n")
    shown = term.expect(r"model \(turn 2\): ")
    assert re.search(r"refining your message… \d+ s", shown), shown
    assert re.search(r"updating the adapter… \d+ s", shown), shown
    assert "refined message:" in shown and "‖Δθ‖² =" in shown
    shown = term.expect(r"accept\? .*> ")
    assert "set aside what you typed while the model worked: 'stray words'" in shown
    term.type("y\n")
    term.expect(r"accepted at turn 2")
    term.expect(r"you> ")

    target = tmp_path / "saved"
    term.type(f"/save {target}\n")
    assert f"saved {target / 'transcript.json'} and the adapter {target / 'adapter'}" in term.expect(r"you> ")
    transcript = json.loads((target / "transcript.json").read_text())
    assert transcript["method"] == "rosa2" and transcript["adapter"] == str(target / "adapter")
    [conversation] = transcript["conversations"]
    assert conversation["question"] == "What is 2 + 2?"
    assert [(t["turn"], t["reward"], t["feedback"]) for t in conversation["turns"]] == [(1, -1.0, "wrong, think again"), (2, 1.0, "")]
    assert "stray words" not in json.dumps(transcript)
    assert (target / "adapter" / "adapter_config.json").is_file() and (target / "adapter" / "rosa2.json").is_file()

    term.type("Name a colour.\n")
    term.expect(r"accept\? .*> ")
    term.type("/new\n")
    term.expect(r"new problem: the adapter is reset\.")
    term.expect(r"you> ")
    term.type("/quit\n")
    assert term.proc.wait(timeout=60) == 0


def test_chat_off_a_terminal_reads_a_script_without_status_lines(tiny_dir):
    """Piped input is a script: every line is read in turn (nothing set aside) and no status line
    is drawn into a log."""
    script = "What is 2 + 2?\nno\ny\n/quit\n"
    out = subprocess.run([ROSA2, "chat", "--model", str(tiny_dir), "--model-device", "cpu", "--max-turns", "3",
                          "--max-new-tokens", "8", "--semantic-max-new-tokens", "16"],
                         input=script, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "accepted at turn 2" in out.stdout and "set aside" not in out.stdout
    assert "…" not in out.stderr
