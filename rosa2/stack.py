"""The local stack: a Prefect server and an MLflow tracking server on loopback (docs/architecture.md).

Servers are started as subprocesses (this module imports neither library): each gets a log file
under ``<home>/logs``, a PID file under ``<home>/run`` and a health check; state lives under the
project home (SQLite by default, PostgreSQL when ``database_url`` names one). Ports and hosts come
from :class:`rosa2.config.TrackingConfig`, so the URLs the clients use and the servers we start
never disagree.

Security: the servers bind the host of their URL (127.0.0.1 by default). Binding anything beyond
loopback is refused unless team mode is on, which turns on MLflow's basic auth and Prefect's API
auth string (credentials from the environment variables the clients read anyway).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from rosa2 import env
from rosa2.config import ConfigError, TrackingConfig, _help
from rosa2.errors import Rosa2Error

SERVICES = ("prefect", "mlflow")
MLFLOW_AUTH_TEMPLATE = "basic_auth.ini"  # under <source>/mlflow/


class StackError(Rosa2Error):
    """A server did not start, stop or answer as expected; the message says which and where its log is."""


@dataclass
class StackConfig:
    """How ``rosa2 stack up`` runs the servers; where they listen comes from TrackingConfig."""

    database_url: str | None = _help(
        "PostgreSQL for both servers: 'team' (the local cluster of rosa2.team, started on demand) or "
        "postgresql://user:pass@host:port holding databases 'mlflow' and 'prefect' (better given as "
        "ROSA2_DATABASE_URL in the environment: a command line is readable by every user); default: SQLite under the home",
        default_factory=lambda: os.environ.get("ROSA2_DATABASE_URL") or None,
    )
    team: bool = _help(
        "Team mode: MLflow basic auth (MLFLOW_TRACKING_USERNAME/PASSWORD) and Prefect's API auth string "
        "(PREFECT_API_AUTH_STRING); required to listen beyond loopback",
        default=False,
    )
    start_timeout_s: float = _help("Seconds to wait for a server's health check after start", default=120.0)

    def __post_init__(self) -> None:
        if self.database_url not in (None, "team") and urlparse(self.database_url).scheme not in ("postgresql", "postgres"):
            raise ConfigError(
                f"database_url={redact(self.database_url)!r} is not allowed; expected 'team' or postgresql://user:pass@host:port "
                "(leave it unset for SQLite under the project home)"
            )
        if self.start_timeout_s <= 0:
            raise ConfigError(f"start_timeout_s={self.start_timeout_s!r} must be > 0")

    def postgres(self, database: str, driver: str = "postgresql") -> str | None:
        """The URL of one server's database on the configured PostgreSQL, or None for SQLite."""
        if self.database_url is None:
            return None
        if self.database_url == "team":
            from rosa2 import team

            return (team.current() or team.up()).url(database, driver)
        parsed = urlparse(self.database_url)
        return parsed._replace(scheme=driver, path="/" + database).geturl()


@dataclass
class Service:
    name: str
    url: str  # what clients use
    health_url: str
    host: str
    port: int
    home: Path  # the project home: data, logs and PID files live under it

    @property
    def pid_file(self) -> Path:
        return self.home / "run" / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return self.home / "logs" / f"{self.name}.log"


@dataclass
class ServiceStatus:
    name: str
    url: str
    healthy: bool
    pid: int | None  # a process we started and that is alive, else None
    log: Path
    detail: str = ""

    def line(self) -> str:
        state = "up" if self.healthy else "down"
        owner = f"pid {self.pid}" if self.pid else ("not started by rosa2" if self.healthy else "no process")
        return f"{self.name:8s} {state:5s} {self.url}  ({owner}; log {self.log}){'  ' + self.detail if self.detail else ''}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def services(tracking: TrackingConfig, home: Path | None = None) -> dict[str, Service]:
    """The two services at the URLs the clients will use, keeping their state under ``home``."""
    home = Path(home) if home is not None else env.home()
    out = {}
    for name, url, default_port, health in (
        ("prefect", tracking.prefect_api_url, 4200, "/health"),
        ("mlflow", tracking.mlflow_uri, 5000, "/health"),
    ):
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"{name} URL {url!r} is not allowed; expected http://HOST:PORT{'/api' if name == 'prefect' else ''}")
        out[name] = Service(name, url, url.rstrip("/") + health, parsed.hostname, parsed.port or default_port, home)
    return out


