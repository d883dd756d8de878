"""The local critic decodes only what it uses and prefills only what is new (issue 16, levers 1 and 2).

Lever 1: the critique and TGD's update call have budgets of their own (``max_new_tokens`` and
``update_tokens``); a reply cut by its own budget is still ``truncated``.
Lever 2: ``PromptStore`` keeps each critic prompt's KV and starts a later prompt after the longest
token prefix it shares with a stored one (a session's next turn repeats its problem and earlier
turns); what the critic computes does not change."""

from __future__ import annotations

import pytest

from rosa2.config import ConfigError, SemanticConfig

QUESTION = "What is 17 * 23? Give the final number."
WRONG = "17 * 23 = 381. The answer is 381."
SPARSE = "That is not correct, try again."


def turn_items(turn: int) -> list[tuple[str, list[dict[str, str]], str, str]]:
    """Three sessions' (question, H, y_t, x_{t+1}) at turn 1 or 2 (turn 2: y_1 and x_2 in H)."""
    sessions = [
        (QUESTION, [WRONG, "17 * 23 = 401."], SPARSE),
        ("Name the capital of France.", ["Lyon", "Marseille, I think."], "Think of the Eiffel Tower."),
        ("Which is larger, 48 or 84?", ["48", "I still say 48 is larger."], SPARSE),
    ]
    items = []
    for question, answers, message in sessions:
        history = [{"role": "user", "content": question}]
        for answer in answers[: turn - 1]:
            history += [{"role": "assistant", "content": answer}, {"role": "user", "content": message}]
        items.append((question, history, answers[turn - 1], message))
    return items


def critic_keys(engine, items, prompts="textgrad"):
    """The (system prompt, prompt) pairs TextGrad builds for ``items``: critiques, then updates."""
    from rosa2.textgrad_engine import Completion, Update

    seen = []
    complete = engine._complete
    engine._complete = lambda keys: seen.extend(keys) or [Completion("<IMPROVED_VARIABLE>Check.</IMPROVED_VARIABLE>")] * len(keys)
    try:
        updates = [Update.build(engine, *item, prompts=prompts) for item in items]
        engine.run_batched([u.backward for u in updates])
        engine.run_batched([u.step for u in updates])
    finally:
        engine._complete = complete
    return seen


def first_forward_logits(model, run):
    """``run()``'s result and, per generate call, the next-token logits of its first forward (the
    end of the prompt: what decoding starts from), row by row."""
    captured, calls = [], []
    generate = model.generate

    def hook(module, args, kwargs, output):
        if calls and calls[-1] is None:
            calls[-1] = output.logits[:, -1].clone()

    def recorded(*args, **kwargs):
        calls.append(None)
        return generate(*args, **kwargs)

    handle = model.register_forward_hook(hook, with_kwargs=True)
    model.generate = recorded
    try:
        result = run()
    finally:
        handle.remove()
        del model.generate
    captured.extend(calls)
    return result, captured


def test_critique_and_update_have_budgets_of_their_own(tiny):
    from rosa2.textgrad_engine import TGD_TAGS, LocalEngine, is_update_call

    engine = LocalEngine(tiny, name="tiny", max_new_tokens=7, update_tokens=3, batch_size=8)
    keys = critic_keys(engine, turn_items(1))
    assert [is_update_call(k) for k in keys] == [False] * 3 + [True] * 3
    before = engine.calls
    replies = engine.complete(keys)
    # a random model reaches neither EOS nor the closing tag: every reply runs to its own budget
    assert [r.tokens for r in replies] == [7] * 3 + [3] * 3
    assert all(r.truncated for r in replies)
    assert all(r.text.startswith(TGD_TAGS[0]) for r in replies[3:])
    assert engine.tokens["decoded"] == 3 * 7 + 3 * 3 and engine.tokens["reply"] == 3 * 7 + 3 * 3
    # one mixed batch: generated to the larger budget, each row cut to its own, same start (greedy)
    mixed = engine._complete([keys[0], keys[3]])
    assert [r.tokens for r in mixed] == [7, 3] and mixed[0] == replies[0] and mixed[1] == replies[3]
    assert engine.calls - before == 6  # _complete itself counts no call: complete() does
    # 0 = the critique's budget, as before the split
    same = LocalEngine(tiny, name="tiny", max_new_tokens=5, batch_size=8)
    assert same.budget(keys[0]) == same.budget(keys[3]) == 5


def test_update_tokens_reach_the_engine_and_flags():
    import argparse

    from rosa2.config import add_arguments, from_args

    with pytest.raises(ConfigError, match="update_tokens=-1"):
        SemanticConfig(update_tokens=-1)
    parser = argparse.ArgumentParser()
    add_arguments(parser, SemanticConfig, prefix="semantic-")
    text = parser.format_help()
    assert "--semantic-update-tokens" in text and "--semantic-session-cache" in text and "--no-semantic-session-cache" in text
    cfg = from_args(SemanticConfig, parser.parse_args(["--semantic-update-tokens", "48", "--no-semantic-session-cache"]), prefix="semantic-")
    assert cfg.update_tokens == 48 and cfg.session_cache is False
    assert from_args(SemanticConfig, parser.parse_args([]), prefix="semantic-") == SemanticConfig()


