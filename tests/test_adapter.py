"""The parametric stream: LoRA θ, the closed-form update toward the target policy (docs/algorithm.md §2)."""

from __future__ import annotations

import json

import pytest
import torch

from rosa2.adapter import RowLoRA, UpdateItem, parametric_steps, segment_grads, segment_index, target_residual
from rosa2.config import AdaptConfig, ConfigError, GenerationConfig, ModelConfig, SessionConfig
from rosa2.policy import Policy
from rosa2.session import SessionEngine

QUESTION = [{"role": "user", "content": "What is 12 + 30? Answer with the number."}]


class Stream:
    """One session's θ (slot 0 of a RowLoRA) and its update, as the engine runs them for a batch of one."""

    def __init__(self, policy: Policy, cfg: AdaptConfig) -> None:
        self.policy, self.cfg = policy, cfg
        self.lora = RowLoRA(policy.model, cfg, slots=1)
        self.lora.reset(0, seed=0)

    @property
    def params(self) -> list[torch.Tensor]:
        return self.lora.tensors()

    def theta(self) -> torch.Tensor:
        return self.lora.flat(0).detach().clone().double()

    def step(self, prompt, response, reward):
        (step,) = parametric_steps(self.policy.model, self.lora, self.cfg, [UpdateItem(0, prompt, response, reward)])
        return step


def log_likelihood(stream: Stream, prompt: torch.Tensor, response: torch.Tensor) -> float:
    """log π(y | context) = Σ_i log p_i under the policy as it is now (adapter included)."""
    ids = torch.cat([prompt, response])[None]
    with torch.no_grad(), stream.lora.rows([0]):
        logits = stream.policy.model(input_ids=ids).logits[0, prompt.numel() - 1 : -1]
    return float(torch.log_softmax(logits.double(), -1).gather(-1, response[:, None]).sum())


@pytest.fixture
def answer(tiny):
    """(policy, stream, reply) with the stream's hooks taken off the shared tiny model afterwards."""
    made = []

    def make(**adapt):
        policy = Policy(tiny, GenerationConfig(max_new_tokens=16))
        stream = Stream(policy, AdaptConfig(**adapt))
        made.append(stream)
        reply = policy.generate(QUESTION)
        assert reply.tokens > 0
        return policy, stream, reply

    yield make
    for stream in made:
        stream.lora.remove()


@pytest.mark.parametrize("granularity", ["sequence", "chunks:4", "token"])
@pytest.mark.parametrize("reward", [-1.0, 1.0])
def test_update_moves_the_likelihood_of_the_answer_with_the_reward(answer, granularity, reward):
    # A random model is far from linear in θ: a small step checks the direction of the update
    # here; test_session.py checks the defaults (η = 1, accumulated steps) on the real SmolLM2.
    policy, stream, reply = answer(granularity=granularity, eta=0.1)
    before = log_likelihood(stream, reply.prompt_ids, reply.response_ids)
    step = stream.step(reply.prompt_ids, reply.response_ids, reward)
    after = log_likelihood(stream, reply.prompt_ids, reply.response_ids)
    assert step.delta_theta_sq > 0
    assert (after - before) * reward > 0, (granularity, reward, before, after)
    expected = {"sequence": 1, "chunks:4": min(4, reply.tokens), "token": reply.tokens}[granularity]
    assert step.segments == expected and len(step.residual) == expected
    assert all(r * reward > 0 for r in step.residual)  # R = p̃ − p has the sign of the reward


def test_logprob_residual_moves_the_likelihood_by_about_eta_over_beta(answer):
    policy, stream, reply = answer(residual="logprob", eta=0.5, beta=1.0, damping=0.0)
    before = log_likelihood(stream, reply.prompt_ids, reply.response_ids)
    stream.step(reply.prompt_ids, reply.response_ids, -1.0)
    after = log_likelihood(stream, reply.prompt_ids, reply.response_ids)
    assert after - before == pytest.approx(-0.5, rel=0.2)  # linearised: J·Δθ = η·r/β exactly


