"""Every arm does what its name says (issue 13): the Switch switches, the words stream accounts for
every refinement, the system-prompt target persists per problem, and answers are read as the
chosen extraction mode says."""

from __future__ import annotations

import math

import pytest

from rosa2.config import ConfigError, GenerationConfig, RewardConfig, SemanticConfig, SessionConfig
from rosa2.environment import ExactMatchEnvironment, answer_status
from rosa2.records import Problem, RewardResult
from rosa2.session import SessionEngine
from rosa2.textgrad_engine import TGD_TAGS

PROBLEM = Problem(id="p1", prompt="What is 2 + 3? Answer with the number.", domain="math", answer="5")
OTHER = Problem(id="p2", prompt="What is 4 + 4? Answer with the number.", domain="math", answer="8")
GOOD = "Add the two numbers again, one at a time, and write only the sum."


def scripted(updates: list[str], critique: str = "The message should ask the assistant to redo the addition."):
    """A capable critic: TGD update replies taken in order from ``updates`` (the last repeats)."""
    from rosa2.textgrad_engine import ChatEngine, Completion, is_update_call

    class Engine(ChatEngine):
        def _complete(self, keys):
            out = []
            for key in keys:
                if is_update_call(key):
                    out.append(Completion(updates.pop(0) if len(updates) > 1 else updates[0]))
                else:
                    out.append(Completion(critique))
            return out

    return Engine("scripted", max_new_tokens=64, batch_size=8)


def engine(loaded, method: str, max_turns: int, **semantic) -> SessionEngine:
    return SessionEngine(
        loaded, SessionConfig(method=method, max_turns=max_turns),
        generation=GenerationConfig(max_new_tokens=6), semantic=SemanticConfig(max_new_tokens=12, **semantic),
    )


# ---------------------------------------------------------------------------------------------
# Switch


@pytest.mark.parametrize("method,max_turns", [("switch-w2p@5", 5), ("switch-p2w@10", 10), ("switch-w2p", 5), ("switch-p2w@1", 5)])
def test_a_switch_that_could_never_switch_is_refused(method, max_turns):
    with pytest.raises(ConfigError, match=r"switch turn k=\d+ needs 2 <= k <= T_max - 1") as err:
        SessionConfig(method=method, max_turns=max_turns)
    assert method in str(err.value) and f"T_max={max_turns}" in str(err.value)


def test_switch_turns_the_streams_over_after_turn_k():
    # at k the update after turn k is the first on the new axis, which first acts on turn k + 1
    w2p = SessionConfig(method="switch-w2p@5", max_turns=10)
    assert [w2p.streams_at(t) for t in range(1, 10)] == [(False, True)] * 4 + [(True, False)] * 5
    p2w = SessionConfig(method="switch-p2w@5", max_turns=10)
    assert [p2w.streams_at(t) for t in range(1, 10)] == [(True, False)] * 4 + [(False, True)] * 5
    assert SessionConfig(method="switch-w2p@2", max_turns=3).streams_at(2) == (True, False)


def test_ablation_flow_never_rewrites_the_switch_turn():
    from rosa2.flows.ablation import ABLATION_MAX_TURNS, ABLATION_METHODS, ablation_cells
    from rosa2.tasks.cells import Cell

    assert ABLATION_MAX_TURNS == 10 and "switch-w2p@5" in ABLATION_METHODS and "switch-p2w@5" in ABLATION_METHODS
    ok = Cell(session=SessionConfig(method="baseline", max_turns=10))
    assert [c.method for c in ablation_cells(ok)] == list(ABLATION_METHODS)
    short = Cell(session=SessionConfig(method="baseline", max_turns=5))
    with pytest.raises(ConfigError, match=r"switch-w2p@5.*T_max - 1 = 4"):
        ablation_cells(short)
    demo = ablation_cells(short, ("baseline", "switch-w2p@2", "switch-p2w@3"))
    assert [c.method for c in demo] == ["baseline", "switch-w2p@2", "switch-p2w@3"]


