"""``rosa2 worker start``: one Prefect worker of a work pool, pinned to one GPU (docs/architecture.md).

The worker is Prefect's own process worker; this command only fixes what a GPU host needs:
``CUDA_VISIBLE_DEVICES`` so every cell it starts sees only its GPU, ``--limit`` = how many cells
fit on that GPU at once, flow-run heartbeats so a lost worker's cell is retried elsewhere, and the
server URLs the cells report to.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

from rosa2.config import ConfigError, TrackingConfig, add_arguments, from_args

HEARTBEAT_S = 30  # Prefect's minimum; flows/scaleout.py's lost_after_s must exceed it


def worker_env(tracking: TrackingConfig, name: str, gpu: str | None) -> dict[str, str]:
    """The environment of the worker and so of every cell it runs."""
    extra = {
        "PREFECT_API_URL": tracking.prefect_api_url,
        "MLFLOW_TRACKING_URI": tracking.mlflow_uri,
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
        "ROSA2_WORKER": name,
    }
    if gpu is not None:
        extra["CUDA_VISIBLE_DEVICES"] = gpu
    return extra


def worker_argv(pool: str, name: str, slots: int) -> list[str]:
    prefect = Path(sys.executable).parent / "prefect"
    exe = str(prefect) if prefect.exists() else (shutil.which("prefect") or "prefect")
    return [exe, "worker", "start", "--pool", pool, "--type", "process", "--name", name, "--limit", str(slots)]


def cmd(args: argparse.Namespace) -> int:
    gpu = args.gpu
    if gpu is not None and not all(part.isdigit() for part in gpu.split(",")):
        raise ConfigError(f"--gpu={gpu!r} is not allowed; expected a GPU index such as 0 (or a list such as 0,1)")
    if args.slots < 1:
        raise ConfigError(f"--slots={args.slots!r} must be >= 1 (cells that fit on the GPU at once)")
    name = args.name or f"{socket.gethostname()}-{'gpu' + gpu.replace(',', '+') if gpu is not None else 'cpu'}"
    tracking = from_args(TrackingConfig, args)
    argv = worker_argv(args.pool, name, args.slots)
    print(f"rosa2 worker {name}: pool {args.pool}, {args.slots} cell(s) at once"
          f"{', CUDA_VISIBLE_DEVICES=' + gpu if gpu is not None else ', no GPU'}, API {tracking.prefect_api_url}", flush=True)
    os.execvpe(argv[0], argv, {**os.environ, **worker_env(tracking, name, gpu)})
    return 0  # not reached: exec replaces this process


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start"], help="start a worker in the foreground")
    parser.add_argument("--pool", default="rosa2-gpu", help="Prefect work pool to poll (default: 'rosa2-gpu')")
    parser.add_argument("--gpu", default=None, help="GPU index this worker owns (sets CUDA_VISIBLE_DEVICES); omit on CPU hosts")
    parser.add_argument("--slots", type=int, default=1,
                        help="cells run at once on this GPU (default 1: a GPU never runs two sessions that do not fit)")
    parser.add_argument("--name", default=None, help="worker name (default: HOST-gpuN)")
    add_arguments(parser, TrackingConfig, skip=("study", "adapters"))
    parser.set_defaults(func=cmd)
