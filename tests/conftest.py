"""Shared fixtures. Real parts only: a tiny random model built from a config for speed, the
embedded SmolLM2 for end-to-end; servers and Docker are started by the fixtures that need them."""

from __future__ import annotations

import pytest

import rosa2  # noqa: F401  - applies environment hygiene before any heavy import


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (converted once by infra/setup.sh)."""
    from rosa2 import models

    return models.load("embedded")


@pytest.fixture()
def tiny():
    """A fresh 2-layer random Llama with the embedded tokenizer (fast, deterministic)."""
    from rosa2 import models

    return models.tiny_random(seed=0)


@pytest.fixture(scope="session")
def sandbox_image() -> str:
    """The sandbox image name, built if missing; skips (with the reason) when no Docker engine answers."""
    from rosa2.config import SandboxConfig
    from rosa2.sandbox.image import SandboxError, build, docker_client

    image = SandboxConfig().image
    try:
        docker_client(timeout=10)
    except SandboxError as exc:
        pytest.skip(f"no Docker engine answers: {exc}")
    build(image, log=lambda line: None)  # nothing to do when infra/setup.sh built it
    return image


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def platform_servers(tmp_path_factory):
    """A real Prefect server and MLflow server on free loopback ports, SQLite under a tmp home,
    started and stopped by rosa2.stack (so the stack is under test too). Yields (tracking, home)."""
    from rosa2 import stack
    from rosa2.config import TrackingConfig

    home = tmp_path_factory.mktemp("stack-home")
    tracking = TrackingConfig(
        mlflow_uri=f"http://127.0.0.1:{free_port()}", prefect_api_url=f"http://127.0.0.1:{free_port()}/api", study="tests"
    )
    try:
        stack.up(tracking, stack.StackConfig(start_timeout_s=180), home=home)
        yield tracking, home
    finally:
        stack.down(tracking, home=home)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny random model saved as a local transformers directory (what `--model PATH` takes)."""
    from rosa2 import models

    path = tmp_path_factory.mktemp("tiny-model")
    tiny = models.tiny_random(seed=0)
    tiny.model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def platform(platform_servers, tiny_dir, tmp_path, monkeypatch):
    """In-process flows against the session's servers, with a fresh project home for results."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tracking, _ = platform_servers
    monkeypatch.setenv("ROSA2_HOME", str(tmp_path / "home"))
    with temporary_settings({PREFECT_API_URL: tracking.prefect_api_url}):
        yield tracking