def test_the_ablate_demo_switches_inside_its_own_turn_budget():
    from rosa2.cli import build_parser
    from rosa2.cli.ablate import DEMO_MAX_TURNS, DEMO_METHODS

    for method in DEMO_METHODS:
        SessionConfig(method=method, max_turns=DEMO_MAX_TURNS)  # raises when the demo could not switch
    parser = build_parser("ablate")
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    help_text = " ".join(sub.choices["ablate"].format_help().split())
    assert all(m in help_text for m in DEMO_METHODS) and f"{DEMO_MAX_TURNS}" in help_text


# ---------------------------------------------------------------------------------------------
# the words stream in the session loop


def test_a_tagged_refinement_enters_the_history(tiny):
    textgrad = engine(tiny, "textgrad", 3)
    textgrad.semantic().engine = scripted([f"{TGD_TAGS[0]}{GOOD}{TGD_TAGS[1]}"])
    result = textgrad.run(PROBLEM, ExactMatchEnvironment("sparse"))
    first, second, _ = result.turns
    assert first.semantic_class == "refined" and not first.semantic_fallback
    assert first.refined_feedback == GOOD and second.message == GOOD  # x* entered H
    assert first.delta_x_sq > 0 and first.detail["critic_reply"] == GOOD


@pytest.mark.parametrize(
    "reply,kind",
    [
        (f"{TGD_TAGS[0]}The improved variable is the user's next message after the assistant's rejected answer.{TGD_TAGS[1]}", "copied"),
        (f"{TGD_TAGS[0]}That is not correct. Please try again.{TGD_TAGS[1]}", "copied"),
        (f"{TGD_TAGS[0]}  {TGD_TAGS[1]}", "empty"),
    ],
)
def test_a_reply_that_is_no_refinement_keeps_the_raw_message_and_is_counted(tiny, reply, kind):
    from rosa2.environment import SPARSE_MESSAGE

    textgrad = engine(tiny, "textgrad", 2)
    stream = textgrad.semantic()
    stream.engine = scripted([reply])
    first, second = textgrad.run(PROBLEM, ExactMatchEnvironment("sparse")).turns
    assert first.semantic_class == kind and first.semantic_fallback
    assert first.refined_feedback == SPARSE_MESSAGE and second.message == SPARSE_MESSAGE
    assert math.isnan(first.delta_x_sq)
    assert stream.counts[kind] == 1 and stream.fallbacks == 1


def test_the_system_prompt_target_persists_across_turns_and_resets_per_problem(tiny):
    prompts = [f"{TGD_TAGS[0]}Work carefully, step {i}, and check the sum before answering.{TGD_TAGS[1]}" for i in (1, 2, 3, 4)]
    textgrad = engine(tiny, "textgrad", 3, target="system")
    textgrad.semantic().engine = scripted(prompts)
    seen: list[list[dict]] = []
    generate = textgrad.policy.generate
    textgrad.policy.generate = lambda messages, **kw: seen.append(messages) or generate(messages, **kw)  # type: ignore[method-assign]
    first = textgrad.run(PROBLEM, ExactMatchEnvironment("sparse"))
    t1, t2, _ = first.turns
    assert t1.detail["system_prompt_before"] == "" and "step 1" in t1.detail["system_prompt"]
    assert t2.detail["system_prompt_before"] == t1.detail["system_prompt"]  # optimised across turns
    assert seen[1][0] == {"role": "system", "content": t1.detail["system_prompt"]}
    assert seen[2][0]["content"] == t2.detail["system_prompt"] and sum(m["role"] == "system" for m in seen[2]) == 1
    assert t1.refined_feedback == t1.feedback  # the user's message stays raw
    second = textgrad.run(OTHER, ExactMatchEnvironment("sparse"))
    assert second.turns[0].detail["system_prompt_before"] == ""  # reset per problem, like θ
    assert seen[3][0]["role"] == "user"


