"""Throughput of the work pool: the same four-cell sweep with one worker, then with two (issue 6).

Opt-in (it takes minutes on 2 cores): ``ROSA2_SCALEOUT_BENCH=1 python -m pytest
tests/test_scaleout_bench.py -s``. Prints cells per hour for both and their ratio, measured in one
run on the same servers; appends them as JSON to ``$ROSA2_SCALEOUT_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.test_scaleout import EXPERIMENT, Worker, _cell_flow_runs, _experiment_cell, _pool_cfg, _tracking, topology  # noqa: F401

pytestmark = pytest.mark.skipif(
    os.environ.get("ROSA2_SCALEOUT_BENCH") != "1", reason="benchmark: set ROSA2_SCALEOUT_BENCH=1 to run it"
)
CELLS = 4


def test_two_workers_finish_a_sweep_faster_than_one(topology):
    """Real cells (the platform's experiment flow, tiny model, 2 problems × 2 turns each)."""
    from rosa2.flows.scaleout import run

    def sweep(study: str, seeds: range) -> float:
        cells = [{"cell": _experiment_cell(topology, s), "tracking": _tracking(topology, study), "progress": False}
                 for s in seeds]
        start = time.monotonic()
        run(cells, _pool_cfg(entrypoint=EXPERIMENT))
        return time.monotonic() - start

    first = Worker(topology, "b1")
    second = None
    try:
        sweep("bench-warm", range(100, 101))  # deployment, dataset and model caches
        one = sweep("bench-one", range(0, CELLS))
        second = Worker(topology, "b2")
        two = sweep("bench-two", range(CELLS, 2 * CELLS))
    finally:
        first.stop()
        if second:
            second.stop()
    figures = {
        "cells": CELLS, "one_worker_s": round(one, 1), "two_workers_s": round(two, 1),
        "cells_per_hour_one": round(CELLS * 3600 / one), "cells_per_hour_two": round(CELLS * 3600 / two),
        "ratio": round(one / two, 2), "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
    }
    print("scale-out throughput:", json.dumps(figures))
    if os.environ.get("ROSA2_SCALEOUT_REPORT"):
        with open(os.environ["ROSA2_SCALEOUT_REPORT"], "a") as fh:
            fh.write(json.dumps(figures) + "\n")
    used = {t for r in _cell_flow_runs() if r.parameters["parameters"]["cell"]["generation"]["seed"] >= CELLS
            for t in r.tags if t.startswith("worker:")}
    assert used == {"worker:b1", "worker:b2"}
    assert two < one, f"two workers ({two:.0f} s) were not faster than one ({one:.0f} s)"
