"""The ``sweep`` flow: a grid models × datasets × methods × seeds from a YAML file, one parent run
with one child run per cell.

The file (every section optional except the four lists; sections take the config fields of the
same name, see ``rosa2 run --help``)::

    study: nightly-math
    models: [embedded]
    datasets: [embedded-math]
    methods: [baseline, textgrad, rosa, rosa2, switch-w2p@3]
    seeds: [0]
    session: {max_turns: 3, feedback: sparse}
    data: {limit: 10}
    generation: {max_new_tokens: 96}
    adapt: {beta: 1.0, eta: 1.0}
    semantic: {critic: base}
    sandbox: {timeout_s: 10}
    tracking: {adapters: corrected}
    scaleout: {runner: pool, pool: rosa2-gpu}   # or {runner: ray, num_gpus: 1}; see flows/scaleout.py

An unknown field or a bad value is an error that names the file, line and field.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow

from rosa2.config import ConfigError, DataConfig, GenerationConfig, ModelConfig, SessionConfig, TrackingConfig
from rosa2.tasks.cells import Cell, check_sandbox_floor
from rosa2.flows.experiment import GroupOutcome, run_group

# one section per config of a Cell (model, session, data, generation, adapt, semantic, reward,
# sandbox...), so a config the Cell gains is a section without a change here; plus tracking
SECTIONS: dict[str, type] = {
    **{f.name: typing.get_type_hints(Cell)[f.name] for f in dataclasses.fields(Cell)}, "tracking": TrackingConfig,
}
# fields that the grid lists set, so a section may not
GRID = {"models": ("model", "name"), "datasets": ("data", "dataset"), "methods": ("session", "method"), "seeds": ("generation", "seed")}


@dataclass
class SweepSpec:
    study: str | None
    models: list[str]
    datasets: list[str]
    methods: list[str]
    seeds: list[int]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<sweep>"
    scaleout: Any = None  # rosa2.flows.scaleout.ScaleoutConfig: where the cells run (default: here, one by one)

    def tracking(self, base: TrackingConfig | None = None) -> TrackingConfig:
        base = base or TrackingConfig()
        overrides = dict(self.sections.get("tracking", {}))
        if self.study:
            overrides["study"] = self.study
        return dataclasses.replace(base, **overrides)

    def cells(self) -> list[Cell]:
        out = []
        for model, dataset, method, seed in itertools.product(self.models, self.datasets, self.methods, self.seeds):
            values = {name: dict(self.sections.get(name, {})) for name in SECTIONS if name != "tracking"}
            values["model"]["name"], values["data"]["dataset"] = model, dataset
            values["session"]["method"], values["generation"]["seed"] = method, seed
            out.append(Cell(**{name: SECTIONS[name](**kwargs) for name, kwargs in values.items()}))
        return out


def _where(source: str, node: Any) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307 - our own annotations
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    out: list[type] = []
    for arg in args:
        origin = typing.get_origin(arg) or arg
        out.append({tuple: list}.get(origin, origin))
    if float in out:
        out.append(int)
    return tuple(out)


def _check_value(source: str, section: str, name: str, node: Any, value: Any, cls: type) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    allowed = _allowed_types(f.type)
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{_where(source, node)}: {section}.{name}={value!r} is not allowed; expected {expected}")
    return tuple(value) if isinstance(value, list) else value


def _refuse_duplicate_keys(source: str, node: Any, path: str = "") -> None:
    """A key given twice in one mapping (YAML keeps the last, silently) is an error at its second line."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, Any] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None:
                if name == "<<":  # a merge key may repeat its anchors' keys: that is what it is for
                    continue
                if name in seen:
                    raise ConfigError(
                        f"{_where(source, key)}: {path}{name!r} is given twice (first at line "
                        f"{seen[name].start_mark.line + 1}); keep one"
                    )
                seen[name] = key
            _refuse_duplicate_keys(source, value, f"{path}{name}." if name is not None else path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(source, item, path)


def parse(text: str, source: str = "<sweep>") -> SweepSpec:
    """Parse and check a sweep file; errors name the file, line and field."""
    import yaml

    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{source}: expected a mapping with models, datasets, methods and seeds")
    _refuse_duplicate_keys(source, root)
    data = yaml.safe_load(text)
    nodes = {k.value: (k, v) for k, v in root.value}
    known = {"study", "scaleout", *GRID, *SECTIONS}
    for key, (knode, _) in nodes.items():
        if key not in known:
            raise ConfigError(f"{_where(source, knode)}: unknown field {key!r}; expected one of {sorted(known)}")
    for key in GRID:
        if key not in nodes:
            raise ConfigError(f"{source}: missing field {key!r} (a list)")
        knode, vnode = nodes[key]
        values = data[key]
        kind = int if key == "seeds" else str
        if not isinstance(values, list) or not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{_where(source, vnode)}: {key}={values!r} is not allowed; expected a non-empty list of {kind.__name__}")
    sections: dict[str, dict[str, Any]] = {}
    for name, cls in SECTIONS.items():
        if name not in nodes:
            continue
        knode, vnode = nodes[name]
        if not isinstance(vnode, yaml.MappingNode):
            raise ConfigError(f"{_where(source, vnode)}: {name} must be a mapping of {cls.__name__} fields")
        fields = {f.name for f in dataclasses.fields(cls)}
        taken = {f for grid, (sec, f) in GRID.items() if sec == name}
        sections[name] = {}
        for fk, fv in vnode.value:
            if fk.value not in fields or fk.value in taken:
                reason = f"set by the grid list {[g for g, (s, f) in GRID.items() if (s, f) == (name, fk.value)][0]!r}" if fk.value in taken else f"expected one of {sorted(fields - taken)}"
                raise ConfigError(f"{_where(source, fk)}: unknown field {name}.{fk.value!r}; {reason}")
            sections[name][fk.value] = _check_value(source, name, fk.value, fv, data[name][fk.value], cls)
        try:  # the section alone, so a bad value is reported at its line
            built = cls(**{**({"method": "baseline"} if cls is SessionConfig else {}), **sections[name]})
            if name == "sandbox":
                check_sandbox_floor(built, prefix="")
        except ConfigError as exc:
            line = next((_where(source, fk) for fk, _ in vnode.value if f"{fk.value}=" in str(exc)), _where(source, vnode))
            raise ConfigError(f"{line}: {name}: {exc}") from None
    study = data.get("study")
    if study is not None and not isinstance(study, str):
        raise ConfigError(f"{_where(source, nodes['study'][1])}: study={study!r} is not allowed; expected a name")
    spec = SweepSpec(study, data["models"], data["datasets"], data["methods"], data["seeds"], sections, source)
    if "scaleout" in nodes:
        from rosa2.flows.scaleout import from_mapping

        spec.scaleout = from_mapping(data["scaleout"], _where(source, nodes["scaleout"][1]))
    for key, (_, vnode) in nodes.items():
        if key not in GRID:
            continue
        for item, value in zip(vnode.value, data[key]):
            try:
                probe = {"models": lambda v: ModelConfig(name=v), "datasets": lambda v: DataConfig(dataset=v),
                         "methods": lambda v: SessionConfig(method=v, **sections.get("session", {})),
                         "seeds": lambda v: GenerationConfig(seed=v, **sections.get("generation", {}))}[key]
                probe(value)
            except ConfigError as exc:
                raise ConfigError(f"{_where(source, item)}: {key}: {exc}") from None
    return spec


def load(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"sweep file {path}: {exc.strerror}") from None
    return parse(text, str(path))


def check_sources(spec: SweepSpec) -> list[str]:
    """What ``rosa2 sweep FILE --check`` can check offline, so a bad sweep fails there and not at
    2 a.m.: every local model or critic directory must be a transformers directory, every local
    dataset file must exist and read (each row checked). Raises one line naming the first bad one;
    returns one line per hub model or dataset, which cannot be checked without fetching it."""
    from rosa2 import models
    from rosa2.data import check as check_dataset, is_hub
    from rosa2.errors import Rosa2Error

    notes: list[str] = []
    critics = {c.semantic.critic for c in spec.cells()} - {"base", "openai"}
    for what, name in [*(("model", m) for m in spec.models), *(("semantic.critic", c) for c in sorted(critics))]:
        if name in models.EMBEDDED_ALIASES:
            continue
        try:
            resolved = models.resolve(name)
        except Rosa2Error as exc:
            raise ConfigError(f"{spec.source}: {what} {name!r}: {exc}") from None
        if resolved == name and not Path(name).expanduser().exists():
            notes.append(f"{what} {name}: hub id, not checked (offline; a local directory would have to exist here)")
    data = spec.sections.get("data", {})
    for dataset in spec.datasets:
        cfg = DataConfig(**{**data, "dataset": dataset})
        try:
            count = check_dataset(cfg)
        except Rosa2Error as exc:
            raise ConfigError(f"{spec.source}: dataset {dataset!r}: {exc}") from None
        if count is None and is_hub(dataset):
            notes.append(f"dataset {dataset}: on the hub, not checked (offline)")
    return notes


@flow(name="sweep", validate_parameters=False, log_prints=True)
def sweep(spec: SweepSpec, tracking: TrackingConfig | None = None, progress: bool = True) -> GroupOutcome:
    """Every cell of the grid as a child of one parent run (``rosa2.kind=sweep``), then the report."""
    tracking = spec.tracking(tracking)
    return run_group(spec.cells(), tracking, f"sweep {Path(spec.source).name}", "sweep", progress, spec.scaleout)
