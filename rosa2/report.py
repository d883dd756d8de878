"""Reports in the paper's shape, from cell summaries (pure: no tracking server, no orchestration).

A *cell* is one method × model × dataset × seed with every other knob fixed; its summary is what
:func:`rosa2.metrics.summarize` returns. From a list of cells this module renders

- Table 1: Accuracy@K by model × method (rows) and dataset (columns), with the gain over the
  baseline of the same model and dataset (seed Eq. 18), paired over problems: the mean gain, its
  paired-bootstrap 95 % interval and the problems won ↑ / lost ↓ (:func:`rosa2.metrics.paired_gain_of`);
- Table 2: both readings of Correction Uplift — Eq. 19 (of the problems failed at turn 1, the share
  solved by K) and the Table 2 caption (of the problems solved by K, the share that failed turn 1) —
  and Avg Turn;
- Table 3: what each arm did — the words stream's refinements that entered the history, its
  fallbacks, how often a rejected answer changed, and how many turns had no answer to score;
- Table 4: time per problem and peak memory;
- the warnings of :func:`rosa2.metrics.warnings` (an arm that is not what its name says);

and two PNG plots: cumulative accuracy per turn for every method, Switch curves included (ROSA2
Figure 2a / 4), and the per-turn dynamics of ‖Δθ‖² (parametric stream) and ‖Δx‖² (semantic stream)
(ROSA2 Figure 3).

Rows are kept apart by every knob that differs between cells of the same method (the cells'
flat config params, :attr:`CellSummary.params`): ablation cells that differ in
``adapt.update_context`` are two rows, ``rosa (update_context=generated)`` and
``rosa (update_context=next)``. Only cells that differ in nothing but the seed are averaged; the
tables then say ``± std``.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rosa2 import metrics

METHOD_ORDER = ("baseline", "textgrad", "rosa", "rosa2", "switch-w2p", "switch-p2w")
# params that make the grid (one column or row each) or say where things are tracked: never a variant
GRID_PARAMS = ("model.name", "data.dataset", "session.method", "generation.seed")
NOT_KNOBS = ("tracking.",)
# Table 3: (header, numerator count, denominator count) — pooled over the seeds of a row
ARM_RATES = (
    ("Refined %", "semantic_refined", "semantic_refinements"),
    ("Fallback %", ("semantic_refinements", "semantic_refined"), "semantic_refinements"),
    ("Critic cut %", "semantic_truncated", "semantic_refinements"),
    ("Answer change %", "answer_changed", "answer_change_turns"),
    ("No answer %", "no_answer_turns", "scored_turns"),
)


@dataclass
class CellSummary:
    """One experiment cell and its metrics (a :func:`rosa2.metrics.summarize` dict)."""

    model: str
    dataset: str
    method: str
    seed: int
    summary: dict[str, Any]
    run_id: str | None = None  # where it is tracked, when it is
    extra: dict[str, Any] = field(default_factory=dict)
    # the cell's flat config params (``adapt.update_context``...; MLflow's params of its run): the
    # report keeps cells apart by every one that differs between cells of the same method
    params: dict[str, Any] = field(default_factory=dict)


def curve(summary: dict[str, Any], name: str) -> list[float]:
    """A per-turn curve (index 0 = turn 1; one of :data:`rosa2.metrics.CURVES` or another per-turn
    mean) from a summary, NaN at a turn without a value; empty when the summary has none."""
    value = summary.get(name)
    if not isinstance(value, (list, tuple)):
        return []
    return [float("nan") if v is None else float(v) for v in value]


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _method_key(label: str) -> tuple[int, str]:
    base = re.split(r"[@ ]", label)[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), label)


# --- rows: cells that differ only in seed ---------------------------------------------------------


def _param_text(value: Any) -> str:
    # as MLflow stores a param, so cells built here and cells read back from MLflow compare equal
    return "None" if value is None else str(value)


def _is_knob(name: str) -> bool:
    return name not in GRID_PARAMS and not name.startswith(NOT_KNOBS)


def _knob_values(cells: list[CellSummary], name: str) -> set[str]:
    return {_param_text(c.params.get(name, "?")) for c in cells}


def differing_knobs(cells: Iterable[CellSummary]) -> list[str]:
    """Params (other than model, dataset, method, seed and tracking) whose value is not the same in every cell."""
    cells = list(cells)
    names = sorted({n for c in cells for n in c.params if _is_knob(n)})
    return [n for n in names if len(_knob_values(cells, n)) > 1]


def variants(cells: list[CellSummary]) -> list[dict[str, str]]:
    """Per cell, the knobs that tell it apart from other cells of its model, dataset and method."""
    by_method: dict[tuple[str, str, str], list[CellSummary]] = {}
    for cell in cells:
        by_method.setdefault((cell.model, cell.dataset, cell.method), []).append(cell)
    knobs = {key: differing_knobs(group) for key, group in by_method.items()}
    return [
        {n: _param_text(c.params.get(n, "?")) for n in knobs[(c.model, c.dataset, c.method)]} for c in cells
    ]


def _short_names(all_knobs: Iterable[str]) -> dict[str, str]:
    """``adapt.update_context`` → ``update_context`` unless two sections share the field name."""
    all_knobs = set(all_knobs)
    tails = [n.split(".")[-1] for n in all_knobs]
    return {n: n.split(".")[-1] if tails.count(n.split(".")[-1]) == 1 else n for n in all_knobs}


@dataclass
class _Group:
    model: str
    dataset: str
    method: str
    label: str  # method, with the knobs that set this row apart: "rosa (update_context=next)"
    variant: dict[str, str]
    cells: list[CellSummary] = field(default_factory=list)

    def values(self, name: str) -> list[float]:
        """One value per seed."""
        return [_num(c.summary.get(name)) for c in self.cells]

    def outcomes(self) -> dict[str, float] | None:
        """Per problem, the share of seeds that solved it by K; None when a cell lacks per-problem data."""
        per_cell = [c.summary.get("solved_by_problem") for c in self.cells]
        if not per_cell or not all(isinstance(p, dict) for p in per_cell):
            return None
        solved: dict[str, list[float]] = {}
        for outcome in per_cell:
            for pid, turn in outcome.items():
                solved.setdefault(pid, []).append(float(turn is not None))
        return {pid: statistics.fmean(v) for pid, v in solved.items()}

    def pooled(self, numerator: str | tuple[str, str], denominator: str) -> tuple[int, int] | None:
        """(numerator, denominator) counts summed over the seeds; None when a cell lacks them."""
        def count(summary: dict[str, Any], name: str | tuple[str, str]) -> float | None:
            if isinstance(name, tuple):
                a, b = (summary.get(n) for n in name)
                return None if a is None or b is None else float(a) - float(b)
            value = summary.get(name)
            return None if value is None else float(value)

        num = [count(c.summary, numerator) for c in self.cells]
        den = [count(c.summary, denominator) for c in self.cells]
        if any(v is None for v in num + den):
            return None
        return int(sum(num)), int(sum(den))  # type: ignore[arg-type]


def _groups(cells: Iterable[CellSummary]) -> dict[tuple[str, str, str], _Group]:
    """Rows keyed by (model, dataset, label); only cells differing in seed share a row."""
    cells = list(cells)
    per_cell = variants(cells)
    short = _short_names(k for v in per_cell for k in v)
    out: dict[tuple[str, str, str], _Group] = {}
    for cell, variant in zip(cells, per_cell):
        label = cell.method
        if variant:
            label += " (" + ", ".join(f"{short[k]}={v}" for k, v in variant.items()) + ")"
        group = out.setdefault(
            (cell.model, cell.dataset, label), _Group(cell.model, cell.dataset, cell.method, label, variant)
        )
        group.cells.append(cell)
    return out


def _baseline_of(group: _Group, groups: dict[tuple[str, str, str], _Group]) -> _Group | None:
    """The baseline row a method row is compared with: the model and dataset's only one, or, when
    baselines differ in some knob, the one whose knobs equal this row's; None when ambiguous."""
    bases = [g for g in groups.values() if (g.model, g.dataset, g.method) == (group.model, group.dataset, "baseline")]
    if len(bases) <= 1:
        return bases[0] if bases else None
    mine = group.cells[0].params
    matching = [b for b in bases if all(_param_text(mine.get(k, "?")) == v for k, v in b.variant.items())]
    return matching[0] if len(matching) == 1 else None


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None)


