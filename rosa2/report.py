"""Reports in the paper's shape, from cell summaries (pure: no tracking server, no orchestration).

A *cell* is one method × model × dataset × seed; its summary is what :func:`rosa2.metrics.summarize`
returns. From a list of cells this module renders

- Table 1: Accuracy@K by model × method (rows) and dataset (columns), with the gain over the
  baseline of the same model and dataset (seed Eq. 18);
- Table 2: Correction Uplift (seed Eq. 19) and Avg Turn;
- Table 4: time per problem and peak memory;

and two PNG plots: cumulative accuracy per turn for every method, Switch curves included (ROSA2
Figure 2a / 4), and the per-turn dynamics of ‖Δθ‖² (parametric stream) and ‖Δx‖² (semantic stream)
(ROSA2 Figure 3). Cells that differ only in seed are averaged; the tables then say ``± std``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

METHOD_ORDER = ("baseline", "textgrad", "rosa", "rosa2", "switch-w2p", "switch-p2w")
# names of per-turn curves in a summary (rosa2.metrics), and the scalar finals
CURVES = ("accuracy_at_turn", "delta_theta_sq", "delta_x_sq")
FINALS = ("accuracy", "correction_uplift", "avg_turn", "avg_turn_with_failures", "avg_time_s", "peak_memory_mb")


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


def curve(summary: dict[str, Any], name: str) -> list[float]:
    """A per-turn curve (index 0 = turn 1) from a summary; empty when the summary has none."""
    for key in (name, f"{name}_by_turn", f"mean_{name}"):
        value = summary.get(key)
        if isinstance(value, (list, tuple)):
            return [float("nan") if v is None else float(v) for v in value]
    per_turn = summary.get("per_turn")
    if isinstance(per_turn, dict) and isinstance(per_turn.get(name), (list, tuple)):
        return [float("nan") if v is None else float(v) for v in per_turn[name]]
    if isinstance(per_turn, list) and per_turn and isinstance(per_turn[0], dict):
        return [float(row.get(name, float("nan")) or 0.0) for row in per_turn]
    return []


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _method_key(method: str) -> tuple[int, str]:
    base = method.split("@")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


@dataclass
class _Group:
    model: str
    dataset: str
    method: str
    values: dict[str, list[float]]  # metric -> one value per seed


def _groups(cells: Iterable[CellSummary]) -> dict[tuple[str, str, str], _Group]:
    out: dict[tuple[str, str, str], _Group] = {}
    for cell in cells:
        group = out.setdefault(
            (cell.model, cell.dataset, cell.method), _Group(cell.model, cell.dataset, cell.method, {})
        )
        for name in FINALS:
            group.values.setdefault(name, []).append(_num(cell.summary.get(name)))
    return out


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


def _table(
    cells: list[CellSummary], title: str, columns: list[tuple[str, str, int, float]], gains_on: str | None = None
) -> str:
    """Rows model × method, one column block per dataset; ``columns`` = (metric, header, digits, scale)."""
    groups = _groups(cells)
    models = sorted({g.model for g in groups.values()})
    datasets = sorted({g.dataset for g in groups.values()})
    methods = sorted({g.method for g in groups.values()}, key=_method_key)
    header = ["Model", "Method"] + [f"{d} {h}" if len(columns) > 1 else d for d in datasets for _, h, _, _ in columns]
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        for method in methods:
            if not any((model, d, method) in groups for d in datasets):
                continue
            row = [model, method]
            for dataset in datasets:
                group = groups.get((model, dataset, method))
                for metric, _, digits, scale in columns:
                    if group is None:
                        row.append("")
                        continue
                    mean, std = _mean_std(group.values[metric])
                    text = _fmt(mean, std, digits, scale)
                    base = groups.get((model, dataset, "baseline"))
                    if metric == gains_on and base is not None and method != "baseline" and not math.isnan(mean):
                        base_mean, _ = _mean_std(base.values[metric])
                        if not math.isnan(base_mean):
                            text += f" ({(mean - base_mean) * scale:+.{digits}f})"
                    row.append(text)
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def table1(cells: list[CellSummary]) -> str:
    """Accuracy@K (%) by model × method × dataset, gains over the baseline in parentheses."""
    return _table(cells, "Table 1. Accuracy@K (%), gain vs baseline", [("accuracy", "Acc", 1, 100.0)], gains_on="accuracy")


def table2(cells: list[CellSummary]) -> str:
    """Correction Uplift (%) and Avg Turn (over solved problems)."""
    return _table(
        cells, "Table 2. Correction Uplift (%) and Avg Turn",
        [("correction_uplift", "Uplift", 1, 100.0), ("avg_turn", "Avg Turn", 2, 1.0)],
    )


def table4(cells: list[CellSummary]) -> str:
    """Average time per problem (s) and peak memory (MB)."""
    return _table(
        cells, "Table 4. Time per problem (s) and peak memory (MB)",
        [("avg_time_s", "Time s", 1, 1.0), ("peak_memory_mb", "Mem MB", 0, 1.0)],
    )


def render(cells: list[CellSummary], title: str = "ROSA2 study") -> str:
    """The whole markdown report: the three tables and the per-cell list of where each is tracked."""
    if not cells:
        return f"# {title}\n\nNo finished cells yet.\n"
    seeds = sorted({c.seed for c in cells})
    parts = [
        f"# {title}",
        f"{len(cells)} cells; seeds {seeds}; K = turn limit of each cell. Cells differing only in seed are averaged (± std).",
        table1(cells), table2(cells), table4(cells),
    ]
    return "\n\n".join(parts) + "\n"


def _curves_by_method(cells: list[CellSummary], name: str) -> dict[tuple[str, str, str], list[float]]:
    """Mean curve over seeds per (model, dataset, method)."""
    collected: dict[tuple[str, str, str], list[list[float]]] = {}
    for cell in cells:
        values = curve(cell.summary, name)
        if values:
            collected.setdefault((cell.model, cell.dataset, cell.method), []).append(values)
    out = {}
    for key, runs in collected.items():
        length = max(len(r) for r in runs)
        out[key] = [
            statistics.fmean([r[i] for r in runs if i < len(r) and not math.isnan(r[i])] or [float("nan")])
            for i in range(length)
        ]
    return out


def _style(method: str) -> dict[str, Any]:
    # the Switch ablation is drawn dashed so it reads against the four main methods
    return {"linestyle": "--" if method.startswith("switch") else "-", "marker": "o", "label": method}


def _panels(cells: list[CellSummary]) -> list[tuple[str, str]]:
    return sorted({(c.model, c.dataset) for c in cells})


def plot_accuracy(cells: list[CellSummary], path: str | Path) -> Path:
    """Cumulative accuracy per turn, one line per method, one panel per model × dataset (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(cells) or [("", "")]
    curves = _curves_by_method(cells, "accuracy_at_turn")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (model, dataset) in zip(axes[0], panels):
        for (m, d, method), values in sorted(curves.items(), key=lambda kv: _method_key(kv[0][2])):
            if (m, d) == (model, dataset):
                ax.plot(range(1, len(values) + 1), [100 * v for v in values], **_style(method))
        ax.set(title=f"{model} · {dataset}", xlabel="turn", ylabel="accuracy@turn (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_dynamics(cells: list[CellSummary], path: str | Path) -> Path:
    """Per-turn mean ‖Δθ‖² (parametric stream) and ‖Δx‖² (semantic stream) per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for ax, name, label in zip(axes[0], ("delta_theta_sq", "delta_x_sq"), ("‖Δθ‖² (weights)", "‖Δx‖² (words)")):
        curves = _curves_by_method(cells, name)
        for (model, dataset, method), values in sorted(curves.items(), key=lambda kv: _method_key(kv[0][2])):
            style = _style(method)
            style["label"] = method if len(_panels(cells)) == 1 else f"{method} · {model} · {dataset}"
            ax.plot(range(1, len(values) + 1), values, **style)
        ax.set(title=label, xlabel="turn (update after)", ylabel=label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
    return _save(fig, path)


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
