"""A cell's sessions advanced together (``SessionConfig.parallel_sessions`` > 1): the
same per-turn results as one at a time, stored as each session leaves the batch, resumed from the
store, and kept adapters in PEFT's layout equal to those of one session at a time. No servers: the
platform's session task is called directly with a local ResultStore."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from rosa2.config import ConfigError, DataConfig, GenerationConfig, ModelConfig, SemanticConfig, SessionConfig
from rosa2.records import Problem

# the gold letter 'Z' is no option: the choice session is unscorable and leaves after turn 1, so
# later problems join its slot while the others run on, and sessions finish out of input order
PROBLEMS = [
    Problem(id="m0", prompt="What is 2 + 5?", domain="math", answer="7"),
    Problem(id="c1", prompt="Which is a colour? A) red B) seven", domain="choice", answer="Z", metadata={"choices": ["red", "seven"]}),
    Problem(id="m2", prompt="What is 3 * 4?", domain="math", answer="12"),
    Problem(id="m3", prompt="Compute 17 - 9.", domain="math", answer="8"),
    Problem(id="m4", prompt="What is 10 / 2?", domain="math", answer="5"),
]
PARALLEL = 3
# slots 0..2 hold m0, c1, m2; c1 leaves after round 1 and m3 takes its slot; m0 and m2 leave after
# round 2 (T_max) and m4 takes m2's slot, whose adapter must have been saved first
FINISH_ORDER = ["c1", "m0", "m2", "m3", "m4"]


def cell_for(tiny_dir, method: str, parallel: int):
    from rosa2.tasks.cells import Cell

    return Cell(
        model=ModelConfig(name=str(tiny_dir), device="cpu"),
        session=SessionConfig(method=method, max_turns=2, parallel_sessions=parallel),
        data=DataConfig(limit=len(PROBLEMS)),
        generation=GenerationConfig(max_new_tokens=8),
        semantic=SemanticConfig(max_new_tokens=16),  # the random critic never closes TextGrad's tags: keep it short
    )


@dataclasses.dataclass
class Run:
    cell: object
    store: object
    results: list
    finished: list[str]


def run_cell(tiny_dir, root, method: str, parallel: int) -> Run:
    from rosa2.tasks.cells import ResultStore
    from rosa2.tasks.sessions import run_cell_sessions

    cell, store, finished = cell_for(tiny_dir, method, parallel), ResultStore(root), []
    results = run_cell_sessions(
        cell, PROBLEMS, store, adapters="all", progress=False, on_problem=lambda r: finished.append(r.problem_id)
    )
    return Run(cell, store, results, finished)


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """Each method's cell one at a time and batched, every adapter kept (retention ``all``)."""
    return {
        (method, parallel): run_cell(tiny_dir, tmp_path_factory.mktemp(f"{method}-{parallel}"), method, parallel)
        for method in ("rosa", "rosa2")
        for parallel in (1, PARALLEL)
    }


@pytest.mark.parametrize("method", ["rosa", "rosa2"])
def test_batched_cell_gives_the_one_at_a_time_results(runs, method):
    from rosa2.tasks import sessions

    single, batched = runs[(method, 1)], runs[(method, PARALLEL)]
    assert [r.problem_id for r in batched.results] == [p.id for p in PROBLEMS]  # problem order, not finish order
    assert single.finished == [p.id for p in PROBLEMS]
    assert batched.finished == FINISH_ORDER  # on_problem as each session left the batch
    for a, b in zip(single.results, batched.results):
        assert (a.solved, a.turn_solved, a.turns_used, a.scored) == (b.solved, b.turn_solved, b.turns_used, b.scored)
        assert len(a.turns) == len(b.turns)
        for x, y in zip(a.turns, b.turns):
            assert (x.turn, x.response, x.reward, x.refined_feedback) == (y.turn, y.response, y.reward, y.refined_feedback)
            assert (x.words_on, x.weights_on) == (y.words_on, y.weights_on)
            assert math.isclose(x.delta_theta_sq, y.delta_theta_sq, rel_tol=1e-3, abs_tol=1e-9)
    turns = [r for res in batched.results for r in res.turns]
    assert sum(r.weights_on for r in turns) == 4  # four math sessions × one update before T_max
    assert (sum(r.words_on for r in turns) == 4) == (method == "rosa2")
    # every problem is in the store, and the engine left no per-row hooks on its model
    # (as JSON: a turn without a refined x* has ‖Δx‖² NaN, which never equals itself)
    stored = [json.dumps(batched.store.get(batched.cell.problem_key(p)).to_dict(), sort_keys=True) for p in PROBLEMS]
    assert stored == [json.dumps(r.to_dict(), sort_keys=True) for r in batched.results]
    assert sessions._engines  # one engine per model: the batch of one and the batch of PARALLEL shared it
    for engine in sessions._engines.values():
        assert not any(m._forward_hooks for m in engine.policy.model.modules())


