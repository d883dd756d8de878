"""Math and multiple-choice rewards: real math-verify in real worker processes, real benchmark golds."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rosa2.config import DataConfig
from rosa2.data import load_problems
from rosa2.errors import Rosa2Error
from rosa2.records import Problem
from rosa2.rewards import reward_for
from rosa2.rewards.choice import ChoiceReward, extract_choice
from rosa2.rewards.math import MathLimits, MathReward, MathVerifyRewardModel, last_boxed, verifier_pool
from rosa2.rewards.pool import WorkerPool

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HUGE = "\\boxed{123456789^{123456789}}"  # sympy grinds on this for minutes: only a timeout ends it


def math_problem(answer: str) -> Problem:
    return Problem(id="t:1", prompt="?", domain="math", answer=answer)


def choice_problem(answer: str, n: int = 4) -> Problem:
    return Problem(id="t:2", prompt="?", domain="choice", answer=answer, metadata={"choices": [f"option {i}" for i in range(n)]})


@pytest.fixture(scope="module")
def math500() -> list[dict]:
    return [json.loads(line) for line in (DATA / "math500.jsonl").read_text().splitlines()]


def test_every_math500_gold_accepts_its_own_boxed_answer_and_rejects_a_changed_one(math500):
    for i, row in enumerate(math500):
        reward = MathReward(Problem(id=str(i), prompt="", domain="math", answer=row["answer"]))
        responses = [f"Reasoning...\nSo the answer is $\\boxed{{{row['answer']}}}$."]
        if i % 5 == 0:  # a changed answer for every fifth gold keeps the file fast on a loaded host
            responses.append(f"\\boxed{{{row['answer']} + 1}}")
        right, *wrong = reward.score_many(responses)
        assert (right.reward, right.outcome, right.scored) == (1.0, "correct", True), (row["answer"], right)
        assert right.prediction == row["answer"] and right.gold == row["answer"] and right.detail["gold_parsed"]
        assert all(w.reward == -1.0 and w.outcome in ("wrong", "no_answer") for w in wrong), (row["answer"], wrong)


@pytest.mark.parametrize("form", ["\\frac{1}{2}", "0.5", "1/2", "\\dfrac12", "\\tfrac{1}{2}", "0.50", "\\frac{2}{4}"])
def test_equivalent_forms_of_one_half_are_accepted(form):
    assert MathVerifyRewardModel("\\frac{1}{2}").get_reward(f"The answer is \\boxed{{{form}}}.") == 1.0


def test_paper_api_is_plus_minus_one_and_the_last_box_counts():
    model = MathVerifyRewardModel("18")
    assert model.get_reward("Janet makes \\boxed{18} dollars") == 1.0
    assert model.get_reward("\\boxed{17}") == -1.0
    assert model.get_reward("First \\boxed{18}, but on reflection \\boxed{17}") == -1.0
    assert model.get_reward("First \\boxed{17}, but on reflection \\boxed{18}") == 1.0
    assert model.get_reward("The final answer is $18$.") == 1.0  # an anchored form math-verify reads


@pytest.mark.parametrize(
    "response, outcome, why",
    [
        ("", "empty", "empty response"),
        ("   \n", "empty", "empty response"),
        ("Let me think: 9 + 9 = \\boxed{1", "truncated", "never closed"),
        ("I computed 18 but did not box it", "no_answer", "no \\boxed{} answer"),
        ("\\boxed{ }", "no_answer", "is empty"),
    ],
)
def test_bad_responses_score_minus_one_with_a_reason(response, outcome, why):
    result = MathVerifyRewardModel("18").score(response)
    assert (result.reward, result.outcome, result.scored) == (-1.0, outcome, True)
    assert why in result.detail["why"]
    assert "\\boxed{}" in result.error_text and "18" not in result.error_text  # rich feedback, no gold


def test_a_gold_that_does_not_parse_is_flagged_and_never_solved():
    for gold in ("\\text{}", ""):
        result = MathReward(math_problem(gold)).score(f"\\boxed{{{gold}}}")
        assert (result.reward, result.scored, result.outcome) == (-1.0, False, "gold_unparseable")
        assert "gold answer" in result.detail["why"]


def test_math_verify_alarm_fires_in_the_worker_and_scores_timeout():
    start = time.monotonic()
    result = MathVerifyRewardModel("5", MathLimits(verify_timeout_s=1)).score(HUGE)
    assert (result.reward, result.outcome) == (-1.0, "timeout")
    assert time.monotonic() - start < 15


def test_a_hung_worker_is_killed_replaced_and_the_next_answer_still_scores():
    pool = WorkerPool(size=1, warmup=("rosa2.rewards.math:warm_up",))
    try:
        hung = MathVerifyRewardModel("5", MathLimits(verify_timeout_s=0, wall_timeout_s=3), pool=pool)  # no alarm
        start = time.monotonic()
        result = hung.score(HUGE)
        assert (result.reward, result.outcome) == (-1.0, "timeout") and "killed" in result.detail["why"]
        assert time.monotonic() - start < 15 and pool.killed == 1
        assert hung.score("\\boxed{5}").reward == 1.0  # a fresh worker took over
    finally:
        pool.close()


ORPHAN = """
import threading, time, psutil
from rosa2.rewards.math import MathLimits, MathVerifyRewardModel
model = MathVerifyRewardModel("5", MathLimits(verify_timeout_s=0, wall_timeout_s=600))
threading.Thread(target=model.score, args=(HUGE,), daemon=True).start()
while not psutil.Process().children():
    time.sleep(0.1)
