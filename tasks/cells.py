"""Experiment cells, their deterministic keys, and the local result store that makes runs resumable.

A cell is one method × model × dataset × seed with every other knob fixed. Its key is a hash of
every config field and the dataset fingerprint, so the same cell always gets the same key; a
problem's key is a hash of the cell's configs (without the dataset selection) and the problem
itself. Each finished problem is written under ``<home>/results`` the moment it finishes, before
anything is sent to MLflow: a crash, a kill or an unreachable tracking server loses nothing, and
a rerun skips every problem already there. (No Prefect or MLflow import here: plain data.)
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from rosa2 import env
from rosa2.config import (
    AdaptConfig, DataConfig, GenerationConfig, ModelConfig, RewardConfig, SandboxConfig, SemanticConfig, SessionConfig,
    TrackingConfig, flatten,
)
from rosa2.errors import Rosa2Error
from rosa2.models import display_name
from rosa2.records import Problem, ProblemResult, digest

KEY_VERSION = "1"  # bump when the meaning of a stored result changes


@dataclass
class Cell:
    """One experiment cell: every config the session engine needs, plus the dataset selection."""

    model: ModelConfig = field(default_factory=ModelConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    @property
    def method(self) -> str:
        return self.session.method

    @property
    def seed(self) -> int:
        return self.generation.seed

    def configs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def params(self, tracking: TrackingConfig | None = None) -> dict[str, Any]:
        """Every config field, flat (``adapt.beta``...): the MLflow params of the cell."""
        return flatten(**self.configs(), tracking=tracking)

    def run_configs(self) -> dict[str, Any]:
        """What decides a problem's outcome (everything but which problems are selected)."""
        return {k: v for k, v in self.configs().items() if k != "data"}

    def key(self, fingerprint: str) -> str:
        """Deterministic cell key: all fields + dataset fingerprint."""
        return digest({"v": KEY_VERSION, "params": flatten(**self.configs()), "data": fingerprint})

    def problem_key(self, problem: Problem) -> str:
        """Deterministic per-problem key: the configs that decide the outcome + the problem itself."""
        return digest({"v": KEY_VERSION, "params": flatten(**self.run_configs()), "problem": dataclasses.asdict(problem)}, 24)

    def name(self) -> str:
        return f"{self.method} · {display_name(self.model.name)} · {Path(self.data.dataset).name} · seed {self.seed}"

    def run_name(self) -> str:
        """The cell's flow-run name in the Prefect UI: method · model · dataset · seed."""
        return f"{self.method} · {display_name(self.model.name)} · {Path(self.data.dataset).name} · s{self.seed}"

    def replace(self, **sections: Any) -> "Cell":
        """A copy with some sections replaced, e.g. ``cell.replace(session=SessionConfig(method="rosa"))``."""
        return dataclasses.replace(self, **sections)

    def __post_init__(self) -> None:
        check_sandbox_floor(self.sandbox)


# What a sandbox container needs to start and run the harness at all (measured on Docker 28 with the
# rosa2-sandbox image: the harness is killed for memory at 8 MB and passes from 12 MB with one
# interpreter; issue 17's isolated verdict runs the candidate and the tests in two processes, so the
# floors leave room for that). Below them every evaluation would end in an infrastructure error,
# retried and then lost; the error comes before any work instead.
SANDBOX_FLOORS: dict[str, tuple[float, str]] = {
    "memory_mb": (32, "MB"),
    "pids_limit": (8, "processes"),
    "cpus": (0.1, "CPUs"),
    "timeout_s": (1.0, "s"),
}


def check_sandbox_floor(cfg: SandboxConfig, prefix: str = "sandbox.") -> None:
    """A ConfigError for a sandbox limit below what a container can start with."""
    from rosa2.config import ConfigError

    for name, (floor, unit) in SANDBOX_FLOORS.items():
        value = getattr(cfg, name)
        if value < floor:
            raise ConfigError(
                f"{prefix}{name}={value!r} is below what a sandbox container can start with "
                f"({floor:g} {unit} at least); raise it (--sandbox-{name.replace('_', '-')})"
            )


# ---------------------------------------------------------------------------------------------
# claims: one process at a time per cell (or parent) key on this project home


