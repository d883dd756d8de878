"""What runs inside a sandbox container: its init (the zygote) and, per evaluation, a warden, a
reaper, a judge and the candidate.

Standard library only (it runs on the image's python3, not the project's venv). The container's
command is ``python3 -I -c <this file> --zygote`` under uid 0, in a container whose only
capabilities are SETUID and SETGID (sandbox/client.py). The zygote never reads a payload; for each
evaluation the host runs ``RELAY`` with ``docker exec`` (uid 0), which hands its stdio to the
zygote over a root-only socket; the zygote forks a session that runs ``serve((JUDGE, CANDIDATE))``.
The session's stdin carries one JSON payload ``{"program", "tests", "entry_point", "marker",
"limit", "scratch", "trusted"}``; its result is one line ``<marker><json>`` on stdout. The kinds of
process, none able to reach the one above it:

- the **warden** (the session, uid 0): forks the reaper and the candidate *before* it reads the
  payload, so neither ever holds the tests or the marker; then forks the judge, waits for its
  verdict, has the reaper (uid 0 until it drops to the candidate's uid) kill every process of
  the candidate's uid and remove its files and IPC objects, checks that nothing is left, and
  writes the result line. Only it holds the result descriptor.
- the **judge** (uid JUDGE): runs the tests. HumanEval's ``check(candidate)`` and plain asserts run
  here, where the candidate's code never runs: ``candidate(*args)`` (and every other name the
  tests take from the program) is a proxy that sends the arguments to the candidate process and
  gets back *plain data* (None, bool, int, float, complex, str, bytes and lists, tuples, dicts,
  sets, frozensets of them, rebuilt here as the builtin types); anything else is an error. So no
  object the candidate made, and none of its code, takes part in a comparison.
- the **candidate** (uid CANDIDATE, a fresh uid per evaluation, no capability): runs the program
  and answers calls. It sees the arguments of each call and nothing else of the tests.

``unittest.TestCase`` suites (BigCodeBench) mock what the program imports, so they must run in
the candidate's process: there the verdict is the candidate's own report, made harder to fake
(the judge checks a nonce and that every test of the source is reported) and guarded (the
builtins, ``unittest`` and this runner are compared with a snapshot taken before the program
ran, after the program and after every test), but not out of its reach; see sandbox/README.md.

Run as ``python3 -I -c <this file>`` without ``--uids`` (``sandbox/bench.py``, the unit tests:
trusted code on the host), the warden, judge and candidate run under the caller's uid with no
isolation, and the payload's ``scratch`` folders are emptied before the run.
"""

import ast
import builtins
import json
import linecache
import os
import shutil
import signal
import sys
import time
import traceback

SOLUTION = "solution.py"
TESTS = "tests.py"
SNIPPET = 300  # characters of a test's source kept in the report
OOM_FILES = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")
REPLY_LIMIT = 16 * 2**20  # bytes of one message from the candidate
EXIT_GRACE_S = 0.2  # how long the candidate may take to exit once the judge is done
REAP_S = 3.0  # how long the reaper keeps killing the candidate's processes
SYSVIPC = ("shm", "sem", "msg")
PLAIN = "None, bool, int, float, complex, str, bytes, and lists, tuples, dicts, sets, frozensets of them"
_BIG = 2**63


# ---------------------------------------------------------------------------------------------
# plain data: the only thing that crosses from the candidate to the judge


class NotPlain(Exception):
    """A value that is not plain data."""


def encode(value):
    """``value`` as JSON-ready data with its exact type tagged. Subclasses are not plain: an
    ``int`` subclass could redefine ``__eq__``."""
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is float:
        return value
    if kind is int:
        return value if -_BIG < value < _BIG else ["i", hex(value)]  # hex: no digit limit
    if kind is list:
        return ["l", [encode(v) for v in value]]
    if kind is tuple:
        return ["t", [encode(v) for v in value]]
    if kind is dict:
        return ["d", [[encode(k), encode(v)] for k, v in value.items()]]
    if kind is set:
        return ["s", [encode(v) for v in value]]
    if kind is frozenset:
        return ["f", [encode(v) for v in value]]
    if kind is bytes:
        return ["b", value.hex()]
    if kind is complex:
        return ["c", value.real, value.imag]
    raise NotPlain(kind)


_SCALARS = (type(None), bool, int, float, str)
_SEQUENCES = {"l": list, "t": tuple, "s": set, "f": frozenset}


def decode(data):
    """The builtin value ``encode`` gave ``data`` for; ValueError/TypeError for anything else."""
    if type(data) in _SCALARS:
        return data
    if type(data) is not list or not data or type(data[0]) is not str:
        raise ValueError("not a tagged value")
    tag = data[0]
    if tag in _SEQUENCES and len(data) == 2 and type(data[1]) is list:
        return _SEQUENCES[tag](decode(v) for v in data[1])
    if tag == "d" and len(data) == 2 and type(data[1]) is list:
        out = {}
        for pair in data[1]:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("bad dict item")
            out[decode(pair[0])] = decode(pair[1])
        return out
    if tag == "i" and len(data) == 2 and type(data[1]) is str:
        return int(data[1], 16)
    if tag == "b" and len(data) == 2 and type(data[1]) is str:
        return bytes.fromhex(data[1])
    if tag == "c" and len(data) == 3 and all(type(x) in (int, float) for x in data[1:]):
        return complex(data[1], data[2])
    raise ValueError(f"unknown tag {tag[:20]!r}")


