"""The session engine: Algorithm 1 of ROSA2 (docs/algorithm.md §1), B sessions wide.

```
for each problem:                       # one "session"
  θ ← 0 (fresh LoRA adapter);  H ← [system?, x_1]
  for t = 1 .. T_max:
    y_t ~ π(· | H; θ_base + θ)
    r_t, x_{t+1} ← environment(y_t)
    if r_t = +1 or t = T_max: stop
    x*_{t+1} ← semantic_update(question, H, y_t, x_{t+1})  if words are on, else x_{t+1}
    θ ← θ + parametric_update(H, y_t, r_t)                  if weights are on
    H ← H + [y_t, x*_{t+1}]
```

A method is only which streams are on after which turn (``SessionConfig.streams_at``). The engine
advances up to ``batch_size`` sessions together, one turn per round (``SessionEngine._round``, the
only copy of the loop): generation reads the weights once for B tokens, each session keeps its own
θ in an adapter slot, and a plain session is a batch of one. One engine holds one loaded model;
``with_session`` derives engines for other methods, update knobs or widths that share it, so an
ablation never reloads the model.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from rosa2 import models
from rosa2.adapter import ParametricStep, RowLoRA, UpdateItem, check_target_modules, lora_structure, parametric_steps
from rosa2.config import AdaptConfig, ConfigError, GenerationConfig, ModelConfig, RewardConfig, SandboxConfig, SemanticConfig, SessionConfig
from rosa2.environment import Environment, answer_status, as_dict, environment_for
from rosa2.errors import Rosa2Error
from rosa2.models import LoadedModel
from rosa2.policy import Message, Policy, Reply
from rosa2.records import Problem, ProblemResult, RewardResult, TurnRecord

if TYPE_CHECKING:
    from rosa2.semantic import Refinement, SemanticStream

OnTurn = Callable[[TurnRecord], None]


def uses_streams(session: SessionConfig) -> tuple[bool, bool]:
    """(words ever on, weights ever on) over turns 1..T_max."""
    flags = [session.streams_at(t) for t in range(1, session.max_turns + 1)]
    return any(w for w, _ in flags), any(p for _, p in flags)


def validate(model: ModelConfig | LoadedModel, session: SessionConfig, adapt: AdaptConfig | None, semantic: SemanticConfig) -> None:
    """Everything that can be wrong with the input, checked before any weight is read: the
    dataclasses check their own values; here the target modules against the model's config
    (meta device) and the critic model's name."""
    words, weights = uses_streams(session)
    if weights or adapt is not None:
        check_target_modules(model, adapt or AdaptConfig())
    elif isinstance(model, ModelConfig):
        models.resolve(model.name)  # a missing model fails here, not halfway through a load
    if words and semantic.critic not in ("base", "openai"):
        models.resolve(semantic.critic)


def next_history(history: list[Message], response: str, feedback: str, refinement: "Refinement | None") -> list[Message]:
    """H_{t+1} = H_t + [y_t, x*_{t+1}] (Algorithm 1's last line), written once.

    x*_{t+1} is the refined message when the words stream refined the message, else the raw
    x_{t+1} (the refinement's ``text`` is then that raw message, or the default corrective one for
    an empty message). For ``semantic.target = system`` the message stays raw and the system
    prompt the stream returned replaces the first message (a frozen prompt then stays in force)."""
    if refinement is None or refinement.target == "message":
        message = refinement.text if refinement is not None else feedback
        return [*history, {"role": "assistant", "content": response}, {"role": "user", "content": message}]
    rest = [m for m in history if m["role"] != "system"]
    system = [{"role": "system", "content": refinement.text}] if refinement.text.strip() else []
    return [*system, *rest, {"role": "assistant", "content": response}, {"role": "user", "content": feedback}]


def problem_seed(problem_id: str, seed: int) -> int:
    """A problem's own seed: its adapter init and sampling do not depend on what ran before it."""
    return (seed * 1_000_003 + zlib.crc32(problem_id.encode())) % (2**31)


