"""``rosa2 bench``: what batching sessions buys, and what each stream costs, measured in one run.

Every arm runs the same problems with the same seeds under greedy decoding, each in a fresh
process (so one arm's peak memory is not another's), one arm after the other on the same device:

- ``sequential``: ``SessionEngine`` at ``batch_size`` 1 (one problem at a time), method ``rosa2``;
- ``batched``: the same engine at ``batch_size`` B (B sessions at once, one adapter slot each), method ``rosa2``;
- ``baseline``: the engine at B, method ``baseline`` (no stream): the paper's Table 4
  reference for time per problem and peak memory.

Ratios (the issue's names): ``batched_vs_sequential`` = sessions/hour batched over sequential;
``parametric_over_generate`` / ``semantic_over_generate`` = a stream's seconds over the generation
seconds of the turns it ran after (batched arm; per-session shares of the batch's wall time);
``time_per_problem_rosa2_over_baseline`` and ``adapt_memory_overhead`` = batched rosa2 over batched
baseline. Peak memory is CUDA's peak allocated, or on CPU the process's peak RSS (VmHWM), over
every turn of the arm (the engines reset it per turn; the arm takes the largest).

``ceiling`` (also in a fresh process) says how near generation runs to what this machine allows:
a decode step must read every weight once (``weight_bytes`` over the bandwidth measured by one
large read) and do ~2 FLOPs per weight per row (over the matmul rate measured at the shape holding
most of the model's weights and at that batch size, on one cached matrix); the ceiling at batch B is B tokens per the larger of the two
times. ``generation_fraction_of_ceiling_b1`` / ``_bB`` put the engine's generation (``model.generate``
on a left-padded batch as ``Policy.generate_many`` runs it, no adapter slot, greedy, every row
forced to the same length) against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from rosa2.config import SMALL_CRITIC, ConfigError, _help, add_arguments, add_engine_arguments, engine_configs, from_args

ARMS = ("sequential", "batched", "baseline", "ceiling")
TARGETS = {
    "batched_vs_sequential": ">= 3 at B=8 on the 2-core CPU (>= 10 at B=32 on a GPU)",
    "parametric_over_generate": "<= 0.5",
    "semantic_over_generate": "<= 1.5",
    "adapt_memory_overhead": "<= 1.10",
    "time_per_problem_rosa2_over_baseline": "reported (the paper saw 0.89 on MATH)",
    "generation_fraction_of_ceiling_bB": ">= 0.5 at B=8",
}
TINY = "tiny-random"


# The engine's options bench takes (every engine and critic knob, the standard flags, so a lever is
# measured by a flag in one bench sitting), with bench's own defaults: short answers and critiques,
# T_max 3 (the rest at the library defaults). Bench sets the method per arm and B by --batch-size.
BENCH_SECTIONS = ("model", "session", "generation", "adapt", "semantic", "reward")
BENCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "session": {"max_turns": 3, "feedback": "sparse"},
    "generation": {"max_new_tokens": 64},
    # the CPU demo's critic (config.SMALL_CRITIC); batch 8: 0.54x the time of 2 for ~+0.9 GB (8 sessions, 2 CPU cores)
    "semantic": {**SMALL_CRITIC, "batch_size": 8},
    "adapt": {"checkpoint_activations": True},
}
BENCH_SKIP = {"session": ("method", "parallel_sessions")}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """``rosa2 bench``'s options: :class:`BenchConfig`'s, then the engine's at bench's defaults."""
    add_arguments(parser, BenchConfig, skip=("engine",))
    add_engine_arguments(parser, BENCH_SECTIONS, defaults=BENCH_DEFAULTS, skip=BENCH_SKIP)


def bench_config(args: argparse.Namespace) -> "BenchConfig":
    """The BenchConfig of parsed :func:`add_bench_arguments` options (bad values fail here)."""
    return from_args(BenchConfig, args, engine=engine_configs(args, BENCH_SECTIONS))


def bench_engine(argv: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The engine configs ``rosa2 bench ARGV`` runs with (``()``: bench's defaults)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_engine_arguments(parser, BENCH_SECTIONS, defaults=BENCH_DEFAULTS, skip=BENCH_SKIP)
    return engine_configs(parser.parse_args(list(argv)), BENCH_SECTIONS)


@dataclass
class BenchConfig:
    """What only the bench decides; the engine's configs are ``engine`` (from the standard options)."""

    dataset: str = _help("Problems: a dataset name or file (see `rosa2 datasets`)", default="embedded-math")
    problems: int = _help("Problems per arm (the same ones in every arm)", default=8)
    batch_size: int = _help("Sessions advanced together in the batched arms (B)", default=8)
    update_tokens: int = _help(
        "Context + response tokens per backward micro-batch of the batched update (CPU: 256 kept the update's "
        "memory at ~1/3 of 1024 for ~10% more time; raise it on a GPU; 0 = the engine's own, from free memory)", default=256
    )
    arms: tuple[str, ...] = _help("Arms to run (ratios need their arms)", default=ARMS)
    repeats: int = _help(
        "Times to run the arms, interleaved (each ratio is then the median of its repeats, every repeat's value "
        "under \"repeats\"): on a shared 2-core CPU one run's ratios moved by 10-20% and its memory ratio by up to "
        "0.2 (1.16-1.36 for the same code)", default=1,
    )
    engine: dict[str, Any] = _help(
        f"The engine's configs by section ({', '.join(BENCH_SECTIONS)}); the method is each arm's",
        default_factory=bench_engine,
    )

    def __post_init__(self) -> None:
        self.arms = tuple(self.arms)
        for name in ("problems", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 1")
        if self.update_tokens < 0:
            raise ConfigError(f"update_tokens={self.update_tokens!r} must be >= 0 (0: from free memory)")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ConfigError(f"arms={list(self.arms)!r} is not allowed; expected a non-empty subset of {list(ARMS)}")
        missing = [name for name in BENCH_SECTIONS if name not in self.engine]
        if missing:
            raise ConfigError(f"engine lacks the sections {missing}; expected {list(BENCH_SECTIONS)}")
        self.engine_configs("rosa2")  # each config checked its values; here the arms' method with T_max

    def engine_configs(self, method: str) -> dict[str, Any]:
        """The configs of an arm's engine: ``engine`` with the arm's method."""
        return {**self.engine, "session": dataclasses.replace(self.engine["session"], method=method)}


@dataclass
class ArmResult:
    arm: str
    wall_s: float
    cpu_s: float  # user + system CPU seconds of the arm's process (less sensitive to other load)
    peak_memory_bytes: int
    adapter_bytes: int
    results: list[dict[str, Any]]
    prefill_s: float = 0.0  # one batched forward over the last turn's prompts (KV-cache reuse bound)
    prefill_generate_s: float = 0.0  # the generation seconds of those same turns
    extra: dict[str, Any] = field(default_factory=dict)


def _load(cfg: BenchConfig) -> Any:
    from rosa2 import models

    if cfg.engine["model"].name == TINY:
        return models.tiny_random(seed=cfg.engine["generation"].seed)
    return models.load(cfg.engine["model"])


def _best_seconds(fn: Any, sync: Any, repeats: int = 5) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up (the machine's capability, not its load)."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _weight_bytes(model: Any) -> tuple[int, int]:
    """(bytes a decode step reads, multiply-accumulates per generated token): every linear layer's
    weight, the output head included (a tied head is the embedding table, read once per step; the
    embedding lookup itself reads only B rows and is left out)."""
    import torch

    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(w.numel() * w.element_size() for w in linears), sum(w.numel() for w in linears)


def run_ceiling(cfg: BenchConfig, new_tokens: int = 32) -> dict[str, Any]:
    """This machine's generation ceiling for the model, and the engines' generation tokens/s against
    it at B = 1 and B = ``batch_size`` (see the module docstring)."""
    import torch

    from rosa2.kvcache import preallocated_cache
    from rosa2.policy import Policy, left_pad

    loaded = _load(cfg)
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    dtype = next(model.parameters()).dtype
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    read, macs = _weight_bytes(model)
    buffer = torch.ones(max(read, 256 * 2**20) // 4, dtype=torch.float32, device=device)
    bandwidth = buffer.numel() * 4 / _best_seconds(lambda: buffer.sum(), sync)
    del buffer
    # the matmul rate at the shape that holds most of the weights (the MLP's, in a transformer),
    # repeated on one matrix that stays in cache: compute, not the weight reads counted above
    shapes: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            shapes[tuple(m.weight.shape)] = shapes.get(tuple(m.weight.shape), 0) + m.weight.numel()
    out_features, in_features = max(shapes, key=shapes.__getitem__)
    weight = torch.randn(out_features, in_features, dtype=dtype, device=device)
    out: dict[str, Any] = {
        "weight_bytes_per_step": read, "flops_per_token": 2 * macs, "memory_bandwidth_gb_s": round(bandwidth / 1e9, 2),
    }
    prompt = Policy(loaded).prompt_ids([{"role": "user", "content": "Count slowly from one to one thousand, in words."}])
    for suffix, batch in (("b1", 1), ("bB", cfg.batch_size)):
        x = torch.randn(batch, in_features, dtype=dtype, device=device)
        loops = 20
        rate = loops * 2 * batch * out_features * in_features / _best_seconds(
            lambda: [torch.nn.functional.linear(x, weight) for _ in range(loops)], sync
        )
        step = max(read / bandwidth, batch * 2 * macs / rate)
        ceiling = batch / step
        ids, mask, _ = left_pad([prompt] * batch, tokenizer.pad_token_id)

        def generate(n: int) -> None:
            with torch.no_grad():
                cache = preallocated_cache(model, batch, int(ids.shape[1]) + n)  # as Policy.generate_many does
                model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), cache=cache, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)

        decode = _best_seconds(lambda: generate(new_tokens), sync, repeats=3) - _best_seconds(lambda: generate(1), sync, repeats=3)
        measured = batch * (new_tokens - 1) / decode
        out[f"matmul_gflop_s_{suffix}"] = round(rate / 1e9, 1)
        out[f"bound_{suffix}"] = "memory" if read / bandwidth >= batch * 2 * macs / rate else "compute"
        out[f"ceiling_tokens_per_s_{suffix}"] = round(ceiling, 1)
        out[f"generation_tokens_per_s_{suffix}"] = round(measured, 1)
        out[f"generation_fraction_of_ceiling_{suffix}"] = round(measured / ceiling, 3)
    out["batch_size"] = cfg.batch_size
    return out


def run_arm(arm: str, cfg: BenchConfig, problems: list[Any]) -> ArmResult:
    """One arm in this process: load, warm up, run every problem, measure wall time and peak memory."""
    import torch

    if arm == "ceiling":
        return ArmResult(arm=arm, wall_s=0.0, cpu_s=0.0, peak_memory_bytes=0, adapter_bytes=0, results=[], extra=run_ceiling(cfg))

    from rosa2.environment import environment_for
    from rosa2.session import SessionEngine, peak_memory_bytes, reset_peak_memory

    configs = cfg.engine_configs("baseline" if arm == "baseline" else "rosa2")
    engine = SessionEngine(
        **{**configs, "model": _load(cfg)},
        batch_size=1 if arm == "sequential" else cfg.batch_size, update_tokens=cfg.update_tokens,
    )
    environments = [environment_for(p, configs["session"].feedback, reward=configs["reward"]) for p in problems]
    engine.policy.generate([{"role": "user", "content": "Hi"}], max_new_tokens=2)  # one-time kernels/allocations
    device = engine.policy.device
    reset_peak_memory(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    results = engine.run_many(problems, environments)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    out = ArmResult(
        arm=arm,
        wall_s=wall,
        cpu_s=cpu,
        # the engines reset the peak at every turn (per-turn records), so the arm's peak is the
        # largest of the turns' peaks, not what the process peaked at since the last turn began
        peak_memory_bytes=max([peak_memory_bytes(device), *(r.peak_memory_bytes for r in results)]),
        adapter_bytes=engine.adapter_bytes(),
        results=[r.to_dict() for r in results],
    )
    if arm == "baseline":  # θ never changes here, so this is where a KV cache across turns could pay
        out.prefill_s, out.prefill_generate_s = _prefill_probe(engine, results, cfg.batch_size)
    return out


def _prefill_probe(engine: Any, results: list[Any], batch_size: int) -> tuple[float, float]:
    """Seconds of one no-grad forward over the prompts of each problem's last turn (what reusing
    the earlier turns' KV cache could at most save) against those turns' generation seconds."""
    import torch

    from rosa2.policy import left_pad

    prompts, generate = [], 0.0
    for result in results:
        if len(result.turns) < 2:
            continue
        history = []
        for record in result.turns[:-1]:
            history += [{"role": "user", "content": record.message}, {"role": "assistant", "content": record.response}]
        history.append({"role": "user", "content": result.turns[-1].message})
        prompts.append(engine.policy.prompt_ids(history))
        generate += result.turns[-1].seconds_generate
    if not prompts:
        return 0.0, 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(prompts), batch_size):
            ids, mask, positions = left_pad(prompts[lo : lo + batch_size], engine.policy.tokenizer.pad_token_id)
            engine.policy.model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
    return time.perf_counter() - start, generate


def _arm_in_fresh_process(arm: str, cfg: BenchConfig, problems: list[Any]) -> ArmResult:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_arm, arm, cfg, problems).result()


