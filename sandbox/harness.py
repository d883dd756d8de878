"""The program that runs inside a sandbox container, once per evaluation, in a fresh process.

Standard library only (it runs on the image's python3, not the project's venv). It reads one JSON
payload from stdin: ``{"program", "tests", "entry_point", "marker", "limit", "scratch"}``, empties
the ``scratch`` folders and works in the first, runs the program, then the tests, and writes one line
``<marker><json result>`` on a private copy of stdout. The program's own prints go to stderr, so
nothing it writes can be taken for the result.

Tests in HumanEval's ``def check(candidate): assert ...`` form are split with ``ast`` into their
top-level statements; each statement that contains an ``assert`` is one test, run on its own so
one failure does not hide the rest. ``unittest.TestCase`` classes (BigCodeBench) give one test per
method. Any other test source runs as a single test. Timeouts, memory and process limits are the
host's business (sandbox/client.py); this file only reports what happened.
"""

import ast
import json
import linecache
import os
import shutil
import sys
import traceback

SOLUTION = "solution.py"
TESTS = "tests.py"
SNIPPET = 300  # characters of a test's source kept in the report
OOM_FILES = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")


def _register(filename, source):
    # Tracebacks then show the model's source lines, which is what `rich` feedback is for.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def _error_text(exc, limit):
    """The exception with only the model's and the tests' frames (never this harness's)."""
    te = traceback.TracebackException.from_exception(exc)
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename in (SOLUTION, TESTS)])
    text = "".join(te.format())
    return text if len(text) <= limit else text[: limit // 2] + "\n...\n" + text[-limit // 2 :]


def _snippet(source, node):
    text = ast.get_source_segment(source, node) or ""
    return text if len(text) <= SNIPPET else text[:SNIPPET] + "..."


def _has_assert(node):
    return any(isinstance(n, ast.Assert) for n in ast.walk(node))


def _got(stmt, env):
    """For ``assert X == Y``: the value X had, so the feedback says what the candidate returned."""
    test = stmt.test if isinstance(stmt, ast.Assert) else None
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return None
    try:
        value = eval(compile(ast.Expression(test.left), TESTS, "eval"), env)  # noqa: S307 - inside the sandbox
        text = repr(value)
    except BaseException:  # noqa: BLE001 - the assert already failed; this is only a hint
        return None
    return text if len(text) <= SNIPPET else text[:SNIPPET] + "..."


def _run_statement(code, env, limit):
    """(status, error text) of one compiled statement."""
    try:
        exec(code, env)  # noqa: S102 - inside the sandbox
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
        parts = [
            (stmt, compile(ast.Module(body=[stmt], type_ignores=[]), TESTS, "exec")) for stmt in func.body
        ]
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


def run_unittest(cases, limit):
    import unittest

    results = []
    for case in cases:
        for test in unittest.defaultTestLoader.loadTestsFromTestCase(case):
            outcome = unittest.TestResult()
            test.run(outcome)
            status, error = "passed", ""
            for kind, found in (("failed", outcome.failures), ("error", outcome.errors)):
                if found:
                    status, error = kind, found[0][1][-limit:]
            results.append({"name": test.id(), "status": status, "error": error})
    return results


def run_tests(tests_source, namespace, entry_point, limit):
    """Tests see the program's names in a copy of its namespace, so their own definitions
    (``check``, ``METADATA``) never replace the program's."""
    _register(TESTS, tests_source)
    try:
        code = compile(tests_source, TESTS, "exec")
    except SyntaxError as exc:
        return [{"name": "tests", "status": "error", "error": "the tests do not compile: " + _error_text(exc, limit)}]
    env = dict(namespace)
    status, error = _run_statement(code, env, limit)
    if status != "passed":
        return [{"name": "tests", "status": status, "error": error}]
    if entry_point and callable(env.get("check")):
        if entry_point not in namespace:
            return [{"name": "check", "status": "error", "error": f"NameError: the program does not define {entry_point!r}"}]
        return run_check(tests_source, env, namespace[entry_point], limit)
    import unittest  # only here: importing it costs more than most HumanEval tests take

    cases = [v for k, v in env.items() if isinstance(v, type) and issubclass(v, unittest.TestCase) and k not in namespace]
    if cases:
        return run_unittest(cases, limit)
    return [{"name": "tests", "status": "passed", "error": ""}]


def evaluate(program, tests, entry_point, limit):
    """The outcome (without the host's timeout/oom verdicts), error text and per-test results."""
    _register(SOLUTION, program)
    try:
        code = compile(program, SOLUTION, "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: null bytes in the source
        return {"outcome": "syntax_error", "error_text": _error_text(exc, limit), "tests": []}
    namespace = {"__name__": "solution", "__file__": SOLUTION}
    status, error = _run_statement(code, namespace, limit)
    if status == "passed" and isinstance(tests, str) and tests.strip():
        results = run_tests(tests, namespace, entry_point, limit)
    elif status == "passed":
        results = []
    else:
        # The program raised while being defined; an AssertionError there is still its error.
        return {"outcome": "error", "error_text": error, "tests": []}
    bad = [r for r in results if r["status"] != "passed"]
    if not bad:
        return {"outcome": "passed", "error_text": "", "tests": results}
    first = bad[0]
    text = "Failed test: " + first["name"] + ("\n  got: " + first["got"] if "got" in first else "")
    text += ("\n" + first["error"]) if first["error"] else ""
    outcome = "error" if any(r["status"] == "error" for r in bad) else "failed"
    return {"outcome": outcome, "error_text": text[:limit], "tests": results}


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


def other_processes():
    """Processes left in the container besides its init (pid 1) and this one."""
    mine = str(os.getpid())
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and p not in ("1", mine))


def clear_scratch(folder):
    """Empty ``folder`` (the container's /tmp and /dev/shm: the previous evaluation may have left
    files there).

    Only the folders the payload names are touched, never a default: the same harness runs on
    the host in ``sandbox/bench.py`` with a fresh temporary folder of its own."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        try:
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        except OSError:
            pass


def main():
    payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    result_fd = os.dup(1)
    os.dup2(2, 1)  # the program's stdout joins stderr: the host caps it; fd 1 no longer carries results
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # input() sees end-of-file instead of hanging
    os.close(devnull)
    main_pid = os.getpid()
    scratch = payload.get("scratch") or []
    for folder in scratch:
        clear_scratch(folder)
    if scratch:
        os.chdir(scratch[0])
    try:
        result = evaluate(payload["program"], payload.get("tests"), payload.get("entry_point"), int(payload.get("limit", 4000)))
    finally:
        if os.getpid() != main_pid:
            os._exit(1)  # a forked copy of this process never reports
        sys.stdout.flush()
        sys.stderr.flush()
    result["leftover"] = other_processes()
    result["oom_kills"] = oom_kills()
    os.write(result_fd, (payload["marker"] + json.dumps(result) + "\n").encode("utf-8"))


if __name__ == "__main__":
    main()
