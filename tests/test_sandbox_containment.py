"""Hostile programs in the sandbox. Each must be contained, get the right outcome, and leave the
pool working: the next evaluation passes, and no container or process of it is left behind (every
container the pool holds runs only its init, the harness's zygote, and none exists outside the pool).

Probes that check a property from inside the container are written as a program plus a
``check(candidate)`` test, so a breach shows up as a failed test with what the probe saw."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest

from rosa2.config import SandboxConfig

pytestmark = pytest.mark.docker
TIMEOUT_S = 3.0
MEMORY_MB = 128


@pytest.fixture(scope="module")
def pool(sandbox_image):
    from rosa2.sandbox import Sandbox

    cfg = SandboxConfig(image=sandbox_image, pool_size=2, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB, pids_limit=32, tmpfs_mb=16, output_limit_bytes=64 * 1024)
    with Sandbox(cfg) as sandbox:
        sandbox.warm()
        yield sandbox


@pytest.fixture()
def contained(pool):
    """Runs one hostile evaluation, then checks that the pool is clean and still works."""
    from rosa2.sandbox.client import OWNER_LABEL

    def run(program: str, tests: str | None = None, entry_point: str | None = None):
        start = time.monotonic()
        evaluation = pool.run(program, tests, entry_point)
        elapsed = time.monotonic() - start
        assert elapsed < TIMEOUT_S + 10, f"the evaluation took {elapsed:.1f} s"
        pool.settle()
        after = pool.run("print('next')")
        assert (after.outcome, after.output) == ("passed", "next\n"), after
        pool.settle()
        held = {c.id for c in pool.containers()}
        owned = pool._client.containers.list(all=True, filters={"label": f"{OWNER_LABEL}={pool.owner}"})
        assert {c.id for c in owned} == held and len(held) <= pool.cfg.pool_size
        for container in owned:
            processes = container.top()["Processes"]
            assert len(processes) == 1 and processes[0][-1].endswith("--zygote"), processes
        return evaluation

    return run


def test_fork_bomb_hits_the_pids_limit_and_times_out(contained):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    evaluation = contained(bomb)
    assert evaluation.outcome == "timeout" and evaluation.recycled


def test_fork_bomb_cannot_exceed_the_pids_limit(contained):
    # Counts how many processes it could start before fork failed, then reports it.
    probe = (
        "import os, time\n"
        "def forks():\n"
        "    children = []\n"
        "    while True:\n"
        "        try:\n"
        "            pid = os.fork()\n"
        "        except OSError:\n"
        "            break\n"
        "        if pid == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        children.append(pid)\n"
        "    for pid in children:\n"
        "        os.kill(pid, 9)\n"
        "        os.waitpid(pid, 0)\n"
        "    return len(children)\n"
    )
    evaluation = contained(probe, "def check(candidate):\n    assert candidate() < 32\n", "forks")
    assert evaluation.outcome == "passed", evaluation.error_text


def test_memory_hog_is_killed_as_oom(contained):
    hog = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 2**20))\n"
    evaluation = contained(hog)
    assert evaluation.outcome == "oom" and evaluation.recycled and f"{MEMORY_MB} MB" in evaluation.error_text


def test_infinite_loop_times_out(contained):
    start = time.monotonic()
    evaluation = contained("while True:\n    pass\n")
    assert evaluation.outcome == "timeout" and evaluation.recycled
    assert TIMEOUT_S <= evaluation.seconds < TIMEOUT_S + 2 and time.monotonic() - start >= TIMEOUT_S


def test_sleep_past_the_limit_times_out(contained):
    evaluation = contained("import time\ntime.sleep(600)\n")
    assert evaluation.outcome == "timeout" and "killed" in evaluation.error_text


def test_nothing_outside_the_tmpfs_is_writable_and_the_tmpfs_is_bounded(contained):
    # /tmp and /dev/shm are the writable scratch (bounded, emptied before each evaluation)
    probe = (
        "import os\n"
        "def writable():\n"
        "    found = []\n"
        "    for folder in ['/', '/etc', '/usr', '/usr/lib', '/var', '/var/tmp', '/root', '/home', '/opt', '/bin', '/dev', '/run', '/proc/sys/kernel']:\n"
        "        try:\n"
        "            with open(os.path.join(folder, 'escape.txt'), 'w') as f:\n"
        "                f.write('x')\n"
        "            found.append(folder)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return found\n"
        "def fills(folder):\n"
        "    with open(folder + '/fill', 'wb') as f:\n"
        "        try:\n"
        "            for _ in range(64):\n"
        "                f.write(b'x' * 2**20)\n"
        "                f.flush()\n"
        "        except OSError as exc:\n"
        "            return exc.errno\n"
        "    return 0\n"
    )
    tests = (
        "import errno\ndef check(candidate):\n    assert candidate() == []\n"
        "    assert fills('/tmp') == errno.ENOSPC\n    assert fills('/dev/shm') == errno.ENOSPC\n"
    )
    evaluation = contained(probe, tests, "writable")
    assert evaluation.outcome == "passed", evaluation.error_text
    assert not Path("/escape.txt").exists() and not Path("/etc/escape.txt").exists()


def test_host_files_are_not_visible(contained, tmp_path):
    secret = tmp_path / f"host-secret-{uuid.uuid4().hex}"
    secret.write_text("host only")
    checkout = Path(__file__).resolve().parents[1]
    paths = [str(secret), str(checkout / "pyproject.toml"), str(checkout), "/var/run/docker.sock", "/run/docker.sock", "/work", "/root/.docker"]
    probe = (
        "import os\n"
        f"PATHS = {paths!r}\n"
        "def visible():\n"
        "    return [p for p in PATHS if os.path.exists(p)]\n"
        "def init():\n"
        "    return open('/proc/1/cmdline', 'rb').read().split(b'\\0')[-2].decode()\n"
    )
    tests = f"def check(candidate):\n    assert candidate() == []\n    assert init() == '--zygote'\n    assert open('/etc/hostname').read().strip() != {socket.gethostname()!r}\n"
    evaluation = contained(probe, tests, "visible")
    assert evaluation.outcome == "passed", evaluation.error_text


def test_only_loopback_exists_inside(contained):
    # Inspected, never used: no packet is sent anywhere.
    probe = (
        "import socket\n"
        "def interfaces():\n"
        "    return sorted(name for _, name in socket.if_nameindex())\n"
        "def dev_lines():\n"
        "    return sorted(line.split(':')[0].strip() for line in open('/proc/net/dev').read().splitlines()[2:])\n"
        "def routes():\n"
        "    return open('/proc/net/route').read().splitlines()[1:]\n"
    )
    tests = "def check(candidate):\n    assert candidate() == ['lo']\n    assert dev_lines() == ['lo']\n    assert routes() == []\n"
    evaluation = contained(probe, tests, "interfaces")
    assert evaluation.outcome == "passed", evaluation.error_text


def test_megabytes_of_output_are_capped(contained, pool):
    evaluation = contained("import sys\nfor _ in range(200):\n    sys.stdout.write('y' * 50_000 + '\\n')\nprint('done', file=sys.stderr)\n")
    assert evaluation.outcome == "passed" and evaluation.output_truncated
    assert len(evaluation.output.encode()) == pool.cfg.output_limit_bytes and set(evaluation.output) <= {"y", "\n"}


def test_a_child_left_running_gets_the_container_recycled(contained):
    orphan = (
        "import subprocess\n"
        "subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "subprocess.Popen(['sh', '-c', 'sleep 300 &'])\n"
        "def f():\n"
        "    return 1\n"
    )
    evaluation = contained(orphan, "def check(candidate):\n    assert candidate() == 1\n", "f")
    assert evaluation.outcome == "passed" and evaluation.recycled and evaluation.leftover_processes >= 1


def test_killing_its_own_parent_is_refused(contained):
    # The parent is the harness's warden (uid 0): another uid, no capability, so no signal reaches it.
    evaluation = contained("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    assert evaluation.outcome == "error" and "PermissionError" in evaluation.error_text and not evaluation.recycled


def test_a_child_killing_the_harness_and_init_is_contained(contained):
    # The child kills its parent (the harness); the container's init ignores signals from inside.
    program = (
        "import subprocess, sys\n"
        "subprocess.run([sys.executable, '-c', 'import os, signal\\n"
        "try:\\n    os.kill(1, signal.SIGKILL)\\nexcept OSError:\\n    pass\\n"
        "os.kill(os.getppid(), signal.SIGKILL)'])\n"
        "print('parent survived')\n"
    )
    evaluation = contained(program)
    assert evaluation.outcome == "error" and "parent survived" not in evaluation.output
