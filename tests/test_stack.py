"""The local stack: servers on loopback with PID files, logs and health checks; team-mode auth;
never listening beyond loopback without it."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rosa2 import stack
from rosa2.config import ConfigError, TrackingConfig

ROOT = Path(__file__).resolve().parents[1]


def test_up_servers_have_pid_files_logs_and_answer_health_checks(platform_servers):
    tracking, home = platform_servers
    rows = {row.name: row for row in stack.status(tracking, home)}
    for name in ("prefect", "mlflow"):
        row = rows[name]
        assert row.healthy and row.pid, row.line()
        assert (home / "run" / f"{name}.pid").is_file() and row.log.is_file()
        assert os.path.exists(f"/proc/{row.pid}")
    # SQLite under the home, not in the checkout or ~
    assert (home / "mlflow" / "mlflow.db").is_file() and (home / "prefect" / "prefect.db").is_file()
    # `up` again is a no-op that says so
    again = stack.up(tracking, home=home)
    assert all(r.detail == "already running" for r in again)


def test_stack_status_cli_prints_both_servers(platform_servers):
    tracking, home = platform_servers
    env = {**os.environ, "ROSA2_HOME": str(home), "MLFLOW_TRACKING_URI": tracking.mlflow_uri, "PREFECT_API_URL": tracking.prefect_api_url}
    out = subprocess.run([sys.executable, "-m", "rosa2", "stack", "status"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"prefect  up    {tracking.prefect_api_url}" in out.stdout and f"mlflow   up    {tracking.mlflow_uri}" in out.stdout


def test_refuses_to_listen_beyond_loopback_without_team_mode(tmp_path):
    tracking = TrackingConfig(mlflow_uri="http://0.0.0.0:5999", prefect_api_url="http://127.0.0.1:4999/api")
    with pytest.raises(ConfigError, match="refusing to listen beyond loopback without auth .*mlflow on 0.0.0.0"):
        stack.up(tracking, home=tmp_path)


def test_bad_database_url_and_url_are_named():
    with pytest.raises(ConfigError, match="database_url='mysql://x' is not allowed"):
        stack.StackConfig(database_url="mysql://x")
    with pytest.raises(ConfigError, match="mlflow URL 'ftp://h' is not allowed"):
        stack.services(TrackingConfig(mlflow_uri="ftp://h"))
    cfg = stack.StackConfig(database_url="postgresql://u:p@db:5432")
    assert cfg.postgres("prefect", "postgresql+asyncpg") == "postgresql+asyncpg://u:p@db:5432/prefect"


def test_team_mode_prefect_gets_the_auth_string_and_needs_it(tmp_path, monkeypatch):
    service = stack.services(TrackingConfig(), tmp_path)["prefect"]
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    with pytest.raises(ConfigError, match="PREFECT_API_AUTH_STRING"):
        stack.command("prefect", service, stack.StackConfig(team=True))
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:s3cret")
    _, extra = stack.command("prefect", service, stack.StackConfig(team=True))
    assert extra["PREFECT_SERVER_API_AUTH_STRING"] == "admin:s3cret"


def test_team_mode_mlflow_requires_basic_auth(tmp_path, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-long-s3cret-pw")
    tracking = TrackingConfig(mlflow_uri=f"http://127.0.0.1:{free_port()}")
    status = stack.start("mlflow", tracking, stack.StackConfig(team=True, start_timeout_s=180), home=tmp_path)
    try:
        assert status.healthy
        ini = tmp_path / "mlflow" / "basic_auth.ini"
        assert oct(ini.stat().st_mode & 0o777) == "0o600"
        url = tracking.mlflow_uri + "/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(url, timeout=10)
        assert denied.value.code == 401
        token = base64.b64encode(b"admin:a-long-s3cret-pw").decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=10) as ok:
            assert ok.status == 200
    finally:
        stopped = stack.stop("mlflow", tracking, home=tmp_path)
    assert not stopped.healthy and not (tmp_path / "run" / "mlflow.pid").exists()


def _descendants(root_pid: int) -> list[int]:
    """root_pid and every process below it (servers fork workers: uvicorn, gunicorn, huey)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


@pytest.mark.slow
def test_team_mode_keeps_every_secret_out_of_argv_logs_and_pid_files(monkeypatch):
    """17.3: PostgreSQL password, MLflow admin password and Prefect auth string never reach a
    command line (/proc/PID/cmdline of the servers and all their workers), a log or a PID file;
    every file under the home that holds one is mode 600."""
    import shutil
    import tempfile

    from conftest import free_port
    from rosa2 import team

    # not under pytest's tmp (mode 0700): the 'postgres' user runs the cluster and must reach it
    home = Path(tempfile.mkdtemp(prefix="rosa2-secrets-"))
    home.chmod(0o755)
    monkeypatch.setenv("ROSA2_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-Pw-7f3a9c")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:prefect-Pw-b81d2e")
    tracking = TrackingConfig(mlflow_uri=f"http://127.0.0.1:{free_port()}", prefect_api_url=f"http://127.0.0.1:{free_port()}/api")
    db = team.up(port=free_port(), home=home)
    try:
        rows = stack.up(tracking, stack.StackConfig(database_url="team", team=True, start_timeout_s=240), home=home)
        assert all(r.healthy and r.pid for r in rows), [r.line() for r in rows]
        secrets = {"postgres": db.password, "mlflow": "mlflow-Pw-7f3a9c", "prefect": "prefect-Pw-b81d2e"}
        assert len(db.password) >= 16
        # the MLflow server really is on PostgreSQL with that password (else the check proves nothing)
        assert db.url("mlflow") in (Path(f"/proc/{rows[1].pid}/environ").read_bytes().decode(errors="replace"))

        time.sleep(3)  # let the servers fork their workers
        for row in rows:
            pids = _descendants(row.pid)
            assert len(pids) >= 1
            for pid in pids:
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue  # ended meanwhile
                for name, secret in secrets.items():
                    assert secret not in argv, f"{name} secret in the argv of pid {pid} ({row.name}): {argv[:200]}"

        holders = []
        for path in home.rglob("*"):
            if not path.is_file() or "data" in path.relative_to(home).parts:  # the cluster's own files (0700)
                continue
            text = path.read_bytes().decode(errors="replace")
            found = [name for name, secret in secrets.items() if secret in text]
            relative = path.relative_to(home)
            if relative.parts[0] in ("logs", "run") or path.name.endswith((".log", ".pid")):
                assert not found, f"{found} secret in {relative}"
                assert path.stat().st_mode & 0o077 == 0, f"{relative} is mode {oct(path.stat().st_mode & 0o777)}"
            if found:
                holders.append(str(relative))
                assert path.stat().st_mode & 0o777 == 0o600, f"{relative} holds {found} with mode {oct(path.stat().st_mode & 0o777)}"
        assert "team/postgres.password" in holders and "mlflow/basic_auth.ini" in holders
        assert {"logs/mlflow.log", "logs/prefect.log", "run/mlflow.pid", "run/prefect.pid"} <= {
            str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()
        }
    finally:
        stack.down(tracking, home=home)
        team.down(home=home)
        shutil.rmtree(home, ignore_errors=True)
