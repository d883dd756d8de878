"""Worker processes for checks that need the main thread of their own process.

math-verify bounds its parsing and comparison with SIGALRM, which works only in the main thread of
the main interpreter: in a Prefect task thread (or any thread) it raises instead. So rewards run
their checks here, in long-lived worker processes whose main thread executes each job, and the
caller enforces an outer wall-clock limit: a worker that overruns it (a hang inside C code that no
alarm interrupts, or alarms switched off) is killed and replaced, and its job reports a timeout.

Workers are fresh interpreters (``python -c``, never ``fork``: the parent may hold torch threads
and locks; and not ``multiprocessing``'s spawn, which re-runs the caller's main script and so fails
in any script without a ``__main__`` guard). They start lazily, up to ``size``, from one long-lived
thread, and die with this process even when it is killed outright (Linux parent-death signal); any
thread may submit jobs, and a batch spreads over all idle workers. A job's wall clock starts when
its worker is ready, so a slow start-up on a loaded host is never scored as a timeout.
"""

from __future__ import annotations

import atexit
import importlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from rosa2.errors import Rosa2Error


STARTUP_TIMEOUT_S = 120.0  # a fresh interpreter importing sympy on a loaded 2-core host takes seconds


@dataclass(frozen=True)
class Job:
    """``module:function`` called with ``args`` in a worker (by name, so nothing unpicklable travels)."""

    target: str
    args: tuple[Any, ...]
    timeout_s: float  # outer wall-clock limit for this job


@dataclass(frozen=True)
class Outcome:
    ok: bool  # the function returned; ``value`` holds its result
    value: Any = None
    timed_out: bool = False  # killed by the outer wall-clock limit
    error: str = ""  # the exception text, or why the worker died


def _call(target: str, args: tuple[Any, ...]) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args)


def _die_with_parent(parent: int) -> None:
    """A parent killed outright cannot kill its workers, and a worker stuck in C code runs no
    Python thread that could notice: ask Linux to SIGKILL us when the parent goes (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:  # it went before we asked
        os._exit(1)


def _serve(fd: int, warmup: tuple[str, ...], parent: int) -> None:
    """A worker's main loop: the jobs run in this process's main thread, so SIGALRM works."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent, which kills us
    conn = Connection(fd)
    for target in warmup:
        _call(target, ())
    conn.send("ready")  # job deadlines start after this: start-up under load is no job's fault
    while True:
        try:
            target, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[bool, Any, str] = (True, _call(target, args), "")
        except BaseException as exc:  # noqa: BLE001 - a job's failure is data for the caller
            reply = (False, None, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, warmup: tuple[str, ...]) -> None:
        parent, child = socket.socketpair()
        code = f"from rosa2.rewards.pool import _serve; _serve({child.fileno()}, {tuple(warmup)!r}, {os.getpid()})"
        env = dict(os.environ)
        # the package may run from a checkout that is not installed: the worker must import it too
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child.fileno()], env=env, stdin=subprocess.DEVNULL)
        child.close()
        self.conn = Connection(parent.detach())

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        try:
            if self.conn.poll(timeout_s) and self.conn.recv() == "ready":
                return
            why = f"did not start within {timeout_s:g}s"
        except (EOFError, OSError):
            why = f"exited during start-up (exit code {self.process.poll()}; its error is on stderr)"
        self.kill()
        raise Rosa2Error(f"a worker process {why}: check that `{sys.executable} -c 'import rosa2'` works")

    def receive(self) -> Outcome:
        ok, value, error = self.conn.recv()
        return Outcome(ok, value, error=error)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # unkillable (D state): nothing more we can do
            pass
        self.conn.close()


class _Spawner:
    """Starts workers from one long-lived thread. Linux sends the parent-death signal when the
    *thread* that started a child ends, so a worker started from a short-lived task thread (Prefect
    runs tasks in threads) would otherwise be killed with it."""

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[tuple[str, ...], queue.Queue[Any]]] = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="rosa2-worker-spawner").start()

    def _loop(self) -> None:
        while True:
            warmup, reply = self._requests.get()
            try:
                reply.put(_Worker(warmup))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                reply.put(exc)

    def start(self, warmup: tuple[str, ...]) -> _Worker:
        reply: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._requests.put((warmup, reply))
        result = reply.get()
        if isinstance(result, BaseException):
            raise result
        return result


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _start_worker(warmup: tuple[str, ...]) -> _Worker:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
    return _spawner.start(warmup)


