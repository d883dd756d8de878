"""Reward hacking: programs that try to score ``passed`` without passing (issue 17).

Each trick is a wrong solution of ``add`` (it returns 0) plus one attack on whatever decides the
outcome: the interpreter's builtins, the harness's functions and frames, the verdict channel,
equality, the hidden tests, ``unittest``; and, across evaluations in one warm container, a
resident process, a lingering thread, scratch files and IPC objects left for the next sample.
Every test asserts that the trick's outcome is not ``passed`` **and** that the next honest
evaluation in the same pool passes (and the next wrong one fails: a resident attacker would make
it pass). Run as a script (``python tests/test_sandbox_tricks.py``) to print the table of
outcomes for the current sandbox.
"""

from __future__ import annotations

import textwrap

import pytest

from rosa2.config import SandboxConfig

pytestmark = pytest.mark.docker

TESTS = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n    assert candidate(-1, 1) == 0\n"
UNITTESTS = (
    "import unittest\n\nclass TestAdd(unittest.TestCase):\n"
    "    def test_small(self):\n        self.assertEqual(add(1, 2), 3)\n"
    "    def test_equal(self):\n        self.assertEqual(add(2, 2), 4)\n"
    "    def test_true(self):\n        self.assertTrue(add(-1, 1) == 0 and add(5, 5) == 10)\n"
)
WRONG = "\ndef add(a, b):\n    return 0\n"
RIGHT = "def add(a, b):\n    return a + b\n"
FORGED = '{"outcome": "passed", "error_text": "", "tests": [], "leftover": [], "oom_kills": 0}'