def device_name(model: Any) -> str:
    """The device and dtype the arms run on (a ModelConfig's, resolved as ``models.load`` resolves them)."""
    import os
    import platform

    import torch

    from rosa2.models import pick_device

    device, dtype = pick_device(model)
    precision = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        index = device.index or 0
        return f"cuda:{index} {torch.cuda.get_device_name(index)} ({precision})"
    name = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu {name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()} ({precision})"


STREAMS = {"parametric": ("weights_on", "seconds_parametric"), "semantic": ("words_on", "seconds_semantic")}


def _stream_ratio(results: list[Any], stream: str) -> tuple[float | None, float, float]:
    """(Σ stream seconds / Σ generation seconds over the turns the stream ran after, both sums)."""
    flag, seconds = STREAMS[stream]
    spent, generate = 0.0, 0.0
    for result in results:
        for record in result.turns:
            if getattr(record, flag):
                spent += getattr(record, seconds)
                generate += record.seconds_generate
    return (spent / generate if generate else None), spent, generate


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _phase_peaks(results: list[Any]) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for result in results:
        for turn in result.turns:
            for phase, mb in turn.detail.get("peak_memory_mb", {}).items():
                peaks[phase] = max(peaks.get(phase, 0.0), mb)
    return peaks


SCIENCE = ("semantic_refinements", "semantic_refined_rate", "semantic_copied", "semantic_truncated", "semantic_empty",
           "answer_change_turns", "answer_change_rate", "no_answer_rate")


