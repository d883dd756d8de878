"""A team's database on one machine: a Debian PostgreSQL cluster under the project home.

Team mode (docs/architecture.md) puts Prefect server and MLflow on PostgreSQL instead of SQLite, so that
several workers (one per GPU) can share one orchestration and tracking database. This module
makes that database with Debian's own binaries (``initdb`` / ``pg_ctl``), listening on 127.0.0.1
only, with one database for MLflow and one for Prefect, owned by a password-protected role.

PostgreSQL refuses to run as root; as root the cluster is owned by the ``postgres`` system user
(``runuser -u postgres``), otherwise by the calling user. Nothing here imports Prefect or MLflow.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from rosa2 import env
from rosa2.errors import Rosa2Error

DEFAULT_PORT = 5433  # 5432 is usually a system cluster's
ROLE = "rosa2"
DATABASES = ("mlflow", "prefect")


class TeamError(Rosa2Error):
    """The team database cannot be created, started or reached."""


@dataclass(frozen=True)
class TeamDatabase:
    """Where the cluster lives and how servers connect to it (loopback, password auth)."""

    root: Path  # <home>/team/postgres: data/, run/ (socket), postgres.log
    port: int
    password: str = field(repr=False)

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def mlflow_uri(self) -> str:
        """MLflow's backend store (SQLAlchemy 2.1 reads postgresql:// as psycopg 3)."""
        return self.url("mlflow")

    @property
    def prefect_url(self) -> str:
        """``PREFECT_API_DATABASE_CONNECTION_URL`` (Prefect's server talks asyncpg)."""
        return self.url("prefect", "postgresql+asyncpg")


def team_root(home: Path | None = None) -> Path:
    return (home or env.home()) / "team" / "postgres"


def _bindir() -> Path:
    """Debian keeps server binaries in /usr/lib/postgresql/<major>/bin, not on PATH."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    majors = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if not majors:
        raise TeamError(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; install them with "
            "`apt-get install postgresql` (infra/setup.sh does this as root)"
        )
    return Path(majors[-1])


def _owner() -> str | None:
    """The system user that owns the cluster: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise TeamError("running as root needs the 'postgres' system user (apt-get install postgresql)") from exc
    return "postgres"


def _run(args: list[str], *, check: bool = True, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    owner = _owner()
    cmd = (["runuser", "-u", owner, "--"] if owner else []) + args
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **(env_extra or {})}, cwd="/"
    )
    if check and proc.returncode != 0:
        raise TeamError(f"`{' '.join(args)}` failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


def _chown(path: Path) -> None:
    owner = _owner()
    if owner:
        entry = pwd.getpwnam(owner)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _password(root: Path) -> str:
    """The role's password, made once and kept beside the cluster (mode 0600, our user only)."""
    path = root.parent / "postgres.password"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(18))
    return path.read_text().strip()


def _private(*paths: Path) -> None:
    """Mode 600 for files that hold, or may one day print, a secret (the password, the server log)."""
    for path in paths:
        if path.is_file():
            path.chmod(0o600)


def _check_reachable(root: Path) -> None:
    """The cluster owner (``postgres`` when we are root) must be able to reach the project home."""
    if _owner() is None:
        return
    for parent in root.parents:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise TeamError(
                f"the 'postgres' user cannot enter {parent} (mode {oct(parent.stat().st_mode & 0o777)}), which holds "
                f"the team database {root}; run `chmod o+x {parent}` or set ROSA2_HOME to a directory it can reach"
            )


def _initdb(root: Path, password: str) -> None:
    data = root / "data"
    _check_reachable(root)
    root.mkdir(parents=True, exist_ok=True)
    _chown(root)
    pwfile = root / ".initdb-pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as fh:
        fh.write(password)
    _chown(pwfile)
    try:
        # host connections need the password; the local socket (in root/run, owner-only) is trusted
        _run([
            str(_bindir() / "initdb"), "-D", str(data), "-U", ROLE, f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-instructions",
        ])
    finally:
        pwfile.unlink(missing_ok=True)


def _running(root: Path) -> bool:
    if not (root / "data" / "PG_VERSION").is_file():
        return False
    return _run([str(_bindir() / "pg_ctl"), "-D", str(root / "data"), "status"], check=False).returncode == 0


def _psql(db: TeamDatabase, sql: str) -> str:
    # over TCP with the password, so the caller needs no socket access
    proc = subprocess.run(
        [str(_bindir() / "psql"), "-h", "127.0.0.1", "-p", str(db.port), "-U", ROLE, "-d", "postgres", "-tAc", sql],
        capture_output=True, text=True, env={**os.environ, "PGPASSWORD": db.password},
    )
    if proc.returncode != 0:
        raise TeamError(f"psql on 127.0.0.1:{db.port} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def up(port: int = DEFAULT_PORT, home: Path | None = None, timeout_s: float = 60.0) -> TeamDatabase:
    """Create (once) and start the cluster on 127.0.0.1:``port``; create the mlflow and prefect
    databases. Idempotent: a running cluster is left as it is."""
    if not 1024 <= port <= 65535:
        raise TeamError(f"port={port!r} is not allowed; expected 1024..65535")
    root = team_root(home)
    db = TeamDatabase(root=root, port=port, password=_password(root))
    if not (root / "data" / "PG_VERSION").is_file():
        _initdb(root, db.password)
    if not _running(root):
        run_dir = root / "run"
        run_dir.mkdir(exist_ok=True)
        _chown(run_dir)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {run_dir}"
        proc = _run(
            [str(_bindir() / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "postgres.log"),
             "-o", options, "-w", "-t", str(int(timeout_s)), "start"],
            check=False,
        )
        if proc.returncode != 0:
            raise TeamError(
                f"PostgreSQL did not start on 127.0.0.1:{port}: {proc.stderr.strip()[-400:]}; "
                f"see {root / 'postgres.log'} (is the port taken?)"
            )
    (root.parent / "postgres.port").write_text(str(port))
    _private(root.parent / "postgres.password", root / "postgres.log")
    for name in DATABASES:
        if _psql(db, f"SELECT 1 FROM pg_database WHERE datname = '{name}'") != "1":
            _psql(db, f"CREATE DATABASE {name} OWNER {ROLE}")
    return db


def current(home: Path | None = None) -> TeamDatabase | None:
    """The cluster ``up`` made, if it is running; None otherwise."""
    root = team_root(home)
    port_file = root.parent / "postgres.port"
    if not port_file.is_file() or not _running(root):
        return None
    return TeamDatabase(root=root, port=int(port_file.read_text()), password=_password(root))


def down(home: Path | None = None) -> bool:
    """Stop the cluster (data kept). Returns whether one was running."""
    root = team_root(home)
    if not _running(root):
        return False
    _run([str(_bindir() / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w", "stop"])
    return True

