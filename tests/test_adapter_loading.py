"""Adapters anyone can load (issue 14 item 6): PEFT's AutoPeftModelForCausalLM reads a saved adapter
by itself, a promoted version loads with mlflow.transformers, and `--adapter DIR|models:/NAME@ALIAS`
runs session, chat and generate on the adapted model. "Same logits" is always against rosa2's own
adapted policy (the engine's PeftModel after a real update)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rosa2.config import GenerationConfig, ModelConfig, SessionConfig
from rosa2.environment import ExactMatchEnvironment
from rosa2.records import Problem
from rosa2.session import SessionEngine

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])


@pytest.fixture()
def no_model_load(monkeypatch):
    """Bad input must fail before any model loads: loading is an error in these tests."""
    from rosa2 import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load", refuse)


def adapted_engine(model: str) -> SessionEngine:
    """An engine whose θ moved once: a rejected first turn under method rosa."""
    engine = SessionEngine(ModelConfig(name=model, device="cpu"), SessionConfig(method="rosa", max_turns=2),
                           generation=GenerationConfig(max_new_tokens=8))
    result = engine.run(Problem(id="p", prompt="Say 7.", domain="math", answer="nope"), ExactMatchEnvironment())
    assert result.turns[0].delta_theta_sq > 0
    return engine


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def adapted_logits(engine: SessionEngine) -> torch.Tensor:
    """The engine's model under the session's θ (slot 0: a batch of one)."""
    with engine.lora().rows([0]):
        return logits(engine.policy.model)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_dir, tmp_path_factory):
    """(adapter dir, rosa2's adapted logits) on the tiny model saved as a local directory."""
    engine = adapted_engine(str(tiny_dir))
    path = engine.save_adapter(tmp_path_factory.mktemp("tiny-adapter") / "adapter")
    return path, adapted_logits(engine)


def test_a_local_base_is_recorded_by_its_path_and_auto_peft_loads_it(tiny_adapter, tiny_dir):
    from peft import AutoPeftModelForCausalLM

    path, expected = tiny_adapter
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(Path(tiny_dir).resolve())  # no hub id exists for it
    meta = json.loads((path / "rosa2.json").read_text())
    assert meta == {"base_model": str(Path(tiny_dir).resolve()), "rosa2_model": str(Path(tiny_dir).resolve()),
                    "local_path": str(Path(tiny_dir).resolve())}
    model = AutoPeftModelForCausalLM.from_pretrained(str(path)).eval()
    assert torch.allclose(logits(model), expected, atol=1e-6)


def stand_in_hub_cache(root: Path, repo: str, files: Path) -> Path:
    """An HF hub cache (models--OWNER--NAME/snapshots/REV + refs/main) holding ``files`` under ``repo``:
    how an offline machine that downloaded the repository holds it. Here the files are the embedded
    model's converted weights, so the logits can equal rosa2's (the hub's own weights are unquantised)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in files.iterdir():
        if f.is_file():
            (snapshot / f.name).symlink_to(f)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    return root


def test_the_embedded_base_is_recorded_by_its_hub_id_and_auto_peft_resolves_it_offline(tmp_path, monkeypatch):
    """adapter_config.json names HuggingFaceTB/SmolLM2-135M-Instruct; PEFT resolves that id through
    transformers' hub cache, so `AutoPeftModelForCausalLM.from_pretrained(dir)` works offline
    wherever the repository is cached (HF_HUB_OFFLINE=1, HF_HUB_CACHE). rosa2.json keeps the local
    directory and says the embedded weights are a dequantised Q4_1 GGUF."""
    from peft import AutoPeftModelForCausalLM

    from rosa2 import models
    from rosa2.adapter import EMBEDDED_HUB_ID

    engine = adapted_engine("embedded")
    path = engine.save_adapter(tmp_path / "adapter")
    expected = adapted_logits(engine)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == EMBEDDED_HUB_ID
    meta = json.loads((path / "rosa2.json").read_text())
    assert meta["base_model"] == EMBEDDED_HUB_ID and meta["rosa2_model"] == "embedded"
    assert meta["local_path"] == str(models.embedded_cache_dir().resolve()) and "Q4_1" in meta["weights"]

    cache = stand_in_hub_cache(tmp_path / "hub", EMBEDDED_HUB_ID, models.embedded_cache_dir())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    model = AutoPeftModelForCausalLM.from_pretrained(str(path), cache_dir=str(cache)).eval()
    # PEFT's model sums x Wᵀ where rosa2's decode-sized matmuls sum W xᵀ (rosa2.streamed): over
    # SmolLM2's 30 layers the logits (|z| ≈ 20) agree to ~1e-4, and the tolerance still tells the
    # adapted model from its base
    assert torch.allclose(logits(model), expected, atol=2e-4, rtol=1e-5)
    with model.disable_adapter():
        assert not torch.allclose(logits(model), expected, atol=2e-4, rtol=1e-5)


def test_generate_with_adapter_dir_runs_the_adapted_model(tiny_adapter, tiny_dir, capsys):
    """`rosa2 generate --adapter DIR` answers as the adapted PeftModel does (greedy)."""
    from peft import PeftModel

    from rosa2 import models
    from rosa2.cli import main
    from rosa2.policy import Policy

    path, _ = tiny_adapter
    prompt = "Name a colour."
    assert main(["generate", prompt, "--model", str(tiny_dir), "--model-device", "cpu", "--adapter", str(path),
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    loaded = models.load(ModelConfig(name=str(tiny_dir), device="cpu"))
    loaded.model = PeftModel.from_pretrained(loaded.model, str(path)).eval()
    reference = Policy(loaded, GenerationConfig(max_new_tokens=12)).generate([{"role": "user", "content": prompt}])
    assert out.out.strip() == reference.text.strip()
    assert f"adapter {path} merged into" in out.err
    plain = Policy(models.load(ModelConfig(name=str(tiny_dir), device="cpu")), GenerationConfig(max_new_tokens=12))
    assert plain.generate([{"role": "user", "content": prompt}]).text != reference.text  # θ changes the answer


@pytest.mark.parametrize("command", ["generate", "session", "chat"])
def test_a_bad_adapter_is_refused_before_the_model_loads(no_model_load, command, tmp_path, capsys):
    from rosa2.cli import main

    args = {"generate": ["generate", "hi"], "session": ["session", "--question", "q", "--answer", "1"], "chat": ["chat"]}[command]
    (tmp_path / "empty").mkdir()
    assert main([*args, "--adapter", str(tmp_path / "empty")]) == 2
    assert "has no adapter_config.json or adapter_model.safetensors" in capsys.readouterr().err


def test_session_refuses_to_save_an_adapter_fitted_on_top_of_another(no_model_load, capsys):
    from rosa2.cli import main

    assert main(["session", "--question", "q", "--answer", "1", "--adapter", "some/dir", "--save-adapter", "x"]) == 2
    assert "--save-adapter with --adapter" in capsys.readouterr().err


def test_a_promoted_adapter_loads_with_mlflow_transformers_and_with_adapter_models_uri(
    platform_servers, tiny_adapter, tiny_dir, tmp_path, monkeypatch, capsys
):
    """Promote = the kept adapter as an MLflow transformers model in the registry, tagged with its real
    base; `mlflow.transformers.load_model("models:/NAME@ALIAS")` gives rosa2's logits, and
    `--adapter models:/NAME@ALIAS` resolves to the same adapter."""
    import mlflow.transformers

    from rosa2.cli import adapter_source, main
    from rosa2.cli.adapters import promote
    from rosa2.tasks import tracking as tr

    tracking, _ = platform_servers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.mlflow_uri)
    monkeypatch.setenv("ROSA2_HOME", str(tmp_path / "home"))
    path, expected = tiny_adapter
    mc = tr.client(tracking)
    experiment = mc.create_experiment(f"adapter-loading-{os.getpid()}")
    run_id = mc.create_run(experiment, tags={"rosa2.kind": "cell"}).info.run_id
    mc.log_param(run_id, "model.name", str(tiny_dir))
    tr.log_adapter(mc, run_id, path, "problem/1")

    version = promote(mc, run_id, "problem/1", "tiny-loading", "champion", tmp_path / "pulled")
    registered = mc.get_model_version_by_alias("tiny-loading", "champion")
    assert registered.version == version.version
    assert registered.tags["base_model"] == str(Path(tiny_dir).resolve())  # the real base, not a rosa2 alias

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking.mlflow_uri)
    try:
        components = mlflow.transformers.load_model("models:/tiny-loading@champion", return_type="components")
    finally:
        mlflow.set_tracking_uri(previous)
    assert torch.allclose(logits(components["model"].eval()), expected, atol=1e-6)

    local = adapter_source.fetch("models:/tiny-loading@champion")
    assert local.name == "peft" and json.loads((local / "rosa2.json").read_text())["base_model"] == str(Path(tiny_dir).resolve())
    args = ["generate", "Name a colour.", "--model", str(tiny_dir), "--model-device", "cpu", "--max-new-tokens", "12"]
    assert main([*args, "--adapter", "models:/tiny-loading@champion"]) == 0
    from_registry = capsys.readouterr().out
    assert main([*args, "--adapter", str(path)]) == 0
    assert from_registry == capsys.readouterr().out

    assert main([*args, "--adapter", "models:/no-such-model@champion"]) == 2
    assert "cannot be read from the registry" in capsys.readouterr().err