def _auth_header(name: str) -> dict[str, str]:
    """Client credentials the servers expect in team mode (the same variables the libraries read)."""
    if name == "mlflow" and os.environ.get("MLFLOW_TRACKING_USERNAME"):
        token = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        return {"Authorization": "Basic " + b64encode(token.encode()).decode()}
    if name == "prefect" and os.environ.get("PREFECT_API_AUTH_STRING"):
        return {"Authorization": "Basic " + b64encode(os.environ["PREFECT_API_AUTH_STRING"].encode()).decode()}
    return {}


def probe(service: Service, timeout: float = 3.0) -> str | None:
    """None when the health endpoint answers 2xx, else a short reason."""
    request = urllib.request.Request(service.health_url, headers=_auth_header(service.name))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - our own URL
            return None if response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except Exception as exc:  # noqa: BLE001 - refused, timeout, DNS: all mean "not answering"
        reason = getattr(exc, "reason", exc)
        return f"{type(exc).__name__}: {reason}"


def require(tracking: TrackingConfig, names: tuple[str, ...] = SERVICES) -> None:
    """Raise one error naming every server that does not answer, and how to start it."""
    svc = services(tracking)
    down = [f"{n} at {svc[n].url} ({reason})" for n in names if (reason := probe(svc[n])) is not None]
    if down:
        raise StackError(
            f"server not reachable: {'; '.join(down)}. Start the local stack with `rosa2 stack up` "
            "(or point MLFLOW_TRACKING_URI / PREFECT_API_URL at running servers)"
        )


def _read_pid(service: Service) -> dict | None:
    try:
        info = json.loads(service.pid_file.read_text())
    except (OSError, ValueError):
        return None
    return info if env.pid_alive(int(info["pid"])) else None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def _team_env(cfg: StackConfig, name: str, home: Path) -> dict[str, str]:
    if not cfg.team:
        return {}
    if name == "prefect":
        auth = os.environ.get("PREFECT_API_AUTH_STRING")
        if not auth or ":" not in auth:
            raise ConfigError("team mode needs PREFECT_API_AUTH_STRING='user:password' in the environment")
        return {"PREFECT_SERVER_API_AUTH_STRING": auth}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not user or not password:
        raise ConfigError("team mode needs MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment")
    # MLflow's auth app creates its admin from an ini file; we render it under the home (never commit
    # a password) from the template in mlflow/.
    template = (env.source_root() / "mlflow" / MLFLOW_AUTH_TEMPLATE).read_text()
    db = f"sqlite:///{home / 'mlflow' / 'auth.db'}"  # its own alembic history: never share the tracking DB
    rendered = template.format(admin_username=user, admin_password=password, database_uri=db)
    path = home / "mlflow" / "basic_auth.ini"
    write_private(path, rendered)
    return {"MLFLOW_AUTH_CONFIG_PATH": str(path), "MLFLOW_FLASK_SERVER_SECRET_KEY": _secret(home / "mlflow" / "flask_secret")}


def _secret(path: Path) -> str:
    """The auth app's CSRF key: the user's MLFLOW_FLASK_SERVER_SECRET_KEY, else one made once (mode 600)."""
    if os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    if not path.is_file():
        import secrets

        write_private(path, secrets.token_hex(32))
    return path.read_text().strip()


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 600 from the first byte, not chmod after the fact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)  # an older file made with a wider mode is narrowed too
        fh.write(text)


