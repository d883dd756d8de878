"""KV reuse across the turns of a session: the next prompt starts after the last turn's cache,
only while the weights that built it are unchanged, and nothing it generates changes."""

from __future__ import annotations

import pytest

from rosa2.config import GenerationConfig, SessionConfig
from rosa2.kvcache import TurnCache, common_prefix
from rosa2.policy import Policy
from rosa2.records import Problem
from rosa2.session import SessionEngine

QUESTION = [{"role": "user", "content": "What is 2 + 3? Answer with the number."}]
RETRY = "That is not correct, try again."


def conversation(policy: Policy, turns: int, reuse: bool) -> list[str]:
    history, texts = list(QUESTION), []
    policy.turn_cache.clear()
    for _ in range(turns):
        if not reuse:
            policy.turn_cache.clear()
        reply = policy.generate(history)
        texts.append(reply.text)
        history = [*history, {"role": "assistant", "content": reply.text}, {"role": "user", "content": RETRY}]
    return texts


def test_later_turns_start_after_the_cached_conversation_and_generate_the_same(tiny):
    policy = Policy(tiny, GenerationConfig(max_new_tokens=6))
    fresh = conversation(policy, 3, reuse=False)
    assert policy.turn_cache.reused_tokens == 0
    assert conversation(policy, 3, reuse=True) == fresh
    # turns 2 and 3 reused at least their previous prompt (the system prompt, the question, ...)
    first = len(policy.prompt_ids(QUESTION))
    assert policy.turn_cache.reused_tokens >= 2 * first


def test_a_weight_change_drops_the_cache(tiny):
    from rosa2.adapter import RowLoRA, UpdateItem, parametric_steps
    from rosa2.config import AdaptConfig

    policy = Policy(tiny, GenerationConfig(max_new_tokens=6))
    lora = RowLoRA(tiny.model, AdaptConfig(), slots=2)
    lora.reset(0, seed=1)
    lora.reset(1, seed=1)
    reply = policy.generate(QUESTION, lora=lora, slot=0)
    history = [*QUESTION, {"role": "assistant", "content": reply.text}, {"role": "user", "content": RETRY}]
    # θ moves: the KV of H_t is stale
    parametric_steps(tiny.model, lora, AdaptConfig(), [UpdateItem(0, reply.prompt_ids, reply.response_ids, -1.0)])
    policy.generate(history, lora=lora, slot=0)
    assert policy.turn_cache.reused_tokens == 0
    policy.generate([*history, {"role": "assistant", "content": "5"}, {"role": "user", "content": RETRY}], lora=lora, slot=0)
    assert policy.turn_cache.reused_tokens > 0  # same weights since the last generation: reused
    before = policy.turn_cache.reused_tokens
    policy.generate(history, lora=lora, slot=1)  # another slot is another θ
    assert policy.turn_cache.reused_tokens == before
    policy.generate(history, lora=lora, slot=1)
    assert policy.turn_cache.reused_tokens > before
    before = policy.turn_cache.reused_tokens
    lora.reset(1, seed=2)  # a reset (the next problem) changes the weights too
    policy.generate(history, lora=lora, slot=1)
    assert policy.turn_cache.reused_tokens == before
    lora.remove()


@pytest.mark.parametrize("method,reused", [("baseline", True), ("rosa", False)])
def test_sessions_reuse_the_cache_only_when_no_step_was_taken(tiny, method, reused):
    engine = SessionEngine(tiny, SessionConfig(method=method, max_turns=3), generation=GenerationConfig(max_new_tokens=6))
    problem = Problem(id="p", prompt=QUESTION[0]["content"], domain="math", answer="5")
    held = []  # whether the turn's KV was still held when each stream ran
    refine, update = engine._refine, engine._update
    engine._refine = lambda *a: held.append(engine.policy.turn_cache._cache is not None) or refine(*a)
    engine._update = lambda *a: held.append(engine.policy.turn_cache._cache is not None) or update(*a)
    result = engine.run(problem)
    assert result.turns_used == 3 and not result.solved
    assert (engine.policy.turn_cache.reused_tokens > 0) == reused
    assert held == ([] if method == "baseline" else [False, False])  # a moving θ frees it before the update
    assert engine.policy.turn_cache._cache is None  # the conversation's KV is freed when it ends


def test_turn_cache_refuses_what_it_cannot_serve():
    cache = TurnCache(min_tokens=4)
    assert cache.take(object(), [1, 2, 3]) == (0, None)  # nothing kept yet
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2 and common_prefix([[5], [6]]) == 0
