"""Prefect tasks around the rosa2 core (docs/architecture.md): prepare dataset, run sessions, evaluate code,
aggregate, log. ``rosa2.tasks.tracking`` is the one module that imports MLflow; ``rosa2.tasks.cells`` holds
the cell keys and the local result store that make runs resumable."""
