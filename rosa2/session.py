"""The session engine: Algorithm 1 of ROSA2 (docs/algorithm.md §1), one problem at a time.

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

A method is only which streams are on after which turn (``SessionConfig.streams_at``). One
engine holds one loaded model; ``with_session`` derives engines for other methods or update knobs
that share it, so an ablation never reloads the model.
"""

from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from rosa2 import models
from rosa2.adapter import ParametricStep, ParametricStream, check_target_modules
from rosa2.config import AdaptConfig, GenerationConfig, ModelConfig, RewardConfig, SandboxConfig, SemanticConfig, SessionConfig
from rosa2.environment import Environment, answer_status, as_dict, environment_for
from rosa2.errors import Rosa2Error
from rosa2.models import LoadedModel
from rosa2.policy import Message, Policy
from rosa2.records import Problem, ProblemResult, TurnRecord

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
    """H_{t+1} = H_t + [y_t, x*_{t+1}] (Algorithm 1's last line), written once for both engines.

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


# ---------------------------------------------------------------------------------------------


@dataclass
class _Shared:
    """What engines derived with ``with_session`` share: the loaded model and the critics."""

    loaded: LoadedModel
    policy: Policy
    semantic: dict[str, "SemanticStream"] = field(default_factory=dict)


class SessionEngine:
    """Runs sessions (Algorithm 1) of one method on one loaded model.

    ``model`` is a ModelConfig (validated, then loaded) or an already loaded model. ``run`` takes a
    Problem and an Environment (default: ``environment_for`` with the session's feedback mode)."""

    def __init__(
        self,
        model: ModelConfig | LoadedModel,
        session: SessionConfig,
        adapt: AdaptConfig | None = None,
        semantic: SemanticConfig | None = None,
        generation: GenerationConfig | None = None,
        sandbox: SandboxConfig | None = None,
        reward: RewardConfig | None = None,
    ) -> None:
        semantic = semantic or SemanticConfig()
        validate(model, session, adapt, semantic)
        loaded = model if isinstance(model, LoadedModel) else models.load(model)
        self.session = session
        self.adapt = adapt or AdaptConfig()
        self.semantic_cfg = semantic
        self.generation = generation or GenerationConfig()
        self.sandbox = sandbox
        self.reward = reward or RewardConfig()
        self._shared = _Shared(loaded, Policy(loaded, self.generation))
        self._parametric: ParametricStream | None = None

    @property
    def policy(self) -> Policy:
        return self._shared.policy

    def with_session(
        self,
        session: SessionConfig | None = None,
        *,
        adapt: AdaptConfig | None = None,
        semantic: SemanticConfig | None = None,
    ) -> "SessionEngine":
        """An engine for another method / update knobs / critic on the same loaded model."""
        session = session or self.session
        validate(self._shared.loaded, session, adapt, semantic or self.semantic_cfg)
        other = copy.copy(self)
        other.session = session
        if adapt is not None:
            other.adapt, other._parametric = adapt, None
        if semantic is not None:
            other.semantic_cfg = semantic
        return other

    # -- the two streams, built on first use --------------------------------------------------

    def parametric(self, create: bool = True) -> ParametricStream | None:
        """This engine's parametric stream (the LoRA adapter on the shared model)."""
        if self._parametric is None and (create or self._wrapped()):
            before = self.policy.model
            self._parametric = ParametricStream(self.policy, self.adapt)
            if self.policy.model is not before:
                # the model is now a PeftModel: critics built on the bare model would run with θ on
                self._shared.semantic.clear()
                self._shared.loaded.model = self.policy.model
        if self._parametric is not None:
            self._parametric.activate()
        return self._parametric

    def _wrapped(self) -> bool:
        return hasattr(self.policy.model, "peft_config")

    def semantic(self) -> "SemanticStream":
        from rosa2.semantic import SemanticStream

        key = repr(self.semantic_cfg)
        if key not in self._shared.semantic:
            self._shared.semantic[key] = SemanticStream(self.policy, self.semantic_cfg)
        return self._shared.semantic[key]

    # -- Algorithm 1 ----------------------------------------------------------------------------

    def run(self, problem: Problem, environment: Environment | None = None, on_turn: OnTurn | None = None) -> ProblemResult:
        """One session on ``problem``: at most T_max turns, stop at the first accepted answer."""
        session = self.session
        env = environment or environment_for(problem, session.feedback, self.sandbox, self.reward)
        seed = problem_seed(problem.id, self.generation.seed)
        parametric = self.parametric(create=uses_streams(session)[1])
        if parametric is not None:
            parametric.reset(seed)  # θ ← 0 (also for a frozen method run after an adapted one)
        history: list[Message] = [{"role": "user", "content": env.reset(problem)}]  # the policy adds the system message
        turns: list[TurnRecord] = []
        start = time.perf_counter()
        for t in range(1, session.max_turns + 1):
            clock = _Clock(self.policy.device)
            reply = clock.time("generate", self.policy.generate, history, seed=seed + t)
            reward, feedback, result = clock.time("reward", env.step, reply.text, t)
            done = reward > 0 or t == session.max_turns or not result.scored  # unscorable: stop
            words, weights = (False, False) if done else session.streams_at(t)
            if weights:  # θ moves after this turn, so its KV cannot serve the next: free it before the streams
                self.policy.turn_cache.clear()
            refinement = clock.time("semantic", self._refine, problem, history, reply.text, feedback) if words else None
            following = next_history(history, reply.text, feedback, refinement)
            step = clock.time("parametric", self._update, history, reply, following, reward) if weights else None
            turns.append(self._record(t, history, reply, result, reward, feedback, following, refinement, step, clock))
            if on_turn is not None:
                on_turn(turns[-1])
            if done:
                break
            history = following
        self.policy.turn_cache.clear()  # this conversation's KV; the next problem starts its own
        return self._result(problem, turns, time.perf_counter() - start, scored=result.scored)

    def _refine(self, problem: Problem, history: list[Message], response: str, message: str) -> "Refinement":
        return self.semantic().refine(problem.prompt, history, response, message)

    def _update(self, history: list[Message], reply: Any, following: list[Message], reward: float) -> ParametricStep:
        """θ ← θ + Δθ on y_t, in the context ``_update_context`` picks."""
        parametric = self.parametric()
        assert parametric is not None
        return parametric.step(self._update_context(reply, following), reply.response_ids, reward)

    def _update_context(self, reply: Any, following: list[Message]) -> Any:
        """Prompt ids y_t is scored in: the context it was generated in (H, the paper's reading) or
        the next one (``following`` = H + y_t + x*_{t+1}), per ``AdaptConfig.update_context``."""
        if self.adapt.update_context == "next":
            return self.policy.prompt_ids(following)
        return reply.prompt_ids

    def _record(self, t, history, reply, result, reward, feedback, following, refinement, step, clock) -> TurnRecord:  # type: ignore[no-untyped-def]
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
            turn=t,
            reward=reward,
            response=reply.text,
            message=history[-1]["content"],
            feedback=feedback,
            refined_feedback=following[-1]["content"],
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

    def _result(self, problem: Problem, turns: list[TurnRecord], seconds: float, scored: bool) -> ProblemResult:
        solved_at = next((r.turn for r in turns if r.reward > 0), None)
        return ProblemResult(
            problem_id=problem.id,
            method=self.session.method,
            solved=solved_at is not None,
            turn_solved=solved_at,
            turns_used=len(turns),
            seconds=seconds,
            peak_memory_bytes=max(r.peak_memory_bytes for r in turns),
            max_turns=self.session.max_turns,
            scored=scored,
            turns=turns,
        )

    # -- adapters -------------------------------------------------------------------------------

    def save_adapter(self, path: str | Path) -> Path:
        """Save θ of the last problem (PEFT layout, adapter only); call it after ``run``."""
        parametric = self.parametric(create=False)
        if parametric is None:
            raise Rosa2Error(f"method {self.session.method!r} has no parametric stream, so there is no adapter to save")
        return parametric.save(path)

    def load_adapter(self, path: str | Path) -> None:
        """Set θ from a saved adapter (e.g. to inspect a promoted one with ``policy.generate``)."""
        parametric = self.parametric()
        assert parametric is not None
        parametric.load(path)


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
            self.seconds[phase] += time.perf_counter() - start
            self.peaks[phase] = max(self.peaks.get(phase, 0), peak_memory_bytes(self.device))
            reset_peak_memory(self.device)

    def absorb(self, other: "_Clock") -> None:
        """Take ``other``'s peaks (a batched round's generation, critic and update) as this turn's too."""
        for phase, b in other.peaks.items():
            self.peaks[phase] = max(self.peaks.get(phase, 0), b)
        self.outside = max(self.outside, other.outside)

    @property
    def peak(self) -> int:
        return max([peak_memory_bytes(self.device), self.outside, *self.peaks.values()])

    def peaks_mb(self) -> dict[str, float]:
        """Peak per phase that ran, in MiB (for a turn record's detail)."""
        return {phase: round(b / 2**20, 1) for phase, b in self.peaks.items()}
