"""Bad input, named (issue 17.5 / 14.2): each a one-line error before any work, never a traceback
or minutes of compute."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rosa2.config import ConfigError, SandboxConfig

ROOT = Path(__file__).resolve().parents[1]


def rosa2(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rosa2", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(out: subprocess.CompletedProcess, command: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith(f"rosa2 {command}: error:")]
    assert len(lines) == 1, out.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("question, answer, named", [("", "4", "--question"), ("   ", "4", "--question"), ("2+2?", "", "--answer")])
def test_session_refuses_an_empty_question_or_answer_before_loading_a_model(question, answer, named):
    start = time.monotonic()
    line = one_line_error(rosa2("session", "--question", question, "--answer", answer), "session")
    assert f"{named} is empty" in line
    assert "scoring with" not in line
    assert time.monotonic() - start < 60  # no model was loaded (that alone is ~10 s here)


def test_a_prompt_longer_than_the_context_is_refused_with_both_numbers_before_generating(tiny):
    from rosa2.config import GenerationConfig
    from rosa2.policy import ContextTooLong, Policy, context_length

    policy = Policy(tiny, GenerationConfig(max_new_tokens=16))
    context = context_length(policy.model)
    assert context == 2048
    calls = []
    policy.model.generate = lambda *a, **k: calls.append(1)  # would be minutes of compute on a real model
    question = "What is 2+2? " * 1000  # ~7000 tokens
    prompt_tokens = policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True)["input_ids"]
    with pytest.raises(ContextTooLong) as info:
        policy.generate([{"role": "user", "content": question}])
    message = str(info.value)
    assert f"the prompt is {len(prompt_tokens)} tokens" in message and f"context is {context} tokens" in message
    assert calls == []  # refused before generating
    # the answer budget counts: a prompt that fits alone but not with max_new_tokens is refused too
    fits = "x " * 1000
    n = len(policy.tokenizer.apply_chat_template([{"role": "user", "content": fits}], add_generation_prompt=True, return_dict=True)["input_ids"])
    with pytest.raises(ContextTooLong, match=f"the prompt is {n} tokens and the answer may take {context - n + 1} more"):
        policy.generate([{"role": "user", "content": fits}], max_new_tokens=context - n + 1)


@pytest.mark.slow
def test_session_cli_names_both_numbers_for_a_100k_character_question():
    question = "What is 2+2? " * 7700  # 100k characters
    line = one_line_error(rosa2("session", "--question", question, "--answer", "4", "--max-turns", "1"), "session")
    assert "the prompt is " in line and "the model's context is 8192 tokens" in line


def test_sandbox_limits_below_what_a_container_starts_with_are_refused_when_the_cell_is_built():
    from rosa2.tasks.cells import SANDBOX_FLOORS, Cell

    with pytest.raises(ConfigError, match=r"sandbox.memory_mb=1 is below what a sandbox container can start with \(32 MB"):
        Cell(sandbox=SandboxConfig(memory_mb=1))
    for name, (floor, _) in SANDBOX_FLOORS.items():
        Cell(sandbox=SandboxConfig(**{name: floor}))  # the floor itself is allowed
        with pytest.raises(ConfigError, match=f"sandbox.{name}="):
            Cell(sandbox=SandboxConfig(**{name: type(floor)(floor / 2) if isinstance(floor, float) else floor - 1}))


def test_run_refuses_sandbox_memory_1_before_any_work(tmp_path):
    from conftest import free_port

    # servers that do not exist: the error must come before they are even looked for
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
           "ROSA2_HOME": str(tmp_path)}
    line = one_line_error(rosa2("run", "--sandbox-memory-mb", "1", **env), "run")
    assert "sandbox.memory_mb=1 is below" in line and "--sandbox-memory-mb" in line


def test_sweep_file_sandbox_floor_names_the_line(tmp_path):
    from rosa2.flows import sweep as sweep_module

    path = tmp_path / "s.yaml"
    path.write_text("models: [embedded]\ndatasets: [embedded-math]\nmethods: [rosa]\nseeds: [0]\nsandbox:\n  timeout_s: 5\n  memory_mb: 1\n")
    with pytest.raises(ConfigError, match=r"s\.yaml:7: sandbox: memory_mb=1 is below"):
        sweep_module.load(path)
