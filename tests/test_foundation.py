"""The foundation: the mlflow folder never shadows the library, the loader, env hygiene, doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rosa2 import env, models
from rosa2.config import GenerationConfig, ModelConfig, SemanticConfig

ROOT = Path(__file__).resolve().parents[1]


def test_root_mlflow_folder_does_not_shadow_the_library():
    # Run from the repository root, where ./mlflow exists, as a user would.
    code = "import mlflow, sys; print(mlflow.__file__); print(mlflow.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    path, version = out.stdout.split()
    assert (ROOT / "mlflow").is_dir()
    assert "site-packages" in path and not path.startswith(str(ROOT / "mlflow")), path
    assert version.startswith("3.")
    assert not (ROOT / "mlflow" / "__init__.py").exists()


def test_core_imports_neither_prefect_nor_mlflow():
    code = (
        "import sys, rosa2, rosa2.config, rosa2.models, rosa2.policy, rosa2.env;"
        "import pkgutil, importlib;"
        "[importlib.import_module('rosa2.'+m.name) for m in pkgutil.iter_modules(rosa2.__path__) if m.name not in ('cli', '__main__')];"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('prefect','mlflow')]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_words_stream_imports_textgrad_without_litellm():
    """TextGrad's experimental LiteLLM engine (litellm + openai, ~150 MB of RSS) is never loaded by the
    words stream; asking TextGrad for it names what to use instead."""
    code = (
        "import sys, rosa2.textgrad_engine, textgrad;"
        "print([m for m in sys.modules if m.split('.')[0] in ('litellm', 'openai')]);"
        "textgrad.get_engine('experimental:gpt-4o')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
    assert "Rosa2Error" in result.stderr and "semantic.critic='openai'" in result.stderr


def test_freed_heap_goes_back_to_the_os_after_a_phase():
    """glibc keeps freed small blocks for reuse; return_freed_memory hands them back (RSS drops)."""
    code = (
        "import torch; from rosa2.session import return_freed_memory\n"
        "rss = lambda: int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) // 1024\n"
        "blocks = [torch.ones(16 * 1024) for _ in range(4000)]\n"  # 64 KiB each, 250 MiB: heap, not mmap
        "pin = torch.ones(16)\n"  # allocated after them: the heap's top is not free, so free() trims nothing
        "del blocks\n"
        "before = rss(); return_freed_memory(torch.device('cpu')); print(before, rss())"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split())
    assert before - after > 150, (before, after)


def test_env_hygiene_points_state_under_the_home():
    root = env.home()
    assert os.environ["PREFECT_HOME"].startswith(str(root))
    assert os.environ["TEXTGRAD_LOG_DIR"].startswith(str(root))
    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_embedded_model_generates_with_the_chat_template(smol):
    from rosa2.policy import Policy

    policy = Policy(smol, GenerationConfig(max_new_tokens=24))
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    templated = smol.tokenizer.decode(policy.prompt_ids(messages))
    assert "<|im_start|>user" in templated and templated.rstrip().endswith("<|im_start|>assistant")
    reply = policy.generate(messages)
    assert "Paris" in reply.text
    assert 0 < reply.tokens <= 24
    again = policy.generate(messages)  # greedy decoding is deterministic
    assert again.text == reply.text


def test_loader_rejects_a_directory_without_config(tmp_path):
    with pytest.raises(models.ModelError, match="has no config.json"):
        models.resolve(str(tmp_path))


def test_loader_rejects_a_name_that_is_neither_path_nor_hub_id():
    with pytest.raises(models.ModelError, match="neither 'embedded'"):
        models.resolve("no/such/thing")


def test_loader_loads_a_local_directory(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = models.load(ModelConfig(name=str(tmp_path), device="cpu"))
    assert loaded.model.config.num_hidden_layers == 2
    assert loaded.source == str(tmp_path.resolve())


def test_corrupted_cache_entry_names_file_and_hash_and_is_rebuilt(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ROSA2_HOME", str(home))
    # Seed the private cache from the real one (cheap copy instead of a 10 s conversion).
    import shutil

    shutil.copytree(env.source_root() / ".rosa2" / "models", home / "models") if (
        env.source_root() / ".rosa2" / "models"
    ).exists() else models._convert_embedded(home / "models" / models.EMBEDDED_DIRNAME)
    target = models.embedded_cache_dir()
    assert str(target).startswith(str(home))
    manifest = json.loads((target / models.MANIFEST).read_text())
    victim = target / "config.json"
    victim.write_text(victim.read_text() + " ")
    models._verified.discard(target)
    with pytest.raises(models.ModelError) as info:
        models.ensure_embedded()
    message = str(info.value)
    assert str(victim) in message and manifest["files"]["config.json"] in message
    assert not target.exists()  # removed, so the next run rebuilds it
    rebuilt = models.ensure_embedded()
    assert json.loads((rebuilt / models.MANIFEST).read_text())["files"] == manifest["files"]


def test_wrong_hash_gguf_is_named(monkeypatch, tmp_path):
    fake = tmp_path / models.EMBEDDED_GGUF
    fake.write_bytes(b"not a model")
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: fake)
    with pytest.raises(models.ModelError) as info:
        models._convert_embedded(tmp_path / "out")
    assert str(fake) in str(info.value) and models.EMBEDDED_GGUF_SHA256 in str(info.value)


def test_doctor_is_green_on_a_set_up_machine():
    out = subprocess.run([sys.executable, "-m", "rosa2", "doctor"], capture_output=True, text=True)
    assert "embedded model" in out.stdout and "accelerator" in out.stdout
    assert out.returncode == 0, out.stdout


def test_doctor_fails_with_the_fix_when_the_model_cache_is_missing(tmp_path):
    environ = {**os.environ, "ROSA2_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "rosa2", "doctor"], capture_output=True, text=True, env=environ)
    assert out.returncode == 1, out.stdout
    assert "[FAIL] embedded model" in out.stdout
    assert "fix: run `bash infra/setup.sh`" in out.stdout


def test_rosa2_run_has_demo_size_defaults_that_flags_override(capsys):
    from rosa2.cli import build_parser, main
    from rosa2.cli.run import base_cell, run_cells

    cell = base_cell(build_parser("run").parse_args(["run"]))
    assert (cell.generation.max_new_tokens, cell.semantic.max_new_tokens, cell.data.limit) == (48, 48, 8)
    # the CPU demo's critic: compact prompts, budgets from measured lengths (config.SMALL_CRITIC)
    assert (cell.semantic.prompts, cell.semantic.update_tokens) == ("compact", 64)
    assert (cell.data.dataset, cell.session.max_turns, cell.session.parallel_sessions) == ("embedded-choice", 3, 8)
    cell = base_cell(build_parser("run").parse_args(["run", "--max-new-tokens", "200", "--semantic-max-new-tokens", "300"]))
    assert (cell.generation.max_new_tokens, cell.semantic.max_new_tokens) == (200, 300)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "Tokens per critique (TGD's backward call) at most (default: 48)" in " ".join(capsys.readouterr().out.split())
    _, cells = run_cells(build_parser("run").parse_args(["run", "--method", "rosa", "baseline", "--parallel-sessions", "4", "--feedback", "none"]))
    assert [(c.method, c.session.parallel_sessions, c.session.feedback) for c in cells] == [("rosa", 4, "none"), ("baseline", 4, "none")]
    # the library defaults are untouched for everything else
    assert GenerationConfig().max_new_tokens == 128
    assert SemanticConfig().prompts == "textgrad"


def test_sigterm_unwinds_a_command_like_ctrl_c(tiny_dir):
    """`kill PID` reaches the command as KeyboardInterrupt (what closes its MLflow run as KILLED)."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "rosa2", "chat", "--model", str(tiny_dir), "--model-device", "cpu"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    banner = proc.stdout.readline()  # printed once the model is loaded; then chat waits on stdin
    assert "rosa2 chat" in banner and time.monotonic() < deadline, banner
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rosa2 chat: interrupted" in err, (proc.returncode, err[-2000:])


@pytest.mark.parametrize("command", sorted(__import__("rosa2.cli", fromlist=["COMMANDS"]).COMMANDS))
def test_every_command_prints_its_help(command, capsys):
    """`rosa2 COMMAND --help` renders (argparse %-formats help text: a stray % used to crash bench's)."""
    from rosa2.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rosa2 {command}")


@pytest.mark.parametrize("name, shown", [
    ("embedded", "SmolLM2-135M-Instruct"), ("smollm2", "SmolLM2-135M-Instruct"), ("Qwen/Qwen3-8B", "Qwen3-8B"),
    ("./models/Qwen3-8B", "Qwen3-8B"), ("/abs/models/Qwen3-8B/", "Qwen3-8B"), ("gpt2", "gpt2"),
])
def test_one_display_name_for_a_model_everywhere(name, shown):
    from rosa2.models import display_name

    assert display_name(name) == shown
