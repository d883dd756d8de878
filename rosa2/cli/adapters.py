"""``rosa2 adapters list|pull|show|promote``: the adapters (θ of a session, adapter weights only)
that cells kept under their retention policy.

``list STUDY`` finds them; ``pull RUN PROBLEM`` downloads one; ``show RUN PROBLEM`` loads it onto
its base model (the run's ``model.name``) and prints per-layer norms; ``promote RUN PROBLEM
--name N --alias A`` registers it in the MLflow Model Registry under an alias, as an MLflow
``transformers`` model (``rosa2.cli.adapter_source.mlflow_model``) tagged with its real base model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rosa2 import env
from rosa2.config import TrackingConfig, add_arguments, from_args
from rosa2.errors import Rosa2Error


def _client(args: argparse.Namespace) -> tuple[Any, TrackingConfig]:
    from rosa2 import stack
    from rosa2.tasks import tracking as tr

    tracking = from_args(TrackingConfig, args, study=getattr(args, "study", None) or TrackingConfig().study)
    stack.require(tracking, ("mlflow",))
    return tr.client(tracking), tracking


def list_adapters(mc: Any, study: str) -> list[dict[str, Any]]:
    """One row per kept adapter in the study's finished cells."""
    from rosa2.tasks import tracking as tr

    rows = []
    for run in tr.cell_runs(mc, study):
        for item in mc.list_artifacts(run.info.run_id, "adapters"):
            rows.append({
                "run_id": run.info.run_id, "problem": item.path.split("/", 1)[1],
                "method": run.data.params.get("session.method"), "model": run.data.params.get("model.name"),
                "dataset": run.data.params.get("data.dataset"),
            })
    return rows


def pull(mc: Any, run_id: str, problem: str, dest: str | Path | None = None) -> Path:
    from rosa2.tasks import tracking as tr

    name = tr.safe_name(problem)
    target = Path(dest) if dest else env.home() / "adapters" / run_id
    target.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mc.download_artifacts(run_id, f"adapters/{name}", str(target)))
    except Exception as exc:  # noqa: BLE001 - MlflowException: missing run or artifact
        raise Rosa2Error(
            f"run {run_id} has no adapter for problem {problem!r} ({type(exc).__name__}); `rosa2 adapters list STUDY` shows the kept ones"
        ) from None


def layer_norms(base: Any, adapter_dir: Path) -> list[tuple[str, float, float, float]]:
    """Load the adapter onto ``base`` (a LoadedModel) and return (module, ‖A‖², ‖B‖², ‖ΔW‖²) per
    adapted module, ΔW = (α/r)·B·A: the size of θ where it acts on the weights."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    rows = []
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        delta = (b @ a) * module.scaling["default"]
        rows.append((name.removeprefix("base_model.model."), float(a.pow(2).sum()), float(b.pow(2).sum()), float(delta.pow(2).sum())))
    return rows


def promote(mc: Any, run_id: str, problem: str, name: str, alias: str, dest: str | Path | None = None) -> Any:
    """Register the kept adapter of (run, problem) as an MLflow transformers model under ``name`` /
    ``alias``; the version's ``base_model`` tag is the base it was fitted to (its hub id when known)."""
    import tempfile

    from rosa2.cli import adapter_source
    from rosa2.tasks import tracking as tr

    path = pull(mc, run_id, problem, dest)
    with tempfile.TemporaryDirectory() as tmp:
        base = adapter_source.mlflow_model(path, Path(tmp) / "model", mc.get_run(run_id).data.params.get("model.name"))
        return tr.register_adapter(mc, run_id, problem, name, alias, model_dir=Path(tmp) / "model", base_model=base)


def cmd(args: argparse.Namespace) -> int:
    mc, tracking = _client(args)
    if args.action == "list":
        rows = list_adapters(mc, tracking.study)
        if not rows:
            print(f"study {tracking.study!r} has no kept adapters (retention: `rosa2 run --adapters`; see `rosa2 adapters --help`)")
        for row in rows:
            print(f"{row['run_id']}  {row['problem']:24s} {row['method']:14s} {row['model']}  {row['dataset']}")
        return 0
    if not args.run_id or not args.problem:
        raise Rosa2Error(f"`rosa2 adapters {args.action}` needs RUN_ID and PROBLEM (see `rosa2 adapters list STUDY`)")
    if args.action == "pull":
        print(pull(mc, args.run_id, args.problem, args.dest))
    elif args.action == "show":
        from rosa2 import models
        from rosa2.config import ModelConfig

        path = pull(mc, args.run_id, args.problem, args.dest)
        base_name = mc.get_run(args.run_id).data.params.get("model.name")
        if not base_name:
            raise Rosa2Error(f"run {args.run_id} has no model.name param; cannot find the base model")
        rows = layer_norms(models.load(ModelConfig(name=base_name, device="cpu")), path)
        print(f"adapter {path} on {base_name}: {len(rows)} adapted modules")
        print(f"{'module':56s} {'‖A‖²':>10s} {'‖B‖²':>12s} {'‖ΔW‖²':>12s}")
        for name, a, b, d in rows:
            print(f"{name:56s} {a:10.4f} {b:12.4e} {d:12.4e}")
        print(f"{'total':56s} {sum(r[1] for r in rows):10.4f} {sum(r[2] for r in rows):12.4e} {sum(r[3] for r in rows):12.4e}")
    elif args.action == "promote":
        from rosa2.tasks import tracking as tr

        if not args.name:
            raise Rosa2Error("`rosa2 adapters promote` needs --name (the registered model name)")
        version = promote(mc, args.run_id, args.problem, args.name, args.alias, args.dest)
        print(f"registered {args.name} version {version.version} with alias {args.alias!r} (source {version.source})")
        print(f"try it: rosa2 chat --adapter models:/{args.name}@{args.alias}")
    return 0


RETENTION = """\
retention: which adapters a cell keeps (`rosa2 run|ablate|sweep --adapters POLICY`; a sweep YAML's
tracking: {adapters: POLICY}). Only sessions in which the parametric stream made an update
(methods rosa, rosa2, switch-*) have an adapter to keep.
  final      (default) at most one per cell: the adapter of the cell's last problem
  all        one per problem
  corrected  one per problem that failed turn 1 and was solved later
  none       none
A kept adapter is adapters/<problem id> in the cell's MLflow run: adapter_config.json (task_type
CAUSAL_LM; base_model_name_or_path is the base's hub id when known, e.g.
HuggingFaceTB/SmolLM2-135M-Instruct for the embedded model, else its local directory),
adapter_model.safetensors, and rosa2.json (the local base directory, the --model name that loads
it, what its weights are). `promote` registers it as an MLflow transformers model; try it with
`rosa2 chat|session|generate --adapter models:/NAME@ALIAS`."""


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = RETENTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("action", choices=["list", "pull", "show", "promote"])
    parser.add_argument("run_id", nargs="?", help="list: the STUDY; otherwise the MLflow run id of the cell")
    parser.add_argument("problem", nargs="?", help="problem id whose adapter to use")
    parser.add_argument("--dest", default=None, help="download folder (default: <home>/adapters/<run id>)")
    parser.add_argument("--name", default=None, help="promote: registered model name")
    parser.add_argument("--alias", default="champion", help="promote: alias for the new version (default: champion)")
    add_arguments(parser, TrackingConfig, skip=("study", "adapters", "prefect_api_url"))
    parser.set_defaults(func=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    if args.action == "list":
        args.study = args.run_id or TrackingConfig().study
    return cmd(args)