@pytest.mark.parametrize("prompts", ["textgrad", "compact"])
def test_session_prompts_start_after_the_last_turn_and_compute_the_same(tiny, prompts):
    """Turn 2's critic prompts start after what they share with turn 1's (the problem, the earlier
    turns): the next-token logits at the end of every prompt are those of a full prefill, and so
    are the replies."""
    from rosa2.kvcache import PrefixStore, PromptStore, common_prefix
    from rosa2.textgrad_engine import LocalEngine

    plain = LocalEngine(tiny, name="tiny", max_new_tokens=4, batch_size=3, prefixes=None, prefill_chunk=None)
    turns = [critic_keys(plain, turn_items(t), prompts) for t in (1, 2)]
    (want1, logits1), (want2, logits2) = (first_forward_logits(tiny.model, lambda k=k: plain.complete(k)) for k in turns)

    store = PromptStore(chunk=64)
    cached = LocalEngine(tiny, name="tiny", max_new_tokens=4, batch_size=3, prompts=store, prefill_chunk=64)
    got1, seen1 = first_forward_logits(tiny.model, lambda: cached.complete(turns[0]))
    at_turn_1 = store.reused_tokens
    got2, seen2 = first_forward_logits(tiny.model, lambda: cached.complete(turns[1]))
    assert got1 == want1 and got2 == want2
    for got, want in zip(seen1 + seen2, logits1 + logits2):
        assert got.shape == want.shape and float((got - want).abs().max()) < 1e-4

    # turn 1: only the template head is shared (computed once, then served to the other rows);
    # turn 2: each row starts at least where it stops matching the same session's turn-1 prompt
    rows = [[cached._chat_ids(s, p) for s, p in keys] for keys in turns]
    per_session = sum(common_prefix([a[:-1], b[:-1]]) for a, b in zip(rows[0], rows[1]))
    assert store.reused_tokens - at_turn_1 >= per_session
    heads = PrefixStore(chunk=64)
    shared = LocalEngine(tiny, name="tiny", max_new_tokens=4, batch_size=3, prefixes=heads, prefill_chunk=64)
    shared.complete(turns[0])
    before = heads.reused_tokens
    shared.complete(turns[1])
    assert store.reused_tokens - at_turn_1 > heads.reused_tokens - before  # more than the head alone
    assert cached.tokens["prefilled"] < shared.tokens["prefilled"]
    opening = len(tiny.tokenizer("<IMPROVED_VARIABLE>", add_special_tokens=False)["input_ids"])  # prefilled in updates
    assert cached.tokens["prompt"] == shared.tokens["prompt"] == sum(map(len, rows[0] + rows[1])) + 6 * opening


def test_prompt_store_is_bounded_and_superseded_by_a_session_s_next_prompt(tiny):
    from rosa2.kvcache import PromptStore

    model = tiny.model
    store = PromptStore(max_tokens=100, min_tokens=4, chunk=16)
    a = list(range(10, 50))  # 40 tokens
    reused, cache = store.prefill(model, a)
    assert reused == 0 and cache.get_seq_length() == 40 and store.tokens == 40
    b = a[:30] + list(range(60, 80))  # shares 30 with a
    store.new_batch()  # a is an earlier batch's: b may supersede it
    reused, cache = store.prefill(model, b, session_after=10)  # beyond the 10 every row shares: a's session
    assert reused == 30 and cache.get_seq_length() == 50
    assert [ids for ids, _ in store._store.values()] == [b]  # a superseded by b
    c = a[:8] + list(range(100, 140))  # only the shared head: both kept
    assert store.prefill(model, c, session_after=10)[0] == 8 and store.tokens == 98
    store.prefill(model, list(range(200, 230)))  # 30 more: over 100, the least recently used (b) leaves
    assert store.tokens == 78 and [ids[0] for ids, _ in store._store.values()] == [10, 200]
    assert store.reused_tokens == 38 and store.computed_tokens == 40 + 20 + 40 + 30
    # served and computed KV together are those of a full prefill of the same tokens
    import torch

    from rosa2.kvcache import prefill

    fresh = prefill(model, None, b, 0, 64)
    reused, again = store.prefill(model, b)  # c's first 8 tokens served, the rest computed
    assert reused == 8
    for x, y in zip(fresh.layers, again.layers):
        assert torch.allclose(x.keys, y.keys, atol=1e-5) and torch.allclose(x.values, y.values, atol=1e-5)
    store.prefill(copy_of(tiny), a)  # another model object: nothing stored is valid for it
    assert len(store._store) == 1