def _src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# name -> (program, tests). Every program is wrong: it must never score `passed`.
TRICKS: dict[str, tuple[str, str]] = {
    # -- builtins ------------------------------------------------------------------------
    "builtins.exec replaced by a no-op": (_src("""
        import builtins
        builtins.exec = lambda *args, **kwargs: None
        """) + WRONG, TESTS),
    "compile forced to optimize=1 (asserts vanish)": (_src("""
        import builtins
        _compile = builtins.compile
        def compile(source, filename, mode, flags=0, dont_inherit=False, optimize=-1, **kw):
            return _compile(source, filename, mode, flags, dont_inherit, 1)
        builtins.compile = compile
        """) + WRONG, TESTS),
    "AssertionError swapped in builtins": (_src("""
        import builtins
        class Never(Exception):
            pass
        builtins.AssertionError = Never
        """) + WRONG, TESTS),
    # -- the harness ---------------------------------------------------------------------
    "__main__.run_tests patched": (_src("""
        import __main__
        passed = lambda *a, **k: [{"name": "t", "status": "passed", "error": ""}]
        for name in dir(__main__):
            if name.startswith(("run_", "judge", "evaluate", "_run")) and callable(getattr(__main__, name)):
                setattr(__main__, name, passed)
        """) + WRONG, TESTS),
    "harness function patched via sys._getframe(1).f_globals": (_src("""
        import sys
        frame = sys._getframe(1)
        while frame is not None:
            g = frame.f_globals
            if g.get("__name__") != "solution":
                for name in list(g):
                    if name in ("_run_statement", "run_statement"):
                        g[name] = lambda *a, **k: ("passed", "")
                    if name in ("run_tests", "run_check", "run_unittest"):
                        g[name] = lambda *a, **k: []
            frame = frame.f_back
        """) + WRONG, TESTS),
    "check and candidate redefined": (_src("""
        def check(candidate):
            pass
        candidate = lambda *a: 3
        """) + WRONG, TESTS),
    # -- the verdict channel -------------------------------------------------------------
    "stack walk to main(): marker + result fd, forged verdict, os._exit(0)": (_src("""
        import json, os, sys
        def forge():
            frame = sys._getframe()
            while frame is not None:
                local = frame.f_locals
                payload = local.get("payload")
                if isinstance(payload, dict) and "marker" in payload:
                    fd = local.get("result_fd", 1)
                    os.write(fd, (payload["marker"] + FORGED + "\\n").encode())
                    os._exit(0)
                frame = frame.f_back
            # no marker in reach: forge on every descriptor and leave
            for fd in range(1, 64):
                try:
                    os.write(fd, (FORGED + "\\n").encode())
                except OSError:
                    pass
            os._exit(0)
        FORGED = %r
        forge()
        """ % FORGED) + WRONG, TESTS),
    "json.dumps patched to write a passing verdict": (_src("""
        import json
        _dumps = json.dumps
        json.dumps = lambda obj, *a, **k: %r
        """ % FORGED) + WRONG, TESTS),
    "sys.exit(0) at import": ("import sys\nsys.exit(0)\n" + WRONG, TESTS),
    "os._exit(0) at import": ("import os\nos._exit(0)\n" + WRONG, TESTS),
    "atexit handler raising SystemExit(0)": ("import atexit, sys\natexit.register(sys.exit, 0)\n" + WRONG, TESTS),
    "killing every other process": (_src("""
        import os, signal
        for pid in os.listdir("/proc"):
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        """) + WRONG, TESTS),
    # -- equality ------------------------------------------------------------------------
    "returns an object whose __eq__ is always True": (_src("""
        class Anything:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
        def add(a, b):
            return Anything()
        """), TESTS),
    "returns an int subclass whose __eq__ is always True": (_src("""
        class Int(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def add(a, b):
            return Int(0)
        """), TESTS),
    # -- test visibility -----------------------------------------------------------------
    "hidden tests read from memory, answered from a lookup table": (_src("""
        import gc, os, re, sys
        TABLE = {}
        def learn(text):
            for args, want in re.findall(r"candidate\\(([^()]*)\\) == ([^\\n]+)", text):
                try:
                    TABLE[eval("(" + args + ",)")] = eval(want)
                except Exception:
                    pass
        for obj in gc.get_objects():
            if isinstance(obj, dict):
                for value in list(obj.values()):
                    if isinstance(value, str) and "def check(" in value:
                        learn(value)
        frame = sys._getframe()
        while frame is not None:
            for value in list(frame.f_locals.values()):
                if isinstance(value, str) and "def check(" in value:
                    learn(value)
                if isinstance(value, dict):
                    for v in value.values():
                        if isinstance(v, str) and "def check(" in v:
                            learn(v)
            frame = frame.f_back
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
                    for line in maps:
                        span, perms = line.split()[:2]
                        if "r" not in perms or "[v" in line:
                            continue
                        lo, hi = (int(x, 16) for x in span.split("-"))
                        if hi - lo > 64 * 2**20:
                            continue
                        try:
                            mem.seek(lo)
                            chunk = mem.read(hi - lo)
                        except OSError:
                            continue
                        for found in re.findall(rb"def check\\(candidate\\):[ -~\\n]{0,4000}", chunk):
                            learn(found.decode())
            except OSError:
                pass
        def add(a, b):
            return TABLE.get((a, b), 0)
        """), TESTS),
    # -- unittest ------------------------------------------------------------------------
    "unittest.TestCase.assert* neutralised": (_src("""
        import unittest
        for name in dir(unittest.TestCase):
            if name.startswith(("assert", "fail")):
                setattr(unittest.TestCase, name, lambda *a, **k: None)
        """) + WRONG, UNITTESTS),
    "unittest.TestResult.addFailure neutralised": (_src("""
        import unittest
        unittest.TestResult.addFailure = lambda *a, **k: None
        unittest.TestResult.addError = lambda *a, **k: None
        """) + WRONG, UNITTESTS),
    "unittest.SkipTest raised by the solution": (_src("""
        import unittest
        def add(a, b):
            raise unittest.SkipTest("not today")
        """), UNITTESTS),
    "unittest: builtins.AssertionError swapped": (_src("""
        import builtins
        class Never(Exception):
            pass
        builtins.AssertionError = Never
        """) + WRONG, UNITTESTS),
}



