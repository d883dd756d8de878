"""``--adapter DIR|models:/NAME@ALIAS``: one option, shared by ``rosa2 session``, ``chat`` and
``generate``, that runs a command on its model with a saved adapter's θ merged in.

A DIR is an adapter directory (``--save-adapter``, ``/save`` in chat, ``rosa2 adapters pull``). A
``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) URI is a version ``rosa2 adapters promote``
registered in the MLflow Model Registry at ``MLFLOW_TRACKING_URI``: an MLflow ``transformers``
model whose ``peft/`` folder is the adapter. Resolving it needs MLflow, so it lives here in the
CLI layer; the core only ever sees a directory (``rosa2.adapter.merge_adapter``).

``mlflow_model`` writes that MLflow model for ``promote``. A promoted version loads without rosa2:
``mlflow.transformers.load_model("models:/NAME@ALIAS")`` (a text-generation pipeline; pass
``base_model_path=DIR`` where the base is not at the path it was promoted from) and, as the same
model's pyfunc flavour, ``mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(["question"])``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from rosa2 import env
from rosa2.errors import Rosa2Error

REGISTRY_PREFIX = "models:/"
PEFT_SUBDIR = "peft"  # where an MLflow transformers model keeps a PEFT adapter (mlflow.transformers.peft)


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter", metavar="DIR|models:/NAME@ALIAS", default=None,
        help="run on the model with this saved adapter's θ merged into its weights: an adapter directory "
        "(--save-adapter, `rosa2 adapters pull`) or a version `rosa2 adapters promote` registered in MLflow "
        "(models:/NAME@ALIAS or models:/NAME/VERSION, at MLFLOW_TRACKING_URI)",
    )


def fetch(spec: str) -> Path:
    """The local adapter directory ``spec`` names (a registry version is downloaded first)."""
    from rosa2.adapter import check_adapter_dir

    if not spec.strip():
        raise Rosa2Error("--adapter is empty; give an adapter directory or models:/NAME@ALIAS")
    if spec.startswith(REGISTRY_PREFIX):
        return _from_registry(spec)
    return check_adapter_dir(spec)


def _from_registry(uri: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    from rosa2 import stack
    from rosa2.adapter import ADAPTER_CONFIG
    from rosa2.config import TrackingConfig

    tracking = TrackingConfig()
    stack.require(tracking, ("mlflow",))  # one line naming the server, not minutes of retries
    dest = env.home() / "adapters" / "registry" / "".join(c if c.isalnum() or c in "-_." else "_" for c in uri[len(REGISTRY_PREFIX):])
    shutil.rmtree(dest, ignore_errors=True)  # an alias may point at a new version since the last download
    dest.mkdir(parents=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest), tracking_uri=tracking.mlflow_uri))
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0]
        raise Rosa2Error(
            f"--adapter {uri!r} cannot be read from the registry at {tracking.mlflow_uri}: {first} "
            "(`rosa2 adapters promote RUN PROBLEM --name NAME` registers one)"
        ) from None
    for candidate in (local / PEFT_SUBDIR, local):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise Rosa2Error(f"--adapter {uri!r} holds no PEFT adapter (no {ADAPTER_CONFIG} at its top or under {PEFT_SUBDIR}/)")


def load_model(model_cfg: Any, spec: str | None) -> Any:
    """``models.load(model_cfg)``, with the adapter ``spec`` names merged in when one is given.
    Says on stderr what was merged, and when the adapter was fitted to another base."""
    from rosa2 import models
    from rosa2.adapter import base_metadata, merge_adapter, read_metadata

    path = fetch(spec) if spec else None  # a bad --adapter fails before the model loads
    loaded = models.load(model_cfg)
    if path is None:
        return loaded
    fitted = read_metadata(path).get("base_model")
    running = base_metadata(loaded.source)["base_model"]
    merged = merge_adapter(loaded, path)
    note = f"; it was fitted to {fitted}, not to this model" if fitted and fitted != running else ""
    print(f"adapter {spec} merged into {running}{note}", file=sys.stderr)
    return merged


def mlflow_model(adapter_dir: Path, dest: Path, model_name: str | None = None) -> str:
    """Write an MLflow ``transformers`` model (text-generation) at ``dest`` for the adapter: the
    adapter under ``peft/`` with its ``rosa2.json``, the tokenizer, and a reference to the base
    model instead of its weights: the local directory it is loaded from here (``base_model_path``),
    or, for a hub id, the hub repository. The base is ``rosa2.json``'s ``rosa2_model`` (else
    ``model_name``, the cell's ``model.name``). Returns the base's portable name (its hub id when known)."""
    import json

    import mlflow.transformers
    from peft import PeftModel

    from rosa2 import models
    from rosa2.adapter import METADATA_FILE, base_metadata, read_metadata
    from rosa2.config import ModelConfig

    name = read_metadata(adapter_dir).get("rosa2_model") or model_name
    if not name:
        raise Rosa2Error(f"adapter {adapter_dir} has no {METADATA_FILE} and no model name was given; cannot find its base model")
    base = models.load(ModelConfig(name=name, device="cpu"))
    meta = read_metadata(adapter_dir) or base_metadata(base.source)
    model = PeftModel.from_pretrained(base.model, str(adapter_dir)).eval()
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": base.tokenizer}, path=str(dest), task="text-generation",
        base_model_path=base.source if Path(base.source).is_dir() else None, pip_requirements=_requirements(),
        metadata={"rosa2_base_model": meta["base_model"], "rosa2_model": name},
    )
    (dest / PEFT_SUBDIR / METADATA_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta["base_model"]


def _requirements() -> list[str]:
    """The installed versions the model needs, given so MLflow does not load the model again to infer them."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    return pins
