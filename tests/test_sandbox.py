"""The code reward and its sandbox: extraction and assembly, the harness's per-test results, every
outcome through real containers, retries after infrastructure failures, the CLI, and HumanEval's
canonical solutions (all pass their own tests, all fail another task's)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rosa2.config import DataConfig, SandboxConfig
from rosa2.errors import Rosa2Error
from rosa2.records import Problem
from rosa2.rewards.code import CodeReward, assemble, extract_code
from rosa2.sandbox import harness

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval.jsonl.gz"
STUB = 'from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    """Sum of a and b."""\n'
TESTS = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n    assert candidate(-1, 1) == 0\n"
PROBLEM = Problem(id="toy:add", prompt="Complete add.", domain="code", tests=TESTS, entry_point="add", metadata={"stub": STUB})


# ---------------------------------------------------------------------------------------------
# no Docker needed: extraction, assembly, the harness run in this process


def test_extract_code_prefers_the_python_block_that_defines_the_entry_point():
    reply = (
        "Here is a helper:\n```python\ndef helper():\n    return 1\n```\nand the answer:\n"
        "```python\ndef add(a, b):\n    return a + b\n```\n```text\nnot code\n```\nDone."
    )
    assert extract_code(reply, "add") == "def add(a, b):\n    return a + b"
    assert extract_code(reply, "missing") == "def add(a, b):\n    return a + b"  # the last Python block
    assert extract_code("```py\nx = 1\n```") == "x = 1"
    assert extract_code("```\ny = 2\n```") == "y = 2"  # an untagged fence is taken as Python


def test_extract_code_handles_a_truncated_fence_and_raw_code():
    assert extract_code("```python\ndef add(a, b):\n    return a +") == "def add(a, b):\n    return a +"
    assert extract_code("    return a + b\n") == "    return a + b"
    assert extract_code("") == ""


def test_assemble_full_body_and_dedented_body():
    program, form = assemble(STUB, "def add(a, b):\n    return a + b", "add")
    assert form == "full" and program.startswith(STUB) and program.endswith("return a + b")
    program, form = assemble(STUB, "    return a + b\n", "add")
    assert (form, program) == ("body", STUB + "    return a + b\n")
    program, form = assemble(STUB, "total = a + b\nreturn total", "add")
    assert form == "dedented-body" and "\n    total = a + b\n    return total" in program
    assert assemble("", "print(1)", None) == ("print(1)", "full")
    program, form = assemble(STUB, "    def add(a, b):\n        return a + b\n", "add")
    assert form == "full" and program.endswith("\ndef add(a, b):\n    return a + b\n")


def _evaluate(program, tests=None, entry_point=None):
    """The harness's result for one evaluation, run on the host (its host mode: the judge and the
    candidate are separate processes, without separate uids)."""
    from rosa2.sandbox.bench import host_run

    return host_run(program, tests, entry_point, 60)[0]


def test_plain_data_round_trips_with_exact_types_and_nothing_else_crosses():
    values = [None, True, 0, -(2**70), 1.5, float("inf"), -0.0, 2j, "é\ud800", b"\x00", [1, (2, "3")], (), {1: [2], (3,): None}, {1, 2}, frozenset({"a"})]
    for value in values:
        back = harness.decode(json.loads(json.dumps(harness.encode(value))))
        assert back == value and type(back) is type(value), value
        assert repr(back) == repr(value)

    class Int(int):
        def __eq__(self, other):
            return True

    for odd in (Int(3), [Int(3)], {"k": object()}, range(3), (x for x in ()), bytearray(b"x")):
        with pytest.raises(harness.NotPlain):
            harness.encode(odd)
    for forged in ({"outcome": "passed"}, ["x", 1], ["l", "abc"], ["d", [[1]]], ["c", "1", 2], ["s", [["l", []]]]):
        with pytest.raises((ValueError, TypeError)):
            harness.decode(forged)


def test_the_judge_sees_only_plain_values_so_a_fake_eq_is_an_error():
    fake = "class Yes:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Yes()\n"
    result = _evaluate(fake, TESTS, "add")
    assert result["outcome"] == "error" and "not" not in [t["status"] for t in result["tests"]]
    assert "add() returned a solution.Yes" in result["error_text"] and "plain data" in result["error_text"]
    tupled = _evaluate("def add(a, b):\n    return (a + b, {a}, [b], {'s': b'x'})\n", "assert add(1, 2) == (3, {1}, [2], {'s': b'x'})\n")
    assert tupled["outcome"] == "passed", tupled


SEARCH = (
    "import gc, re, sys\n"
    "KEY, MARK = 'SEC' + 'RET', re.compile(chr(30) + '[0-9a-f]{32}:')\n"
    "def found(o):\n    return isinstance(o, str) and o != KEY and (KEY in o or MARK.search(o) is not None)\n"
    "def inside(v):\n    return [v] + (list(v.values()) if isinstance(v, dict) else list(v) if isinstance(v, (list, tuple)) else [])\n"
    "hits = [x[:80] for o in gc.get_objects() for x in inside(o) if found(x)]\n"
    "f = sys._getframe()\n"
    "while f:\n"
    "    hits += [x[:80] for v in list(f.f_locals.values()) for x in inside(v) if found(x)]\n"
    "    f = f.f_back\n"
)


def test_the_tests_and_the_marker_never_reach_the_candidate_process():
    # The program looks for the tests' text (a word only they contain) and for the result marker
    # in its process: every str in live containers and frames' locals, one level deep.
    snoop = SEARCH + "def leak():\n    return hits\n"
    result = _evaluate(snoop, "def check(candidate):\n    assert candidate() == []  # SECRET\n", "leak")
    assert result["outcome"] == "passed", result["error_text"]
    # the probe can fail: the same search run by the tests, in the judge's process, finds them
    judged = _evaluate("x = 1\n", SEARCH + "assert hits == []  # SECRET\n")
    assert judged["outcome"] == "failed", judged  # its `hits` were not empty


def test_in_process_unittest_suites_detect_what_the_program_altered():
    tests = "import unittest\nclass T(unittest.TestCase):\n    def test_it(self):\n        self.assertEqual(f(), 1)\n"
    assert _evaluate("def f():\n    return 1\n", tests, "f")["outcome"] == "passed"
    patched = _evaluate("import unittest\nunittest.TestCase.assertEqual = lambda *a: None\ndef f():\n    return 2\n", tests, "f")
    assert patched["outcome"] == "error" and "unittest.case.TestCase.assertEqual" in patched["error_text"]
    during = "import builtins\ndef f():\n    builtins.len = lambda x: 0\n    return 2\n"
    late = _evaluate(during, tests, "f")
    assert late["outcome"] == "error" and "builtins.len" in late["error_text"] and "during" in late["error_text"]
    mocked = (
        "import unittest\nfrom unittest import mock\nclass T(unittest.TestCase):\n"
        "    @mock.patch('builtins.open')\n    def test_it(self, fake_open):\n        self.assertEqual(f(), 1)\n"
    )
    assert _evaluate("def f():\n    return 1\n", mocked, "f")["outcome"] == "passed"  # mock.patch restores: not flagged


BCB_PROGRAM = (
    "import os, random, subprocess\n"
    "def task_func(d):\n    if d is None:\n        raise ValueError('no dir')\n    random.seed(0)\n    return sorted(os.listdir(d))\n"
)
BCB_TESTS = """
import unittest
from unittest.mock import patch, MagicMock, mock_open
import os, shutil, subprocess, tempfile
class TestCases(unittest.TestCase):
    def setUp(self):
        self.d = tempfile.mkdtemp()
        self.maxDiff = None
    def tearDown(self):
        shutil.rmtree(self.d)
    @patch('os.listdir')
    def test_mock(self, listdir):
        listdir.return_value = ['b', 'a']
        self.assertEqual(task_func(self.d), ['a', 'b'])
    def test_real(self):
        open(os.path.join(self.d, 'x'), 'w').close()
        self.assertListEqual(task_func(self.d), ['x'])
    def test_raises(self):
        with self.assertRaises(ValueError):
            task_func(None)
    def test_subtests(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertAlmostEqual(i * 1.0, i)
    @patch('builtins.open', new_callable=mock_open, read_data='data')
    def test_open(self, opened):
        with open('f') as handle:
            self.assertEqual(handle.read(), 'data')
    @unittest.skip('declared by the tests')
    def test_skipped(self):
        self.fail()
    @patch('subprocess.run')
    def test_run(self, run):
        run.return_value = MagicMock(returncode=0)
        self.assertEqual(subprocess.run(['x']).returncode, 0)
"""


def test_the_in_process_guard_accepts_what_bigcodebench_style_tests_do_to_the_interpreter():
    # mock.patch of os/builtins/subprocess, mock_open (which caches module globals), subTest,
    # assertRaises, a declared skip: none of it is taken for the program's tampering.
    result = _evaluate(BCB_PROGRAM, BCB_TESTS, "task_func")
    assert result["outcome"] == "passed", result["error_text"]
    statuses = {t["name"].rsplit(".", 1)[1]: t["status"] for t in result["tests"]}
    assert statuses == {n: "passed" for n in ("test_mock", "test_real", "test_raises", "test_subtests", "test_open", "test_run")} | {"test_skipped": "skipped"}
    wrong = _evaluate(BCB_PROGRAM.replace("sorted(os.listdir(d))", "os.listdir(d)"), BCB_TESTS, "task_func")
    assert wrong["outcome"] == "failed" and wrong["error_text"].startswith("Failed test: solution.TestCases.test_mock")


def test_harness_splits_check_into_one_test_per_assert_and_reports_what_the_candidate_returned():
    result = _evaluate(STUB + "    return a * b\n", TESTS, "add")
    assert result["outcome"] == "failed"
    assert [t["status"] for t in result["tests"]] == ["failed", "passed", "failed"]
    assert result["tests"][0]["name"] == "assert candidate(1, 2) == 3" and result["tests"][0]["got"] == "2"
    assert result["error_text"].startswith("Failed test: assert candidate(1, 2) == 3\n  got: 2")
    assert "harness" not in result["error_text"]  # only the model's and the tests' frames


def test_harness_outcomes_without_a_container():
    assert _evaluate(STUB + "    return a + b\n", TESTS, "add")["outcome"] == "passed"
    syntax = _evaluate("def add(a, b)\n    return a + b\n", TESTS, "add")
    assert syntax["outcome"] == "syntax_error" and "SyntaxError" in syntax["error_text"]
    crash = _evaluate("raise RuntimeError('at import')\n", TESTS, "add")
    assert crash["outcome"] == "error" and "RuntimeError: at import" in crash["error_text"]
    missing = _evaluate("def other():\n    pass\n", TESTS, "add")
    assert missing["outcome"] == "error" and "'add'" in missing["error_text"]
    raising = _evaluate("def add(a, b):\n    return a / 0\n", TESTS, "add")
    assert raising["outcome"] == "error" and "ZeroDivisionError" in raising["error_text"]


def test_harness_keeps_check_state_and_falls_back_when_check_cannot_be_split():
    stateful = "def check(candidate):\n    x = candidate(1, 1)\n    assert x == 2\n    for i in range(3):\n        assert candidate(i, 0) == i\n"
    result = _evaluate("def add(a, b):\n    return a + b\n", stateful, "add")
    assert result["outcome"] == "passed" and len(result["tests"]) == 2
    returning = "def check(candidate):\n    assert candidate(1, 1) == 2\n    return\n"
    result = _evaluate("def add(a, b):\n    return a + b\n", returning, "add")
    assert result["outcome"] == "passed" and result["tests"][0]["name"] == "check(candidate)"


def test_harness_runs_unittest_cases_one_test_per_method():
    tests = (
        "import unittest\nclass T(unittest.TestCase):\n"
        "    def test_ok(self):\n        self.assertEqual(task_func(2), 4)\n"
        "    def test_bad(self):\n        self.assertEqual(task_func(3), 6)\n"
    )
    result = _evaluate("def task_func(x):\n    return x * x\n", tests, "task_func")
    assert result["outcome"] == "failed"
    assert {t["name"].rsplit(".", 1)[1]: t["status"] for t in result["tests"]} == {"test_ok": "passed", "test_bad": "failed"}


def test_harness_empties_only_the_scratch_folder_it_is_given(tmp_path):
    from rosa2.sandbox.bench import host_evaluate
    from rosa2.sandbox.client import HARNESS

    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    payload = json.dumps({"program": "print(1)", "marker": "@@", "limit": 100})
    done = subprocess.run([sys.executable, "-I", "-c", HARNESS], input=payload, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert json.loads(done.stdout.partition("@@")[2])["outcome"] == "passed"
    assert keep.read_text() == "mine"  # no scratch named: nothing is removed anywhere
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "old.txt").write_text("stale")
    payload = json.dumps({"program": "import os\nprint(os.listdir('.'))", "marker": "@@", "limit": 100, "scratch": [str(scratch)]})
    done = subprocess.run([sys.executable, "-I", "-c", HARNESS], input=payload, capture_output=True, text=True, timeout=60)
    assert done.stderr.strip() == "[]" and keep.read_text() == "mine"
    assert host_evaluate(STUB + "    return a + b\n", TESTS, "add", 60)[0] == "passed"


def test_code_reward_refuses_bad_problems():
    with pytest.raises(Rosa2Error, match="domain='math'"):
        CodeReward(Problem(id="m", prompt="1+1", domain="math", answer="2"))
    with pytest.raises(Rosa2Error, match="no tests"):
        CodeReward(Problem(id="c", prompt="x", domain="code", tests="  ", entry_point="f"))


def test_build_refuses_an_unknown_method():
    from rosa2.sandbox.image import SandboxError, build

    with pytest.raises(SandboxError, match="'podman'.*auto"):
        build("rosa2-sandbox:latest", method="podman")


# ---------------------------------------------------------------------------------------------
# real containers


@pytest.fixture(scope="module")
def pool(sandbox_image):
    from rosa2.sandbox import Sandbox

    with Sandbox(SandboxConfig(image=sandbox_image, timeout_s=10, memory_mb=128, retries=1)) as sandbox:
        sandbox.warm()
        yield sandbox


@pytest.mark.docker
def test_passed_failed_error_and_syntax_error_through_the_code_reward(pool):
    reward = lambda response: CodeReward(PROBLEM, pool=pool).score(response)  # noqa: E731
    ok = reward("Sure:\n```python\ndef add(a, b):\n    return a + b\n```")
    assert (ok.reward, ok.outcome, ok.scored, ok.error_text) == (1.0, "passed", True, "")
    assert ok.detail["tests_passed"] == ok.detail["tests_total"] == 3 and ok.detail["assembly"] == "full"
    wrong = reward("    return a - b\n")
    assert (wrong.reward, wrong.outcome, wrong.detail["assembly"]) == (-1.0, "failed", "body")
    assert wrong.error_text.startswith("Failed test: assert candidate(1, 2) == 3\n  got: -1")
    assert [t["status"] for t in wrong.detail["tests"]] == ["failed", "failed", "failed"]
    crash = reward("```python\ndef add(a, b):\n    return undefined_name\n```")
    assert crash.outcome == "error" and "NameError" in crash.error_text and crash.scored
    broken = reward("```python\ndef add(a, b) return a\n```")
    assert broken.outcome == "syntax_error" and "SyntaxError" in broken.error_text and broken.reward == -1.0


@pytest.mark.docker
def test_a_reward_given_no_pool_runs_on_the_installed_docker_runner(sandbox_image):
    # the session's path: reward_for -> CodeReward -> default_runner, the entry point that names
    # rosa2.sandbox.shared (the core never imports the sandbox)
    from rosa2.rewards import reward_for
    from rosa2.sandbox import shared

    cfg = SandboxConfig(image=sandbox_image, timeout_s=10, memory_mb=128, retries=1, pool_size=1)
    reward = reward_for(PROBLEM, cfg)
    assert reward.score("    return a + b\n").outcome == "passed"
    assert reward.score("    return a - b\n").outcome == "failed"
    assert shared(cfg)._live  # the warm pool the reward used is the process-wide one for cfg


@pytest.mark.docker
def test_timeout_and_oom_are_outcomes_and_the_next_evaluation_works(pool):
    start = time.monotonic()
    slow = pool.run("import time\ntime.sleep(30)\n", timeout_s=2)
    assert slow.outcome == "timeout" and slow.recycled and time.monotonic() - start < 2 + 5
    hog = pool.run("chunks = []\nwhile True:\n    chunks.append(bytearray(8 * 2**20))\n")
    assert hog.outcome == "oom" and hog.recycled and "128 MB" in hog.error_text
    assert pool.run("print('fine')").output == "fine\n"


@pytest.mark.docker
def test_program_output_is_captured_and_tmp_starts_empty(pool):
    first = pool.run("for d in ('/tmp', '/dev/shm'):\n    open(d + '/leftover.txt', 'w').write('x')\nprint('hi')\n")
    assert (first.outcome, first.output, first.output_truncated) == ("passed", "hi\n", False)
    # Every evaluation that may land in the same container starts with an empty /tmp and /dev/shm.
    empty = "import os\nfor d in ('/tmp', '/dev/shm'):\n    assert os.listdir(d) == [], os.listdir(d)\nassert os.getcwd() == '/tmp'\n"
    for _ in range(pool.cfg.pool_size + 1):
        assert pool.run(empty).outcome == "passed"


@pytest.mark.docker
def test_a_container_lost_under_the_pool_is_an_infrastructure_error_that_is_retried(pool):
    from rosa2.sandbox import Sandbox

    victim = pool._acquire()
    victim.remove(force=True)  # the engine loses a container between two evaluations
    pool._release(victim)
    retried = [pool.run("print(1)") for _ in range(pool.cfg.pool_size)]
    assert all(r.outcome == "passed" for r in retried) and max(r.attempts for r in retried) == 2

    with Sandbox(SandboxConfig(image=pool.cfg.image, pool_size=1, retries=0)) as fragile:
        container = fragile._acquire()
        container.remove(force=True)
        fragile._release(container)
        lost = CodeReward(PROBLEM, pool=fragile).score("    return a + b\n")
        assert (lost.outcome, lost.scored, lost.reward) == ("sandbox_error", False, -1.0)
        assert "sandbox failure after 1 attempts" in lost.error_text
        assert CodeReward(PROBLEM, pool=fragile).score("    return a + b\n").outcome == "passed"


@pytest.mark.docker
def test_parallel_evaluations_share_the_pool_safely(pool):
    responses = [f"    return a + b + {i % 2}\n" for i in range(8)]
    with ThreadPoolExecutor(max_workers=6) as workers:
        results = list(workers.map(lambda r: CodeReward(PROBLEM, pool=pool).score(r), responses))
    assert [r.outcome for r in results] == ["passed", "failed"] * 4
    batch = CodeReward(PROBLEM, pool=pool).score_many(responses[:4])
    assert [r.reward for r in batch] == [1.0, -1.0, 1.0, -1.0]
    assert len(pool.containers()) <= pool.cfg.pool_size


@pytest.mark.docker
def test_close_removes_every_container(sandbox_image):
    from rosa2.sandbox import Sandbox
    from rosa2.sandbox.client import OWNER_LABEL
    from rosa2.sandbox.image import docker_client

    client = docker_client()
    sandbox = Sandbox(SandboxConfig(image=sandbox_image, pool_size=2, timeout_s=2))
    sandbox.warm()
    sandbox.run("import time\ntime.sleep(10)")  # a recycle in flight when closing
    owned = lambda: client.containers.list(all=True, filters={"label": f"{OWNER_LABEL}={sandbox.owner}"})  # noqa: E731
    assert owned()
    sandbox.close()
    assert owned() == []


@pytest.mark.docker
def test_containers_of_a_killed_process_are_removed_by_the_next_pool(sandbox_image):
    from rosa2.sandbox import Sandbox
    from rosa2.sandbox.image import docker_client

    orphaning = (
        "import os\nfrom rosa2.sandbox import Sandbox\nfrom rosa2.config import SandboxConfig\n"
        f"pool = Sandbox(SandboxConfig(image={sandbox_image!r}, pool_size=1))\npool.warm()\n"
        "print(pool.containers()[0].id, flush=True)\nos._exit(0)  # no atexit, as after SIGKILL\n"
    )
    done = subprocess.run([sys.executable, "-c", orphaning], capture_output=True, text=True, timeout=120)
    orphan = done.stdout.strip()
    client = docker_client()
    assert orphan in _labelled(client)
    Sandbox(SandboxConfig(image=sandbox_image)).close()
    assert orphan not in _labelled(client)


def _labelled(client) -> set[str]:
    from rosa2.sandbox.image import LABEL

    return {c.id for c in client.containers.list(all=True, filters={"label": LABEL})}


def _rosa2(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rosa2", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.docker
def test_cli_build_run_and_check_leave_no_container(sandbox_image, tmp_path):
    from rosa2.sandbox.image import docker_client

    client = docker_client()
    before = _labelled(client)
    built = _rosa2("sandbox", "build")
    assert built.returncode == 0 and "exists" in built.stdout

    program = tmp_path / "add.py"
    program.write_text("def add(a, b):\n    print('adding')\n    return a + b\n")
    tests = tmp_path / "tests.py"
    tests.write_text(TESTS)
    run = _rosa2("sandbox", "run", str(program), "--tests", str(tests), "--entry-point", "add", "--json")
    evaluation = json.loads(run.stdout)
    assert run.returncode == 0 and evaluation["outcome"] == "passed" and len(evaluation["tests"]) == 3
    assert evaluation["output"].startswith("adding\n")

    program.write_text("def add(a, b)\n")
    bad = _rosa2("sandbox", "run", str(program))
    assert bad.returncode == 1 and bad.stdout.strip().splitlines()[-1].startswith("syntax_error")
    missing = _rosa2("sandbox", "run", str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "nope.py" in missing.stderr and "traceback" not in missing.stderr.lower()

    if HUMANEVAL.is_file():
        check = _rosa2("sandbox", "check", "--dataset", str(HUMANEVAL), "--limit", "4")
        assert check.returncode == 0 and check.stdout.strip().splitlines()[-1] == "4 passed, 0 failed"
        shuffled = _rosa2("sandbox", "check", "--dataset", str(HUMANEVAL), "--limit", "4", "--shuffle-tests")
        assert shuffled.returncode == 0 and shuffled.stdout.strip().splitlines()[-1] == "0 passed, 4 failed"
        assert "sandbox check" in check.stderr  # the progress bar goes to stderr
        not_code = _rosa2("sandbox", "check", "--dataset", str(HUMANEVAL.with_name("math500.jsonl")), "--limit", "2")
        assert not_code.returncode == 2 and "no canonical_solution" in not_code.stderr
    assert _labelled(client) <= before  # none added (a new pool may sweep stale ones of dead owners)


@pytest.mark.docker
def test_humaneval_canonical_solutions_pass_and_fail_other_tasks_tests(pool):
    if not HUMANEVAL.is_file():
        pytest.skip(f"{HUMANEVAL} is not here (../shared/data)")
    from rosa2.data import load_problems
    from rosa2.sandbox import check

    problems = load_problems(DataConfig(dataset=str(HUMANEVAL)))
    assert len(problems) == 164
    own = check.run(problems, pool)
    failures = [(p.id, r.outcome, r.error_text[:200]) for p, r in own if r.reward < 0]
    assert failures == []
    assert check.summary(own) == (164, 0)
    shuffled = check.run(problems, pool, shuffle_tests=True)
    passing = [p.id for p, r in shuffled if r.reward > 0]
    # wrong code may also loop or blow up on another task's inputs: any model outcome but passed
    outcomes = {r.outcome for _, r in shuffled}
    assert passing == [] and outcomes <= {"failed", "error", "timeout", "oom"} and "failed" in outcomes