# Programs that attack the evaluations after them in the same container. Each is also wrong.
RESIDENT = _src("""
    import atexit, os, re, signal, sys, time
    FORGED = %r.encode()
    MARKER = re.compile(rb"\\x1e[0-9a-f]{32}:")
    def scan(pid):
        found = set()
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
            for line in maps:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                anonymous = len(fields) < 6 or fields[5] == "[heap]"
                if fields[1].startswith("rw") and anonymous and hi - lo < 256 * 2**20:
                    try:
                        mem.seek(lo)
                        found.update(MARKER.findall(mem.read(hi - lo)))
                    except OSError:
                        pass
        return found
    def attack():
        deadline, me, done = time.time() + 20, os.getpid(), set()
        while time.time() < deadline:
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) in (1, me) or pid in done:
                    continue
                try:
                    if b"python" not in open(f"/proc/{pid}/cmdline", "rb").read():
                        continue
                    os.kill(int(pid), signal.SIGSTOP)  # freeze it while its memory is read
                except OSError:
                    continue
                try:
                    found = scan(pid)
                except OSError:
                    found = set()
                for marker in found:
                    for fd in range(1, 16):
                        try:
                            with open(f"/proc/{pid}/fd/{fd}", "wb") as out:
                                out.write(marker + FORGED + b"\\n")
                        except OSError:
                            pass
                try:
                    os.kill(int(pid), signal.SIGKILL if found else signal.SIGCONT)
                except OSError:
                    pass
                if found:
                    done.add(pid)
            time.sleep(0.001)
    def daemon():
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                try:
                    attack()
                finally:
                    os._exit(0)
            os._exit(0)
    """ % FORGED)
RESIDENT_FROM_ATEXIT = RESIDENT + "atexit.register(daemon)\n" + WRONG
RESIDENT_AT_IMPORT = RESIDENT + "daemon()\n" + WRONG
LINGERING_THREAD = _src("""
    import threading, time
    def linger():
        while True:
            time.sleep(0.05)
    threading.Thread(target=linger).start()  # not a daemon: the interpreter waits for it
    """) + WRONG
LEAVES_SCRATCH_AND_IPC = _src("""
    import ctypes, os
    for top in ("/tmp/keep", "/dev/shm/keep"):
        os.makedirs(top + "/inner")
        with open(top + "/inner/secret", "w") as handle:
            handle.write("answers")
        os.chmod(top + "/inner", 0o500)
        os.chmod(top, 0o500)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    IPC_CREAT = 0o1000
    shm = libc.shmget(0x5EC2E7, 48 * 2**20, IPC_CREAT | 0o666)
    assert shm >= 0, ctypes.get_errno()
    at = libc.shmat(shm, None, 0)
    ctypes.memset(at, 1, 48 * 2**20)  # 48 MB charged to the container, kept after exit
    assert libc.semget(0x5EC2E8, 1, IPC_CREAT | 0o666) >= 0
    assert libc.msgget(0x5EC2E9, IPC_CREAT | 0o666) >= 0
    try:
        rt = ctypes.CDLL("librt.so.1", use_errno=True)
        rt.mq_open(b"/keep", os.O_CREAT | os.O_RDWR, 0o666, None)
    except OSError:
        pass
    """) + WRONG
# The next, honest sample: it passes only when nothing of the previous one is left.
FINDS_NOTHING = _src("""
    import os
    for folder in ("/tmp", "/dev/shm", "/dev/mqueue"):
        assert os.listdir(folder) == [], (folder, os.listdir(folder))
    for kind in ("shm", "sem", "msg"):
        with open("/proc/sysvipc/" + kind) as table:
            rows = table.read().splitlines()[1:]
        assert rows == [], (kind, rows)
    others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()
              and os.stat("/proc/" + p).st_uid == os.getuid()]
    assert others == [], others  # nothing else runs under this evaluation's uid
    chunk = bytearray(160 * 2**20)  # the memory the previous sample tried to keep is free again
    """) + RIGHT
