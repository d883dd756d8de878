"""The semantic stream (Words): TextGrad refinement of the user's next message on a local engine."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest

from rosa2.config import ConfigError, SemanticConfig
from rosa2.errors import Rosa2Error
from rosa2.models import LoadedModel, ModelError
from rosa2.policy import Policy

QUESTION = "What is 17 * 23? Give the final number."
GOLD = "391"  # the reference answer: it exists in the test, never in the stream's inputs
HISTORY = [{"role": "user", "content": QUESTION}]
WRONG = "17 * 23 = 381. The answer is 381."
SPARSE = "That is not correct, try again."


def stream_for(loaded: LoadedModel, **cfg):
    from rosa2.semantic import SemanticStream

    return SemanticStream(Policy(loaded), SemanticConfig(**{"max_new_tokens": 8, **cfg}))


def recording(stream):
    """Wrap the stream's engine so every (system prompt, prompt) it generates for is kept."""
    seen: list[tuple[str, str]] = []
    batches: list[int] = []
    complete = stream.engine._complete

    def record(keys):
        seen.extend(keys)
        batches.append(len(keys))
        return complete(keys)

    stream.engine._complete = record
    return seen, batches


def test_tagless_reply_falls_back_to_the_raw_message(tiny):
    stream = stream_for(tiny)
    out = stream.refine(QUESTION, HISTORY, WRONG, SPARSE)
    # a random model never writes <IMPROVED_VARIABLE> ... </IMPROVED_VARIABLE>
    assert out.fallback and not out.synthesised
    assert out.text == SPARSE and out.original == SPARSE
    assert out.delta_x_sq == 0.0
    assert stream.fallbacks == 1
    assert stream.calls == 2  # backward (critique) + TGD step
    stream.refine(QUESTION, HISTORY, WRONG, SPARSE)
    assert stream.fallbacks == 2 and stream.calls == 4


def test_empty_message_is_synthesised(tiny):
    from rosa2.semantic import DEFAULT_CORRECTIVE

    stream = stream_for(tiny)
    seen, _ = recording(stream)
    out = stream.refine(QUESTION, HISTORY, WRONG, "")
    assert out.synthesised and out.original == ""
    assert out.text.strip() and out.text == DEFAULT_CORRECTIVE  # tag-less reply: the default
    assert out.fallback and stream.fallbacks == 1
    assert out.delta_x_sq > 0
    # the critic was asked to write the whole message, not to polish an empty one
    assert all("the whole message has to be written" in prompt for _, prompt in seen)


def test_reference_answer_never_reaches_the_critic(tiny):
    from textgrad.autograd.llm_backward_prompts import BACKWARD_SYSTEM_PROMPT

    stream = stream_for(tiny)
    seen, _ = recording(stream)
    stream.refine_many(
        [
            (QUESTION, HISTORY, WRONG, SPARSE),
            (QUESTION, HISTORY, WRONG, ""),
            (QUESTION, HISTORY + [{"role": "assistant", "content": "380"}, {"role": "user", "content": "No."}], WRONG, "Wrong again."),
        ]
    )
    assert len(seen) == 6
    for system, prompt in seen:
        assert GOLD not in system and GOLD not in prompt
    # and the prompts do carry what the critic needs: the problem, the failed answer, the message
    backward = [p for s, p in seen if s == BACKWARD_SYSTEM_PROMPT]
    assert len(backward) == 3
    assert all(QUESTION in p and WRONG in p for p in backward)
    assert SPARSE in backward[0] and "Assistant: 380" in backward[2]