def _open_private_log(path: Path) -> int:
    """A server log, appended to, mode 600: a server may print what it was started with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return fd


_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


def redact(text: str) -> str:
    """``scheme://user:PASSWORD@host`` -> ``scheme://user:***@host`` (for anything we print or log)."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def command(name: str, service: Service, cfg: StackConfig) -> tuple[list[str], dict[str, str]]:
    """The server command line and its extra environment."""
    root = service.home
    bindir = Path(sys.executable).parent
    extra: dict[str, str] = {}
    if name == "mlflow":
        store = cfg.postgres("mlflow") or f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
        (root / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
        argv = [
            str(bindir / "mlflow"), "server",
            "--artifacts-destination", str(root / "mlflow" / "artifacts"),
            "--host", service.host, "--port", str(service.port),
            "--workers", "1",  # one worker: SQLite writers must not race
        ]
        if cfg.team:
            argv += ["--app-name", "basic-auth"]
        # the store URL holds the database password in team mode: the environment (readable by this
        # user only, /proc/PID/environ), never argv (world-readable /proc/PID/cmdline, ps, the PID file)
        extra["MLFLOW_BACKEND_STORE_URI"] = store
        # start-up hangs offline without these (ENVIRONMENT.md); rosa2.env sets them, repeat for safety
        extra.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", LITELLM_LOCAL_MODEL_COST_MAP="True")
    else:
        prefect_home = root / "prefect"
        prefect_home.mkdir(parents=True, exist_ok=True)
        db = cfg.postgres("prefect", "postgresql+asyncpg") or f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"
        argv = [str(bindir / "prefect"), "server", "start", "--host", service.host, "--port", str(service.port)]
        extra.update(
            PREFECT_HOME=str(prefect_home),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=db,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_API_URL=service.url,
        )
    extra.update(_team_env(cfg, name, root))
    return argv, extra


def _check_exposure(svc: dict[str, Service], cfg: StackConfig) -> None:
    exposed = [f"{s.name} on {s.host}" for s in svc.values() if not _is_loopback(s.host)]
    if exposed and not cfg.team:
        raise ConfigError(
            f"refusing to listen beyond loopback without auth ({', '.join(exposed)}); use 127.0.0.1 in the "
            "URLs or turn on team mode (--team) with MLFLOW_TRACKING_USERNAME/PASSWORD and PREFECT_API_AUTH_STRING set"
        )


def start(name: str, tracking: TrackingConfig, cfg: StackConfig, home: Path | None = None) -> ServiceStatus:
    """Start one server unless something healthy already answers at its URL; wait for its health check."""
    service = services(tracking, home)[name]
    log = service.log
    if probe(service) is None:
        info = _read_pid(service)
        return ServiceStatus(name, service.url, True, info and int(info["pid"]), log, "already running")
    if not _port_free(service.host, service.port):
        raise StackError(
            f"{name}: port {service.port} on {service.host} is taken by something that does not answer "
            f"{service.health_url}; stop it or choose another port in the URL"
        )
    argv, extra = command(name, service, cfg)
    log.parent.mkdir(parents=True, exist_ok=True)
    service.pid_file.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **extra}
    # a client URL in the server's environment would make `prefect server start` talk to itself
    child_env.pop("PREFECT_API_URL", None)
    with os.fdopen(_open_private_log(log), "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {redact(' '.join(argv))}\n".encode())
        out.flush()
        proc = subprocess.Popen(  # noqa: S603 - fixed argv
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=service.home,  # never the checkout: ./mlflow there must not shadow the library
            env=child_env, start_new_session=True,  # own process group: `down` stops the server and its workers
        )
    write_private(service.pid_file, json.dumps({"pid": proc.pid, "url": service.url, "argv": [redact(a) for a in argv], "started": time.time()}))
    deadline = time.monotonic() + cfg.start_timeout_s
    reason = probe(service)
    while reason is not None:
        if proc.poll() is not None:
            service.pid_file.unlink(missing_ok=True)
            raise StackError(f"{name} exited with code {proc.returncode} during start-up; see {log}")
        if time.monotonic() > deadline:
            stop(name, tracking, home=home)
            raise StackError(f"{name} did not pass its health check {service.health_url} in {cfg.start_timeout_s:.0f} s ({reason}); see {log}")
        time.sleep(0.5)
        reason = probe(service)
    return ServiceStatus(name, service.url, True, proc.pid, log, "started")


def stop(name: str, tracking: TrackingConfig, timeout: float = 20.0, home: Path | None = None) -> ServiceStatus:
    """Stop a server this stack started (by the PID in its PID file): SIGTERM its group, then SIGKILL."""
    service = services(tracking, home)[name]
    info = _read_pid(service)
    if info is None:
        service.pid_file.unlink(missing_ok=True)
        healthy = probe(service) is None
        detail = "answers, but was not started by rosa2: left alone" if healthy else "not running"
        return ServiceStatus(name, service.url, healthy, None, service.log, detail)
    pid = int(info["pid"])
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while env.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not env.pid_alive(pid):
            break
    service.pid_file.unlink(missing_ok=True)
    return ServiceStatus(name, service.url, False, None, service.log, f"stopped pid {pid}")


def status(tracking: TrackingConfig | None = None, home: Path | None = None) -> list[ServiceStatus]:
    tracking = tracking or TrackingConfig()
    out = []
    for name, service in services(tracking, home).items():
        info = _read_pid(service)
        reason = probe(service)
        out.append(ServiceStatus(name, service.url, reason is None, info and int(info["pid"]), service.log, reason or ""))
    return out


def up(tracking: TrackingConfig | None = None, cfg: StackConfig | None = None, home: Path | None = None) -> list[ServiceStatus]:
    """Start both servers (Prefect first: its first start runs migrations, ~12 s)."""
    tracking, cfg = tracking or TrackingConfig(), cfg or StackConfig()
    _check_exposure(services(tracking, home), cfg)
    return [start(name, tracking, cfg, home) for name in SERVICES]


def down(tracking: TrackingConfig | None = None, home: Path | None = None) -> list[ServiceStatus]:
    tracking = tracking or TrackingConfig()
    return [stop(name, tracking, home=home) for name in SERVICES]