def _science(counts: dict[str, Any]) -> dict[str, Any]:
    return {k: counts[k] for k in SCIENCE if k in counts}


def summarize_arms(cfg: BenchConfig, arms: dict[str, ArmResult]) -> dict[str, Any]:
    """The bench JSON: ratios first, the absolute figures they come from beside them."""
    from rosa2.metrics import accuracy_at, answer_counts, semantic_counts
    from rosa2.records import ProblemResult

    ceiling = arms.pop("ceiling", None)
    results = {name: [ProblemResult.from_dict(r) for r in arm.results] for name, arm in arms.items()}
    per_hour = {name: 3600.0 * len(results[name]) / arm.wall_s for name, arm in arms.items()}
    accuracy = {name: accuracy_at(rs, cfg.engine["session"].max_turns) for name, rs in results.items()}
    absolute: dict[str, Any] = {
        "sessions_per_hour": {k: round(v, 1) for k, v in per_hour.items()},
        "wall_s": {k: round(a.wall_s, 2) for k, a in arms.items()},
        "cpu_s": {k: round(a.cpu_s, 2) for k, a in arms.items()},
        "time_per_problem_s": {k: round(a.wall_s / len(results[k]), 2) for k, a in arms.items()},
        "accuracy": accuracy,
        "turns": {k: sum(r.turns_used for r in rs) for k, rs in results.items()},
        "peak_memory_bytes": {k: a.peak_memory_bytes for k, a in arms.items()},
        "adapter_bytes": {k: a.adapter_bytes for k, a in arms.items()},
        # which stream needs the memory: the largest peak of each phase over the arm's turns
        "peak_memory_mb_by_phase": {k: _phase_peaks(rs) for k, rs in results.items()},
        # what a lever did to the science, beside what it saved: did the critic write a message,
        # and did the answer move after a rejection (a faster critic that always falls back is no win)
        "science": {k: {**_science(semantic_counts(rs)), **_science(answer_counts(rs))} for k, rs in results.items()},
    }
    out: dict[str, Any] = {"device": device_name(cfg.engine["model"])}
    if "sequential" in results and "batched" in results:
        out["batched_vs_sequential"] = _ratio(per_hour["batched"], per_hour["sequential"])
        # the same ratio on CPU seconds: on a shared machine wall time also measures the neighbours
        absolute["batched_vs_sequential_cpu_time"] = _ratio(arms["sequential"].cpu_s, arms["batched"].cpu_s)
        same = [
            a.response == b.response and a.reward == b.reward
            for ra, rb in zip(results["sequential"], results["batched"])
            for a, b in zip(ra.turns, rb.turns)
        ]
        absolute["turns_equal_to_sequential"] = f"{sum(same)}/{len(same)}"
        absolute["accuracy_unchanged"] = accuracy["sequential"] == accuracy["batched"]
    for name in ("batched", "sequential"):
        if name in results:
            for stream in ("parametric", "semantic"):
                ratio, spent, generate = _stream_ratio(results[name], stream)
                if name == "batched":
                    out[f"{stream}_over_generate"] = None if ratio is None else round(ratio, 3)
                absolute[f"{stream}_over_generate_{name}"] = None if ratio is None else round(ratio, 3)
                absolute[f"{stream}_s_{name}"] = round(spent, 2)
                absolute[f"generate_s_for_{stream}_turns_{name}"] = round(generate, 2)
    if "batched" in arms and "baseline" in arms:
        out["time_per_problem_rosa2_over_baseline"] = _ratio(
            arms["batched"].wall_s / len(results["batched"]), arms["baseline"].wall_s / len(results["baseline"])
        )
        out["adapt_memory_overhead"] = _ratio(arms["batched"].peak_memory_bytes, arms["baseline"].peak_memory_bytes)
    if "baseline" in arms and arms["baseline"].prefill_generate_s:
        absolute["kv_cache_prefill_s"] = round(arms["baseline"].prefill_s, 3)
        absolute["kv_cache_prefill_share_of_generate"] = round(
            arms["baseline"].prefill_s / arms["baseline"].prefill_generate_s, 3
        )
    if ceiling is not None:
        out["generation_fraction_of_ceiling_b1"] = ceiling.extra["generation_fraction_of_ceiling_b1"]
        out["generation_fraction_of_ceiling_bB"] = ceiling.extra["generation_fraction_of_ceiling_bB"]
        absolute["ceiling"] = ceiling.extra
    out["absolute"] = absolute
    out["targets"] = TARGETS
    out["config"] = dataclasses.asdict(cfg)
    return out