# Tries ptrace and process_vm_readv on every process it did not start.
PTRACE_PROBE = _src("""
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    buf = ctypes.create_string_buffer(4096)
    REACHED = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        if pid == os.getpid():
            continue
        if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
            REACHED.append(("ptrace", pid))
            libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
        try:
            start = int(open(f"/proc/{pid}/maps").readline().split("-")[0], 16)
        except (OSError, ValueError):
            start = 0x400000
        local, remote = iovec(ctypes.addressof(buf), 4096), iovec(start, 4096)
        if libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) > 0:
            REACHED.append(("process_vm_readv", pid))
        try:
            open(f"/proc/{pid}/mem", "rb").close()
            REACHED.append(("/proc/mem", pid))
        except OSError:
            pass
    import socket
    for path in ("/dev/rosa2/zygote", "/dev/rosa2"):
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
            REACHED.append(("connect", path))
        except OSError:
            pass
    try:
        REACHED.append(("listdir", os.listdir("/dev/rosa2")))
    except OSError:
        pass
    def reached():
        return REACHED
    """)
# In-process suites: the program finds the runner's report descriptor and nonce in its own process
# and writes the report itself. Still possible (sandbox/README.md, "what stays open").
IN_PROCESS_FORGERY = _src("""
    import json, os, sys, unittest
    def add(a, b):
        frame = sys._getframe(1)
        while frame is not None:
            runner = frame.f_locals.get("self")
            message = frame.f_locals.get("message")
            if isinstance(message, dict) and "nonce" in message and hasattr(runner, "replies"):
                tests = [{"name": "forged", "case": "TestAdd", "method": m, "status": "passed", "error": ""}
                         for m in ("test_small", "test_equal", "test_true")]
                os.write(runner.replies, (json.dumps({"tests": tests, "nonce": message["nonce"]}) + "\\n").encode())
                os._exit(0)
            frame = frame.f_back
        return 0
    """)

# The problem's own helpers: the tests call them with the expected answer as the argument.
SHIFT_STUB = (
    "def encode_shift(s: str):\n    return ''.join(chr((ord(c) + 5 - 97) % 26 + 97) for c in s)\n\n\n"
    "def decode_shift(s: str):\n    \"\"\"Decode what encode_shift encoded.\"\"\"\n"
)
SHIFT_TESTS = (
    "def check(candidate):\n    import random\n    for _ in range(20):\n"
    "        plain = ''.join(random.choice('abcdefghij') for _ in range(12))\n"
    "        assert candidate(encode_shift(plain)) == plain\n"
)
SHIFT_RIGHT = "def decode_shift(s: str):\n    return ''.join(chr((ord(c) - 5 - 97) % 26 + 97) for c in s)\n"
RECORDING_HELPER = _src("""
    SEEN = []
    def encode_shift(s: str):
        SEEN.append(s)  # the tests pass the expected answer through the program's helper
        return s
    def decode_shift(s: str):
        return SEEN[-1] if SEEN else s
    """)
POLY_STUB = "import math\n\n\ndef poly(xs: list, x: float):\n    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n\n\ndef find_zero(xs: list):\n    \"\"\"A zero of poly(xs).\"\"\"\n"
POLY_TESTS = "def check(candidate):\n    for xs in ([1, 2], [-6, 11, -6, 1]):\n        assert abs(poly(xs, candidate(xs))) < 1e-4\n"
POLY_RIGHT = "def find_zero(xs):\n    lo, hi = -100.0, 100.0\n    for _ in range(200):\n        mid = (lo + hi) / 2\n        if poly(xs, lo) * poly(xs, mid) <= 0:\n            hi = mid\n        else:\n            lo = mid\n    return lo\n"
ZERO_POLY = "def poly(xs, x):\n    return 0.0\n\n\ndef find_zero(xs):\n    return 12345.0\n"
# name -> (stub, tests, entry point, hostile response, honest response), scored through CodeReward
HELPER_TRICKS = {
    "program's helper records the expected answer (HumanEval/50 style)": (SHIFT_STUB, SHIFT_TESTS, "decode_shift", RECORDING_HELPER, SHIFT_RIGHT),
    "program redefines the tests' helper poly() to return 0 (HumanEval/32 style)": (POLY_STUB, POLY_TESTS, "find_zero", ZERO_POLY, POLY_RIGHT),
}


def _helper_reward(pool, name: str, response_index: int):
    from rosa2.records import Problem
    from rosa2.rewards.code import CodeReward

    stub, tests, entry, hostile, honest = HELPER_TRICKS[name]
    problem = Problem(id="trick", prompt="-", domain="code", tests=tests, entry_point=entry, metadata={"stub": stub})
    return CodeReward(problem, pool=pool).score(f"```python\n{(hostile, honest)[response_index]}```")