class WorkerPool:
    """Up to ``size`` worker processes shared by every caller in this process (thread-safe)."""

    def __init__(self, size: int | None = None, warmup: tuple[str, ...] = ()) -> None:
        self.size = size or max(1, min(4, os.cpu_count() or 1))
        if self.size < 1:
            raise Rosa2Error(f"worker pool size={size!r} must be >= 1")
        self.warmup = warmup
        self._idle: list[_Worker] = []
        self._count = 0  # workers alive: idle + checked out
        self._cond = threading.Condition()
        self.killed = 0  # workers killed for overrunning their wall-clock limit (for the logs)

    def _checkout(self, block: bool) -> _Worker | None:
        with self._cond:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._count < self.size:
                    self._count += 1
                    break
                if not block:
                    return None
                self._cond.wait()
        try:
            worker = _start_worker(self.warmup)
            worker.wait_ready()
            return worker
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _checkin(self, worker: _Worker | None) -> None:
        """Return a healthy worker, or drop a dead one (``None``) so the next checkout spawns anew."""
        with self._cond:
            if worker is None:
                self._count -= 1
            else:
                self._idle.append(worker)
            self._cond.notify()

    def run(self, jobs: list[Job]) -> list[Outcome]:
        """Run ``jobs`` on as many workers as are free, in parallel; outcomes in the jobs' order."""
        outcomes: list[Outcome | None] = [None] * len(jobs)
        pending = deque(enumerate(jobs))
        busy: dict[Connection, tuple[_Worker, int, float]] = {}  # conn -> (worker, job index, deadline)
        try:
            while pending or busy:
                while pending:
                    worker = self._checkout(block=not busy)
                    if worker is None:
                        break
                    index, job = pending.popleft()
                    try:
                        worker.conn.send((job.target, job.args))
                    except (BrokenPipeError, OSError) as exc:
                        worker.kill()
                        self._checkin(None)
                        outcomes[index] = Outcome(False, error=f"worker died before the job started: {exc}")
                        continue
                    busy[worker.conn] = (worker, index, time.monotonic() + job.timeout_s)
                if not busy:
                    continue
                now = time.monotonic()
                ready = wait(list(busy), timeout=max(0.0, min(d for _, _, d in busy.values()) - now))
                for conn in ready:
                    worker, index, _ = busy.pop(conn)  # type: ignore[index]
                    try:
                        outcomes[index] = worker.receive()
                        self._checkin(worker)
                    except (EOFError, OSError):
                        code = worker.process.poll()
                        worker.kill()
                        self._checkin(None)
                        outcomes[index] = Outcome(False, error=f"worker process died (exit code {code})")
                now = time.monotonic()
                for conn, (worker, index, deadline) in list(busy.items()):
                    if now >= deadline:
                        del busy[conn]
                        worker.kill()
                        self.killed += 1
                        self._checkin(None)
                        outcomes[index] = Outcome(False, timed_out=True, error="wall-clock limit exceeded; worker killed")
        finally:
            for worker, _, _ in busy.values():  # interrupted: nobody will read these replies
                worker.kill()
                self._checkin(None)
        return outcomes  # type: ignore[return-value]

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for worker in idle:
            worker.kill()


_shared: dict[tuple[str, ...], WorkerPool] = {}
_shared_lock = threading.Lock()


def shared_pool(warmup: tuple[str, ...] = ()) -> WorkerPool:
    """The process-wide pool for a given warm-up (one per kind of job, created on first use)."""
    with _shared_lock:
        pool = _shared.get(warmup)
        if pool is None:
            pool = _shared[warmup] = WorkerPool(warmup=warmup)
        return pool


@atexit.register
def _close_shared() -> None:
    for pool in _shared.values():
        pool.close()