def run_bench(cfg: BenchConfig, *, log: Any = None) -> dict[str, Any]:
    """Run the chosen arms one after the other, each in a fresh process, and summarise them."""
    from rosa2.config import DataConfig
    from rosa2.data import load_problems

    problems = load_problems(DataConfig(dataset=cfg.dataset, limit=cfg.problems))
    reports = []
    for repeat in range(cfg.repeats):
        arms: dict[str, ArmResult] = {}
        for arm in cfg.arms:
            if arm == "ceiling" and repeat:  # the machine's ceiling is measured once
                continue
            arms[arm] = _arm_in_fresh_process(arm, cfg, problems)
            if log is not None:
                of = f" (repeat {repeat + 1}/{cfg.repeats})" if cfg.repeats > 1 else ""
                log(f"rosa2 bench: {arm} done in {arms[arm].wall_s:.1f} s{of}")
        reports.append(summarize_arms(cfg, arms))
    return combine_repeats(reports)


RATIOS = ("batched_vs_sequential", "parametric_over_generate", "semantic_over_generate",
          "time_per_problem_rosa2_over_baseline", "adapt_memory_overhead")


def combine_repeats(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from repeated runs of the arms: each ratio is the median of its repeats (the
    middle one's value, so an odd count reports a ratio that was measured), every repeat's value
    beside it under ``repeats``; ``absolute`` is the first repeat's, each later one's under
    ``repeats.absolute``. One report is returned as it is."""
    import statistics

    if len(reports) == 1:
        return reports[0]
    out = dict(reports[0])
    values: dict[str, list[float]] = {}
    for key in RATIOS:
        seen = [r[key] for r in reports if r.get(key) is not None]
        if seen:
            out[key] = round(statistics.median(seen), 3)
            values[key] = seen
    out["repeats"] = {"count": len(reports), "values": values, "absolute": [r["absolute"] for r in reports[1:]]}
    return out