def run_trick(pool, name: str):
    program, tests = TRICKS[name]
    return pool.run(program, tests, "add")


@pytest.fixture(scope="module")
def pool(sandbox_image):
    from rosa2.sandbox import Sandbox

    with Sandbox(SandboxConfig(image=sandbox_image, pool_size=1, timeout_s=10, memory_mb=256, retries=1)) as sandbox:
        sandbox.warm()
        yield sandbox


def _honest_next(pool, tests: str = TESTS) -> None:
    """After a trick, the same pool judges honestly: right passes, wrong fails."""
    pool.settle()
    right = pool.run(RIGHT, tests, "add")
    assert right.outcome == "passed", (right.outcome, right.error_text)
    wrong = pool.run(WRONG, tests, "add")
    assert wrong.outcome == "failed", (wrong.outcome, wrong.error_text)


@pytest.mark.parametrize("name", list(TRICKS))
def test_a_trick_never_scores_passed_and_the_next_evaluation_is_honest(pool, name):
    evaluation = run_trick(pool, name)
    assert evaluation.outcome != "passed", (name, evaluation)
    assert evaluation.outcome in ("failed", "error", "syntax_error"), (name, evaluation.outcome, evaluation.error_text)
    _honest_next(pool, TRICKS[name][1])


@pytest.mark.parametrize("name", list(HELPER_TRICKS))
def test_the_tests_helpers_are_the_problems_own_not_the_programs(pool, name):
    hostile = _helper_reward(pool, name, 0)
    assert hostile.outcome == "failed" and hostile.reward == -1.0, (hostile.outcome, hostile.error_text)
    honest = _helper_reward(pool, name, 1)
    assert honest.outcome == "passed" and honest.reward == 1.0, (honest.outcome, honest.error_text)


@pytest.mark.xfail(strict=True, reason="known open (README): an in-process unittest suite's report can be forged by the program")
def test_an_in_process_suite_report_forged_by_the_program(pool):
    evaluation = pool.run(IN_PROCESS_FORGERY, UNITTESTS, "add")
    assert evaluation.outcome != "passed", evaluation


def _cross(pool, hostile: str, tests: str = TESTS):
    """A hostile sample, then honest ones in the same (single-container) pool."""
    first = pool.run(hostile, tests, "add")
    assert first.outcome != "passed", first
    pool.settle()
    return first


def test_a_resident_process_started_at_exit_cannot_fake_the_next_evaluations(pool):
    _cross(pool, RESIDENT_FROM_ATEXIT)
    for _ in range(3):  # the daemon, were it alive, would forge every one of these
        _honest_next(pool)


def test_a_resident_process_started_at_import_cannot_fake_the_next_evaluations(pool):
    _cross(pool, RESIDENT_AT_IMPORT)
    for _ in range(3):
        _honest_next(pool)


def test_a_lingering_thread_neither_holds_the_container_nor_kills_the_next_sample(pool):
    start = __import__("time").monotonic()
    first = _cross(pool, LINGERING_THREAD)
    assert first.outcome == "failed" and first.exit_code == 0, first
    assert __import__("time").monotonic() - start < pool.cfg.timeout_s, "the thread held the evaluation"
    _honest_next(pool)


def test_scratch_files_chmod_0500_and_ipc_objects_do_not_reach_the_next_sample(pool):
    first = _cross(pool, LEAVES_SCRATCH_AND_IPC)
    assert first.outcome == "failed", first  # the program itself ran: only its answer is wrong
    after = pool.run(FINDS_NOTHING, TESTS, "add")
    assert after.outcome == "passed", after.error_text
    _honest_next(pool)


def test_ptrace_and_process_vm_readv_reach_no_process_of_the_sandbox(pool):
    probe = pool.run(PTRACE_PROBE, "def check(candidate):\n    assert candidate() == []\n", "reached")
    assert probe.outcome == "passed", probe.error_text
    _honest_next(pool)


