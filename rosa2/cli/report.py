"""``rosa2 report STUDY``: the study's tables (Table 1, 2, 4) from its finished cells in MLflow;
``--out DIR`` also writes the PNG plots, ``--publish`` logs them to a report run in the study."""

from __future__ import annotations

import argparse

from rosa2.config import TrackingConfig, add_arguments, from_args


def study_cells(tracking: TrackingConfig) -> list:
    """Every finished cell of the study as a report.CellSummary (metrics as logged)."""
    from rosa2.models import display_name
    from rosa2.report import CellSummary
    from rosa2.tasks import tracking as tr

    mc = tr.client(tracking)
    cells = []
    for run in tr.cell_runs(mc, tracking.study):
        tags, params = run.data.tags, run.data.params
        model = params.get("model.name", tags.get("rosa2.model", "?"))
        cells.append(CellSummary(
            model=display_name(model),
            dataset=params.get("data.dataset", "?").rstrip("/").split("/")[-1],
            method=params.get("session.method", tags.get("rosa2.method", "?")),
            seed=int(params.get("generation.seed", 0)),
            summary=tr.summary_from_run(mc, run), run_id=run.info.run_id,
            params=dict(params),  # the report keeps cells apart by every knob that differs
        ))
    return cells


def cmd(args: argparse.Namespace) -> int:
    from rosa2 import report, stack

    tracking = from_args(TrackingConfig, args, study=args.study)
    stack.require(tracking, ("mlflow",))
    cells = study_cells(tracking)
    print(report.render(cells, title=f"study {args.study}"))
    if args.out:
        for name, path in report.write(cells, args.out, title=f"study {args.study}").items():
            print(f"wrote {path}")
    if args.publish:
        from rosa2.tasks import tracking as tr

        mc = tr.client(tracking)
        exp_id = tr.experiment_id(mc, args.study)
        run, _ = tr.open_run(mc, exp_id, tr.TAG_PARENT_KEY, f"report-{args.study}", f"report {args.study}", "report")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tr.log_files(mc, run.info.run_id, report.write(cells, tmp, title=f"study {args.study}"))
        tr.finish(mc, run.info.run_id)
        print(f"published: {tr.run_url(tracking, run)}")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="MLflow experiment (study) name")
    parser.add_argument("--out", default=None, help="also write report.md and the PNG plots into this folder")
    parser.add_argument("--publish", action="store_true", help="log the report and plots to a 'report' run in the study")
    add_arguments(parser, TrackingConfig, skip=("study", "adapters", "prefect_api_url"))
    parser.set_defaults(func=cmd)