print(psutil.Process().children()[0].pid, flush=True)
time.sleep(600)
"""


def test_a_parent_killed_outright_takes_its_busy_worker_with_it():
    import psutil

    code = f"HUGE = {HUGE!r}\n" + ORPHAN
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker = psutil.Process(int(parent.stdout.readline()))
        time.sleep(2)  # the worker is warm and deep in the hopeless comparison
        assert worker.status() != psutil.STATUS_ZOMBIE
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if worker.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        worker.kill()
        pytest.fail("the worker outlived its parent")


def test_scoring_from_a_thread_works_where_math_verify_alone_would_raise():
    results = []
    thread = threading.Thread(target=lambda: results.append(MathVerifyRewardModel("\\sqrt{2}").score("\\boxed{\\sqrt 2}")))
    thread.start()
    thread.join()
    assert results[0].reward == 1.0


def test_many_threads_share_the_pool_without_mixing_answers():
    golds = [str(n) for n in range(8)]
    results: dict[str, list] = {}

    def work(gold: str) -> None:
        model = MathVerifyRewardModel(gold)
        results[gold] = model.score_many([f"\\boxed{{{gold}}}", f"\\boxed{{{gold}1}}"] * 3)

    threads = [threading.Thread(target=work, args=(g,)) for g in golds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == golds
    assert all([r.reward for r in results[g]] == [1.0, -1.0] * 3 for g in golds)


def test_score_many_keeps_order_across_early_and_verified_answers():
    reward = MathReward(math_problem("42"))
    results = reward.score_many(["\\boxed{42}", "", "\\boxed{41}", "\\boxed{4", "answer: 42", "\\boxed{42.0}"])
    assert [r.outcome for r in results] == ["correct", "empty", "wrong", "truncated", "correct", "correct"]
    assert len(verifier_pool()._idle) <= verifier_pool().size


def test_last_boxed_handles_nesting():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == ("x^{2}", False)
    assert last_boxed("\\boxed{\\frac{1}{") == (None, True)
    assert last_boxed("no box") == (None, False)


@pytest.mark.parametrize(
    "response, letter",
    [
        ("The answer is \\boxed{C}.", "C"),
        ("\\boxed{(B)}", "B"),
        ("\\boxed{\\text{D}}", "D"),
        ("After elimination... Answer: C", "C"),
        ("the correct option is (b)", "B"),
        ("Final answer: **D**", "D"),
        ("I think it's (A), no wait, (D).", "D"),
        ("A good case can be made. B", "B"),
        ("B is tempting, but C", "C"),
        ("\\boxed{B} is my answer, A is wrong", "B"),
        ("The answer is a number we have to pick... it must be C", "C"),
        ("The answer is C. Option B is wrong because of X.", "C"),
        ("answer: (b)", "B"),
        ("I believe the correct answer is D", "D"),
    ],
)
def test_choice_letter_forms(response, letter):
    assert extract_choice(response, "ABCD")[0] == letter


def test_choice_reward_outcomes():
    reward = ChoiceReward(choice_problem("C"))
    assert (reward.score("\\boxed{C}").reward, reward.score("\\boxed{C}").prediction) == (1.0, "C")
    assert reward.score("Answer: B").outcome == "wrong"
    assert reward.score("E is my choice").outcome == "no_answer"  # E is not an option of four
    assert "\\boxed{}" in reward.score("no idea").error_text and reward.score("Answer: B").error_text == ""
    assert reward.score("").outcome == "empty"
    flagged = ChoiceReward(choice_problem("F")).score("\\boxed{F}")
    assert (flagged.scored, flagged.outcome) == (False, "gold_unparseable")
    ten = ChoiceReward(choice_problem("J", n=10))
    assert ten.score("The answer is (J)").reward == 1.0


def test_reward_for_dispatches_on_domain():
    assert isinstance(reward_for(math_problem("1")), MathReward)
    assert isinstance(reward_for(choice_problem("A")), ChoiceReward)
    code = load_problems(DataConfig(dataset="humaneval", limit=1))[0]
    from rosa2.rewards.code import CodeReward  # built lazily: no container starts until score()

    assert isinstance(reward_for(code), CodeReward)
    with pytest.raises(Rosa2Error, match="domain='poetry'"):
        reward_for(Problem(id="x", prompt="", domain="poetry"))
    with pytest.raises(Rosa2Error, match="metadata\\['choices'\\]"):
        reward_for(Problem(id="x", prompt="", domain="choice", answer="A"))
