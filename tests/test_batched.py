"""One engine, B sessions wide: per-row adapter slots, batched generation, one backward for B
updates, continuous batching, and B = 1 equal to B = N on the same engine under greedy decoding."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from rosa2 import models
from rosa2.adapter import RowLoRA, UpdateItem, parametric_steps, token_batches
from rosa2.config import AdaptConfig, ConfigError, GenerationConfig, SemanticConfig, SessionConfig
from rosa2.environment import Environment, ExactMatchEnvironment
from rosa2.policy import Policy, left_pad
from rosa2.records import Problem, RewardResult
from rosa2.session import SessionEngine

QUESTIONS = ["What is 2 + 3?", "Name a colour.", "hi", "Compute 17 * 23 and explain each step, please."]


def _prompts(policy: Policy) -> list[torch.Tensor]:
    return [policy.prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]


def test_batched_generation_equals_one_at_a_time(tiny):
    """Left padding + attention mask: each row decodes what it decodes alone (prompts of unequal
    length), each under its own adapter slot."""
    policy = Policy(tiny, GenerationConfig(max_new_tokens=12))
    prompts = _prompts(policy)
    assert len({int(p.numel()) for p in prompts}) > 1
    lora = RowLoRA(tiny.model, AdaptConfig(), slots=len(prompts))
    for slot in range(len(prompts)):
        lora.reset(slot, seed=slot)
        lora.B[0][slot].normal_(std=0.5)  # a non-zero θ per slot, different in every slot
    batch = policy.generate_many(prompts, lora=lora, slots=list(range(len(prompts))))
    for slot, (question, reply) in enumerate(zip(QUESTIONS, batch)):
        alone = policy.generate([{"role": "user", "content": question}], lora=lora, slot=slot)
        assert reply.response_ids.tolist() == alone.response_ids.tolist()
        assert reply.text == alone.text
    lora.remove()


def _logits(model, prompts, lora=None, slots=None):
    ids, mask, positions = left_pad(prompts, 0)
    ctx = lora.rows(slots) if lora is not None else torch.no_grad()
    with torch.no_grad(), ctx:
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]


def test_per_row_adapters_are_independent(tiny):
    """Updating session 0's adapter moves row 0's logits and leaves row 1's (slot 1) unchanged;
    with no rows set the model is the frozen base model."""
    policy = Policy(tiny, GenerationConfig(max_new_tokens=6))
    prompts = _prompts(policy)[:2]
    base = _logits(tiny.model, prompts)
    lora = RowLoRA(tiny.model, AdaptConfig(), slots=2)
    lora.reset(0, seed=1)
    lora.reset(1, seed=2)
    replies = policy.generate_many(prompts, lora=lora, slots=[0, 1])
    before = _logits(tiny.model, prompts, lora, [0, 1])
    assert torch.allclose(before, base, atol=1e-6)  # θ = 0 at the start: B = 0

    (step,) = parametric_steps(tiny.model, lora, AdaptConfig(), [UpdateItem(0, prompts[0], replies[0].response_ids, -1.0)])
    assert step.delta_theta_sq > 0
    after = _logits(tiny.model, prompts, lora, [0, 1])
    assert not torch.allclose(after[0], before[0], atol=1e-5)
    assert torch.equal(after[1], before[1])
    assert torch.allclose(_logits(tiny.model, prompts), base, atol=1e-6)  # no slot active = base model
    # the same slot applied to another row gives that row the same adapted function
    swapped = _logits(tiny.model, prompts[::-1], lora, [1, 0])
    assert torch.allclose(swapped[1], after[0], atol=1e-5)
    lora.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_applies_the_adapter_in_place_as_the_update_does(dtype):
    """Generation (no grad) adds s·B A x into W x in place and skips slots whose B is zero; the
    update (grad on) builds the same sum out of place. Both give one function: equal logits up to
    rounding, and a zero-B row is the base model bit for bit."""
    tiny = models.tiny_random(seed=0)
    tiny.model.to(dtype)
    ids, mask, positions = left_pad([torch.tensor([5, 6, 7, 8, 9]), torch.tensor([10, 11, 12])], 0)

    def logits(slots=None, grad=False):
        with torch.set_grad_enabled(grad), lora.rows(slots) if slots else torch.no_grad():
            return tiny.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().detach()

    lora = RowLoRA(tiny.model, AdaptConfig(), slots=2)
    lora.reset(0, seed=1)
    lora.reset(1, seed=2)
    base = logits()
    assert torch.equal(logits([0, 1]), base)  # θ = 0: the hooks add nothing, not even rounding
    for b in lora.B:
        b[1].normal_(std=0.5)
    in_place, out_of_place = logits([0, 1]), logits([0, 1], grad=True)
    assert torch.equal(in_place[0], base[0])  # slot 0 still zero, beside a non-zero slot
    assert not torch.allclose(in_place[1], base[1], atol=1e-3)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(in_place, out_of_place, atol=tol, rtol=tol)
    assert torch.equal(logits(), base)  # outside rows(): the base model, untouched by the in-place adds
    lora.remove()


def test_one_backward_for_two_sessions_equals_each_alone(tiny):
    """Two sessions updated in one backward take, each, the step they take as a batch of one
    (granularity chunks:3 goes through the vmapped is_grads_batched path): max_tokens=1 puts every
    session in its own micro-batch."""
    cfg = AdaptConfig(granularity="chunks:3")
    policy = Policy(tiny, GenerationConfig(max_new_tokens=8))
    prompts = _prompts(policy)[:2]
    replies = [policy.generate([{"role": "user", "content": q}]) for q in QUESTIONS[:2]]
    thetas, steps = [], []
    for max_tokens in (1, 4096):
        lora = RowLoRA(tiny.model, cfg, slots=2)
        for slot in range(2):
            lora.reset(slot, seed=10 + slot)
        items = [UpdateItem(slot, prompts[slot], replies[slot].response_ids, reward) for slot, reward in ((0, -1.0), (1, 1.0))]
        steps.append(parametric_steps(tiny.model, lora, cfg, items, max_tokens=max_tokens))
        thetas.append([lora.flat(slot).clone() for slot in range(2)])
        lora.remove()
    for slot in range(2):
        assert torch.allclose(thetas[0][slot], thetas[1][slot], atol=1e-6, rtol=1e-4)
        assert math.isclose(steps[0][slot].delta_theta_sq, steps[1][slot].delta_theta_sq, rel_tol=1e-4)
        assert steps[0][slot].segments == steps[1][slot].segments == 3
        assert steps[0][slot].delta_theta_sq > 0
    lengths = [int(prompts[k].numel() + replies[k].response_ids.numel()) for k in range(2)]
    assert [step.batch_tokens for step in steps[0]] == lengths  # alone: each its own micro-batch
    assert [step.batch_tokens for step in steps[1]] == [2 * max(lengths)] * 2  # together: rows × longest


class ScriptedEnvironment(Environment):
    """A simulated user that accepts the answer at a fixed turn (1-based), whatever it says:
    sessions then leave the batch at different rounds."""

    name = "scripted"

    def __init__(self, accept_at: int) -> None:
        super().__init__("sparse")
        self.accept_at = accept_at

    def scorer(self, problem: Problem):
        calls = iter(range(1, 1000))

        def score(response: str) -> RewardResult:
            ok = next(calls) == self.accept_at
            return RewardResult(reward=1.0 if ok else -1.0, prediction=response[:10], gold=problem.answer)

        return score


PROBLEMS = [Problem(id=f"p{i}", prompt=f"What is {i} + {3 * i}?", domain="math", answer=str(4 * i)) for i in range(5)]
ACCEPT_AT = [1, 3, 2, 4, 2]  # p0 leaves after round 1, p2 after round 2, ... with max_turns 3, p3 never


def _assert_same(one, many):
    assert [r.problem_id for r in many] == [r.problem_id for r in one]
    for a, b in zip(one, many):
        assert (a.solved, a.turn_solved, a.turns_used, a.scored) == (b.solved, b.turn_solved, b.turns_used, b.scored)
        for x, y in zip(a.turns, b.turns):
            assert (x.turn, x.response, x.reward, x.message, x.refined_feedback) == (y.turn, y.response, y.reward, y.message, y.refined_feedback)
            assert (x.words_on, x.weights_on, x.semantic_class) == (y.words_on, y.weights_on, y.semantic_class)
            assert math.isclose(x.delta_theta_sq, y.delta_theta_sq, rel_tol=1e-3, abs_tol=1e-9)


@pytest.fixture(scope="module")
def width_engine():
    """One engine (one loaded tiny model) that every method and width below derives from."""
    return SessionEngine(
        models.tiny_random(seed=0), SessionConfig(method="rosa", max_turns=3), AdaptConfig(granularity="chunks:2"),
        SemanticConfig(max_new_tokens=16),  # the random critic never closes TextGrad's tags: keep it short
        GenerationConfig(max_new_tokens=8),
    )


@pytest.mark.parametrize("method", ["baseline", "textgrad", "rosa", "rosa2", "switch-w2p@2", "switch-p2w@2"])
def test_batch_of_one_equals_batch_of_two_on_the_same_engine(width_engine, method):
    """Same per-turn responses, rewards, refined messages and ‖Δθ‖² at B = 1 and B = 2; at B = 2
    sessions leave at different rounds and problems join freed slots (θ reset)."""
    session = SessionConfig(method=method, max_turns=3)
    one = width_engine.with_session(session, batch_size=1)
    expected = one.run_many(PROBLEMS, [ScriptedEnvironment(k) for k in ACCEPT_AT])
    many = width_engine.with_session(session, batch_size=2)
    order: list[tuple[str, int]] = []
    left: list[str] = []
    got = many.run_many(
        PROBLEMS,
        [ScriptedEnvironment(k) for k in ACCEPT_AT],
        on_turn=lambda problem, record: order.append((problem.id, record.turn)),
        on_result=lambda result: left.append(result.problem_id),
    )
    _assert_same(expected, got)
    words, weights = (sum(getattr(r, f) for res in got for r in res.turns) for f in ("words_on", "weights_on"))
    assert (words > 0, weights > 0) == {"baseline": (False, False), "textgrad": (True, False), "rosa": (False, True)}.get(
        method, (True, True)
    )
    # p0 leaves after round 1, so p2 joins in round 2 beside p1; p1 and p3 leave after 3 turns
    assert order[:5] == [("p0", 1), ("p1", 1), ("p1", 2), ("p2", 1), ("p1", 3)]
    assert left == ["p0", "p1", "p2", "p4", "p3"]
    assert [r.turns_used for r in got] == [1, 3, 2, 3, 2]
    if weights:
        assert many.adapter_bytes() == 2 * many.lora().slot_numel() * 4  # float32 slots, two of them
    # seconds are shares: a run's problems add up to about its wall time, whatever B
    assert all(0 < r.seconds <= r.wall_seconds + 1e-6 for r in got)
    many.release()


def test_reset_draws_the_same_initial_adapter_in_every_slot(tiny):
    lora = RowLoRA(tiny.model, AdaptConfig(), slots=3)
    lora.reset(2, seed=7)
    lora.reset(0, seed=7)
    lora.reset(1, seed=8)
    assert torch.equal(lora.flat(2), lora.flat(0)) and not torch.equal(lora.flat(1), lora.flat(0))
    assert all(bool(b[2].eq(0).all()) for b in lora.B) and lora.is_zero(2)
    lora.remove()
    assert not any(m._forward_hooks for m in tiny.model.modules())


def test_update_budget_follows_the_free_memory_and_the_measured_cost(width_engine):
    from rosa2.session import UpdateBudget, available_memory_bytes

    cpu = torch.device("cpu")
    budget = UpdateBudget(first=256, share=0.5)
    assert budget.tokens(cpu) == 256  # nothing measured yet
    budget.observe(100, 0)  # a step that allocated nothing measurable teaches nothing
    assert budget.tokens(cpu) == 256
    budget.observe(100, 100 * 2**20)  # 1 MiB per token
    free = available_memory_bytes(cpu)
    assert abs(budget.tokens(cpu) - 0.5 * free / 2**20) <= 0.01 * free / 2**20 + 1
    budget.observe(10, 20 * 2**20)  # a dearer step: the budget follows the largest cost seen
    assert budget.bytes_per_token == 2 * 2**20

    # an engine at update_tokens=0 takes its updates in budgeted micro-batches (the same steps:
    # test_one_backward_for_two_sessions_equals_each_alone); what a tiny model's update allocates
    # can be served from freed heap, so its measured cost is not asserted here
    engine = width_engine.with_session(SessionConfig(method="rosa", max_turns=2), batch_size=2)
    assert engine.update_tokens == 0
    results = engine.run_many(PROBLEMS[:2], [ScriptedEnvironment(9) for _ in range(2)])
    assert all(r.turns[0].delta_theta_sq > 0 for r in results)
    assert engine._budget.bytes_per_token >= 0 and engine._budget.tokens(cpu) >= 1
    engine.release()


def test_token_batches_keep_the_padded_size_within_the_budget():
    assert token_batches([0, 1, 2, 3], [100, 120, 90, 300], 250) == [[0, 1], [2], [3]]
    assert token_batches([0, 1, 2], [10, 10, 10], 1) == [[0], [1], [2]]  # over budget: one each
    assert token_batches([0, 1, 2], [10, 10, 10], 1024) == [[0, 1, 2]]


def test_bad_input_is_refused(tiny):
    with pytest.raises(ConfigError, match="gate_projx"):
        RowLoRA(tiny.model, AdaptConfig(target_modules=("q_proj", "gate_projx")), slots=2)
    with pytest.raises(ConfigError, match="batch_size=0"):
        SessionEngine(tiny, SessionConfig(method="rosa"), batch_size=0)
    with pytest.raises(ConfigError, match="update_tokens=-1"):
        SessionEngine(tiny, SessionConfig(method="rosa"), update_tokens=-1)
    from rosa2.bench import BenchConfig

    with pytest.raises(ConfigError, match="arms"):
        BenchConfig(arms=("fast",))


@pytest.mark.slow
def test_batch_of_one_equals_batch_of_three_on_smollm2():
    """The real model, three problems, rosa (weights): B = 3 equals B = 1 on the same engine."""
    generation = GenerationConfig(max_new_tokens=24)
    problems = [
        Problem(id=f"s{i}", prompt=f"What is {a} * {b}? Give only the number.", domain="math", answer=str(a * b))
        for i, (a, b) in enumerate([(7, 8), (37, 43), (12, 11)])
    ]
    engine = SessionEngine(models.load("embedded"), SessionConfig(method="rosa", max_turns=2), generation=generation)
    expected = engine.run_many(problems, [ExactMatchEnvironment("sparse") for _ in problems])
    wide = engine.with_session(batch_size=3)
    _assert_same(expected, wide.run_many(problems, [ExactMatchEnvironment("sparse") for _ in problems]))


def test_bench_cli_on_the_tiny_model(tmp_path):
    """`rosa2 bench` prints the issue's ratios with their absolute figures and the device."""
    out = subprocess.run(
        [sys.executable, "-m", "rosa2", "bench", "--model", "tiny-random", "--problems", "2", "--batch-size", "2",
         "--max-turns", "2", "--max-new-tokens", "4", "--semantic-max-new-tokens", "4"],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    for key in ("batched_vs_sequential", "parametric_over_generate", "semantic_over_generate",
                "time_per_problem_rosa2_over_baseline", "adapt_memory_overhead"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["device"].startswith(("cpu", "cuda"))
    assert report["absolute"]["turns_equal_to_sequential"] == "4/4"
    assert report["absolute"]["peak_memory_bytes"]["baseline"] > 0
    # which stream needs the memory, per arm; the arm's peak is the largest of its phases' peaks
    phases = report["absolute"]["peak_memory_mb_by_phase"]
    assert set(phases["baseline"]) == {"generate", "reward"}
    assert set(phases["batched"]) == set(phases["sequential"]) == {"generate", "reward", "semantic", "parametric"}
    for arm, peaks in phases.items():
        assert 0 < max(peaks.values()) <= report["absolute"]["peak_memory_bytes"][arm] / 2**20 + 0.1
    # the science beside the time: the critic's refinements and the answers' moves, per arm
    science = report["absolute"]["science"]
    assert science["baseline"]["semantic_refinements"] == 0
    assert science["batched"]["semantic_refinements"] == science["sequential"]["semantic_refinements"] > 0
    assert science["batched"]["answer_change_turns"] == science["sequential"]["answer_change_turns"]
    # how near generation runs to this machine's ceiling for the model, at B = 1 and B = 2
    ceiling = report["absolute"]["ceiling"]
    assert ceiling["weight_bytes_per_step"] > 0 and ceiling["memory_bandwidth_gb_s"] > 0
    for suffix in ("b1", "bB"):
        assert ceiling[f"bound_{suffix}"] in ("memory", "compute")
        assert 0 < ceiling[f"generation_tokens_per_s_{suffix}"]
        assert report[f"generation_fraction_of_ceiling_{suffix}"] == ceiling[f"generation_fraction_of_ceiling_{suffix}"] > 0
    assert ceiling["flops_per_token"] * 2 == ceiling["weight_bytes_per_step"]  # float32: 4 bytes and 2 FLOPs per weight


def test_repeated_bench_reports_the_median_ratio_and_every_repeat():
    """`rosa2 bench --repeats N`: each ratio is the median of the N runs, each run's value kept; a
    ratio an arm set did not measure stays absent; the first run's absolute figures head the report."""
    from rosa2.bench import combine_repeats

    def report(memory, speedup, wall):
        out = {"device": "cpu", "adapt_memory_overhead": memory, "absolute": {"wall_s": {"batched": wall}}}
        if speedup is not None:
            out["batched_vs_sequential"] = speedup
        return out

    single = report(1.2, 2.8, 80.0)
    assert combine_repeats([single]) is single
    combined = combine_repeats([report(1.36, 2.9, 81.0), report(1.16, None, 86.0), report(1.20, 2.7, 83.0)])
    assert combined["adapt_memory_overhead"] == 1.2
    assert combined["batched_vs_sequential"] == 2.8  # the median of the two runs that measured it
    assert combined["repeats"]["count"] == 3
    assert combined["repeats"]["values"] == {"adapt_memory_overhead": [1.36, 1.16, 1.20], "batched_vs_sequential": [2.9, 2.7]}
    assert combined["absolute"]["wall_s"]["batched"] == 81.0
    assert [a["wall_s"]["batched"] for a in combined["repeats"]["absolute"]] == [86.0, 83.0]
    assert "parametric_over_generate" not in combined