@pytest.mark.parametrize("residual", ["prob", "logprob"])
def test_single_segment_step_is_eta_R_g_over_norm_plus_lambda(answer, residual):
    eta, beta, damping = 0.7, 2.0, 0.3
    policy, stream, reply = answer(residual=residual, eta=eta, beta=beta, damping=damping)
    stream.step(reply.prompt_ids, reply.response_ids, -1.0)  # make B ≠ 0 so both A and B have gradients
    # g = ∇_θ Σ_i p_i (or Σ_i log p_i), computed here with one plain backward
    ids = torch.cat([reply.prompt_ids, reply.response_ids])[None]
    for p in stream.params:
        p.requires_grad_(True)
    with stream.lora.rows([0]):
        logits = policy.model(input_ids=ids).logits[0, reply.prompt_ids.numel() - 1 : -1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, reply.response_ids[:, None])[:, 0]
    if residual == "prob":
        f, R = logp.exp().sum(), float(target_residual(logp.exp().detach(), 1.0, beta).sum())
    else:
        f, R = logp.sum(), 1.0 / beta
    g = stream.lora.flat(0, torch.autograd.grad(f, stream.params)).double()
    for p in stream.params:
        p.requires_grad_(False)
    lam = damping * float(g @ g)  # λ relative to the mean diagonal of JJᵀ (= ‖g‖² for S = 1)
    expected = eta * R * g / (float(g @ g) + lam)

    before = stream.theta()
    step = stream.step(reply.prompt_ids, reply.response_ids, 1.0)
    actual = stream.theta() - before
    assert torch.allclose(actual, expected, rtol=1e-3, atol=2**-21 * float(before.abs().max()))  # θ is float32
    assert step.delta_theta_sq == pytest.approx(float(expected @ expected), rel=1e-3)


@pytest.mark.parametrize("chunk", [16, 2])  # all segments in one vmapped backward / in pieces
def test_batched_jacobian_equals_one_backward_per_row(answer, chunk):
    policy, stream, reply = answer()
    stream.step(reply.prompt_ids, reply.response_ids, -1.0)
    ids = torch.cat([reply.prompt_ids, reply.response_ids])[None]
    for w in stream.params:
        w.requires_grad_(True)
    with stream.lora.rows([0]):
        logits = policy.model(input_ids=ids).logits[0, reply.prompt_ids.numel() - 1 : -1]
    p = torch.log_softmax(logits, -1).gather(-1, reply.response_ids[:, None])[:, 0].exp()
    index = segment_index(p.numel(), "chunks:3", 64)
    outputs = torch.zeros(3).index_add(0, index, p)
    rows = [stream.lora.flat(0, torch.autograd.grad(outputs[s], stream.params, retain_graph=True)) for s in range(3)]
    batched = segment_grads(outputs[None], stream.params, chunk)  # per tensor: [S, slots, ...]
    jacobian = torch.stack([stream.lora.flat(0, [g[s] for g in batched]) for s in range(3)])
    assert torch.allclose(jacobian, torch.stack(rows), atol=1e-7)


