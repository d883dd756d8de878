"""One builder of the engine's options (rosa2.config.add_engine_arguments / engine_configs) behind
every command that runs sessions: the same flags everywhere, each command's own defaults, and a
knob given on the command line reaching the configs the engine takes. No model is loaded."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from rosa2.cli import build_parser
from rosa2.config import SECTIONS, ConfigError


def _bench(*argv: str):
    from rosa2.bench import bench_config

    return bench_config(build_parser("bench").parse_args(["bench", *argv]))


def _flags(parser) -> dict[str, tuple[str, ...]]:
    """dest -> the option strings that set it."""
    return {a.dest: tuple(a.option_strings) for a in parser._actions if a.option_strings}


def test_a_knob_on_the_bench_command_line_reaches_the_engine_configs():
    cfg = _bench(
        "--model", "tiny-random", "--device", "cpu", "--dtype", "float32", "--max-turns", "2", "--max-new-tokens", "5",
        "--semantic-max-new-tokens", "7", "--semantic-batch-size", "3", "--semantic-prompts", "compact",
        "--granularity", "chunks:4", "--no-checkpoint-activations", "--feedback", "rich", "--seed", "3",
        "--reward-extraction", "paper", "--rank", "4",
        "--arms", "batched,baseline", "--update-tokens", "128", "--problems", "3", "--dataset", "embedded-choice",
        "--batch-size", "4",
    )
    assert (cfg.dataset, cfg.problems, cfg.batch_size, cfg.update_tokens, cfg.arms) == (
        "embedded-choice", 3, 4, 128, ("batched", "baseline"))
    engine = cfg.engine_configs("baseline")
    assert (engine["model"].name, engine["model"].device, engine["model"].dtype) == ("tiny-random", "cpu", "float32")
    assert (engine["session"].method, engine["session"].max_turns, engine["session"].feedback) == ("baseline", 2, "rich")
    assert (engine["generation"].max_new_tokens, engine["generation"].seed) == (5, 3)
    assert (engine["semantic"].max_new_tokens, engine["semantic"].batch_size, engine["semantic"].prompts) == (7, 3, "compact")
    assert (engine["adapt"].granularity, engine["adapt"].checkpoint_activations, engine["adapt"].rank) == ("chunks:4", False, 4)
    assert engine["reward"].extraction == "paper"
    assert cfg.engine_configs("rosa2")["session"].method == "rosa2"
    # the long names of the model's options work too, as in every other command
    assert _bench("--model-device", "cpu", "--model-dtype", "bfloat16").engine["model"].dtype == "bfloat16"
    # the arms run in spawned processes: the config pickles, engine configs and all
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_every_engine_field_is_a_bench_option_and_bench_keeps_its_defaults():
    from rosa2.bench import BENCH_SECTIONS, BENCH_SKIP, BenchConfig

    dests = _flags(build_parser("bench")._subparsers._group_actions[0].choices["bench"])
    for section in BENCH_SECTIONS:
        cls, prefix, _ = SECTIONS[section]
        for f in dataclasses.fields(cls):
            if f.name not in BENCH_SKIP.get(section, ()):
                assert prefix + f.name in dests, f"{section}.{f.name} has no `rosa2 bench` option"
    cfg = _bench()
    assert cfg == BenchConfig()  # the defaults of the command line are the dataclass's
    engine = cfg.engine
    semantic = engine["semantic"]  # the CPU demo's small critic (config.SMALL_CRITIC), batch 8
    assert (semantic.prompts, semantic.max_new_tokens, semantic.update_tokens, semantic.batch_size) == ("compact", 48, 64, 8)
    assert (engine["generation"].max_new_tokens, engine["session"].max_turns, engine["session"].feedback) == (64, 3, "sparse")
    assert engine["adapt"].checkpoint_activations is True and engine["model"].name == "embedded"
    assert (cfg.problems, cfg.batch_size, cfg.update_tokens, cfg.dataset) == (8, 8, 256, "embedded-math")


def test_bad_engine_values_on_the_bench_command_line_fail_before_any_model():
    with pytest.raises(ConfigError, match="max_turns=0"):
        _bench("--max-turns", "0")
    with pytest.raises(ConfigError, match="granularity='rows'"):
        _bench("--granularity", "rows")
    with pytest.raises(ConfigError, match="device='tpu'"):
        _bench("--device", "tpu")
    with pytest.raises(SystemExit):  # bench sets the method per arm and B by --batch-size
        build_parser("bench").parse_args(["bench", "--method", "rosa"])
    with pytest.raises(SystemExit):
        build_parser("bench").parse_args(["bench", "--parallel-sessions", "2"])


def _command_parser(command: str):
    if command == "profile_session":
        from rosa2.profile_session import build_parser as profile_parser

        return profile_parser()
    return build_parser(command)._subparsers._group_actions[0].choices[command]


def test_every_command_spells_the_engine_options_the_same():
    """session, chat, run, ablate, bench and the profiler take one set of engine flags (their
    skips aside): one adder, not one copy per command."""
    commands = ("session", "chat", "run", "ablate", "bench", "profile_session")
    flags = {c: _flags(_command_parser(c)) for c in commands}
    for section in ("model", "session", "generation", "adapt", "semantic"):
        cls, prefix, _ = SECTIONS[section]
        for f in dataclasses.fields(cls):
            spelled = {c: flags[c][prefix + f.name][0] for c in commands if prefix + f.name in flags[c]}
            assert len(set(spelled.values())) == 1, (section, f.name, spelled)
    assert flags["bench"]["model_device"][:2] == ("--model-device", "--device")
    assert "--critic-max-new-tokens" in flags["profile_session"]["semantic_max_new_tokens"]


def test_run_builds_a_cell_of_every_section_and_profile_takes_the_engine_options():
    from rosa2.cli.run import CELL_SECTIONS, base_cell
    from rosa2.profile_session import build_parser as profile_parser
    from rosa2.config import engine_configs
    from rosa2.tasks.cells import Cell

    assert set(CELL_SECTIONS) == {f.name for f in dataclasses.fields(Cell)}
    args = build_parser("run").parse_args(["run", "--granularity", "token", "--semantic-prompts", "compact",
                                           "--device", "cpu", "--limit", "25%", "--reward-extraction", "paper"])
    cell = base_cell(args, "textgrad")
    assert (cell.method, cell.adapt.granularity, cell.semantic.prompts) == ("textgrad", "token", "compact")
    assert (cell.model.device, cell.data.limit, cell.reward.extraction) == ("cpu", 0.25, "paper")
    args = profile_parser().parse_args(["--critic-max-new-tokens", "9", "--granularity", "chunks:2", "--max-turns", "2"])
    configs = engine_configs(args, session={"method": "rosa"})
    assert (configs["semantic"].max_new_tokens, configs["adapt"].granularity) == (9, "chunks:2")
    assert (configs["session"].method, configs["session"].max_turns, configs["generation"].max_new_tokens) == ("rosa", 2, 48)
    with pytest.raises(ValueError, match="sandbox"):  # an override for a section the command has not
        engine_configs(args, sandbox={"cpus": 2.0})


def test_bench_update_tokens_zero_is_the_engines_free_memory_budget():
    assert _bench("--update-tokens", "0").update_tokens == 0
    with pytest.raises(ConfigError, match="update_tokens=-1"):
        _bench("--update-tokens", "-1")
