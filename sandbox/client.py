"""A warm pool of hardened containers that runs model-written code (sandbox/README.md).

Every container: no network, read-only root with a small tmpfs on /tmp, every capability dropped
but SETUID and SETGID (the harness needs them to give the judge and the candidate their own
uids; no-new-privileges keeps any other process from gaining them), pids / memory (= memswap) /
CPU limits, and the label ``rosa2.sandbox`` so nothing is left behind. The container's init is
the harness's zygote (sandbox/harness.py); each evaluation is one ``docker exec`` (uid 0) of its
relay with ``--uids JUDGE CANDIDATE``, which has the zygote fork the evaluation: the candidate uid
is new for every evaluation in a container, so nothing one sample starts or leaves can reach the
next. The program and tests reach it on stdin (``put_archive`` is refused on a read-only root).
The wall-clock limit is enforced from outside: on the deadline the whole container is killed and
replaced. After every evaluation the host itself checks that only the container's init runs (the
container's cgroup, or ``docker top`` when the engine is not local); a container is replaced
after a timeout, an OOM kill, a process left running, a scratch or IPC residue, an exec that has
not exited, or any end without a verdict.

Outcomes: passed, failed, error, timeout, oom, syntax_error, and sandbox_error, which is the
infrastructure failing (retried ``retries`` times, never scored as a model failure).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import secrets
import select
import socket
import struct
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rosa2 import env
from rosa2.config import SandboxConfig
from rosa2.sandbox.harness import RELAY, ZYGOTE_READY
from rosa2.sandbox.image import LABEL, SandboxError, docker_client, image_exists

OUTCOMES = ("passed", "failed", "error", "timeout", "oom", "syntax_error", "sandbox_error")
HARNESS = (Path(__file__).resolve().parent / "harness.py").read_text()
OWNER_LABEL = LABEL + ".owner"
RESULT_LIMIT = 8 * 2**20  # bytes of the harness's result stream kept (it is one JSON line)
ERROR_TEXT_LIMIT = 4000  # characters of error text per test and overall
GRACE_S = 0.5  # after the result line, how long trailing output may still arrive
ACQUIRE_TIMEOUT_S = 120.0
# The container's only writable places, emptied before each evaluation so none sees another's files
SCRATCH = ["/tmp", "/dev/shm", "/dev/mqueue"]
JUDGE_UID = 2000  # runs the tests; never runs the program's code
CANDIDATE_UID_BASE = 10000  # the n-th evaluation in a container runs the program as uid BASE + n
UIDS_PER_CONTAINER = 50000  # then the container is replaced
STARTUP_TIMEOUT_S = 60.0  # a new container's zygote must listen within this
EXIT_WAIT_S = 1.0  # how long the exec may take to be reported finished after its stream ended


class SandboxInfraError(Exception):
    """The engine or a container failed, not the program: the evaluation is retried."""


@dataclass
class Evaluation:
    """What one run of a program (and its tests) in the sandbox gave."""

    outcome: str
    error_text: str = ""
    tests: list[dict[str, Any]] = field(default_factory=list)  # name, status, error (got, line)
    output: str = ""  # the program's stdout+stderr, capped at output_limit_bytes
    output_truncated: bool = False
    exit_code: int | None = None
    seconds: float = 0.0
    attempts: int = 1
    recycled: bool = False  # the container was replaced after this evaluation
    leftover_processes: int = 0  # processes the program left running (killed, and the container replaced)

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Exec:
    """The raw end of one ``docker exec``."""

    result: dict[str, Any] | None
    output: bytes
    output_bytes: int  # all the program wrote, including what the cap dropped
    exit_code: int | None
    timed_out: bool
    seconds: float


class Sandbox:
    """A thread-safe pool of warm sandbox containers. Use as a context manager or call ``close``.

    ``run(program, tests, entry_point)`` evaluates one program; any number of threads may call it
    at once (at most ``pool_size`` run in parallel, the others wait for a container).
    """

    def __init__(self, cfg: SandboxConfig | None = None, *, client: Any = None) -> None:
        self.cfg = cfg or SandboxConfig()
        self._client = client or docker_client(timeout=max(60.0, self.cfg.timeout_s + 30))
        if not image_exists(self._client, self.cfg.image):
            raise SandboxError(f"sandbox image {self.cfg.image!r} is missing; run `rosa2 sandbox build`")
        self._idle: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._live: dict[str, Any] = {}  # id -> container, every one this pool started and not removed
        self._closed = False
        self._removals: list[threading.Thread] = []  # background removals of recycled containers
        self._serial: dict[str, int] = {}  # container id -> evaluations run in it (its next candidate uid)
        self._cgroups: dict[str, tuple[int, Path] | None] = {}  # container id -> (init pid, cgroup.procs)
        # host:pid says whether the owner still lives (``leftover_containers``); the token tells
        # apart the pools of one process
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # A process killed before its atexit (SIGKILL, SIGTERM) leaves its containers: the next
        # pool on this host removes those whose owner is gone.
        for stale in leftover_containers(self._client):
            self._remove(stale)
        _open_pools.add(self)

    # -- containers -----------------------------------------------------------------------

    def _start_container(self) -> Any:
        cfg = self.cfg
        memory = f"{cfg.memory_mb}m"
        container = self._client.containers.run(
            cfg.image,
            command=["python3", "-I", "-c", HARNESS, "--zygote"],  # init: forks one session per evaluation
            detach=True,
            network_mode="none",
            user="0:0",  # init (sleep) and the harness; the harness gives the tests and the program their own uids
            read_only=True,
            tmpfs={"/tmp": f"size={cfg.tmpfs_mb}m,mode=1777,nosuid,nodev,noexec"},
            shm_size=f"{cfg.tmpfs_mb}m",  # /dev/shm stays (multiprocessing locks need it), as small as /tmp
            cap_drop=["ALL"],
            cap_add=["SETUID", "SETGID"],  # only uid 0's execs hold them; every uid the harness drops to has none
            security_opt=["no-new-privileges"],
            pids_limit=cfg.pids_limit,
            mem_limit=memory,
            memswap_limit=memory,  # equal: no swap, so a memory hog meets the OOM killer, not the disk
            nano_cpus=int(cfg.cpus * 1e9),
            working_dir="/tmp",
            labels={LABEL: "1", OWNER_LABEL: self._owner},
        )
        with self._lock:
            self._live[container.id] = container
            self._serial[container.id] = 0
        self._wait_ready(container)
        self._cgroups[container.id] = _cgroup_procs(container)
        return container

    def _wait_ready(self, container: Any) -> None:
        """Until the zygote listens, so an evaluation's time limit never pays for the container's
        start (a Python start-up and imports: ~0.1 s of CPU, seconds under a small CPU limit)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while ZYGOTE_READY not in container.logs(stdout=True, stderr=False):
            if time.monotonic() > deadline:
                self._remove(container)
                raise SandboxInfraError(f"the sandbox container's zygote was not ready in {STARTUP_TIMEOUT_S:.0f} s")
            container.reload()
            if container.status not in ("created", "running"):
                logs = container.logs(stdout=True, stderr=True)[-500:].decode("utf-8", "replace")
                self._remove(container)
                raise SandboxInfraError(f"the sandbox container stopped while starting: {logs}")
            time.sleep(0.01)

    def _acquire(self) -> Any:
        deadline = time.monotonic() + ACQUIRE_TIMEOUT_S
        while True:
            if self._closed:
                raise SandboxInfraError("the sandbox pool is closed")
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                pass
            with self._lock:
                may_start = len(self._live) < self.cfg.pool_size
                if may_start:
                    slot = "starting-" + secrets.token_hex(4)
                    self._live[slot] = None  # holds the slot while the container starts
            if may_start:
                try:
                    return self._start_container()
                except Exception as exc:  # noqa: BLE001 - engine trouble is infrastructure
                    self._sweep_untracked()
                    raise SandboxInfraError(f"could not start a sandbox container: {exc}") from exc
                finally:
                    with self._lock:
                        self._live.pop(slot, None)
            try:
                return self._idle.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise SandboxInfraError(f"no sandbox container became free in {ACQUIRE_TIMEOUT_S:.0f} s") from None

    def _sweep_untracked(self) -> None:
        """Remove containers of this pool that were created but never handed out (a failed start)."""
        try:
            found = self._client.containers.list(all=True, filters={"label": f"{OWNER_LABEL}={self._owner}"})
        except Exception:  # noqa: BLE001 - the engine is gone; `rosa2 sandbox clean` sweeps later
            return
        with self._lock:
            known = set(self._live)
        for container in found:
            if container.id not in known:
                self._remove(container)

    def _release(self, container: Any) -> None:
        if self._closed:
            self._remove(container)
        else:
            self._idle.put(container)

    def _remove(self, container: Any) -> None:
        with self._lock:
            self._live.pop(container.id, None)
            self._serial.pop(container.id, None)
            self._cgroups.pop(container.id, None)
        try:
            container.remove(force=True)  # SIGKILL to every process in it, then delete
        except Exception:  # noqa: BLE001 - already gone; close() and `rosa2 sandbox clean` sweep the rest
            pass

    def _recycle(self, container: Any) -> None:
        """Kill and remove in the background; the next ``_acquire`` starts a fresh one."""
        with self._lock:
            self._live.pop(container.id, None)  # frees the slot now, so a replacement can start
            self._serial.pop(container.id, None)
            self._cgroups.pop(container.id, None)
            self._removals = [t for t in self._removals if t.is_alive()]
            thread = threading.Thread(target=self._remove, args=(container,), daemon=True)
            self._removals.append(thread)
        thread.start()

    def settle(self, timeout_s: float = 60.0) -> None:
        """Wait until every recycled container is removed (tests and ``close`` use it)."""
        with self._lock:
            pending = list(self._removals)
        for thread in pending:
            thread.join(timeout_s)

    @property
    def owner(self) -> str:
        """The value of the ``rosa2.sandbox.owner`` label on this pool's containers."""
        return self._owner

    def containers(self) -> list[Any]:
        """The containers this pool holds now (idle or busy)."""
        with self._lock:
            return [c for c in self._live.values() if c is not None]

    # -- one evaluation -------------------------------------------------------------------

    def _exec(self, container: Any, payload: bytes, marker: bytes, timeout_s: float, candidate_uid: int) -> _Exec:
        api = self._client.api
        start = time.monotonic()
        # The relay hands its stdio to the container's zygote, which forks the evaluation's warden.
        command = ["python3", "-I", "-S", "-c", RELAY, "--uids", str(JUDGE_UID), str(candidate_uid)]
        exec_id = api.exec_create(container.id, command, stdin=True, user="0:0", workdir="/tmp")["Id"]
        raw = api.exec_start(exec_id, socket=True)
        sock = getattr(raw, "_sock", raw)
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # end of stdin: the harness starts
            result, output, output_bytes, timed_out = self._read(sock, marker, start + timeout_s)
        finally:
            # The hijacked connection is shared by docker-py's wrappers: shut it down for all of them.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if raw is not sock:
                raw.close()
            sock.close()
        exit_code = None
        if not timed_out:
            deadline = time.monotonic() + EXIT_WAIT_S
            while True:  # the stream can end a moment before the exec is marked finished
                info = api.exec_inspect(exec_id)
                if not info.get("Running"):
                    exit_code = info.get("ExitCode")
                    break
                if time.monotonic() > deadline:
                    break  # still running: no verdict, and the container is replaced
                time.sleep(0.005)
        parsed = None
        if result is not None:
            try:
                parsed = json.loads(result.decode("utf-8", "replace"))
            except ValueError:
                parsed = None
        return _Exec(parsed, output, output_bytes, exit_code, timed_out, time.monotonic() - start)

    def _read(self, sock: socket.socket, marker: bytes, deadline: float) -> tuple[bytes | None, bytes, int, bool]:
        """Demultiplex the exec stream until end of stream or the deadline.

        Stream 1 carries only the harness's result line; stream 2 the program's output, kept up
        to the cap and drained past it (a blocked writer would otherwise look like a timeout).
        """
        limit = self.cfg.output_limit_bytes
        result = bytearray()
        output = bytearray()
        total = 0
        buffer = bytearray()
        done_at: float | None = None  # set when the result line is complete
        while True:
            now = time.monotonic()
            until = deadline if done_at is None else min(deadline, done_at + GRACE_S)
            if now >= until:
                timed_out = done_at is None
                break
            ready, _, _ = select.select([sock], [], [], until - now)
            if not ready:
                continue
            chunk = sock.recv(1 << 16)
            if not chunk:
                timed_out = False
                break
            buffer += chunk
            while len(buffer) >= 8:
                stream, size = struct.unpack(">BxxxL", buffer[:8])
                if len(buffer) < 8 + size:
                    break
                data = bytes(buffer[8 : 8 + size])
                del buffer[: 8 + size]
                if stream == 1:
                    if len(result) < RESULT_LIMIT:
                        result += data[: RESULT_LIMIT - len(result)]
                    if done_at is None and _result_line(result, marker) is not None:
                        done_at = time.monotonic()
                else:
                    total += len(data)
                    if len(output) < limit:
                        output += data[: limit - len(output)]
        return _result_line(result, marker), bytes(output), total, timed_out

    def _oom_kills(self, container: Any) -> int | None:
        """The container cgroup's OOM-kill count, read from inside (cgroup v2, then v1)."""
        script = (
            "cat /sys/fs/cgroup/memory.events 2>/dev/null || cat /sys/fs/cgroup/memory/memory.oom_control"
        )
        try:
            code, out = container.exec_run(["sh", "-c", script], user="65534:65534")
        except Exception:  # noqa: BLE001 - the container died: no count
            return None
        for line in out.decode("utf-8", "replace").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return None

    def _attempt(
        self, program: str, tests: str | None, entry_point: str | None, timeout_s: float, trusted: str | None = None
    ) -> Evaluation:
        container = self._acquire()
        with self._lock:
            serial = self._serial.get(container.id, 0)
            self._serial[container.id] = serial + 1
        marker = ("\x1e" + secrets.token_hex(16) + ":").encode()
        payload = json.dumps(
            {
                "program": program, "tests": tests, "entry_point": entry_point,
                "marker": marker.decode(), "limit": ERROR_TEXT_LIMIT,
                "scratch": SCRATCH, "trusted": trusted,
            }
        ).encode()
        try:
            run = self._exec(container, payload, marker, timeout_s, CANDIDATE_UID_BASE + serial)
        except Exception as exc:  # noqa: BLE001 - the engine or the container failed under us
            self._recycle(container)
            raise SandboxInfraError(f"{type(exc).__name__}: {exc}") from exc
        evaluation = Evaluation(
            outcome="error",
            output=run.output.decode("utf-8", "replace"),
            output_truncated=run.output_bytes > len(run.output),
            exit_code=run.exit_code,
            seconds=round(run.seconds, 4),
        )
        # A verdict only from an exec that ended, with code 0, after writing a well-formed result.
        result = run.result if isinstance(run.result, dict) else {}
        finished = not run.timed_out and run.exit_code == 0
        try:
            if run.timed_out:
                evaluation.outcome = "timeout"
                evaluation.error_text = f"Timed out: the program ran longer than {timeout_s:g} s and was killed."
            elif finished and result.get("outcome") in OUTCOMES and not result.get("infra"):
                evaluation.outcome = result["outcome"]
                evaluation.error_text = str(result.get("error_text", ""))
                evaluation.tests = result.get("tests", []) if isinstance(result.get("tests"), list) else []
                evaluation.leftover_processes = len(result.get("leftover") or [])
            elif finished and result.get("infra"):
                raise SandboxInfraError(f"the harness reported: {str(result['infra'])[:500]}")
            else:
                evaluation.outcome, evaluation.error_text = self._no_verdict(container, run)
            # A child killed for memory while the harness lived on leaves the count raised: still an OOM.
            if finished and result.get("oom_kills"):
                evaluation.outcome = "oom"
                evaluation.error_text = _oom_text(self.cfg.memory_mb)
        except SandboxInfraError:
            self._recycle(container)
            raise
        reusable = (
            finished
            and evaluation.outcome != "oom"
            and result.get("clean") is True
            and not result.get("leftover")
            and serial + 1 < UIDS_PER_CONTAINER
            and self._only_init_runs(container)  # the host's own look, not the harness's word
        )
        if reusable:
            self._release(container)
        else:
            self._recycle(container)
            evaluation.recycled = True
        return evaluation

    def _only_init_runs(self, container: Any) -> bool:
        """Whether nothing but the container's init runs in it, as the host sees it: the pids in
        its cgroup when the engine is local, else ``docker top``."""
        found = self._cgroups.get(container.id)
        if found is not None:
            init, procs = found
            try:
                pids = procs.read_text().split()
            except OSError:
                pids = None
            if pids is not None:
                return pids == [str(init)]
        try:
            processes = container.top()["Processes"] or []
        except Exception:  # noqa: BLE001 - no answer: do not reuse it
            return False
        return len(processes) == 1

    def _no_verdict(self, container: Any, run: _Exec) -> tuple[str, str]:
        """The exec ended without a verdict (no result, an exit code other than 0, or not ended):
        killed for memory, the engine failed (retried), or else ``error``. Never the output's word."""
        try:
            container.reload()
            running = container.status == "running"
            oom_flag = bool(container.attrs.get("State", {}).get("OOMKilled"))
        except Exception as exc:  # noqa: BLE001
            raise SandboxInfraError(f"container vanished: {exc}") from exc
        kills = self._oom_kills(container) if running else None
        if oom_flag or (kills or 0) > 0:
            return "oom", _oom_text(self.cfg.memory_mb)
        if not running:
            raise SandboxInfraError(f"container stopped during the evaluation (exit code {run.exit_code})")
        if run.exit_code is None:
            return "error", "The evaluation did not end after its output did; no verdict was taken from it."
        how = f"was killed by signal {run.exit_code - 128}" if run.exit_code > 128 else f"exited with code {run.exit_code}"
        return "error", f"The sandbox's harness {how} before giving a verdict; none was taken from its output."

    def run(
        self,
        program: str,
        tests: str | None = None,
        entry_point: str | None = None,
        timeout_s: float | None = None,
        *,
        trusted: str | None = None,
    ) -> Evaluation:
        """Run ``program`` then ``tests`` (HumanEval ``check(candidate)``, unittest, or plain asserts).

        ``trusted``: source the judge runs itself (the problem's stub), so the helpers the tests
        call besides the entry point (HumanEval's ``encode_cyclic``, ``poly``) are the problem's own,
        never the program's: a program's helper would see the expected answer as its argument."""
        timeout = self.cfg.timeout_s if timeout_s is None else timeout_s
        errors = []
        for attempt in range(1, self.cfg.retries + 2):
            try:
                evaluation = self._attempt(program, tests, entry_point, timeout, trusted)
                evaluation.attempts = attempt
                return evaluation
            except SandboxInfraError as exc:
                errors.append(str(exc))
        return Evaluation(
            outcome="sandbox_error",
            error_text="sandbox failure after {} attempts: {}".format(len(errors), " | ".join(errors)),
            attempts=len(errors),
        )

    # -- lifetime -------------------------------------------------------------------------

    def warm(self) -> None:
        """Start every container of the pool now, so the first evaluations do not wait."""
        started = []
        try:
            while len(started) + self._idle.qsize() < self.cfg.pool_size:
                started.append(self._acquire())
        finally:
            for container in started:
                self._release(container)

    def close(self) -> None:
        """Remove every container this pool started. Idempotent; also runs at exit."""
        self._closed = True
        for container in self.containers():
            self._remove(container)
        self.settle()  # daemon threads die with the process: finish removals before exit
        while not self._idle.empty():
            self._idle.get_nowait()
        _open_pools.discard(self)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _result_line(stream: bytearray | bytes, marker: bytes) -> bytes | None:
    at = stream.rfind(marker)
    if at < 0:
        return None
    end = stream.find(b"\n", at)
    return None if end < 0 else bytes(stream[at + len(marker) : end])


