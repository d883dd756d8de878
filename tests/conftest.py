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
    from sandbox.image import SandboxError, build, docker_client

    image = SandboxConfig().image
    try:
        docker_client(timeout=10)
    except SandboxError as exc:
        pytest.skip(f"no Docker engine answers: {exc}")
    build(image, log=lambda line: None)  # nothing to do when infra/setup.sh built it
    return image