# ---------------------------------------------------------------------------------------------
# text for the feedback


def _register(filename, source):
    # Tracebacks then show the model's source lines, which is what `rich` feedback is for.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def _clip(text, limit):
    return text if len(text) <= limit else text[: limit // 2] + "\n...\n" + text[-limit // 2 :]


def _frames(exc, names):
    te = traceback.TracebackException.from_exception(exc)
    return "".join(traceback.StackSummary.from_list([f for f in te.stack if f.filename in names]).format())


def _error_text(exc, limit):
    """The exception with only the model's and the tests' frames (never this harness's); for an
    exception the candidate raised in a call, its frames in the program follow the tests'."""
    remote = getattr(exc, "_sandbox_frames", "")
    body = _frames(exc, (SOLUTION, TESTS)) + remote
    head = "Traceback (most recent call last):\n" if body else ""
    tail = "".join(traceback.TracebackException.from_exception(exc).format_exception_only())
    return _clip(head + body + tail, limit)


def _safe(call, fallback):
    try:
        text = call()
        return text if type(text) is str else fallback
    except BaseException:  # noqa: BLE001 - the candidate's __str__/__repr__ may do anything
        return fallback


def _snippet(source, node):
    text = ast.get_source_segment(source, node) or ""
    return text if len(text) <= SNIPPET else text[:SNIPPET] + "..."


# ---------------------------------------------------------------------------------------------
# the candidate's side: runs the program, answers calls (and runs in-process unittest suites)


def _raised(exc, limit):
    """What the judge needs to raise the same kind of exception and show where it came from."""
    kind = type(exc)
    base = next((k.__name__ for k in kind.__mro__ if getattr(builtins, k.__name__, None) is k), "BaseException")
    return {
        "type": _safe(lambda: kind.__qualname__, "Exception"),
        "module": _safe(lambda: kind.__module__, "builtins"),
        "base": base,
        "message": _safe(lambda: str(exc), "<unprintable>")[:limit],
        "frames": _clip(_frames(exc, (SOLUTION,)), limit),
        "text": _error_text(exc, limit),
    }


def _describe(value, limit=SNIPPET):
    kind = _safe(lambda: type(value).__module__ + "." + type(value).__qualname__, "?")
    return {"type": kind.removeprefix("builtins."), "repr": _safe(lambda: repr(value), "?")[:limit]}


class Candidate:
    """The candidate process's loop: one JSON request per line in, one reply per line out."""

    def __init__(self, requests, replies):
        self.requests = os.fdopen(requests, "rb", buffering=1 << 16)
        self.replies = replies
        self.namespace = {}
        self.snapshot = None
        self.limit = 4000

    def serve(self):
        while True:
            line = self.requests.readline()
            if not line:
                return
            message = json.loads(line)
            handler = getattr(self, "op_" + message["op"])
            self.send(handler(message))

    def send(self, reply):
        try:
            data = (json.dumps(reply) + "\n").encode()
        except (TypeError, ValueError) as exc:  # noqa: BLE001 - never expected: every reply is built here
            data = (json.dumps({"broken": _safe(lambda: str(exc), "?")}) + "\n").encode()
        sys.stdout.flush()
        sys.stderr.flush()
        view = memoryview(data)
        while view:
            view = view[os.write(self.replies, view) :]

    def op_load(self, message):
        self.limit = int(message.get("limit", 4000))
        if message.get("cwd"):
            os.chdir(message["cwd"])
        if message.get("guard"):
            self.snapshot = snapshot()
        source = message["program"]
        _register(SOLUTION, source)
        try:
            code = compile(source, SOLUTION, "exec")
        except (SyntaxError, ValueError) as exc:  # ValueError: null bytes in the source
            return {"syntax_error": _error_text(exc, self.limit)}
        self.namespace = {"__name__": "solution", "__file__": SOLUTION}
        try:
            exec(code, self.namespace)  # noqa: S102 - this is the sandbox
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: the program ended while being defined
            return {"error": _raised(exc, self.limit)}
        names = {}
        for name in message.get("names", []):
            if name not in self.namespace:
                continue
            value = self.namespace[name]
            if callable(value):
                names[name] = ["function"]
                continue
            try:
                names[name] = ["value", encode(value)]
            except (NotPlain, RecursionError):
                names[name] = ["other", _describe(value)]
        return {"ok": True, "names": names}

    def op_call(self, message):
        function = self.namespace.get(message["name"])
        try:
            args, kwargs = decode(message["args"]), decode(message["kwargs"])
        except (ValueError, TypeError) as exc:
            return {"broken": f"bad arguments: {exc}"}
        try:
            value = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the judge raises it again on its side
            return {"raised": _raised(exc, self.limit)}
        try:
            return {"value": encode(value)}
        except (NotPlain, RecursionError):
            return {"invalid": _describe(value)}

    def op_unittest(self, message):
        """An in-process suite: the tests run here, next to the program (they mock what it uses)."""
        altered = compare(self.snapshot)
        if altered:
            return {"altered": altered, "when": "before the tests ran", "nonce": message["nonce"]}
        tests = message["tests"]
        _register(TESTS, tests)
        try:
            code = compile(tests, TESTS, "exec")
        except SyntaxError as exc:
            return {"tests": [{"name": "tests", "status": "error", "error": "the tests do not compile: " + _error_text(exc, self.limit)}], "nonce": message["nonce"]}
        env = dict(self.namespace)
        status, error = _run_statement(code, env, self.limit)
        if status != "passed":
            return {"tests": [{"name": "tests", "status": status, "error": error}], "nonce": message["nonce"]}
        import unittest

        cases = [v for k, v in env.items() if isinstance(v, type) and issubclass(v, unittest.TestCase) and k not in self.namespace]
        results = []
        loader = unittest.TestLoader()
        for case in cases:
            for test in loader.loadTestsFromTestCase(case):
                results.append(_run_one_unittest(test, self.limit))
                altered = compare(self.snapshot)
                if altered:
                    return {"altered": altered, "when": "during " + test.id(), "nonce": message["nonce"]}
        return {"tests": results, "nonce": message["nonce"]}


def _run_one_unittest(test, limit):
    import unittest

    outcome = unittest.TestResult()
    method = getattr(test, test._testMethodName, None)
    declared_skip = getattr(type(test), "__unittest_skip__", False) or getattr(method, "__unittest_skip__", False)
    test.run(outcome)
    status, error = "passed", ""
    for kind, found in (("failed", outcome.failures), ("error", outcome.errors)):
        if found:
            status, error = kind, found[0][1][-limit:]
    if status == "passed" and outcome.unexpectedSuccesses:
        status, error = "failed", "unexpected success of a test marked expectedFailure"
    if status == "passed" and outcome.skipped:
        if declared_skip:
            status = "skipped"
        else:  # raised while running: by the test or by the program, which cannot be told apart
            status, error = "error", "the test was skipped while running: " + str(outcome.skipped[0][1])[:limit]
    return {"name": test.id(), "case": type(test).__qualname__, "method": test._testMethodName, "status": status, "error": error}


# What an in-process suite depends on, compared by identity before and after the program and
# after every test (mock.patch restores what it replaces before the comparison).
def snapshot():
    import unittest
    import unittest.mock  # noqa: F401 - loaded now so the program cannot plant its own

    runner = globals()
    snap = {"builtins": dict(vars(builtins)), "runner": dict(runner), "trace": (sys.gettrace(), sys.getprofile())}
    snap["code"] = {name: f.__code__ for name, f in runner.items() if callable(f) and hasattr(f, "__code__")}
    snap["calls"] = {f"{owner.__name__}.{name}": getattr(owner, name) for owner, name in _REPORTING}
    for name, module in list(sys.modules.items()):
        if name in ("unittest", "json", "traceback") or name.startswith(("unittest.", "json.")):
            snap["module " + name] = (module, dict(vars(module)))
            for value in list(vars(module).values()):
                if isinstance(value, type) and getattr(value, "__module__", "").startswith(("unittest", "json", "traceback")):
                    snap["class " + value.__module__ + "." + value.__qualname__] = (value, dict(vars(value)))
    for value in list(runner.values()):  # the runner's own classes (Candidate's methods, ...)
        if isinstance(value, type) and value.__module__ == __name__:
            snap["class runner." + value.__qualname__] = (value, dict(vars(value)))
    return snap


# What the runner calls to report, besides its own functions and the modules above.
_REPORTING = ((os, "write"), (os, "_exit"), (os, "fdopen"), (sys, "exc_info"))
# Module globals the standard library itself sets while tests run (mock_open's caches).
_VOLATILE = {"module unittest.mock": {"file_spec", "open_spec"}, "module unittest.signals": {"_interrupt_handler"}}


def compare(snap):
    """What differs from ``snap``: names of builtins, unittest, the runner that were replaced."""
    if snap is None:
        return []
    altered = [f"builtins.{k}" for k, v in snap["builtins"].items() if vars(builtins).get(k, _MISSING) is not v]
    runner = globals()
    altered += [f"the runner's {k}" for k, v in snap["runner"].items() if runner.get(k, _MISSING) is not v]
    altered += [f"the runner's {k}.__code__" for k, c in snap["code"].items() if getattr(runner.get(k), "__code__", None) is not c]
    if (sys.gettrace(), sys.getprofile()) != snap["trace"]:
        altered.append("sys.settrace/setprofile")
    altered += [name for name, f in snap["calls"].items() if getattr(*_split_attr(name)) is not f]
    for key, entry in snap.items():
        if not key.startswith(("module ", "class ")):
            continue
        owner, before = entry
        if key.startswith("module ") and sys.modules.get(key[7:]) is not owner:
            altered.append(f"sys.modules[{key[7:]!r}]")
            continue
        now = vars(owner)
        skip = _VOLATILE.get(key, ())
        names = set(before) | set(now) if key.startswith("class ") else set(before)
        for name in names:
            if name not in skip and now.get(name, _MISSING) is not before.get(name, _MISSING):
                altered.append(f"{key.split(' ', 1)[1]}.{name}")
    return sorted(set(altered))[:20]


_MISSING = object()


def _split_attr(name):
    owner, _, attr = name.partition(".")
    return sys.modules[owner], attr, None


# ---------------------------------------------------------------------------------------------
# the judge's side: the tests, with the program's names as proxies into the candidate process


class ProgramBroke(BaseException):
    """The candidate process ended or broke the protocol. A BaseException: a test's ``except
    Exception`` does not swallow it."""


class NotPlainData(BaseException):
    """The program returned something that is not plain data."""


_REBUILT = {}


def _rebuild(raised):
    """An exception of the candidate's kind, raised in the judge: the builtin type itself, or a
    class of the same name derived from its nearest builtin base."""
    name, module = str(raised.get("type", "Exception"))[:200], str(raised.get("module", "builtins"))[:200]
    base = getattr(builtins, str(raised.get("base", "")), None)
    if not (isinstance(base, type) and issubclass(base, BaseException)):
        base = Exception
    if not issubclass(base, Exception):  # SystemExit, KeyboardInterrupt, ...: never a plain failure
        base = ProgramBroke
    if module == "builtins" and getattr(builtins, name, None) is base:
        kind = base
    else:
        kind = _REBUILT.get((module, name, base))
        if kind is None:
            kind = _REBUILT[(module, name, base)] = type(name.rpartition(".")[2] or "Exception", (base,), {"__module__": module, "__qualname__": name})
    try:
        exc = kind(str(raised.get("message", "")))
    except BaseException:  # noqa: BLE001 - an exception type whose constructor wants more
        exc = ProgramBroke(f"{name}: {raised.get('message', '')}")
    exc._sandbox_frames = str(raised.get("frames", ""))
    return exc


class Channel:
    """The judge's end of the pipes to the candidate process."""

    def __init__(self, requests, replies):
        self.requests = requests
        self.replies = os.fdopen(replies, "rb", buffering=1 << 16)
        self.gone = None  # why the candidate can no longer answer

    def request(self, message):
        if self.gone:
            raise ProgramBroke(self.gone)
        try:
            data = (json.dumps(message) + "\n").encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the sandbox passes only plain data ({PLAIN}) to the program: {exc}") from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.requests, view) :]
            line = self.replies.readline(REPLY_LIMIT + 1)
        except OSError:
            line = b""
        if not line:
            self.gone = "The program's process ended before the tests finished."
            raise ProgramBroke(self.gone)
        if not line.endswith(b"\n"):
            self.gone = f"The program sent more than {REPLY_LIMIT // 2**20} MB in one reply."
            raise ProgramBroke(self.gone)
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            reply = None
        if type(reply) is not dict:
            self.gone = "The program's process broke the sandbox's protocol."
            raise ProgramBroke(self.gone)
        return reply


class Remote:
    """A function of the program, called in the candidate process with plain data only."""

    __slots__ = ("_channel", "_name")

    def __init__(self, channel, name):
        self._channel = channel
        self._name = name

    def __call__(self, *args, **kwargs):
        try:
            message = {"op": "call", "name": self._name, "args": encode(list(args)), "kwargs": encode(dict(kwargs))}
        except (NotPlain, RecursionError) as exc:
            raise TypeError(f"the sandbox passes only plain data ({PLAIN}) to the program, not {exc}") from None
        reply = self._channel.request(message)
        if "value" in reply:
            try:
                return decode(reply["value"])
            except (ValueError, TypeError, RecursionError) as exc:
                raise NotPlainData(f"{self._name}() returned a value the sandbox cannot rebuild ({exc})") from None
        if type(reply.get("raised")) is dict:
            raise _rebuild(reply["raised"])
        if type(reply.get("invalid")) is dict:
            what = reply["invalid"]
            raise NotPlainData(
                f"{self._name}() returned a {str(what.get('type'))[:100]} ({str(what.get('repr'))[:SNIPPET]}); "
                f"the tests accept only plain data: {PLAIN}"
            )
        self._channel.gone = "The program's process broke the sandbox's protocol."
        raise ProgramBroke(self._channel.gone)

    def __repr__(self):
        return f"<function {self._name} of the program>"


def _has_assert(node):
    return any(isinstance(n, ast.Assert) for n in ast.walk(node))


def _got(stmt, env):
    """For ``assert X == Y``: the value X had, so the feedback says what the candidate returned."""
    test = stmt.test if isinstance(stmt, ast.Assert) else None
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return None
    try:
        value = eval(compile(ast.Expression(test.left), TESTS, "eval"), env)  # noqa: S307 - the tests' own expression
        text = repr(value)
    except BaseException:  # noqa: BLE001 - the assert already failed; this is only a hint
        return None
    return text if len(text) <= SNIPPET else text[:SNIPPET] + "..."


def _run_statement(code, env, limit):
    """(status, error text) of one compiled statement."""
    try:
        exec(code, env)  # noqa: S102 - the tests (judge) or the program and tests (in-process suite)
        return "passed", ""
    except AssertionError as exc:
        return "failed", _error_text(exc, limit)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are failures too
        return "error", _error_text(exc, limit)


def split_check(tests_source, check_name="check"):
    """The top-level statements of ``def check(candidate)`` as (node, code), or None if not splittable."""
    tree = ast.parse(tests_source, TESTS)
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == check_name]
    if not checks or not checks[0].args.args:
        return None
    func = checks[0]
    try:
        parts = [(stmt, compile(ast.Module(body=[stmt], type_ignores=[]), TESTS, "exec")) for stmt in func.body]
    except SyntaxError:  # a top-level `return` or `yield` in check(): run check() whole instead
        return None
    return func.args.args[0].arg, parts