def _cgroup_procs(container: Any) -> tuple[int, Path] | None:
    """(init's host pid, the container's cgroup.procs) when the engine runs on this host, else None."""
    try:
        container.reload()
        init = int(container.attrs["State"]["Pid"])
        lines = Path(f"/proc/{init}/cgroup").read_text().splitlines()
    except Exception:  # noqa: BLE001 - a remote engine, or no /proc: use docker top
        return None
    candidates = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if "pids" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/pids") / path.lstrip("/") / "cgroup.procs")
        elif hierarchy == "0":
            candidates += [Path("/sys/fs/cgroup") / path.lstrip("/") / "cgroup.procs", Path("/sys/fs/cgroup/unified") / path.lstrip("/") / "cgroup.procs"]
    for procs in candidates:
        try:
            if str(init) in procs.read_text().split():
                return init, procs
        except OSError:
            continue
    return None


def _oom_text(memory_mb: int) -> str:
    return f"Out of memory: the program used more than {memory_mb} MB and was killed."


_open_pools: "weakref.WeakSet[Sandbox]" = weakref.WeakSet()
_shared: dict[tuple, Sandbox] = {}
_shared_lock = threading.Lock()


def shared(cfg: SandboxConfig | None = None) -> Sandbox:
    """One pool per configuration per process, so rewards for many problems reuse warm containers."""
    cfg = cfg or SandboxConfig()
    key = tuple(sorted(asdict(cfg).items()))
    with _shared_lock:
        pool = _shared.get(key)
        if pool is None or pool._closed:
            pool = _shared[key] = Sandbox(cfg)
        return pool


@atexit.register
def _close_all() -> None:
    for pool in list(_open_pools):
        pool.close()


def leftover_containers(client: Any = None, all_owners: bool = False) -> list[Any]:
    """Sandbox containers on this engine; by default only those whose owning process is gone."""
    client = client or docker_client()
    found = client.containers.list(all=True, filters={"label": LABEL})
    if all_owners:
        return found
    host = socket.gethostname()
    stale = []
    for container in found:
        owner_host, pid = (container.labels.get(OWNER_LABEL, "").split(":") + ["", ""])[:2]
        # Another host's containers are never judged from here: their owner may be alive.
        if owner_host == host and (not pid.isdigit() or not env.pid_alive(int(pid))):
            stale.append(container)
    return stale