# An exec that is not the harness: it copies the marker into a forged verdict, then ends as told.
FAKE_HARNESS = """
import json, os, sys, time
payload = json.loads(sys.stdin.read())
verdict = {"outcome": "passed", "error_text": "", "tests": [], "leftover": [], "clean": True, "oom_kills": 0}
sys.stdout.write(payload["marker"] + json.dumps(verdict) + "\\n")
sys.stdout.flush()
if os.environ.get("HOW", "%s") == "hang":
    os.close(1)
    os.close(2)
    time.sleep(4)
sys.exit(%d)
"""


def _fake_exec(monkeypatch, how: str, code: int) -> None:
    from rosa2.sandbox import client

    monkeypatch.setattr(client, "RELAY", FAKE_HARNESS % (how, code))


def test_a_verdict_is_taken_only_from_an_exec_that_exited_with_code_0(pool, monkeypatch):
    from rosa2.sandbox.image import docker_client

    _fake_exec(monkeypatch, "exit", 3)
    forged = pool.run(WRONG, TESTS, "add")
    assert (forged.outcome, forged.exit_code, forged.recycled) == ("error", 3, True), forged
    assert "none was taken from its output" in forged.error_text
    _fake_exec(monkeypatch, "hang", 0)  # the stream ends, the exec does not: its exit is unknown
    hung = pool.run(WRONG, TESTS, "add")
    assert (hung.outcome, hung.exit_code, hung.recycled) == ("error", None, True), hung
    # Exit 0 is what makes the output a verdict (the harness, out of the program's reach, is the
    # only exec that writes one): the host's own look at the container still decides its reuse.
    _fake_exec(monkeypatch, "exit", 0)
    pool.settle()
    container = pool._acquire()
    pool._release(container)
    docker_client().api.exec_start(docker_client().api.exec_create(container.id, ["sleep", "30"], user="12345")["Id"], detach=True)
    deadline = __import__("time").monotonic() + 5
    while pool._only_init_runs(container) and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
    assert not pool._only_init_runs(container)
    trusted = pool.run(WRONG, TESTS, "add")
    assert trusted.outcome == "passed" and trusted.recycled, trusted  # a stray process: never reused
    monkeypatch.undo()
    _honest_next(pool)


def main() -> None:  # pragma: no cover - the report's table
    from rosa2.sandbox import Sandbox

    with Sandbox(SandboxConfig(pool_size=1, timeout_s=10, retries=1)) as pool:
        for name in TRICKS:
            evaluation = run_trick(pool, name)
            after = pool.run(WRONG, TRICKS[name][1], "add").outcome
            print(f"| {name} | {evaluation.outcome} | next wrong: {after} |", flush=True)
        for name in HELPER_TRICKS:
            print(f"| {name} | {_helper_reward(pool, name, 0).outcome} | honest: {_helper_reward(pool, name, 1).outcome} |", flush=True)
        for name, hostile in (("resident daemon from atexit", RESIDENT_FROM_ATEXIT), ("resident daemon at import", RESIDENT_AT_IMPORT),
                              ("lingering non-daemon thread", LINGERING_THREAD), ("scratch 0500 + SysV/POSIX IPC", LEAVES_SCRATCH_AND_IPC)):
            first = pool.run(hostile, TESTS, "add")
            nexts = [pool.run(WRONG, TESTS, "add").outcome, pool.run(RIGHT, TESTS, "add").outcome, pool.run(FINDS_NOTHING, TESTS, "add").outcome]
            print(f"| {name} | {first.outcome} | next wrong/right/clean-probe: {nexts} |", flush=True)
        probe = pool.run(PTRACE_PROBE, "def check(candidate):\n    assert candidate() == []\n", "reached")
        forged = pool.run(IN_PROCESS_FORGERY, UNITTESTS, "add")
        print(f"| in-process unittest report forged via the runner's frame (nonce + descriptor) | {forged.outcome} | known open |", flush=True)
        print(f"| ptrace/process_vm_readv probe | {probe.outcome} | {probe.error_text[:300]!r} |", flush=True)


if __name__ == "__main__":  # pragma: no cover
    main()