def copy_of(loaded):
    import copy

    return copy.deepcopy(loaded.model)


@pytest.mark.slow
def test_smollm2_replies_are_the_same_with_and_without_the_session_cache(smol):
    """Two turns of three sessions on the embedded model, greedy: the same critiques and updates
    with the session cache as with the template head alone, with fewer prompt tokens computed."""
    from rosa2.policy import Policy
    from rosa2.semantic import SemanticStream

    outs, engines = {}, {}
    for cached in (False, True):
        stream = SemanticStream(Policy(smol), SemanticConfig(max_new_tokens=24, update_tokens=16, session_cache=cached, prompts="compact"))
        outs[cached] = [(r.critique, r.reply, r.kind) for t in (1, 2) for r in stream.refine_many(turn_items(t))]
        engines[cached] = stream.engine
    assert outs[True] == outs[False]
    assert all(len(critique.split()) > 3 for critique, _, _ in outs[True])  # real words from a real model
    assert engines[True].tokens["prompt"] == engines[False].tokens["prompt"]
    assert engines[True].tokens["prefilled"] < engines[False].tokens["prefilled"]
    assert engines[True].tokens["reused"] > engines[False].tokens["reused"]


# -- a reply that repeats itself stops there (semantic.loop_tokens) --------------------------------


@pytest.mark.parametrize(
    "tokens,n,keep",
    [
        ([1, 2, 3, 4, 5], 2, None),  # nothing repeats
        ([1, 2, 3, 1, 2, 3, 1], 3, 3),  # "1 2 3" again: keep the first copy
        ([7, 7, 7, 7], 2, 1),  # a one-token loop: "7 7" is seen again at once
        ([1, 2, 1, 2, 9], 3, None),  # "1 2" repeats, but no 3-gram does
    ],
)
def test_loop_stop_keeps_what_came_before_the_repeat(tokens, n, keep):
    """Fed one token at a time after a prompt (whose own repeats do not count), as generate does."""
    import torch

    from rosa2.textgrad_engine import LoopStop

    prompt = [5, 5, 5]
    stop = LoopStop(width=len(prompt), n=n, rows=1)
    done = [bool(stop(torch.tensor([prompt + tokens[:k]]), None)[0]) for k in range(1, len(tokens) + 1)]
    assert stop.kept[0] == keep
    # done from the token that completes the repeat on, never before
    assert done == [keep is not None and k >= keep + n for k in range(1, len(tokens) + 1)]
    assert stop.looped(0, len(tokens)) == keep
    if keep is not None:  # a repeat past the reply's own end (EOS, tag, budget) is not the reply's
        assert stop.looped(0, keep + n - 1) is None


def test_loop_stop_ends_only_the_rows_that_repeat():
    import torch

    from rosa2.textgrad_engine import LoopStop

    stop = LoopStop(width=2, n=2, rows=2)
    prompt = [[5, 5], [5, 5]]
    rows = [[1, 2, 1, 2], [1, 2, 3, 4]]
    done = []
    for k in range(1, 5):
        ids = torch.tensor([p + r[:k] for p, r in zip(prompt, rows)])
        done.append(stop(ids, None).tolist())
    assert done == [[False, False], [False, False], [False, False], [True, False]]
    assert stop.kept == [2, None]


def test_a_looping_critic_reply_stops_where_it_repeats_and_is_truncated(tiny):
    """The tiny random model repeats one token: with loop_tokens the reply is what came before the
    repeat, token for token the start of the unstopped reply, decoded in fewer steps."""
    from rosa2.textgrad_engine import LocalEngine

    keys = critic_keys(LocalEngine(tiny, name="tiny", max_new_tokens=4, batch_size=8), turn_items(1))
    full_engine = LocalEngine(tiny, name="tiny", max_new_tokens=40, update_tokens=40, batch_size=8)
    stopped_engine = LocalEngine(tiny, name="tiny", max_new_tokens=40, update_tokens=40, batch_size=8, loop_tokens=8)
    full, stopped = full_engine.complete(keys), stopped_engine.complete(keys)
    for a, b in zip(full, stopped):
        assert a.tokens == 40 and a.truncated and not a.looped  # the budget cut it
        assert b.truncated and b.looped and b.tokens < a.tokens
        assert a.text.startswith(b.text)  # greedy: the same start, cut before the repeat
    assert stopped_engine.tokens["looped"] == len(keys)
    assert stopped_engine.tokens["decoded"] < full_engine.tokens["decoded"]


def test_loop_tokens_reach_the_local_critic_and_refuse_bad_values(tiny):
    from rosa2.policy import Policy
    from rosa2.semantic import SemanticStream

    with pytest.raises(ConfigError, match="loop_tokens=-1"):
        SemanticConfig(loop_tokens=-1)
    assert SemanticStream(Policy(tiny), SemanticConfig(loop_tokens=12)).engine.loop_tokens == 12
    assert SemanticConfig().loop_tokens == 16