def _fmt(value: float, std: float | None, digits: int, scale: float = 1.0) -> str:
    if math.isnan(value):
        return "–"
    text = f"{value * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def _gain(group: _Group, base: _Group, mean: float, metric: str, digits: int, scale: float) -> str:
    """`` (+50.0 [+0.0, +100.0], 2↑ 0↓)`` paired over problems, or `` (+50.0, unpaired)`` when
    the cells carry no per-problem outcomes (logged before they did)."""
    if metric == "accuracy":
        mine, theirs = group.outcomes(), base.outcomes()
        if mine is not None and theirs is not None:
            paired = metrics.paired_gain_of(mine, theirs)
            if paired is not None:
                return (
                    f" ({paired.gain * scale:+.{digits}f} [{paired.low * scale:+.{digits}f}, {paired.high * scale:+.{digits}f}], "
                    f"{paired.won}↑ {paired.lost}↓)"
                )
    base_mean, _ = _mean_std(base.values(metric))
    return "" if math.isnan(base_mean) else f" ({(mean - base_mean) * scale:+.{digits}f}, unpaired)"


def _table(
    cells: list[CellSummary], title: str, columns: list[tuple[str, str, int, float]], gains_on: str | None = None
) -> str:
    """Rows model × method, one column block per dataset; ``columns`` = (metric, header, digits, scale)."""
    groups = _groups(cells)
    models = sorted({g.model for g in groups.values()})
    datasets = sorted({g.dataset for g in groups.values()})
    labels = sorted({g.label for g in groups.values()}, key=_method_key)
    header = ["Model", "Method"] + [f"{d} {h}" if len(columns) > 1 else d for d in datasets for _, h, _, _ in columns]
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        for label in labels:
            if not any((model, d, label) in groups for d in datasets):
                continue
            row = [model, label]
            for dataset in datasets:
                group = groups.get((model, dataset, label))
                for metric, _, digits, scale in columns:
                    if group is None:
                        row.append("")
                        continue
                    mean, std = _mean_std(group.values(metric))
                    text = _fmt(mean, std, digits, scale)
                    base = _baseline_of(group, groups) if metric == gains_on and group.method != "baseline" else None
                    if base is not None and not math.isnan(mean):
                        text += _gain(group, base, mean, metric, digits, scale)
                    row.append(text)
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def table1(cells: list[CellSummary]) -> str:
    """Accuracy@K (%) by model × method × dataset; the gain over the baseline in parentheses, paired
    over problems: mean gain [95 % paired-bootstrap interval], problems won ↑ and lost ↓."""
    return _table(
        cells, "Table 1. Accuracy@K (%), gain vs baseline paired over problems: +gain [95% CI], won↑ lost↓",
        [("accuracy", "Acc", 1, 100.0)], gains_on="accuracy",
    )