def run_check(tests_source, tests_env, candidate, limit):
    """HumanEval style: each top-level statement of check() that asserts is one test."""
    split = split_check(tests_source)
    if split is None:
        status, error = _run_statement(compile("check(candidate)", TESTS, "exec"), dict(tests_env, candidate=candidate), limit)
        return [{"name": "check(candidate)", "status": status, "error": error}]
    param, parts = split
    env = dict(tests_env)
    env[param] = candidate
    results = []
    for stmt, code in parts:
        status, error = _run_statement(code, env, limit)
        if _has_assert(stmt):
            entry = {"name": _snippet(tests_source, stmt), "line": stmt.lineno, "status": status, "error": error}
            if status == "failed":
                got = _got(stmt, env)
                if got is not None:
                    entry["got"] = got
            results.append(entry)
        elif status != "passed":  # set-up code of check() broke: later asserts cannot run
            results.append({"name": _snippet(tests_source, stmt), "line": stmt.lineno, "status": "error", "error": error})
            break
    return results


def is_unittest(tree):
    """Whether the tests define a ``unittest.TestCase`` class (they then run in-process)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                if name.endswith("TestCase"):
                    return True
    return False


def expected_unittests(tree):
    """(class, method) of every test method the source defines in a TestCase class."""
    cases = set()
    changed = True
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    while changed:  # classes derived from the source's own TestCase classes count too
        changed = False
        for node in classes:
            if node.name in cases:
                continue
            for base in node.bases:
                name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                if name.endswith("TestCase") or name in cases:
                    cases.add(node.name)
                    changed = True
                    break
    return {
        (node.name, item.name)
        for node in classes
        if node.name in cases
        for item in node.body
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test")
    }


def free_names(tree):
    """Names the tests read without defining them: what they take from the program."""
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return sorted(used - bound)


def _summary(results, limit):
    bad = [r for r in results if r["status"] not in ("passed", "skipped")]
    if not bad:
        return {"outcome": "passed", "error_text": "", "tests": results}
    first = bad[0]
    text = "Failed test: " + first["name"] + ("\n  got: " + first["got"] if "got" in first else "")
    text += ("\n" + first["error"]) if first["error"] else ""
    outcome = "error" if any(r["status"] == "error" for r in bad) else "failed"
    return {"outcome": outcome, "error_text": text[:limit], "tests": results}


def judge(payload, channel):
    """The outcome (without the host's timeout/oom verdicts), error text and per-test results."""
    program, tests, entry_point = payload["program"], payload.get("tests"), payload.get("entry_point")
    limit = int(payload.get("limit", 4000))
    has_tests = isinstance(tests, str) and bool(tests.strip())
    tree = None
    if has_tests:
        _register(TESTS, tests)
        try:
            tree = ast.parse(tests, TESTS)
        except SyntaxError:
            tree = None
    in_process = tree is not None and is_unittest(tree)
    names = set(free_names(tree)) if tree is not None and not in_process else set()
    helpers = _trusted_helpers(payload.get("trusted"), names - {entry_point}) if names else {}
    names -= set(helpers)
    if entry_point:
        names.add(entry_point)
    scratch = payload.get("scratch") or []
    load = {"op": "load", "program": program, "names": sorted(names), "guard": in_process, "limit": limit, "cwd": scratch[0] if scratch else None}
    try:
        reply = channel.request(load)
    except ProgramBroke as exc:
        return {"outcome": "error", "error_text": str(exc), "tests": [], "gone": True}
    if "syntax_error" in reply:
        return {"outcome": "syntax_error", "error_text": str(reply["syntax_error"])[:limit], "tests": []}
    if "error" in reply:
        error = reply["error"] if type(reply["error"]) is dict else {}
        return {"outcome": "error", "error_text": str(error.get("text", ""))[:limit], "tests": []}
    if reply.get("ok") is not True or type(reply.get("names")) is not dict:
        return {"outcome": "error", "error_text": "The program's process broke the sandbox's protocol.", "tests": []}
    if not has_tests:
        results = []
    elif in_process:
        results = _judge_unittest(tests, tree, channel, limit)
    else:
        offered = {k: v for k, v in reply["names"].items() if k in names}  # only what was asked for
        results = run_tests(tests, offered, entry_point, channel, limit, helpers)
    result = _summary(results, limit)
    if channel.gone:
        result["gone"] = True
    return result


def _trusted_helpers(source, wanted):
    """The names among ``wanted`` that the problem's own stub defines, defined here by the judge."""
    if not (isinstance(source, str) and source.strip() and wanted):
        return {}
    env = {"__name__": "stub"}
    try:
        exec(compile(source, "stub.py", "exec"), env)  # noqa: S102 - the problem's text, not the program
    except BaseException:  # noqa: BLE001 - an incomplete stub: the program's names are used instead
        return {}
    return {name: env[name] for name in wanted if name in env}


def run_tests(tests_source, names, entry_point, channel, limit, helpers=None):
    """Tests in the judge: the program's names are proxies (functions) or plain values, except
    the helpers the problem's stub defines (``helpers``), which are the problem's own."""
    try:
        code = compile(tests_source, TESTS, "exec")
    except SyntaxError as exc:
        return [{"name": "tests", "status": "error", "error": "the tests do not compile: " + _error_text(exc, limit)}]
    env = {"__name__": "tests", "__builtins__": builtins}
    env.update(helpers or {})
    for name, kind in names.items():
        if type(kind) is not list or not kind:
            continue
        if kind[0] == "function":
            env[name] = Remote(channel, name)
        elif kind[0] == "value" and len(kind) == 2:
            try:
                env[name] = decode(kind[1])
            except (ValueError, TypeError, RecursionError):
                pass
    program_names = dict(env)
    status, error = _run_statement(code, env, limit)
    if status != "passed":
        return [{"name": "tests", "status": status, "error": error}]
    if entry_point and callable(env.get("check")):
        if entry_point not in program_names:
            why = "" if entry_point not in names else " as a function or plain data"
            return [{"name": "check", "status": "error", "error": f"NameError: the program does not define {entry_point!r}{why}"}]
        return run_check(tests_source, env, program_names[entry_point], limit)
    return [{"name": "tests", "status": "passed", "error": ""}]


def _judge_unittest(tests, tree, channel, limit):
    nonce = os.urandom(16).hex()
    try:
        reply = channel.request({"op": "unittest", "tests": tests, "nonce": nonce})
    except ProgramBroke as exc:
        return [{"name": "tests", "status": "error", "error": str(exc)}]
    if reply.get("nonce") != nonce:
        return [{"name": "tests", "status": "error", "error": "The tests' report did not come from the sandbox's runner."}]
    if "altered" in reply:
        what = ", ".join(str(a) for a in reply["altered"][:20]) if type(reply["altered"]) is list else "?"
        return [{"name": "tests", "status": "error", "error": f"The program altered what the tests rely on ({str(reply.get('when'))[:200]}): {what}"}]
    reported = reply.get("tests")
    if type(reported) is not list or not all(type(r) is dict for r in reported):
        return [{"name": "tests", "status": "error", "error": "The tests' report is malformed."}]
    results = []
    for r in reported:
        status = r.get("status") if r.get("status") in ("passed", "failed", "error", "skipped") else "error"
        entry = {"name": str(r.get("name", "?"))[:SNIPPET], "status": status, "error": str(r.get("error", ""))[:limit]}
        results.append(entry)
    seen = {(str(r.get("case")), str(r.get("method"))) for r in reported}
    missing = sorted(expected_unittests(tree) - seen)
    if missing:
        results.append({"name": "tests", "status": "error", "error": "tests missing from the report: " + ", ".join(f"{c}.{m}" for c, m in missing[:10])})
    return results


# ---------------------------------------------------------------------------------------------
# the warden: processes, privileges, clean-up


def oom_kills():
    for path in OOM_FILES:
        try:
            with open(path) as handle:
                for line in handle:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return None


def clear_scratch(folder):
    """Empty ``folder`` (host mode only: the bench's temporary folder).

    Only the folders the payload names are touched, never a default."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        try:
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        except OSError:
            pass


def _close_fds(keep):
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _drop_to(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
        os._exit(70)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _fork_candidate(uid):
    """The candidate process, forked before the payload is read; it waits for the program."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)  # not the payload: input() sees end-of-file
            os.dup2(2, 1)  # the program's stdout joins stderr; never the result descriptor
            _close_fds({req_r, rep_w})
            if uid is None:
                os.setsid()  # host mode: the warden kills the whole group
            else:
                try:
                    with open("/proc/self/oom_score_adj", "w") as adj:
                        adj.write("1000")  # memory trouble kills the candidate before the judge
                except OSError:
                    pass
                _drop_to(uid)
            Candidate(req_r, rep_w).serve()
        except BaseException:  # noqa: BLE001 - the judge sees the pipe close
            code = 1
            traceback.print_exc()  # a fault of this runner (the program's own errors are replies)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)  # no atexit handler, no wait for the program's threads
    os.close(req_r)
    os.close(rep_w)
    return pid, req_w, rep_r


def _processes_of(uid):
    """Live (not zombie) processes whose real uid is ``uid``, this one excluded."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
        except (OSError, ValueError):
            continue
        if fields.get("State", "").strip().startswith(("Z", "X")):
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            found.append(int(name))
    return sorted(found)


def _sysvipc(kind):
    try:
        with open(f"/proc/sysvipc/{kind}") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    if not lines:
        return []
    header = lines[0].split()
    return [dict(zip(header, line.split())) for line in lines[1:] if line.strip()]


def _remove_owned(folder, uid, errors):
    """Remove what ``uid`` owns in ``folder``, opening up the modes it set (0500, 0000) first."""
    try:
        entries = os.listdir(folder)
    except OSError as exc:
        errors.append(f"{folder}: {exc}")
        return

    def open_up(path):
        st = os.lstat(path)
        if st.st_uid == uid and not os.path.islink(path) and os.path.isdir(path):
            os.chmod(path, 0o700)
            for name in os.listdir(path):
                open_up(os.path.join(path, name))

    for name in entries:
        path = os.path.join(folder, name)
        try:
            if os.lstat(path).st_uid != uid:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                open_up(path)
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except (OSError, RecursionError) as exc:
            errors.append(f"{path}: {type(exc).__name__}")


def _remove_ipc(uid, errors):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    remove = {"shm": lambda i: libc.shmctl(i, 0, None), "sem": lambda i: libc.semctl(i, 0, 0), "msg": lambda i: libc.msgctl(i, 0, None)}
    ident = {"shm": "shmid", "sem": "semid", "msg": "msqid"}
    for kind in SYSVIPC:
        for row in _sysvipc(kind):
            if uid in (int(row.get("uid", -1)), int(row.get("cuid", -1))) and remove[kind](int(row[ident[kind]])) != 0:
                errors.append(f"{kind} {row[ident[kind]]}: errno {ctypes.get_errno()}")


def _fork_reaper(uid):
    """A root process forked before anything else, so a fork bomb cannot keep it from starting.
    On ``go`` it becomes ``uid``, kills every process of it, removes its files and IPC objects."""
    cmd_r, cmd_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(2, 1)
            _close_fds({cmd_r, out_w})
            command = _read_all(cmd_r)
            if not command:
                os._exit(0)
            scratch = json.loads(command)["scratch"]
            _drop_to(uid)
            first = remaining = _processes_of(uid)
            deadline = time.monotonic() + REAP_S
            while remaining and time.monotonic() < deadline:
                try:
                    os.kill(-1, signal.SIGKILL)  # every process this uid may signal: only its own
                except ProcessLookupError:
                    pass
                time.sleep(0.001)
                remaining = _processes_of(uid)
            errors = []
            for folder in scratch:
                _remove_owned(folder, uid, errors)
            if any(uid in (int(r.get("uid", -1)), int(r.get("cuid", -1))) for k in SYSVIPC for r in _sysvipc(k)):
                _remove_ipc(uid, errors)
            _write_all(out_w, json.dumps({"found": first, "remaining": remaining, "errors": errors}).encode())
        finally:
            os._exit(0)
    os.close(cmd_r)
    os.close(out_w)
    return pid, cmd_w, out_r


def _owned_by(uid, scratch):
    """Whether ``uid`` owns an entry of the scratch folders or a SysV IPC object."""
    for folder in scratch:
        try:
            if any(os.lstat(os.path.join(folder, n)).st_uid == uid for n in os.listdir(folder)):
                return True
        except OSError:
            return True
    return any(uid in (int(r.get("uid", -1)), int(r.get("cuid", -1))) for kind in SYSVIPC for r in _sysvipc(kind))


def _residue(scratch):
    """What is left in the container's writable places and IPC tables."""
    left = []
    for folder in scratch:
        try:
            left += [os.path.join(folder, n) for n in os.listdir(folder)]
        except OSError:
            pass
    for kind in SYSVIPC:
        left += [f"sysv {kind} {row.get('key')}" for row in _sysvipc(kind)]
    return left


def _others():
    """Live processes in the container besides its init (pid 1) and this one."""
    mine = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (1, mine):
            try:
                with open(f"/proc/{name}/stat") as handle:
                    state = handle.read().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state not in ("Z", "X"):
                out.append(int(name))
    return sorted(out)


def _reap_children(timeout_s=1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.001)


def _wait(pid, timeout_s):
    """The exit status of child ``pid`` (``os.waitstatus_to_exitcode``), or None if it still runs."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.001)


def _how(code):
    if code is None:
        return "did not exit"
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def serve(uids, relay=None):
    """One evaluation. ``uids``: (judge, candidate) in a container, None on the host. ``relay``:
    the pid of the exec that handed its stdio to the zygote (it is not a stray process)."""
    judge_uid, candidate_uid = uids if uids else (None, None)
    if uids:
        reaper = _fork_reaper(candidate_uid)
    candidate_pid, req_w, rep_r = _fork_candidate(candidate_uid)
    payload = json.loads(_read_all(0).decode("utf-8"))
    marker = payload.pop("marker")
    result_fd = os.dup(1)
    os.dup2(2, 1)  # prints of the tests join stderr: only result_fd carries the result
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    scratch = payload.get("scratch") or []

    def finish(result):
        result["oom_kills"] = oom_kills()
        _write_all(result_fd, (marker + json.dumps(result) + "\n").encode("utf-8"))

    if uids:
        residue = _residue(scratch)
        if residue:  # the previous evaluation's clean-up failed: never run on top of it
            finish({"infra": "the container was not clean: " + ", ".join(residue[:10])})
            return
    else:
        for folder in scratch:
            clear_scratch(folder)

    verdict_r, verdict_w = os.pipe()
    judge_pid = os.fork()
    if judge_pid == 0:
        code = 0
        try:
            os.close(result_fd)
            _close_fds({req_w, rep_r, verdict_w})
            if uids:
                _drop_to(judge_uid)
            if scratch:
                os.chdir(scratch[0])
            try:
                result = judge(payload, Channel(req_w, rep_r))
            except BaseException:  # noqa: BLE001 - a fault of this file, never of the program
                result = {"infra": "the judge failed: " + traceback.format_exc()[-2000:]}
            _write_all(verdict_w, json.dumps(result).encode())
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    for fd in (req_w, rep_r, verdict_w):
        os.close(fd)
    verdict = _read_all(verdict_r)
    judge_code = _wait(judge_pid, 5.0)
    try:
        result = json.loads(verdict)
    except ValueError:
        result = {"infra": f"the judge ended without a verdict (it {_how(judge_code)})"}
    # The judge is done and has closed its pipes: the candidate's loop ends and exits at once.
    candidate_code = _wait(candidate_pid, EXIT_GRACE_S)
    leftover = []
    if uids:
        reaper_pid, cmd_w, out_r = reaper
        if _processes_of(candidate_uid) or _owned_by(candidate_uid, scratch):
            _write_all(cmd_w, json.dumps({"scratch": scratch}).encode())
        os.close(cmd_w)  # nothing of the candidate left: the reaper exits without work
        report = _read_all(out_r)
        _wait(reaper_pid, 5.0)
        try:
            report = json.loads(report) if report else {"found": [], "remaining": [], "errors": []}
        except ValueError:
            report = {"found": [], "remaining": ["?"], "errors": ["the reaper failed"]}
        leftover = report["found"]
        if candidate_code is None:
            candidate_code = _wait(candidate_pid, 1.0)
        _reap_children()
        stray = [pid for pid in _others() if pid != relay]
        residue = _residue(scratch)
        leftover = sorted(set(leftover) | set(stray))
        result["clean"] = not (stray or residue or report["remaining"] or report["errors"])
        if not result["clean"]:
            result["dirty"] = [str(x) for x in (stray + residue + report["remaining"] + report["errors"])[:20]]
    else:
        try:
            os.killpg(candidate_pid, signal.SIGKILL)
        except OSError:
            pass
        if candidate_code is None:
            candidate_code = _wait(candidate_pid, 1.0)
    if result.pop("gone", False) and result.get("outcome") == "error":
        result["error_text"] = result.get("error_text", "").rstrip(".") + f": it {_how(candidate_code)}."
    result["leftover"] = leftover
    finish(result)


# ---------------------------------------------------------------------------------------------
# the zygote: the container's init; one evaluation = one fork of it, reached through the relay

ZYGOTE_DIR = "/dev/rosa2"  # /dev is a root-owned tmpfs: no other uid can create or enter it
ZYGOTE_SOCKET = ZYGOTE_DIR + "/zygote"
ZYGOTE_READY = b"rosa2 sandbox zygote ready"

# What ``docker exec`` runs (``python3 -I -S -c RELAY --uids J C``, ~15 ms instead of a full
# interpreter with this file): it hands its stdin/stdout/stderr to the zygote and exits with the
# evaluation's exit status.
RELAY = r"""
import _socket, sys, time
s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
for _ in range(1000):
    try:
        s.connect("/dev/rosa2/zygote")
        break
    except OSError:
        time.sleep(0.005)
else:
    sys.stderr.write("the sandbox's zygote does not answer\n")
    sys.exit(125)
fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
s.sendmsg([" ".join(sys.argv[1:]).encode()], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
code = s.recv(32).strip()
sys.exit((int(code) if int(code) >= 0 else 128 - int(code)) if code.lstrip(b"-").isdigit() else 125)
"""


def zygote():
    """PID 1 of a sandbox container (uid 0): it never reads a payload and never runs the program,
    so each evaluation, a fork of it, starts from the same clean interpreter without paying for a
    new one. It also reaps every orphan (it is the container's init). Only uid 0 may connect: the
    socket's folder is root's, mode 0700, and the peer's credentials are checked."""
    import select
    import socket
    import struct

    os.makedirs(ZYGOTE_DIR, mode=0o700, exist_ok=True)
    os.chmod(ZYGOTE_DIR, 0o700)
    try:
        os.unlink(ZYGOTE_SOCKET)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(ZYGOTE_SOCKET)
    server.listen(16)
    os.write(1, ZYGOTE_READY + b"\n")  # to the container's log: the host waits for it before the first exec
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sessions = {}  # session pid -> the relay's connection
    while True:
        ready, _, _ = select.select([server, wake_r], [], [], 5.0)
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        if server in ready:
            conn, _ = server.accept()
            try:
                relay, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                conn.settimeout(5.0)
                message, fds, _, _ = socket.recv_fds(conn, 4096, 3) if uid == 0 else (b"", [], 0, None)
            except OSError:
                message, fds = b"", []
            if uid != 0 or len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                conn.close()
            else:
                pid = os.fork()
                if pid == 0:
                    _session(fds, message.decode("utf-8", "replace").split(), relay)
                for fd in fds:
                    os.close(fd)  # the session holds them now: the exec's stream ends with it
                sessions[pid] = conn
        while True:  # reap sessions and every orphan reparented to init
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = sessions.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(str(os.waitstatus_to_exitcode(status)).encode())
                except OSError:
                    pass
                conn.close()


def _session(fds, argv, relay):
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        _close_fds(set())  # the zygote's socket, the relay's connection, the received copies
        main(argv, relay)
        code = 0
    except BaseException:  # noqa: BLE001 - reported as the exec's exit status
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main(argv, relay=None):
    if "--zygote" in argv:
        zygote()
        return
    uids = None
    if "--uids" in argv:
        at = argv.index("--uids")
        uids = (int(argv[at + 1]), int(argv[at + 2]))
    serve(uids, relay)


if __name__ == "__main__":
    main(sys.argv[1:])
