"""Process environment hygiene, applied once before any heavy import.

Every library we use has a side effect that is wrong for a nightly, offline, multi-user platform:
telemetry, price lists fetched from the internet, log folders in the current directory, state in
the user's home. This module is the one place that turns them off or points them under the
project home. Values the user already set win (``setdefault``), so all of it stays configurable.
"""

from __future__ import annotations

import os
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one we may not signal counts); a zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def home() -> Path:
    """The project home: ``$ROSA2_HOME``, else ``.rosa2/`` beside a source checkout.

    A checkout (``pyproject.toml`` beside the package) keeps everything inside itself; an
    installed wheel with no checkout uses ``$XDG_CACHE_HOME/rosa2`` (the user asked for the tool).
    """
    configured = os.environ.get("ROSA2_HOME")
    if configured:
        return Path(configured).expanduser().resolve()
    if (_SOURCE_ROOT / "pyproject.toml").is_file():
        return _SOURCE_ROOT / ".rosa2"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "rosa2"


def source_root() -> Path:
    """The checkout the package runs from (holds sandbox/, infra/, mlflow/)."""
    return _SOURCE_ROOT


def defaults(root: Path) -> dict[str, str]:
    """The environment variables we set when the user has not."""
    return {
        # telemetry off everywhere
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        # litellm (imported by textgrad and mlflow) fetches a price list at import otherwise;
        # offline that stalls mlflow server start-up for minutes
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        # mlflow server's job runner also hangs offline
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # state under the project home, never in ./ or ~/
        "TEXTGRAD_LOG_DIR": str(root / "logs" / "textgrad"),
        "PREFECT_HOME": str(root / "prefect"),
        "HF_DATASETS_CACHE": str(root / "cache" / "datasets"),
        "MPLCONFIGDIR": str(root / "cache" / "matplotlib"),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }


_applied = False


def apply() -> Path:
    """Apply the defaults once per process and create the folders they name. Returns the home."""
    global _applied
    root = home()
    if not _applied:
        for key, value in defaults(root).items():
            os.environ.setdefault(key, value)
        for key in ("TEXTGRAD_LOG_DIR", "PREFECT_HOME", "HF_DATASETS_CACHE", "MPLCONFIGDIR"):
            Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
        _applied = True
    return root