def table2(cells: list[CellSummary]) -> str:
    """Both readings of Correction Uplift (%) and Avg Turn (over solved problems)."""
    return _table(
        cells, "Table 2. Correction Uplift (%) — Eq. 19: of the problems failed at turn 1, the share solved by K; "
        "Tab. 2 caption: of the problems solved by K, the share that failed turn 1 — and Avg Turn",
        [("correction_uplift", "Uplift (Eq. 19)", 1, 100.0), ("correction_share", "Share corrected (Tab. 2 caption)", 1, 100.0),
         ("avg_turn", "Avg Turn", 2, 1.0)],
    )


def table3(cells: list[CellSummary]) -> str:
    """What each arm did, pooled over seeds: the words stream's refinements that entered the history
    (refined), those that did not (fallback: copied, empty, cut), the critic's replies cut by its
    token budget, rejected answers that changed at the next turn, and turns with no answer to score."""
    groups = sorted(_groups(cells).values(), key=lambda g: (g.model, g.dataset, _method_key(g.label)))
    header = ["Model", "Dataset", "Method"] + [h for h, _, _ in ARM_RATES]
    lines = [
        "**Table 3. What each arm did: % (count / of), pooled over seeds**", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]
    for group in groups:
        row = [group.model, group.dataset, group.label]
        for _, numerator, denominator in ARM_RATES:
            counts = group.pooled(numerator, denominator)
            row.append("–" if not counts or not counts[1] else f"{100 * counts[0] / counts[1]:.1f} ({counts[0]}/{counts[1]})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def table4(cells: list[CellSummary]) -> str:
    """Average time per problem (s) and peak memory (MB)."""
    return _table(
        cells, "Table 4. Time per problem (s) and peak memory (MB)",
        [("avg_time_s", "Time s", 1, 1.0), ("peak_memory_mb", "Mem MB", 0, 1.0)],
    )


def warnings_section(cells: list[CellSummary]) -> str:
    """Every cell's :func:`rosa2.metrics.warnings`, one line each; "" when there are none."""
    labels = {id(c): g.label for g in _groups(cells).values() for c in g.cells}
    lines = [
        f"- {labels[id(c)]} · {c.model} · {c.dataset} · seed {c.seed}: {warning}"
        for c in cells for warning in metrics.warnings(c.summary, c.method)
    ]
    return "**Warnings**\n\n" + "\n".join(lines) if lines else ""


def plural(n: int, word: str) -> str:
    """``1 cell``, ``2 cells``: a count with its noun in the right number (regular plurals only)."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def render(cells: list[CellSummary], title: str = "ROSA2 study") -> str:
    """The whole markdown report: the four tables and the warnings."""
    if not cells:
        return f"# {title}\n\nNo finished cells yet.\n"
    seeds = sorted({c.seed for c in cells})
    knobs = differing_knobs(cells)
    intro = (
        f"{plural(len(cells), 'cell')}; seeds {seeds}; K = turn limit of each cell. Only cells differing in nothing but the "
        "seed are averaged (± std)."
    )
    if knobs:
        intro += f" Knobs that differ between cells: {', '.join(knobs)} (a row names those that set it apart from its method's other rows)."
    parts = [f"# {title}", intro, table1(cells), table2(cells), table3(cells), table4(cells), warnings_section(cells)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _curves_by_method(cells: list[CellSummary], name: str) -> dict[tuple[str, str, str], list[float]]:
    """Mean curve over seeds per (model, dataset, row label)."""
    collected: dict[tuple[str, str, str], list[list[float]]] = {}
    for key, group in _groups(cells).items():
        for cell in group.cells:
            values = curve(cell.summary, name)
            if values:
                collected.setdefault(key, []).append(values)
    out = {}
    for key, runs in collected.items():
        length = max(len(r) for r in runs)
        out[key] = [
            statistics.fmean([r[i] for r in runs if i < len(r) and not math.isnan(r[i])] or [float("nan")])
            for i in range(length)
        ]
    return out


# one look per line of a panel, in method order: lines that coincide still read apart (and each
# line is nudged sideways by OFFSET turns so equal curves do not hide one another)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
OFFSET = 0.06


def _draw(ax: Any, series: list[tuple[str, list[float]]], ylabel: str, floor_span: float) -> None:
    """Lines over turns 1..K with integer turn ticks; all-NaN series are left out. The y range
    starts at 0 (or the lowest value) and reaches at least ``floor_span`` (1 when everything is 0),
    so all-zero lines sit on a readable axis."""
    series = [(label, values) for label, values in series if any(not math.isnan(v) for v in values)]
    turns = max((len(v) for _, v in series), default=1)
    middle = (len(series) - 1) / 2
    for i, (label, values) in enumerate(series):
        xs = [t + (i - middle) * OFFSET for t in range(1, len(values) + 1)]
        ax.plot(xs, values, label=label, marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)],
                markersize=6, linewidth=1.6, alpha=0.9)
    ax.set_xticks(range(1, turns + 1))
    ax.set_xlim(0.5, turns + 0.5)
    finite = [v for _, values in series for v in values if not math.isnan(v)]
    low, high = min(finite + [0.0]), max(finite + [floor_span])
    if high == low:  # every value 0 (nothing moved): a unit axis instead of a degenerate one
        high = low + 1.0
    margin = 0.06 * (high - low)
    ax.set_ylim(low - margin, high + margin)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no values in these cells", ha="center", va="center", transform=ax.transAxes, color="grey")


def _panels(cells: list[CellSummary]) -> list[tuple[str, str]]:
    return sorted({(c.model, c.dataset) for c in cells})


def _sorted_curves(cells: list[CellSummary], name: str) -> list[tuple[tuple[str, str, str], list[float]]]:
    return sorted(_curves_by_method(cells, name).items(), key=lambda kv: _method_key(kv[0][2]))


def accuracy_figure(cells: list[CellSummary]) -> Any:
    """Cumulative accuracy@turn (%) per method, one panel per model × dataset (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(cells) or [("", "")]
    curves = _sorted_curves(cells, "accuracy_at_turn")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (model, dataset) in zip(axes[0], panels):
        series = [(method, [100 * v for v in values]) for (m, d, method), values in curves if (m, d) == (model, dataset)]
        _draw(ax, series, "accuracy@turn (%)", floor_span=100.0)
        ax.set(title=f"{model} · {dataset}", xlabel="turn")
    return fig


def dynamics_figure(cells: list[CellSummary]) -> Any:
    """Per-turn mean ‖Δθ‖² (parametric stream) and ‖Δx‖² (semantic stream) per method (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    several = len(_panels(cells)) > 1
    for ax, name, label in zip(axes[0], ("delta_theta_sq", "delta_x_sq"), ("‖Δθ‖² (weights)", "‖Δx‖² (words)")):
        series = [
            (f"{method} · {model} · {dataset}" if several else method, values)
            for (model, dataset, method), values in _sorted_curves(cells, name)
        ]
        _draw(ax, series, label, floor_span=0.0)
        ax.set(title=label, xlabel="turn (update after)")
    return fig


def plot_accuracy(cells: list[CellSummary], path: str | Path) -> Path:
    """:func:`accuracy_figure` as a PNG."""
    return _save(accuracy_figure(cells), path)


def plot_dynamics(cells: list[CellSummary], path: str | Path) -> Path:
    """:func:`dynamics_figure` as a PNG."""
    return _save(dynamics_figure(cells), path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(cells: list[CellSummary], directory: str | Path, title: str = "ROSA2 study") -> dict[str, Path]:
    """Write report.md, accuracy_by_turn.png and dynamics.png into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.md").write_text(render(cells, title))
    return {
        "report.md": directory / "report.md",
        "accuracy_by_turn.png": plot_accuracy(cells, directory / "accuracy_by_turn.png"),
        "dynamics.png": plot_dynamics(cells, directory / "dynamics.png"),
    }