# ---------------------------------------------------------------------------------------------
# Peak memory: CUDA peak allocated, else the process's peak RSS (VmHWM, reset through clear_refs)


def reset_peak_memory(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux ≥ 4.0: writing 5 resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then covers the whole process so far


def peak_memory_bytes(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


def return_freed_memory(device: Any) -> None:
    """Hand the heap that a phase freed back to the OS (CPU, glibc: ``malloc_trim``). glibc keeps
    freed blocks in its arenas for reuse, so a process that once held the critic's KV cache kept
    that RSS through every later phase: measured on 2 cores, B = 8, the generate phase after a
    critic round peaked at 1.98 GB against 1.22 GB in a baseline run. CUDA: nothing to do (its
    peak counts allocated bytes, not the caching allocator's reserve)."""
    trim = _malloc_trim() if device.type == "cpu" else None
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Shared:
    """What engines derived with ``with_session`` share: the loaded model, its adapter slots (one
    ``RowLoRA`` per LoRA structure at a time) and the critics."""

    loaded: LoadedModel
    policy: Policy
    semantic: dict[str, "SemanticStream"] = field(default_factory=dict)
    lora: RowLoRA | None = None


@dataclass
class _Live:
    """One session in the batch: its adapter slot θ_slot, environment, history H and turns so far."""

    index: int  # position of the problem in the run's input
    slot: int
    problem: Problem
    env: Environment
    seed: int
    history: list[Message]
    turns: list[TurnRecord] = field(default_factory=list)
    scored: bool = True  # False once a turn's answer could not be scored (the session then stops)
    joined: float = field(default_factory=time.perf_counter)


@dataclass
class _Turn:
    """Turn t of one session, as Algorithm 1 decides it: y_t, the environment's verdict, whether the
    session stops, which streams run after it, and what they did."""

    session: _Live
    reply: Reply
    clock: "_Clock"
    reward: float
    feedback: str  # x_{t+1}, the simulated user's raw next message
    result: RewardResult
    done: bool  # accepted, out of turns, or unscorable: the session leaves after this turn
    words: bool
    weights: bool
    refinement: "Refinement | None" = None
    following: list[Message] = field(default_factory=list)  # H_{t+1}
    step: ParametricStep | None = None

    @property
    def t(self) -> int:
        return len(self.session.turns) + 1


class SessionEngine:
    """Algorithm 1 for up to ``batch_size`` sessions at once on one loaded model, each session with
    its own adapter slot θ_slot (``rosa2.adapter.RowLoRA``); a plain session is a batch of one.

    Every round advances each live session by one turn: one generation (row b under θ_b), the
    rewards, one batched words step for the sessions whose words are on, one batched parametric
    step for those whose weights are on. A session that is solved, out of turns or unscorable
    leaves after its turn and the next problem takes its slot with θ ← 0 (continuous batching at
    turn granularity). Decisions, histories and seeds are per session, so under greedy decoding
    ``batch_size`` 1 and N give the same turns (tests/test_session.py).

    ``model`` is a ModelConfig (validated, then loaded) or an already loaded model. Environments
    default to ``environment_for`` with the session's feedback mode. ``update_tokens`` bounds the
    context + response tokens of one backward micro-batch of the parametric step; 0 (the default)
    sizes it from the memory actually free (``UpdateBudget``)."""

    def __init__(
        self,
        model: ModelConfig | LoadedModel,
        session: SessionConfig,
        adapt: AdaptConfig | None = None,
        semantic: SemanticConfig | None = None,
        generation: GenerationConfig | None = None,
        sandbox: SandboxConfig | None = None,
        reward: RewardConfig | None = None,
        *,
        batch_size: int = 1,
        update_tokens: int = 0,
    ) -> None:
        _check_sizes(batch_size, update_tokens)
        semantic = semantic or SemanticConfig()
        validate(model, session, adapt, semantic)
        loaded = model if isinstance(model, LoadedModel) else models.load(model)
        self.session = session
        self.adapt = adapt or AdaptConfig()
        self.semantic_cfg = semantic
        self.generation = generation or GenerationConfig()
        self.sandbox = sandbox
        self.reward = reward or RewardConfig()
        self.batch_size = batch_size
        self.update_tokens = update_tokens
        self._budget = UpdateBudget()
        self._shared = _Shared(loaded, Policy(loaded, self.generation))
        self._adapter_slot: int | None = None  # the slot save_adapter saves (see there)

    @property
    def policy(self) -> Policy:
        return self._shared.policy

    def with_session(
        self,
        session: SessionConfig | None = None,
        *,
        adapt: AdaptConfig | None = None,
        semantic: SemanticConfig | None = None,
        batch_size: int | None = None,
    ) -> "SessionEngine":
        """An engine for another method / update knobs / critic / width on the same loaded model."""
        session = session or self.session
        validate(self._shared.loaded, session, adapt, semantic or self.semantic_cfg)
        other = copy.copy(self)
        other.session = session
        other.adapt = adapt or self.adapt
        other.semantic_cfg = semantic or self.semantic_cfg
        other.batch_size = batch_size or self.batch_size
        _check_sizes(other.batch_size, other.update_tokens)
        other._adapter_slot = None
        other._budget = UpdateBudget()
        return other

    # -- the two streams, built on first use --------------------------------------------------

    def lora(self, create: bool = True) -> RowLoRA | None:
        """The adapter slots (``batch_size`` of them, this engine's LoRA structure) on the shared
        model; built on first use (None with ``create=False`` before that)."""
        current = self._shared.lora
        if current is not None and lora_structure(current.cfg) == lora_structure(self.adapt) and current.slots >= self.batch_size:
            return current
        if not create:
            return None
        self.release()
        self._shared.lora = RowLoRA(self.policy.model, self.adapt, self.batch_size)
        return self._shared.lora

    def adapter_bytes(self) -> int:
        """Memory held by the adapter slots (0 before any method with weights ran)."""
        return self._shared.lora.nbytes() if self._shared.lora is not None else 0

    def release(self) -> None:
        """Take the adapter slots off the shared model (hooks removed, memory freed); the next run
        with weights builds them afresh. A process that runs many cells on one model calls it per cell."""
        if self._shared.lora is not None:
            self._shared.lora.remove()
            self._shared.lora = None

    def semantic(self) -> "SemanticStream":
        from rosa2.semantic import SemanticStream

        key = repr(self.semantic_cfg)
        if key not in self._shared.semantic:
            self._shared.semantic[key] = SemanticStream(self.policy, self.semantic_cfg)
        return self._shared.semantic[key]

    # -- Algorithm 1 ----------------------------------------------------------------------------

    def run(self, problem: Problem, environment: Environment | None = None, on_turn: OnTurn | None = None) -> ProblemResult:
        """One session on ``problem``: at most T_max turns, stop at the first accepted answer."""
        each = (lambda _, record: on_turn(record)) if on_turn is not None else None
        return self.run_many([problem], [environment] if environment is not None else None, each)[0]

    def run_many(
        self,
        problems: Sequence[Problem],
        environments: Sequence[Environment] | None = None,
        on_turn: Callable[[Problem, TurnRecord], None] | None = None,
        on_result: Callable[[ProblemResult], None] | None = None,
    ) -> list[ProblemResult]:
        """Run every problem (Algorithm 1 each), ``batch_size`` sessions at a time; results in input
        order. ``on_result`` runs as a session leaves, before its slot is given to the next problem."""
        if environments is not None and len(environments) != len(problems):
            raise ConfigError(f"{len(environments)} environments for {len(problems)} problems; expected one per problem")
        weights = uses_streams(self.session)[1]
        lora = self.lora() if weights else None
        waiting = list(range(len(problems)))[::-1]
        free = list(range(self.batch_size))[::-1]
        live: list[_Live] = []
        results: list[ProblemResult | None] = [None] * len(problems)
        while waiting or live:
            while waiting and free:  # join: a new problem takes a free slot with θ ← 0
                index, slot = waiting.pop(), free.pop()
                problem = problems[index]
                env = environments[index] if environments is not None else environment_for(problem, self.session.feedback, self.sandbox, self.reward)
                seed = problem_seed(problem.id, self.generation.seed)
                if lora is not None:
                    lora.reset(slot, seed)
                if self.batch_size == 1:
                    self._adapter_slot = slot
                history: list[Message] = [{"role": "user", "content": env.reset(problem)}]  # the policy adds the system message
                live.append(_Live(index, slot, problem, env, seed, history))
            for session in self._round(live, lora, on_turn):  # leave
                results[session.index] = result = self._result(session)
                self._adapter_slot = session.slot
                if on_result is not None:
                    on_result(result)
                free.append(session.slot)
                live.remove(session)
        self.policy.turn_cache.clear()  # the last conversation's KV
        return [r for r in results if r is not None]

    def _round(self, live: list[_Live], lora: RowLoRA | None, on_turn: Any) -> list[_Live]:
        """One turn of every live session; returns the sessions that finished."""
        batch = _Clock(self.policy.device)  # the batch-wide phases: generation, critic, update
        clocks = [_Clock(self.policy.device) for _ in live]
        start = time.perf_counter()
        replies = batch.time("generate", self._generate, live, lora)
        share = (time.perf_counter() - start) / len(live)
        turns = []
        for s, reply, clock in zip(live, replies, clocks):
            clock.seconds["generate"] = share
            t = len(s.turns) + 1
            reward, feedback, result = clock.time("reward", s.env.step, reply.text, t)
            done = reward > 0 or t == self.session.max_turns or not result.scored  # unscorable: stop
            s.scored = result.scored
            words, weights = (False, False) if done else self.session.streams_at(t)
            turns.append(_Turn(s, reply, clock, reward, feedback, result, done, words, weights))
        if any(turn.weights for turn in turns):  # θ moves, so its KV cannot serve the next turn: free it first
            self.policy.turn_cache.clear()
        refining = [turn for turn in turns if turn.words]
        if refining:
            for turn, refinement in zip(refining, batch.time("semantic", self._refine, refining)):
                turn.refinement = refinement
                turn.clock.seconds["semantic"] = refinement.seconds
        for turn in turns:
            turn.following = next_history(turn.session.history, turn.reply.text, turn.feedback, turn.refinement)
        updating = [turn for turn in turns if turn.weights]
        if updating:
            assert lora is not None
            for turn, step in zip(updating, batch.time("parametric", self._update, updating, lora)):
                turn.step = step
                turn.clock.seconds["parametric"] = step.seconds
        finished = []
        for turn in turns:
            s = turn.session
            turn.clock.absorb(batch)
            record = self._record(turn)
            s.turns.append(record)
            if on_turn is not None:
                on_turn(s.problem, record)
            if turn.done:
                finished.append(s)
            else:
                s.history = turn.following
        return finished

    def _generate(self, live: list[_Live], lora: RowLoRA | None) -> list[Reply]:
        """y_t for every live session, row b under θ_b. A batch of one takes the one-conversation
        path (``Policy.generate``), whose KV cache serves the session's next turn while θ is unchanged."""
        if len(live) == 1:
            s = live[0]
            return [self.policy.generate(s.history, seed=s.seed + len(s.turns) + 1, lora=lora, slot=s.slot)]
        self.policy.turn_cache.clear()
        prompts = [self.policy.prompt_ids(s.history) for s in live]
        first = live[0]
        return self.policy.generate_many(prompts, lora=lora, slots=[s.slot for s in live], seed=first.seed + len(first.turns) + 1)

    def _refine(self, turns: list[_Turn]) -> list["Refinement"]:
        """x*_{t+1} for every rejected turn whose words are on, in one batched words step."""
        from rosa2.semantic import Item

        items = [Item(turn.session.problem.prompt, turn.session.history, turn.reply.text, turn.feedback) for turn in turns]
        return self.semantic().refine_many(items)

    def _update(self, turns: list[_Turn], lora: RowLoRA) -> list[ParametricStep]:
        """θ_b ← θ_b + Δθ_b on y_t for every turn whose weights are on, in one batched step."""
        items = [UpdateItem(turn.session.slot, self._update_context(turn), turn.reply.response_ids, turn.reward) for turn in turns]
        device = self.policy.device
        budget = self.update_tokens or self._budget.tokens(device)
        start = peak_memory_bytes(device)  # the phase's clock reset the peak: this is the memory in use now
        steps = parametric_steps(self.policy.model, lora, self.adapt, items, max_tokens=budget)
        self._budget.observe(max(step.batch_tokens for step in steps), peak_memory_bytes(device) - start)
        return steps

    def _update_context(self, turn: _Turn) -> Any:
        """Prompt ids y_t is scored in: the context it was generated in (H, the paper's reading) or
        the next one (H + y_t + x*_{t+1}), per ``AdaptConfig.update_context``."""
        if self.adapt.update_context == "next":
            return self.policy.prompt_ids(turn.following)
        return turn.reply.prompt_ids

    def _record(self, turn: _Turn) -> TurnRecord:
        reply, result, refinement, step, clock = turn.reply, turn.result, turn.refinement, turn.step, turn.clock
        detail = as_dict(result)
        detail["peak_memory_mb"] = clock.peaks_mb()
        if refinement is not None:
            detail.update(critique=refinement.critique, synthesised=refinement.synthesised, critic_reply=refinement.reply,
                          semantic_target=refinement.target)
            if refinement.target == "system":
                detail.update(system_prompt_before=refinement.original, system_prompt=refinement.text)
        if step is not None:
            detail.update(segments=step.segments, residual=step.residual, gram_mean_diag=step.gram_mean_diag)
        return TurnRecord(
            turn=turn.t,
            reward=turn.reward,
            response=reply.text,
            message=turn.session.history[-1]["content"],
            feedback=turn.feedback,
            refined_feedback=turn.following[-1]["content"],
            words_on=refinement is not None,
            weights_on=step is not None,
            delta_theta_sq=step.delta_theta_sq if step else 0.0,
            delta_x_sq=refinement.delta_x_sq if refinement else 0.0,
            semantic_fallback=bool(refinement and refinement.fallback),
            semantic_class=refinement.kind if refinement else "",
            answer_status=answer_status(result, reply.tokens >= self.generation.max_new_tokens) if result.scored else "",
            tokens=reply.tokens,
            seconds_generate=clock.seconds["generate"],
            seconds_parametric=clock.seconds["parametric"],
            seconds_semantic=clock.seconds["semantic"],
            seconds_reward=clock.seconds["reward"],
            peak_memory_bytes=clock.peak,
            prediction=result.prediction,
            detail=detail,
        )

    def _result(self, s: _Live) -> ProblemResult:
        return ProblemResult(
            problem_id=s.problem.id,
            method=self.session.method,
            seconds=sum(r.seconds_generate + r.seconds_parametric + r.seconds_semantic + r.seconds_reward for r in s.turns),
            wall_seconds=time.perf_counter() - s.joined,
            max_turns=self.session.max_turns,
            scored=s.scored,
            turns=s.turns,
        )

    # -- adapters -------------------------------------------------------------------------------

    def save_adapter(self, path: str | Path) -> Path:
        """Save θ of one session (PEFT layout, adapter only): the session that left last (call it
        from ``run_many``'s ``on_result``, before its slot is reused, or after ``run``) or, in an
        engine of ``batch_size`` 1, the session running now (``rosa2 chat``'s /save)."""
        if not uses_streams(self.session)[1]:
            raise Rosa2Error(f"method {self.session.method!r} has no parametric stream, so there is no adapter to save")
        lora = self.lora(create=False)
        if lora is None or self._adapter_slot is None:
            raise Rosa2Error("no session has run yet, so there is no adapter to save")
        return lora.save(self._adapter_slot, path, base_model=self.policy.source)

    def load_adapter(self, path: str | Path, slot: int = 0) -> RowLoRA:
        """Set θ of ``slot`` from a saved adapter, to inspect it (``policy.generate(..., lora=, slot=)``);
        a run resets every slot a problem joins."""
        lora = self.lora()
        assert lora is not None
        lora.load(slot, path)
        return lora


def _check_sizes(batch_size: int, update_tokens: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be >= 1 (sessions advanced together)")
    if update_tokens < 0:
        raise ConfigError(f"update_tokens={update_tokens!r} must be >= 0 (tokens per backward micro-batch; 0 = from free memory)")


class UpdateBudget:
    """Tokens per backward micro-batch of the parametric step, from the memory actually free.

    Each update measures what it cost: the phase's peak above the memory in use when it began, per
    token of its largest micro-batch (rows × longest row). The next budget is ``share`` of the
    memory available now (CUDA: free device memory; CPU: the kernel's MemAvailable) over the
    largest cost per token seen, so B sessions share one backward whenever they fit. Before the
    first measurement it is ``first`` tokens (the CPU setting measured to keep the update's memory
    at ~1/3 of 1024 tokens' for ~10% more time)."""

    def __init__(self, first: int = 256, share: float = 0.5) -> None:
        self.first, self.share = first, share
        self.bytes_per_token = 0.0

    def tokens(self, device: Any) -> int:
        if self.bytes_per_token <= 0:
            return self.first
        return max(1, int(self.share * available_memory_bytes(device) / self.bytes_per_token))

    def observe(self, tokens: int, extra_bytes: int) -> None:
        if tokens > 0 and extra_bytes > 0:
            self.bytes_per_token = max(self.bytes_per_token, extra_bytes / tokens)


def available_memory_bytes(device: Any) -> int:
    """Memory a new allocation can take now: CUDA's free device memory, else the host's MemAvailable."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


class _Clock:
    """Seconds and peak memory per phase of one turn; a phase that did not run counts 0.

    Each timed phase starts from a reset peak (CUDA: peak allocated; CPU: VmHWM = current RSS), so
    ``peaks`` says which stream needs the memory; ``peak`` is the turn's, the largest of them and
    of what was reached between phases (``outside``)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.seconds = {"generate": 0.0, "reward": 0.0, "semantic": 0.0, "parametric": 0.0}
        self.peaks: dict[str, int] = {}
        self.outside = 0
        reset_peak_memory(device)

    def time(self, phase: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.outside = max(self.outside, peak_memory_bytes(self.device))
        reset_peak_memory(self.device)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            return_freed_memory(self.device)  # counted in the phase's seconds: it is the phase's cost
            self.seconds[phase] += time.perf_counter() - start
            self.peaks[phase] = max(self.peaks.get(phase, 0), peak_memory_bytes(self.device))
            reset_peak_memory(self.device)

    def absorb(self, other: "_Clock") -> None:
        """Take ``other``'s peaks (the round's batched generation, critic and update) as this turn's too."""
        for phase, b in other.peaks.items():
            self.peaks[phase] = max(self.peaks.get(phase, 0), b)
        self.outside = max(self.outside, other.outside)

    @property
    def peak(self) -> int:
        return max([peak_memory_bytes(self.device), self.outside, *self.peaks.values()])

    def peaks_mb(self) -> dict[str, float]:
        """Peak per phase that ran, in MiB (for a turn record's detail)."""
        return {phase: round(b / 2**20, 1) for phase, b in self.peaks.items()}
