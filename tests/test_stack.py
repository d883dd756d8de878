"""The local stack: servers on loopback with PID files, logs and health checks; team-mode auth;
never listening beyond loopback without it."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
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
