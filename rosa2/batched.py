"""Many sessions at once: per-row LoRA adapters, batched generation, one batched update.

Algorithm 1 (docs/algorithm.md §1) runs one problem at a time; its cost is dominated by generation, which
on every device we target is bound by reading the weights once per decoded token. Advancing B
sessions together reads the weights once for B tokens. What makes this non-trivial is that each
session owns its own parametric-stream adapter θ_b:

- **Per-row LoRA** (``RowLoRA``): every target Linear carries A:[slots, r, in] and B:[slots, out, r];
  batch row i uses slot ``rows[i]``, so one forward applies B sessions' adapters to their own rows
  (y = W x + (α/r)·B_{rows[i]} A_{rows[i]} x). With no rows set the model is the frozen base model,
  which is what the semantic stream's local critic wants.
- **One backward for B updates**: sessions' parameters are disjoint slices of the same tensors, so
  the gradient of Σ_b Σ_{i∈s} p_{b,i} with respect to A, B holds, in slot b, exactly session b's
  row s of J (docs/algorithm.md §2). S > 1 segments use ``is_grads_batched`` (one vmapped backward for all S).
  The damped least-squares step itself is the single engine's (``rosa2.adapter``), applied per slot.
- **Continuous batching** (``BatchedSessionEngine``): a session that is solved or out of turns
  leaves after its turn; the next problem takes its slot with the slot's adapter reset to θ = 0.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch  # this module is only imported once a batched run starts

from rosa2.adapter import fresh_lora_a
from rosa2.config import AdaptConfig, ConfigError, GenerationConfig, ModelConfig, RewardConfig, SandboxConfig, SemanticConfig, SessionConfig
from rosa2.environment import Environment, environment_for
from rosa2.errors import Rosa2Error
from rosa2.models import LoadedModel
from rosa2.policy import reply_length, stop_ids
from rosa2.records import Problem, ProblemResult, TurnRecord
from rosa2.session import OnTurn, SessionEngine, _Clock, next_history, problem_seed, uses_streams


def _find_targets(model: Any, target_modules: Sequence[str]) -> list[tuple[str, Any]]:
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    ]
    missing = sorted(set(target_modules) - {n.rsplit(".", 1)[-1] for n, _ in found})
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"target_modules {missing} are not Linear modules of this model; expected some of {names}")
    return found


class RowLoRA:
    """Per-row LoRA adapters on a causal LM: ``slots`` independent adapters θ_0..θ_{slots-1}.

    Installed with forward hooks, so the model's modules and weights are untouched and ``remove()``
    restores it exactly. Outside ``with lora.rows(slot_ids)`` every hook is a no-op (base model).
    PEFT's convention holds per slot: A ~ kaiming-uniform(a=√5), B = 0, so θ starts at zero and the
    first update moves only B (docs/algorithm.md §2).
    """

    def __init__(self, model: Any, cfg: AdaptConfig, slots: int) -> None:
        if slots < 1:
            raise ConfigError(f"slots={slots!r} must be >= 1")
        self.cfg = cfg
        self.slots = slots
        self.scale = cfg.alpha / cfg.rank
        self.targets = _find_targets(model, cfg.target_modules)
        weight = self.targets[0][1].weight
        self.A: list[Any] = []
        self.B: list[Any] = []
        for _, linear in self.targets:
            # float32 whatever the model's dtype, as PEFT keeps the one-at-a-time engine's adapter:
            # accumulated steps are not rounded to bfloat16 and both engines save the same tensors
            self.A.append(torch.zeros(slots, cfg.rank, linear.in_features, device=weight.device, dtype=torch.float32))
            self.B.append(torch.zeros(slots, linear.out_features, cfg.rank, device=weight.device, dtype=torch.float32))
        self._rows: Any = None
        self._handles = [linear.register_forward_hook(self._hook(i)) for i, (_, linear) in enumerate(self.targets)]

    # -- the forward -------------------------------------------------------------------------
    def _hook(self, index: int) -> Any:
        def hook(module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
            rows = self._rows
            if rows is None:
                return output
            x = inputs[0]
            if x.shape[0] != rows.shape[0]:
                raise RuntimeError(f"RowLoRA: batch has {x.shape[0]} rows but {rows.shape[0]} slot ids are set")
            a = self.A[index][rows]  # [b, r, in]
            b = self.B[index][rows]  # [b, out, r]
            flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
            delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
            return output + (self.scale * delta).reshape(output.shape).to(output.dtype)

        return hook

    @contextmanager
    def rows(self, slot_ids: Sequence[int]) -> Iterator[None]:
        """Apply slot ``slot_ids[i]`` to batch row i inside the block."""
        bad = [s for s in slot_ids if not 0 <= s < self.slots]
        if bad:
            raise ValueError(f"slot ids {bad} outside 0..{self.slots - 1}")
        previous = self._rows
        self._rows = torch.tensor(list(slot_ids), dtype=torch.long, device=self.A[0].device)
        try:
            yield
        finally:
            self._rows = previous

    # -- the parameters θ_slot --------------------------------------------------------------
    def reset(self, slot: int, seed: int) -> None:
        """θ_slot ← 0 for a new problem: A re-drawn from ``seed`` (PEFT's init), B zeroed."""
        # the draws are ParametricStream.reset's, so a slot starts where the one-at-a-time
        # engine's adapter starts for the same problem seed
        for a, b, fresh in zip(self.A, self.B, fresh_lora_a([a.shape[1:] for a in self.A], seed)):
            a[slot].copy_(fresh)
            b[slot].zero_()

    def load_slot(self, slot: int, A: Sequence[Any], B: Sequence[Any]) -> None:
        """Copy an adapter into ``slot`` (per target module, A:[r, in], B:[out, r])."""
        for dst_a, dst_b, src_a, src_b in zip(self.A, self.B, A, B, strict=True):
            dst_a[slot].copy_(src_a)
            dst_b[slot].copy_(src_b)

    def tensors(self) -> list[Any]:
        """The slot-stacked parameter tensors, in a fixed order: A_0, B_0, A_1, B_1, ..."""
        return [t for pair in zip(self.A, self.B) for t in pair]

    def slot_numel(self) -> int:
        return sum(t[0].numel() for t in self.tensors())

    def flat(self, slot: int, tensors: Sequence[Any] | None = None) -> Any:
        """θ_slot (or a gradient laid out like ``tensors()``) as one flat vector."""
        return torch.cat([t[slot].reshape(-1) for t in (tensors if tensors is not None else self.tensors())])

    def add_(self, slot: int, delta: Any) -> None:
        """θ_slot ← θ_slot + Δθ, with Δθ flat in ``tensors()`` order."""
        offset = 0
        for t in self.tensors():
            n = t[slot].numel()
            t[slot].add_(delta[offset : offset + n].view_as(t[slot]).to(t.dtype))
            offset += n

    def nbytes(self) -> int:
        """Memory held by all slots' adapters (the bounded part of the adaptation's memory)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def save_slot(self, slot: int, path: str | Path, base_model: str | None = None) -> Path:
        """Write θ_slot in PEFT's adapter layout: ``adapter_config.json`` + ``adapter_model.safetensors``
        with the keys ``get_peft_model_state_dict`` gives ``ParametricStream``, so
        ``SessionEngine.load_adapter``, ``PeftModel.from_pretrained`` and ``rosa2 adapters show`` read
        it as they read an adapter the one-at-a-time engine saved. ``base_model`` (the model's source) goes
        into the config and ``rosa2.json`` (``rosa2.adapter.write_adapter_config``)."""
        from safetensors.torch import save_file

        from rosa2.adapter import ADAPTER_WEIGHTS, lora_config, write_adapter_config

        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} outside 0..{self.slots - 1}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {}
        for (name, _), a, b in zip(self.targets, self.A, self.B):
            # PeftModel wraps the model as base_model.model; the adapter name is dropped on save
            state[f"base_model.model.{name}.lora_A.weight"] = a[slot].detach().to("cpu", copy=True)
            state[f"base_model.model.{name}.lora_B.weight"] = b[slot].detach().to("cpu", copy=True)
        save_file(state, str(path / ADAPTER_WEIGHTS))
        write_adapter_config(path, lora_config(self.cfg), base_model)
        return path

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---------------------------------------------------------------------------------------------
# Batched generation


def left_pad(sequences: Sequence[Any], pad_id: int) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids) for 1-D id tensors, left-padded to one length.

    Left padding keeps every row's last prompt token at the same column, so decoding appends in
    lockstep; positions count real tokens only, so a padded row sees what an unpadded one sees.
    """
    width = max(int(s.numel()) for s in sequences)
    device = sequences[0].device
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for i, seq in enumerate(sequences):
        n = int(seq.numel())
        ids[i, width - n :] = seq
        mask[i, width - n :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@dataclass
class BatchReply:
    """One row of a batched generation: the same fields as ``rosa2.policy.Reply``."""

    text: str
    prompt_ids: Any
    response_ids: Any
    seconds: float  # this row's share of the batch's wall time

    @property
    def tokens(self) -> int:
        return int(self.response_ids.numel())


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    generation: GenerationConfig,
    *,
    lora: RowLoRA | None = None,
    slots: Sequence[int] | None = None,
    max_new_tokens: int | None = None,
) -> list[BatchReply]:
    """Generate for B templated prompts at once, row i under adapter slot ``slots[i]``.

    Greedy decoding gives the same tokens as B separate ``Policy.generate`` calls (up to float
    rounding of the padded batch, which the parity test bounds). Sampling draws from one RNG for
    the whole batch, so sampled text is not bitwise the single engine's.
    """

    ids, mask, _ = left_pad(prompts, tokenizer.pad_token_id)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens or generation.max_new_tokens,
        "do_sample": generation.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if generation.do_sample:
        kwargs.update(temperature=generation.temperature, top_p=generation.top_p)
        torch.manual_seed(generation.seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    start = time.perf_counter()
    context = lora.rows(slots) if lora is not None and slots is not None else nullcontext()
    with torch.no_grad(), context:
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    share = (time.perf_counter() - start) / len(prompts)
    stops = stop_ids(tokenizer)
    replies = []
    for i, prompt in enumerate(prompts):
        response = out[i, ids.shape[1] :]
        response = response[: reply_length(response.tolist(), stops)]
        text = tokenizer.decode(response, skip_special_tokens=True)
        replies.append(BatchReply(text=text, prompt_ids=prompt, response_ids=response, seconds=share))
    return replies


# ---------------------------------------------------------------------------------------------
# The parametric stream for B sessions: one forward, one (vmapped) backward, B closed-form steps


@dataclass
class UpdateItem:
    """One session's parametric update: y_t = ``response_ids`` in context ``prompt_ids``, reward r_t."""

    slot: int
    prompt_ids: Any
    response_ids: Any
    reward: float


def batched_parametric_step(
    model: Any,
    lora: RowLoRA,
    cfg: AdaptConfig,
    items: Sequence[UpdateItem],
    *,
    max_tokens: int = 1024,
    segment_chunk: int = 16,
) -> list[Any]:
    """Δθ_b for every item, each toward its own target policy (ROSA2 Eq. 11 as ``rosa2.adapter``
    reconstructs it), from one forward and one backward per micro-batch of sessions.

    Why one backward suffices: the objective Σ_b Σ_{i∈s} p_{b,i} (or log p for ``residual=logprob``)
    touches slot b's A, B only through row b, so its gradient restricted to slot b is row s of
    session b's J. With S > 1 segments the S rows come from one vmapped backward over the basis
    vectors e_s (``is_grads_batched``), ``segment_chunk`` of them at a time to bound memory. The
    residuals and the damped minimum-norm solve are the single engine's functions, so both engines
    take the same step. Memory: sessions go through the backward in micro-batches of at most
    ``max_tokens`` context + response tokens (one session at least), and ``cfg.checkpoint_activations``
    keeps only each block's input (``rosa2.adapter.update_memory``), so the update's activation
    memory is bounded by the token budget, not by B or by how long the sessions have run.
    Returns one ``rosa2.adapter.ParametricStep`` per item."""
    from rosa2.adapter import ParametricStep, damped_min_norm_step, response_objective, update_memory

    steps: list[Any] = [None] * len(items)
    todo = []
    for k, item in enumerate(items):
        if int(item.response_ids.numel()) == 0:  # an empty answer has no likelihood to move
            steps[k] = ParametricStep(0.0, 0, [], 0.0, 0.0)
        else:
            todo.append(k)
    params = lora.tensors()
    for chunk in token_batches(todo, [int(items[k].prompt_ids.numel() + items[k].response_ids.numel()) for k in todo], max_tokens):
        start = time.perf_counter()
        group = [items[k] for k in chunk]
        slots = [item.slot for item in group]
        if len(set(slots)) != len(slots):
            raise ValueError(f"two updates for one slot in one batch: {slots}")
        lengths = [int(item.response_ids.numel()) for item in group]
        width = max(lengths)
        seqs = [torch.cat([item.prompt_ids, item.response_ids]) for item in group]
        ids, mask, positions = left_pad(seqs, 0)  # pad columns are masked out
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad(), _frozen(model), lora.rows(slots), update_memory(model, cfg):
                logits = model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1, use_cache=False
                ).logits[:, :-1].float()
                logp_all = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, -width:, None])[..., 0]
                objectives = [
                    response_objective(logp_all[b, width - n :], item.reward, cfg)
                    for b, (item, n) in enumerate(zip(group, lengths))
                ]
                count = max(int(out.numel()) for out, _ in objectives)
                outputs = torch.stack(
                    [torch.nn.functional.pad(out, (0, count - int(out.numel()))) for out, _ in objectives]
                )  # [b, S]: zero rows pad sessions with fewer segments and get no gradient
                rows = _segment_grads(outputs, params, segment_chunk)  # per param: [S, slots, ...]
        finally:
            for p in params:
                p.requires_grad_(False)
        seconds = (time.perf_counter() - start) / len(group)
        for b, (k, item, (out, residual)) in enumerate(zip(chunk, group, objectives)):
            segments = int(out.numel())
            jacobian = torch.cat([g[:segments, item.slot].reshape(segments, -1).float() for g in rows], dim=1)
            solve_start = time.perf_counter()
            delta, scale = damped_min_norm_step(jacobian, residual.detach(), cfg.eta, cfg.damping)
            with torch.no_grad():
                lora.add_(item.slot, delta)
            steps[k] = ParametricStep(
                delta_theta_sq=float(delta.double().pow(2).sum()),
                segments=segments,
                residual=[float(x) for x in residual.detach().cpu()],
                gram_mean_diag=scale,
                seconds=seconds + time.perf_counter() - solve_start,
            )
    return steps