@pytest.mark.parametrize("granularity", ["sequence", "chunks:4"])
def test_activation_checkpointing_takes_the_same_step_and_restores_the_model(answer, granularity):
    from transformers.modeling_layers import GradientCheckpointingLayer

    from rosa2.adapter import update_memory

    steps = {}
    for checkpoint in (False, True):
        policy, stream, reply = answer(granularity=granularity, checkpoint_activations=checkpoint)
        stream.step(reply.prompt_ids, reply.response_ids, -1.0)
        steps[checkpoint] = stream.theta()
        stream.lora.remove()
    assert steps[True].abs().sum() > 0
    torch.testing.assert_close(steps[True], steps[False], rtol=1e-4, atol=1e-7)

    blocks = [m for m in policy.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert blocks, "the model has no checkpointable blocks: the test would prove nothing"
    with update_memory(policy.model, AdaptConfig()):
        assert all(b.gradient_checkpointing and b.training for b in blocks)
        assert not any(m.training for b in blocks for m in b.children())  # no dropout switched on
    assert not any(b.gradient_checkpointing or b.training for b in blocks)


def test_segments_are_contiguous_and_capped():
    assert segment_index(5, "sequence", 64).tolist() == [0] * 5
    assert segment_index(6, "chunks:3", 64).tolist() == [0, 0, 1, 1, 2, 2]
    assert segment_index(2, "chunks:4", 64).tolist() == [0, 1]
    assert segment_index(4, "token", 64).tolist() == [0, 1, 2, 3]
    assert segment_index(6, "token", 2).tolist() == [0, 0, 0, 1, 1, 1]


def test_adapter_is_zero_before_the_first_update_and_again_at_the_next_problem(tiny):
    from rosa2.environment import ExactMatchEnvironment
    from rosa2.records import Problem

    engine = SessionEngine(tiny, SessionConfig(method="rosa", max_turns=2), generation=GenerationConfig(max_new_tokens=8))
    seen: list[tuple[bool, bool]] = []

    class Watching(ExactMatchEnvironment):
        def reset(self, problem):  # called by run() after θ ← 0, before the first generation
            lora = engine.lora()
            ids = torch.tensor([[1, 2, 3, 4]])
            with torch.no_grad():
                base = engine.policy.model(input_ids=ids).logits
                with lora.rows([0]):
                    adapted = engine.policy.model(input_ids=ids).logits
            seen.append((lora.is_zero(0), torch.equal(adapted, base)))
            return super().reset(problem)

    for pid in ("p1", "p2"):
        result = engine.run(Problem(id=pid, prompt="Say 7.", domain="math", answer="nope"), Watching())
        assert result.turns[0].delta_theta_sq > 0
        assert not engine.lora().is_zero(0)  # θ accumulated during the problem
    assert seen == [(True, True), (True, True)]
    engine.release()


def test_save_adapter_writes_a_peft_adapter_that_reproduces_the_model(tiny, tmp_path):
    from peft import PeftModel

    from rosa2 import models
    from rosa2.environment import ExactMatchEnvironment
    from rosa2.records import Problem

    engine = SessionEngine(tiny, SessionConfig(method="rosa", max_turns=2), generation=GenerationConfig(max_new_tokens=8))
    engine.run(Problem(id="p", prompt="Say 7.", domain="math", answer="nope"), ExactMatchEnvironment())
    path = engine.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "rosa2.json"]
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 8

    ids = torch.tensor([[5, 6, 7, 8]])
    lora = engine.lora()

    def adapted():
        with lora.rows([0]):
            return engine.policy.model(input_ids=ids).logits

    with torch.no_grad():
        expected = adapted()
        assert not torch.allclose(engine.policy.model(input_ids=ids).logits, expected, atol=1e-6)  # θ moved
        fresh = PeftModel.from_pretrained(models.tiny_random(seed=0).model, str(path)).eval()
        assert torch.allclose(fresh(input_ids=ids).logits, expected, atol=1e-6)
        lora.reset(0, seed=123)
        assert not torch.allclose(adapted(), expected, atol=1e-6)
        engine.load_adapter(path)
        assert torch.allclose(adapted(), expected, atol=1e-6)
    engine.release()


def test_unknown_target_module_is_refused_from_the_config_alone(tiny, tmp_path):
    tiny.model.config.save_pretrained(tmp_path)  # a config and no weights: loading would fail
    with pytest.raises(ConfigError, match=r"\['foo_proj'\].*allowed: \[.*'q_proj'"):
        SessionEngine(ModelConfig(name=str(tmp_path)), SessionConfig(method="rosa"), AdaptConfig(target_modules=("q_proj", "foo_proj")))


def test_knob_values_are_refused_with_what_is_allowed():
    with pytest.raises(ConfigError, match="beta=0"):
        AdaptConfig(beta=0)
    with pytest.raises(ConfigError, match="damping=-1"):
        AdaptConfig(damping=-1)
    with pytest.raises(ConfigError, match="granularity='chunks:0'"):
        AdaptConfig(granularity="chunks:0")
    with pytest.raises(ConfigError, match="granularity='token' with residual='logprob'"):
        AdaptConfig(granularity="token", residual="logprob")