def test_critic_runs_on_the_base_model_with_the_adapter_disabled(tiny):
    import torch
    from peft import LoraConfig, get_peft_model

    from rosa2.semantic import SemanticStream

    base = copy.deepcopy(tiny.model)
    policy = Policy(tiny)
    stream = SemanticStream(policy, SemanticConfig(max_new_tokens=8))
    # as the parametric stream does: wrap policy.model in a PeftModel after the semantic stream exists
    policy.model = get_peft_model(policy.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # a nonzero adapter: θ ≠ 0
    lora = policy.model

    captured = []

    def hook(module, args, kwargs, output):
        if not captured:  # the prefill of the first critic call
            captured.append((kwargs["input_ids"], kwargs.get("attention_mask"), output.logits[:, -1]))

    handle = lora.base_model.model.register_forward_hook(hook, with_kwargs=True)  # the LM inside PEFT
    try:
        stream.refine(QUESTION, HISTORY, WRONG, SPARSE)
    finally:
        handle.remove()
    input_ids, mask, critic_logits = captured[0]
    with torch.no_grad():
        expected = base(input_ids=input_ids, attention_mask=mask).logits[:, -1]
        adapted = lora(input_ids=input_ids, attention_mask=mask).logits[:, -1]  # adapter back on afterwards
    assert torch.allclose(critic_logits, expected, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-4)


def test_delta_x_sq_is_the_squared_distance_of_mean_embeddings(tiny):
    import torch

    stream = stream_for(tiny)
    assert stream.delta_x_sq(SPARSE, SPARSE) == 0.0
    changed = stream.delta_x_sq(SPARSE, "Check the multiplication 17 * 23 digit by digit.")
    assert changed > 0
    assert changed == pytest.approx(stream.delta_x_sq("Check the multiplication 17 * 23 digit by digit.", SPARSE))
    ids = tiny.tokenizer(SPARSE, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        mean = tiny.model.get_input_embeddings()(torch.tensor(ids)).mean(0)
    assert stream.delta_x_sq("", SPARSE) == pytest.approx(float((mean**2).sum()), rel=1e-5)


def test_refine_many_batches_each_call_and_matches_one_by_one(tiny):
    import torch

    from rosa2.semantic import DEFAULT_CORRECTIVE

    items = [
        (QUESTION, HISTORY, WRONG, SPARSE),
        ("Name the capital of France.", [{"role": "user", "content": "Name the capital of France."}], "Lyon", ""),
        (QUESTION, HISTORY, "I do not know.", "The answer must be a number."),
    ]
    # next-token logits after each prompt, row by row: with 2 new tokens the last forward of a
    # generate call is the one decode step, the one before it ends the prompt's prefill (chunked,
    # after a cached prefix); the prefix store's own forwards run outside generate and are skipped
    prefill, calls = [], []
    generate = tiny.model.generate

    def hook(module, args, kwargs, output):
        if calls and calls[-1] is not None:
            calls[-1].append(output.logits[:, -1])

    def generate_and_record(*args, **kwargs):
        calls.append([])
        try:
            return generate(*args, **kwargs)
        finally:
            prefill.extend(calls[-1][-2])
            calls.append(None)

    handle = tiny.model.register_forward_hook(hook, with_kwargs=True)
    tiny.model.generate = generate_and_record
    try:
        batched = stream_for(tiny, batch_size=2, max_new_tokens=2)
        _, sizes = recording(batched)
        together = batched.refine_many(items)
        in_batches = list(prefill)
        prefill.clear()
        single = stream_for(tiny, max_new_tokens=2)
        alone = [single.refine(*item) for item in items]
    finally:
        handle.remove()
        del tiny.model.generate
    assert sizes == [2, 1, 2, 1]  # backward for all, then TGD step for all, two prompts at a time
    assert batched.calls == 6 and batched.fallbacks == 3
    # padding and the shared-prefix cache change nothing the critic computes: same next-token
    # logits as one prompt at a time
    # (batched: 3 critiques then 3 updates; one by one: critique, update, critique, update, ...)
    assert len(in_batches) == len(prefill) == 6
    for got, want in zip(in_batches, prefill[0::2] + prefill[1::2]):
        assert torch.allclose(got, want, atol=1e-4)
    assert [r.critique for r in together] == [r.critique for r in alone]
    assert [r.text for r in together] == [SPARSE, DEFAULT_CORRECTIVE, "The answer must be a number."]
    assert together[1].synthesised and not together[0].synthesised
    assert batched.refine_many([]) == []


def critic_prompts(engine, items):
    """The (system prompt, prompt) pairs of the critiques and then the updates for ``items``."""
    from rosa2.textgrad_engine import Update

    seen = []
    complete = engine._complete
    engine._complete = lambda keys: seen.extend(keys) or ["<IMPROVED_VARIABLE>Check.</IMPROVED_VARIABLE>"] * len(keys)
    try:
        updates = [Update.build(engine, *item) for item in items]
        engine.run_batched([u.backward for u in updates])
        engine.run_batched([u.step for u in updates])
    finally:
        engine._complete = complete
    return seen


def test_shared_prompt_prefixes_are_computed_once_and_change_no_reply(tiny):
    from rosa2.kvcache import PrefixStore, common_prefix
    from rosa2.textgrad_engine import LocalEngine

    items = [
        (QUESTION, HISTORY, WRONG, SPARSE),
        ("Name the capital of France.", [{"role": "user", "content": "Name the capital of France."}], "Lyon", SPARSE),
        (QUESTION, HISTORY, "I do not know. " * 5, "The answer must be a number."),
    ]
    plain = LocalEngine(tiny, name="tiny", max_new_tokens=6, batch_size=3, prefixes=None, prefill_chunk=None)
    keys = critic_prompts(plain, items)
    want = plain.complete(keys)
    assert len(keys) == 6 and len({system for system, _ in keys}) == 2

    store = PrefixStore(chunk=64)
    batched = LocalEngine(tiny, name="tiny", max_new_tokens=6, batch_size=3, prefixes=store, prefill_chunk=64)
    assert batched.complete(keys) == want
    # one entry per system prompt, holding exactly what that call's prompts share
    for system, (ids, cache) in store._store.items():
        rows = [batched._chat_ids(s, p) for s, p in keys if s == system]
        assert ids == rows[0][: common_prefix(rows)] and cache.get_seq_length() == len(ids)
    assert store.reused_tokens == 0  # nothing stored before; the prefix was computed once, at batch 1
    assert batched.complete(keys) == want and store.reused_tokens > 0

    # one prompt at a time: the first call stores its whole prompt, later calls cut it back to the
    # part they share and start after it
    one = PrefixStore(chunk=64)
    single = LocalEngine(tiny, name="tiny", max_new_tokens=6, batch_size=1, prefixes=one, prefill_chunk=64)
    critiques = keys[:3]
    assert single.complete(critiques) == want[:3]
    rows = [single._chat_ids(s, p) for s, p in critiques]
    (ids, _), = one._store.values()
    assert ids == rows[0][: common_prefix(rows)] and one.reused_tokens == 2 * len(ids)


def test_bad_semantic_config_names_the_value(tiny, monkeypatch):
    from rosa2.semantic import SemanticStream

    with pytest.raises(ConfigError, match="batch_size=0"):
        SemanticConfig(batch_size=0)
    with pytest.raises(ConfigError, match="api_base and api_model"):
        SemanticConfig(critic="openai")
    monkeypatch.delenv("ROSA2_TEST_MISSING_KEY", raising=False)
    cfg = SemanticConfig(critic="openai", api_base="http://127.0.0.1:9/v1", api_model="m", api_key_env="ROSA2_TEST_MISSING_KEY")
    with pytest.raises(Rosa2Error, match=r"\$ROSA2_TEST_MISSING_KEY"):
        SemanticStream(Policy(tiny), cfg)
    with pytest.raises(ModelError, match="no-such-critic"):
        SemanticStream(Policy(tiny), SemanticConfig(critic="./no-such-critic"))


@pytest.fixture()
def chat_endpoint(tiny):
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1, served by the tiny model."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rosa2.textgrad_engine import LocalEngine

    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            engine = LocalEngine(tiny, name="tiny", max_new_tokens=body["max_tokens"], batch_size=1)
            system, user = (m["content"] for m in body["messages"])
            text = engine.complete([(system, user)])[0]
            reply = json.dumps(
                {
                    "id": f"c{len(requests)}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", requests
    finally:
        server.shutdown()
        server.server_close()


def test_openai_compatible_critic(tiny, chat_endpoint, monkeypatch):
    from rosa2.semantic import SemanticStream

    url, requests = chat_endpoint
    monkeypatch.setenv("ROSA2_TEST_CRITIC_KEY", "local-key")
    cfg = SemanticConfig(critic="openai", api_base=url, api_model="tiny-critic", api_key_env="ROSA2_TEST_CRITIC_KEY", max_new_tokens=6)
    stream = SemanticStream(Policy(tiny), cfg)
    out = stream.refine(QUESTION, HISTORY, WRONG, SPARSE)
    assert out.fallback and out.text == SPARSE and stream.calls == 2
    assert [r["path"] for r in requests] == ["/v1/chat/completions"] * 2
    assert all(r["model"] == "tiny-critic" and r["max_tokens"] == 6 and r["temperature"] == 0 for r in requests)
    assert all(r["auth"] == "Bearer local-key" for r in requests)
    assert GOLD not in str(requests)


def test_nothing_is_written_to_the_working_directory(tmp_path):
    code = textwrap.dedent(
        f"""
        import rosa2
        from rosa2 import models
        from rosa2.config import SemanticConfig
        from rosa2.policy import Policy
        from rosa2.semantic import SemanticStream
        stream = SemanticStream(Policy(models.tiny_random()), SemanticConfig(max_new_tokens=4))
        print(stream.refine({QUESTION!r}, [], {WRONG!r}, "").fallback)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("True")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_one_real_refinement_on_smollm2(smol):
    stream = stream_for(smol, max_new_tokens=64)
    out = stream.refine(QUESTION, HISTORY, WRONG, SPARSE)
    print(f"\nSmolLM2 refinement: tags={'no' if out.fallback else 'yes'} seconds={out.seconds:.1f} text={out.text!r}")
    print(f"critique={out.critique[:300]!r}")
    assert stream.calls == 2
    assert len(out.critique.split()) > 5  # real words from a real model
    assert out.text.strip()
    assert out.fallback == (stream.fallbacks == 1)
    if out.fallback:
        assert out.text == SPARSE and out.delta_x_sq == 0.0
    else:
        assert (out.delta_x_sq > 0) == (out.text != SPARSE)