def token_batches(keys: Sequence[int], tokens: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups of ``keys`` whose padded size (rows × longest row) stays within
    ``max_tokens``; a row longer than the budget goes alone."""
    groups: list[list[int]] = []
    longest = 0
    for key, n in zip(keys, tokens):
        if groups and (len(groups[-1]) + 1) * max(longest, n) <= max_tokens:
            groups[-1].append(key)
            longest = max(longest, n)
        else:
            groups.append([key])
            longest = n
    return groups


@contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """Base weights without requires_grad inside the block, so autograd keeps no Linear inputs
    for base-weight gradients nobody asks for (the update's activation memory); the flags are
    restored because the model is shared with other engines."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _segment_grads(outputs: Any, params: Sequence[Any], chunk: int) -> list[Any]:
    """∇ Σ_b outputs[b, s] for every s, as [S, *param.shape] per parameter tensor."""
    count = outputs.shape[1]
    if count == 1:
        return [g[None] for g in torch.autograd.grad(outputs.sum(), params)]
    parts: list[list[Any]] = []
    for lo in range(0, count, chunk):
        hi = min(lo + chunk, count)
        basis = torch.zeros(hi - lo, *outputs.shape, dtype=outputs.dtype, device=outputs.device)
        basis[torch.arange(hi - lo), :, torch.arange(lo, hi)] = 1.0
        parts.append(
            list(torch.autograd.grad(outputs, params, grad_outputs=basis, is_grads_batched=True, retain_graph=hi < count))
        )
    return [torch.cat(group) for group in zip(*parts)]


# ---------------------------------------------------------------------------------------------
# Continuous batching of sessions


@dataclass
class _Live:
    """One session in the batch: its slot (adapter θ_slot), environment and history H."""

    index: int  # position of the problem in the run's input
    slot: int
    problem: Any
    env: Any
    seed: int
    history: list[dict[str, str]]
    turns: list[Any]
    scored: bool = True


class BatchedSessionEngine(SessionEngine):
    """Algorithm 1 for up to ``batch_size`` sessions at once, each with its own adapter slot.

    Every round advances each live session by one turn: one batched generation (row b under θ_b),
    the rewards, one ``refine_many`` for the sessions whose words are on, one batched parametric
    step for those whose weights are on. A session that is solved, out of turns or unscorable
    leaves after its turn and the next problem takes its slot with θ ← 0 (continuous batching at
    turn granularity). Per-session decisions, histories, seeds and records are the one-at-a-time
    engine's, so under greedy decoding ``run_many`` returns what ``SessionEngine.run`` returns
    problem by problem (tests/test_batched.py). Seconds in the records are each session's share
    of the batch's wall time, so they add up to the machine time the run took.
    """

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
        batch_size: int = 8,
        update_tokens: int = 1024,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be >= 1")
        if update_tokens < 1:
            raise ConfigError(f"update_tokens={update_tokens!r} must be >= 1 (tokens per backward micro-batch)")
        super().__init__(model, session, adapt, semantic, generation, sandbox, reward)
        self.batch_size = batch_size
        self.update_tokens = update_tokens
        self._lora: RowLoRA | None = None

    def row_lora(self) -> RowLoRA:
        """The per-row adapters (``batch_size`` slots) on the shared model, built on first use."""
        if self._lora is None or self._lora.cfg != self.adapt or self._lora.slots < self.batch_size:
            if self._lora is not None:
                self._lora.remove()
            self._lora = RowLoRA(self.policy.model, self.adapt, self.batch_size)
        return self._lora

    def adapter_bytes(self) -> int:
        """Memory held by the B adapter slots (0 before any method with weights ran)."""
        return self._lora.nbytes() if self._lora is not None else 0

    def parametric(self, create: bool = True) -> Any:
        raise NotImplementedError("the batched engine keeps per-row adapters (row_lora), not a PEFT stream")

    _finished_slot: int | None = None  # slot of the session that left last (its θ stays until a problem joins)

    def save_adapter(self, path: str | Path) -> Path:
        """Save θ of the session that finished last (PEFT layout, adapter only): call it from
        ``run_many``'s ``on_result``, which runs before the slot is given to the next problem, or
        after ``run``. The file is what ``SessionEngine.save_adapter`` writes for that problem."""
        if not uses_streams(self.session)[1]:
            raise Rosa2Error(f"method {self.session.method!r} has no parametric stream, so there is no adapter to save")
        if self._lora is None or self._finished_slot is None:
            raise Rosa2Error("no session has finished yet; save_adapter saves the adapter of the session that left last")
        return self._lora.save_slot(self._finished_slot, path, base_model=self.policy.source)

    def load_adapter(self, path: str | Path) -> None:
        raise NotImplementedError("the batched engine's slots start at θ = 0; load a saved adapter with SessionEngine")

    def release(self) -> None:
        """Take the per-row adapters off the shared model (hooks removed, slot memory freed); the next
        run builds them afresh. Engines derived with ``with_session`` each build their own, so a
        process that runs many cells on one loaded model calls this after each cell."""
        if self._lora is not None:
            self._lora.remove()
            self._lora = None

    def run(self, problem: Problem, environment: Environment | None = None, on_turn: OnTurn | None = None) -> ProblemResult:
        return self.run_many([problem], [environment] if environment is not None else None, on_turn)[0]

    def run_many(
        self,
        problems: Sequence[Problem],
        environments: Sequence[Environment] | None = None,
        on_turn: Callable[[Problem, TurnRecord], None] | None = None,
        on_result: Callable[[ProblemResult], None] | None = None,
    ) -> list[ProblemResult]:
        """Run every problem (Algorithm 1 each), ``batch_size`` sessions at a time, in input order."""
        if environments is not None and len(environments) != len(problems):
            raise ConfigError(f"{len(environments)} environments for {len(problems)} problems; expected one per problem")
        weights = uses_streams(self.session)[1]
        lora = self.row_lora() if weights else None
        self._finished_slot = None
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
                history = [{"role": "user", "content": env.reset(problem)}]
                live.append(_Live(index, slot, problem, env, seed, history, []))
            for session in self._round(live, lora, on_turn):  # leave
                results[session.index] = result = self._result(
                    session.problem, session.turns, sum(_seconds(r) for r in session.turns), session.scored
                )
                self._finished_slot = session.slot  # save_adapter inside on_result saves this θ
                if on_result is not None:
                    on_result(result)
                free.append(session.slot)
                live.remove(session)
        return [r for r in results if r is not None]

    def _round(self, live: list[_Live], lora: RowLoRA | None, on_turn: Any) -> list[_Live]:
        """One turn of every live session; returns the sessions that finished."""
        batch = _Clock(self.policy.device)  # the batch-wide phases: generation, critic, update
        clocks = [_Clock(self.policy.device) for _ in live]
        start = time.perf_counter()
        prompts = [self.policy.prompt_ids(s.history) for s in live]
        if self.generation.do_sample:  # one RNG for the batch: sampled text is not the single engine's
            torch.manual_seed(live[0].seed + len(live[0].turns) + 1)
        replies = batch.time(
            "generate", generate_batch, self.policy.model, self.policy.tokenizer, prompts, self.generation,
            lora=lora, slots=[s.slot for s in live],
        )
        share = (time.perf_counter() - start) / len(live)
        steps = []
        for s, reply, clock in zip(live, replies, clocks):
            clock.seconds["generate"] = share
            t = len(s.turns) + 1
            reward, feedback, result = clock.time("reward", s.env.step, reply.text, t)
            done = reward > 0 or t == self.session.max_turns or not result.scored
            s.scored = result.scored
            steps.append((t, reward, feedback, result, done, (False, False) if done else self.session.streams_at(t)))
        words = [k for k, step in enumerate(steps) if step[5][0]]
        refinements: dict[int, Any] = {}
        if words:
            items = [(live[k].problem.prompt, live[k].history, replies[k].text, steps[k][2]) for k in words]
            for k, refinement in zip(words, batch.time("semantic", self.semantic().refine_many, items)):
                refinements[k] = refinement
                clocks[k].seconds["semantic"] = refinement.seconds
        following = [next_history(live[k].history, replies[k].text, step[2], refinements.get(k)) for k, step in enumerate(steps)]
        updates = [k for k, step in enumerate(steps) if step[5][1]]
        parametric: dict[int, Any] = {}
        if updates:
            assert lora is not None
            items = [
                UpdateItem(live[k].slot, self._update_context(replies[k], following[k]), replies[k].response_ids, steps[k][1])
                for k in updates
            ]
            steps_taken = batch.time(
                "parametric", batched_parametric_step, self.policy.model, lora, self.adapt, items, max_tokens=self.update_tokens
            )
            for k, step in zip(updates, steps_taken):
                parametric[k] = step
                clocks[k].seconds["parametric"] = step.seconds
        finished = []
        for k, (s, reply, clock) in enumerate(zip(live, replies, clocks)):
            t, reward, feedback, result, done, _ = steps[k]
            clock.absorb(batch)
            record = self._record(t, s.history, reply, result, reward, feedback, following[k], refinements.get(k), parametric.get(k), clock)
            s.turns.append(record)
            if on_turn is not None:
                on_turn(s.problem, record)
            if done:
                finished.append(s)
            else:
                s.history = following[k]
        return finished


def _seconds(record: TurnRecord) -> float:
    return record.seconds_generate + record.seconds_parametric + record.seconds_semantic + record.seconds_reward