class CellBusy(Rosa2Error):
    """Another live process holds the claim on this key (and we were told not to wait)."""


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (it wrote no details yet)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    command = " ".join(holder.get("argv", []))[:200]
    return f"pid {holder.get('pid')} on {holder.get('host')} since {started} ({command})"


@contextmanager
def claim(
    key: str,
    what: str = "cell",
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
    home: Path | None = None,
    **details: Any,
) -> Iterator[dict[str, Any]]:
    """Hold the claim on ``key`` for the block: ``<home>/locks/<key>.lock``, an exclusive ``flock``.

    The kernel drops a flock when its process dies, ``kill -9`` included, so a claim can never be
    left behind, and holding one proves that no other process on this home runs the same key. The
    file names its holder (pid, host, command, ``details`` such as the Prefect flow run id): a
    second process waits (saying who holds it) or, with ``wait=False``, raises :class:`CellBusy`.

    Yields what the previous holder left in the file: ``{}`` when it finished (the file is emptied
    on release), else the record of a process that died holding the claim, so the caller can close
    what it left open (its flow run)."""
    root = (Path(home) if home is not None else env.home()) / "locks"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{key}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not _try_lock(fd):
            holder = _read_claim(fd)
            got = False
            for _ in range(20):  # a holder that took the lock a moment ago is writing who it is (or just left)
                if holder or (got := _try_lock(fd)):
                    break
                time.sleep(0.05)
                holder = _read_claim(fd)
            if not got:
                message = f"{what} {key} is being run by {_holder_text(holder)}"
                if not wait:
                    raise CellBusy(f"{message}; wait for it to finish, or stop that process")
                (on_wait or (lambda text: print(text, file=sys.stderr, flush=True)))(f"{message}: waiting for it to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)  # a signal (Ctrl-C, SIGTERM) still interrupts the wait
        previous = _read_claim(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv, "started": time.time(), "key": key, **details}
        _write_claim(fd, record)
        try:
            yield previous
        finally:
            os.ftruncate(fd, 0)  # finished: nothing for the next holder to clean up
    finally:
        os.close(fd)  # closing drops the flock


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def update_claim(key: str, home: Path | None = None, **details: Any) -> None:
    """Add details (e.g. a flow run id learnt later) to the claim this process holds on ``key``."""
    path = (Path(home) if home is not None else env.home()) / "locks" / f"{key}.lock"
    fd = os.open(path, os.O_RDWR)
    try:
        record = _read_claim(fd)
        if record.get("pid") == os.getpid():
            _write_claim(fd, {**record, **details})
    finally:
        os.close(fd)  # (no flock on this descriptor: closing it leaves our claim in place)


def _read_claim(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 1 << 16, 0).decode(errors="replace")
        value = json.loads(text) if text.strip() else {}
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_claim(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record, default=str).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ResultStore:
    """Per-problem results on local disk, keyed by :meth:`Cell.problem_key` (written atomically)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else env.home() / "results"

    def path(self, key: str) -> Path:
        return self.root / "problems" / key[:2] / f"{key}.json"

    def adapter_dir(self, key: str) -> Path:
        return self.root / "adapters" / key

    def get(self, key: str) -> ProblemResult | None:
        try:
            return ProblemResult.from_dict(json.loads(self.path(key).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            # a torn or foreign file: run that problem again rather than trust it
            return None

    def put(self, key: str, result: ProblemResult) -> None:
        _atomic_write(self.path(key), json.dumps(result.to_dict()))

    def cell_state(self, study: str, cell_key: str) -> dict[str, Any]:
        try:
            return json.loads((self.root / "cells" / study / f"{cell_key}.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def set_cell_state(self, study: str, cell_key: str, **state: Any) -> None:
        merged = {**self.cell_state(study, cell_key), **state}
        _atomic_write(self.root / "cells" / study / f"{cell_key}.json", json.dumps(merged))


def results_jsonl(results: list[ProblemResult]) -> str:
    """Per-problem results with their transcripts, one JSON object a line."""
    return "".join(json.dumps(r.to_dict()) + "\n" for r in results)


def read_results_jsonl(text: str) -> list[ProblemResult]:
    return [ProblemResult.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]
