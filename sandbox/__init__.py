"""The sandbox for model-written code (sandbox/README.md): image build, warm container pool, harness.

``Sandbox(cfg).run(program, tests, entry_point) -> Evaluation`` runs one program in a fresh
process, under a uid of its own, inside a hardened container, and its tests in another process it
cannot reach (sandbox/README.md, threat model); ``shared(cfg)`` gives the process-wide pool the
code reward uses (the ``rosa2.code_runners:docker`` entry point: the core's reward finds it there
and never imports this package); ``image.build(name)`` makes the image from the Dockerfile or from
Debian packages. Docker (docker-py) is imported only when a pool or a build is made. Installed as
``rosa2.sandbox`` (pyproject maps the repository's sandbox/ folder).
"""

from rosa2.sandbox.client import OUTCOMES, Evaluation, Sandbox, SandboxInfraError, leftover_containers, shared
from rosa2.sandbox.image import SandboxError, build

__all__ = [
    "OUTCOMES", "Evaluation", "Sandbox", "SandboxError", "SandboxInfraError", "build", "leftover_containers", "shared",
]