def test_a_frozen_system_prompt_stays_in_force_after_the_switch(tiny):
    p2w = engine(tiny, "switch-p2w@2", 4, target="system")
    p2w.semantic().engine = scripted([f"{TGD_TAGS[0]}Always add digit by digit and state the sum.{TGD_TAGS[1]}"])
    seen: list[list[dict]] = []
    generate = p2w.policy.generate
    p2w.policy.generate = lambda messages, **kw: seen.append(messages) or generate(messages, **kw)  # type: ignore[method-assign]
    result = p2w.run(PROBLEM, ExactMatchEnvironment("sparse"))
    assert [(r.words_on, r.weights_on) for r in result.turns] == [(True, False), (False, True), (False, True), (False, False)]
    learned = result.turns[0].detail["system_prompt"]
    assert all(messages[0] == {"role": "system", "content": learned} for messages in seen[1:])


def test_bad_semantic_target_and_extraction_are_named():
    with pytest.raises(ConfigError, match=r"target='prompt' is not allowed; expected one of \['message', 'system'\]"):
        SemanticConfig(target="prompt")
    with pytest.raises(ConfigError, match=r"extraction='strict' is not allowed; expected one of \['flexible', 'paper'\]"):
        RewardConfig(extraction="strict")


# ---------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize(
    "response,flexible,paper",
    [
        ("2 + 3 = 5, so the answer is \\boxed{5}.", "correct", "correct"),
        ("The final answer is $5$.", "correct", "no_answer"),  # unboxed: only the flexible mode reads it
        ("The final answer is $6$.", "wrong", "no_answer"),
        ("Five apples and \\boxed{4}", "wrong", "wrong"),
        ("I am thinking about \\boxed{5", "truncated", "truncated"),
    ],
)
def test_math_paper_vs_flexible_extraction(response, flexible, paper):
    from rosa2.rewards import reward_for

    problem = Problem(id="m", prompt="2 + 3?", domain="math", answer="5")
    assert reward_for(problem, reward=RewardConfig("flexible")).score(response).outcome == flexible
    assert reward_for(problem, reward=RewardConfig("paper")).score(response).outcome == paper


CHOICE = Problem(
    id="c", prompt="What is 52 + 21?\nA) 71\nB) 73\nC) 75\nD) 77", domain="choice", answer="B",
    metadata={"choices": ["71", "73", "75", "77"]},
)


@pytest.mark.parametrize(
    "response,flexible,paper",
    [
        ("52 + 21 = 73", ("correct", "B"), ("no_answer", None)),  # the value of exactly one option
        ("52 + 21 = 74", ("wrong", "74"), ("no_answer", None)),  # a value of no option: an answer, wrong
        ("52 + 21 = 75", ("wrong", "C"), ("no_answer", None)),
        ("The answer is \\boxed{B}.", ("correct", "B"), ("correct", "B")),
        ("The answer is (B).", ("correct", "B"), ("no_answer", None)),
        ("I do not know.", ("no_answer", None), ("no_answer", None)),
    ],
)
def test_choice_paper_vs_flexible_extraction(response, flexible, paper):
    from rosa2.rewards import reward_for

    for mode, (outcome, prediction) in (("flexible", flexible), ("paper", paper)):
        result = reward_for(CHOICE, reward=RewardConfig(mode)).score(response)
        assert (result.outcome, result.prediction) == (outcome, prediction), mode


def test_answer_status_says_why_a_turn_scored_as_it_did():
    assert answer_status(RewardResult(1.0, outcome="correct"), hit_budget=True) == "correct"
    assert answer_status(RewardResult(-1.0, outcome="wrong"), hit_budget=True) == "wrong"
    assert answer_status(RewardResult(-1.0, outcome="no_answer"), hit_budget=False) == "no_answer"
    assert answer_status(RewardResult(-1.0, outcome="no_answer"), hit_budget=True) == "truncated"
    assert answer_status(RewardResult(-1.0, outcome="truncated"), hit_budget=False) == "truncated"
    assert answer_status(RewardResult(-1.0, outcome="failed"), hit_budget=True) == "wrong"  # code: tests ran
