"""The sandbox image: from the Dockerfile where a registry answers, else from Debian packages alone.

Both give the same shape: ``python3`` on PATH, user 65534 (nobody), workdir ``/tmp``, a
``sleep infinity`` command, and the label ``rosa2.sandbox``. The pool (sandbox/client.py) starts
its containers as uid 0 with the harness's zygote as the command instead, and only the SETUID and
SETGID capabilities; the image's own defaults are the safe ones for anyone running it by hand.
The air-gapped path runs ``debootstrap --variant=minbase --include=python3`` and pipes the root
file system into ``docker import``; the rootfs tarball is cached under the project home so a
``--force`` rebuild does not download the packages again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from rosa2 import env
from rosa2.errors import Rosa2Error

LABEL = "rosa2.sandbox"
SUITE = "bookworm"
METHODS = ("auto", "dockerfile", "debian")
# Registry probe: any HTTP answer (401 is the normal one) means pulls can work.
REGISTRY_PROBE = "https://registry-1.docker.io/v2/"
# `docker import` takes the image configuration as Dockerfile instructions.
IMPORT_CHANGES = [
    f'LABEL {LABEL}="1"',
    "USER 65534:65534",
    "WORKDIR /tmp",
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV PYTHONDONTWRITEBYTECODE=1",
    "ENV PYTHONUNBUFFERED=1",
    'CMD ["sleep", "infinity"]',
]


class SandboxError(Rosa2Error):
    """The sandbox cannot run here: no engine, no image, a failed build. The message says the fix."""


def docker_client(timeout: float = 30.0) -> Any:
    """A docker-py client that has answered a ping, or a SandboxError that says what to do."""
    try:
        import docker

        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine answers"
        raise SandboxError(
            f"no Docker engine answers ({type(exc).__name__}: {exc}); start one (as root: "
            "`bash infra/setup.sh`, or `dockerd --bridge=none --iptables=false &`) or set DOCKER_HOST"
        ) from exc


def image_exists(client: Any, image: str) -> bool:
    import docker.errors

    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False


def registry_reachable(url: str = REGISTRY_PROBE, timeout: float = 3.0) -> bool:
    """True when a container registry answers within ``timeout`` (an HTTP error still answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 - fixed https URL
            return True
    except urllib.error.HTTPError:
        return True
    except Exception:  # noqa: BLE001 - unreachable, refused, DNS failure, TLS failure
        return False


def rootfs_tarball(suite: str = SUITE) -> Path:
    """Where the debootstrapped root file system is cached (under the project home)."""
    return env.home() / "cache" / "sandbox" / f"{suite}-minbase-python3.tar"


def _split(image: str) -> tuple[str, str]:
    repo, _, tag = image.rpartition(":")
    if not repo or "/" in tag:  # "name" or "host:5000/name" without a tag
        return image, "latest"
    return repo, tag


def build_from_dockerfile(client: Any, image: str, log: Callable[[str], None] = print) -> None:
    import docker.errors

    context = Path(__file__).resolve().parent
    log(f"building {image} from {context / 'Dockerfile'}")
    try:
        client.images.build(path=str(context), tag=image, rm=True, forcerm=True, pull=True)
    except (docker.errors.BuildError, docker.errors.APIError) as exc:
        raise SandboxError(f"docker build of {image} failed: {exc}") from exc


def debootstrap_rootfs(suite: str = SUITE, mirror: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Run debootstrap once and cache the root file system as a tarball; return its path."""
    tarball = rootfs_tarball(suite)
    if tarball.is_file():
        log(f"using cached root file system {tarball}")
        return tarball
    if os.geteuid() != 0:
        raise SandboxError("building the sandbox image from Debian packages needs root (debootstrap); run `sudo rosa2 sandbox build`")
    if not shutil.which("debootstrap"):
        raise SandboxError("debootstrap is not installed; run `apt-get install -y debootstrap` (or `bash infra/setup.sh`)")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rosa2-rootfs-", dir=tarball.parent) as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", "--variant=minbase", "--include=python3", suite, str(rootfs)]
        if mirror:
            cmd.append(mirror)
        log("running " + " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            raise SandboxError(f"debootstrap failed (exit {done.returncode}): " + " | ".join(tail))
        # Written beside the final path and renamed: a half-written tarball is never "cached".
        partial = tarball.with_suffix(".tar.partial")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
        partial.replace(tarball)
    return tarball


def build_from_debian(client: Any, image: str, mirror: str | None = None, log: Callable[[str], None] = print) -> None:
    tarball = debootstrap_rootfs(mirror=mirror, log=log)
    repo, tag = _split(image)
    log(f"importing {tarball} as {image}")
    client.api.import_image_from_file(str(tarball), repository=repo, tag=tag, changes=IMPORT_CHANGES)
    if not image_exists(client, image):
        raise SandboxError(f"docker import of {tarball} did not produce {image}")


def build(image: str, *, force: bool = False, method: str = "auto", log: Callable[[str], None] = print) -> str:
    """Make sure ``image`` exists; return what was done: 'exists', 'dockerfile' or 'debian'.

    Idempotent: nothing happens when the image exists, unless ``force``. ``method='auto'`` tries
    the Dockerfile only when a registry answers quickly, since a pull on an air-gapped host
    otherwise waits for a long network timeout before failing.
    """
    if method not in METHODS:
        raise SandboxError(f"build method {method!r} is not allowed; expected one of {list(METHODS)}")
    client = docker_client(timeout=600)
    previous = client.images.get(image).id if image_exists(client, image) else None
    if previous and not force:
        log(f"{image} exists (use --force to rebuild)")
        return "exists"
    if method == "auto":
        method = "dockerfile" if registry_reachable() else "debian"
        log(f"registry {'answers' if method == 'dockerfile' else 'does not answer'}: building with {method}")
    if method == "dockerfile":
        build_from_dockerfile(client, image, log=log)
    else:
        build_from_debian(client, image, log=log)
    if previous and previous != client.images.get(image).id:
        _remove_unused(client, previous, log)
    return method


def _remove_unused(client: Any, image_id: str, log: Callable[[str], None]) -> None:
    """Drop the image a rebuild replaced, unless a container still runs from it."""
    import docker.errors

    try:
        client.images.remove(image_id)
        log(f"removed the replaced image {image_id[:19]}")
    except docker.errors.APIError as exc:
        log(f"kept the replaced image {image_id[:19]} ({exc.explanation or exc})")
