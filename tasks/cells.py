"""Experiment cells, their deterministic keys, and the local result store that makes runs resumable.

A cell is one method × model × dataset × seed with every other knob fixed. Its key is a hash of
every config field and the dataset fingerprint, so the same cell always gets the same key; a
problem's key is a hash of the cell's configs (without the dataset selection) and the problem
itself. Each finished problem is written under ``<home>/results`` the moment it finishes, before
anything is sent to MLflow: a crash, a kill or an unreachable tracking server loses nothing, and
a rerun skips every problem already there. (No Prefect or MLflow import here: plain data.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rosa2 import env
from rosa2.config import (
    AdaptConfig, DataConfig, GenerationConfig, ModelConfig, SandboxConfig, SemanticConfig, SessionConfig,
    TrackingConfig, flatten,
)
from rosa2.records import Problem, ProblemResult

KEY_VERSION = "1"  # bump when the meaning of a stored result changes


def digest(payload: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-able payload."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass
class Cell:
    """One experiment cell: every config the session engine needs, plus the dataset selection."""

    model: ModelConfig = field(default_factory=ModelConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    @property
    def method(self) -> str:
        return self.session.method

    @property
    def seed(self) -> int:
        return self.generation.seed

    def configs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def params(self, tracking: TrackingConfig | None = None) -> dict[str, Any]:
        """Every config field, flat (``adapt.beta``...): the MLflow params of the cell."""
        return flatten(**self.configs(), tracking=tracking)

    def run_configs(self) -> dict[str, Any]:
        """What decides a problem's outcome (everything but which problems are selected)."""
        return {k: v for k, v in self.configs().items() if k != "data"}

    def key(self, fingerprint: str) -> str:
        """Deterministic cell key: all fields + dataset fingerprint."""
        return digest({"v": KEY_VERSION, "params": flatten(**self.configs()), "data": fingerprint})

    def problem_key(self, problem: Problem) -> str:
        """Deterministic per-problem key: the configs that decide the outcome + the problem itself."""
        return digest({"v": KEY_VERSION, "params": flatten(**self.run_configs()), "problem": dataclasses.asdict(problem)}, 24)

    def name(self) -> str:
        model = Path(self.model.name).name if "/" in self.model.name and Path(self.model.name).exists() else self.model.name
        return f"{self.method} · {model} · {Path(self.data.dataset).name} · seed {self.seed}"

    def replace(self, **sections: Any) -> "Cell":
        """A copy with some sections replaced, e.g. ``cell.replace(session=SessionConfig(method="rosa"))``."""
        return dataclasses.replace(self, **sections)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ResultStore:
    """Per-problem results on local disk, keyed by :meth:`Cell.problem_key` (written atomically)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else env.home() / "results"

    def path(self, key: str) -> Path:
        return self.root / "problems" / key[:2] / f"{key}.json"

    def adapter_dir(self, key: str) -> Path:
        return self.root / "adapters" / key

    def get(self, key: str) -> ProblemResult | None:
        try:
            return ProblemResult.from_dict(json.loads(self.path(key).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            # a torn or foreign file: run that problem again rather than trust it
            return None

    def put(self, key: str, result: ProblemResult) -> None:
        _atomic_write(self.path(key), json.dumps(result.to_dict()))

    def cell_state(self, study: str, cell_key: str) -> dict[str, Any]:
        try:
            return json.loads((self.root / "cells" / study / f"{cell_key}.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def set_cell_state(self, study: str, cell_key: str, **state: Any) -> None:
        merged = {**self.cell_state(study, cell_key), **state}
        _atomic_write(self.root / "cells" / study / f"{cell_key}.json", json.dumps(merged))


def results_jsonl(results: list[ProblemResult]) -> str:
    """Per-problem results with their transcripts, one JSON object a line."""
    return "".join(json.dumps(r.to_dict()) + "\n" for r in results)


def read_results_jsonl(text: str) -> list[ProblemResult]:
    return [ProblemResult.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]