def test_rerun_loads_the_store_and_resumes_only_what_is_missing(runs, tiny_dir):
    from rosa2.tasks import sessions

    done = runs[("rosa", PARALLEL)]
    sessions._engines.clear()
    finished: list[str] = []
    again = sessions.run_cell_sessions(done.cell, PROBLEMS, done.store, progress=False, on_problem=lambda r: finished.append(r.problem_id))
    assert [r.to_dict() for r in again] == [r.to_dict() for r in done.results]
    assert finished == [] and sessions._engines == {}  # nothing ran: no engine was even built

    # a kill mid-batch loses the sessions in flight: they alone run again, with the same outcome
    for lost in ("m2", "m4"):
        done.store.path(done.cell.problem_key(PROBLEMS[[p.id for p in PROBLEMS].index(lost)])).unlink()
    resumed = sessions.run_cell_sessions(done.cell, PROBLEMS, done.store, progress=False, on_problem=lambda r: finished.append(r.problem_id))
    assert finished == ["m2", "m4"]
    for a, b in zip(done.results, resumed):
        assert [(t.response, t.reward) for t in a.turns] == [(t.response, t.reward) for t in b.turns]


def adapter_config(path) -> dict:
    config = json.loads((path / "adapter_config.json").read_text())
    # PEFT keeps target_modules as a set: the saved order follows the process's string hashing
    return {**config, "target_modules": sorted(config["target_modules"])}


def test_kept_adapters_are_peft_adapters_equal_to_the_one_at_a_time_engines(runs, tiny_dir):
    """Retention ``all``: each session's slot is written before a new problem takes it, in the layout
    SessionEngine.load_adapter and `rosa2 adapters show` read, with the θ the batch of one saved."""
    import torch
    from safetensors.torch import load_file

    from rosa2 import models
    from rosa2.adapter import ADAPTER_WEIGHTS
    from rosa2.cli.adapters import layer_norms
    from rosa2.session import SessionEngine

    for method in ("rosa", "rosa2"):
        single, batched = runs[(method, 1)], runs[(method, PARALLEL)]
        for problem in PROBLEMS:
            mine = batched.store.adapter_dir(batched.cell.problem_key(problem))
            theirs = single.store.adapter_dir(single.cell.problem_key(problem))
            assert mine.is_dir() == theirs.is_dir() == (problem.domain == "math"), problem.id  # no update, nothing kept
            if not mine.is_dir():
                continue
            got, expected = load_file(str(mine / ADAPTER_WEIGHTS)), load_file(str(theirs / ADAPTER_WEIGHTS))
            assert got.keys() == expected.keys()
            for key in expected:
                assert torch.allclose(got[key], expected[key], atol=1e-5, rtol=1e-4), (problem.id, key)
            assert adapter_config(mine) == adapter_config(theirs)

    # per-slot content: the sessions' adapters differ from each other and from θ = 0 (B moved)
    batched = runs[("rosa", PARALLEL)]
    dirs = [batched.store.adapter_dir(batched.cell.problem_key(p)) for p in PROBLEMS if p.domain == "math"]
    b_norms = [sum(float(v.pow(2).sum()) for k, v in load_file(str(d / ADAPTER_WEIGHTS)).items() if "lora_B" in k) for d in dirs]
    assert all(n > 0 for n in b_norms) and len({round(n, 12) for n in b_norms}) == len(dirs)

    # the engine loads it into a slot (then runs with exactly those weights) ...
    base = ModelConfig(name=str(tiny_dir), device="cpu")
    engine = SessionEngine(models.load(base), SessionConfig(method="rosa"))
    lora = engine.load_adapter(dirs[-1])
    saved = load_file(str(dirs[-1] / ADAPTER_WEIGHTS))
    resaved = lora.save(0, engine_dir := dirs[-1].parent / "resaved")
    assert load_file(str(resaved / ADAPTER_WEIGHTS)).keys() == saved.keys()
    for key, value in load_file(str(engine_dir / ADAPTER_WEIGHTS)).items():
        assert torch.equal(value, saved[key]), key
    # ... and so does `rosa2 adapters show` (PeftModel.from_pretrained on a fresh base model)
    rows = layer_norms(models.load(base), dirs[-1])
    assert len(rows) == len(saved) // 2 and all(b > 0 for _, _, b, _ in rows)


def test_parallel_sessions_is_validated_and_reaches_the_cell_from_cli_and_sweep(tmp_path):
    from rosa2.flows import sweep as sweep_module
    from rosa2.cli import build_parser
    from rosa2.cli.run import base_cell
    from rosa2.config import from_args

    with pytest.raises(ConfigError, match=r"parallel_sessions=0 must be >= 1"):
        SessionConfig(parallel_sessions=0)
    for command in ("run", "ablate"):
        args = build_parser(command).parse_args([command, "--parallel-sessions", "4"])
        assert base_cell(args).session.parallel_sessions == 4
    args = build_parser("run").parse_args(["run", "--parallel-sessions", "-2"])
    with pytest.raises(ConfigError, match=r"parallel_sessions=-2"):
        from_args(SessionConfig, args)
    with pytest.raises(SystemExit):  # one session has nothing to batch: no such option there
        build_parser("session").parse_args(["session", "--question", "q", "--answer", "a", "--parallel-sessions", "2"])

    grid = "models: [embedded]\ndatasets: [embedded-math]\nmethods: [rosa, rosa2]\nseeds: [0]\n"
    path = tmp_path / "sweep.yaml"
    path.write_text(grid + "session: {parallel_sessions: 4}\n")
    assert [c.session.parallel_sessions for c in sweep_module.load(path).cells()] == [4, 4]
    path.write_text(grid + "session:\n  max_turns: 3\n  parallel_sessions: 0\n")
    with pytest.raises(ConfigError, match=r"sweep.yaml:7: session: parallel_sessions=0"):
        sweep_module.load(path)
