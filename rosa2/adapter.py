"""The parametric stream (Weights): a LoRA adapter θ and one closed-form step per rejected turn.

ROSA2 moves the policy toward the reward-weighted target policy π*(y) ∝ π_{t-1}(y)·exp(r/β) and
states the step as the least-squares solution of the linearised residual, (JᵀJ)Δθ = JᵀR with
R = π̃* − π (ROSA2 Eq. 11). ROSA's code is not available; this module is **our reconstruction**
(docs/algorithm.md §2):

* per response token i with probability p_i under the current policy the reweighted target is
  p̃_i = p_i·e^{r/β} / (p_i·e^{r/β} + 1 − p_i) and the residual is R_i = p̃_i − p_i;
* tokens are grouped into S segments (``granularity``); row s of J is ∇_θ Σ_{i∈s} p_i over the LoRA
  parameters and R_s = Σ_{i∈s} R_i;
* Δθ = η · Jᵀ (JJᵀ + λ̄ I)⁻¹ R, the damped minimum-norm solution, with λ̄ = λ · mean(diag JJᵀ):
  the damping is relative because the eigenvalues of JJᵀ span 1e-7 … 1e2 across granularities,
  so an absolute λ means nothing. For S = 1 this is η·R·g/(‖g‖² + λ̄);
* ``residual='logprob'`` is the whole-response log-space reading: R = log π̃*(y) − log π(y) ≈ r/β
  on J = ∇_θ Σ_i log p_i (one row); it moves log π(y) by a predictable ≈ η/β nats.

The S rows of J come from one batched backward (``is_grads_batched``), never S passes, and no
P×P matrix is formed. θ lives in ``RowLoRA``: one LoRA slot per live session (a plain session is a
batch of one), PEFT's default init (A random, B = 0), so the adapted model equals the base model
until the first step and the first step moves only B; a slot saves and loads PEFT's layout.
``parametric_steps`` updates B sessions' slots from one forward and one backward.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rosa2.config import AdaptConfig, ConfigError, ModelConfig
from rosa2.models import LoadedModel, ModelError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
METADATA_FILE = "rosa2.json"  # beside adapter_config.json: where the base model came from
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded model's hub repository


@dataclass
class ParametricStep:
    """What one update did: ‖Δθ‖² (ROSA2 Figure 3), the residual per segment, the cost."""

    delta_theta_sq: float
    segments: int
    residual: list[float]
    gram_mean_diag: float
    seconds: float
    batch_tokens: int = 0  # padded tokens (rows × longest row) of the backward micro-batch it was in


# ---------------------------------------------------------------------------------------------
# Validation from the config alone (no weights)


def linear_module_names(model: ModelConfig | LoadedModel) -> list[str]:
    """Full names of the model's ``nn.Linear`` modules. For a ModelConfig the model is built on the
    meta device from its config, so a bad target module fails before any weight is read."""
    import torch
    from torch import nn

    if isinstance(model, LoadedModel):
        network = model.model
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        from rosa2 import models

        source = models.resolve(model.name)
        try:
            config = AutoConfig.from_pretrained(source, revision=model.revision)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not read the config of model {model.name!r} from {source}: {exc}") from exc
        with torch.device("meta"):
            network = AutoModelForCausalLM.from_config(config)
    names = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    # once LoRA is attached, a target is `<name>.base_layer` beside its `<name>.lora_A.<adapter>`
    return [n.removesuffix(".base_layer") for n in names if ".lora_" not in n]


def is_target(name: str, targets: Any) -> bool:
    """PEFT's suffix matching: module ``name`` carries the adapter when a target is its full name
    or its last dotted parts."""
    return any(name == t or name.endswith("." + t) for t in targets)


def refuse_unknown_targets(names: list[str], targets: Any) -> None:
    """Raise ConfigError naming every target that matches none of the Linear module ``names``."""
    unknown = [t for t in targets if not any(is_target(n, (t,)) for n in names)]
    if unknown:
        allowed = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"target_modules {unknown} are not linear modules of this model; allowed: {allowed}")


def check_target_modules(model: ModelConfig | LoadedModel, cfg: AdaptConfig) -> None:
    """Raise ConfigError naming every target module the model lacks, from the config alone."""
    refuse_unknown_targets(linear_module_names(model), cfg.target_modules)


# ---------------------------------------------------------------------------------------------
# The maths, as plain functions of tensors


def target_residual(p: Any, reward: float, beta: float) -> Any:
    """R_i = p̃_i − p_i with p̃_i = p_i e^{r/β} / (p_i e^{r/β} + 1 − p_i): the per-token gap to the
    target policy π* ∝ π·exp(r/β) (ROSA2 Eq. 11's residual, read token-wise)."""
    weight = math.exp(reward / beta)
    return p * weight / (p * weight + 1 - p) - p


def segment_index(tokens: int, granularity: str, max_segments: int) -> Any:
    """Segment id of each response token: 'sequence' → 1, 'chunks:N' → min(N, T) contiguous chunks,
    'token' → one per token, capped at ``max_segments`` contiguous groups."""
    import torch

    if granularity == "sequence":
        count = 1
    elif granularity == "token":
        count = min(tokens, max_segments)
    else:
        count = min(int(granularity.split(":")[1]), tokens)
    # contiguous, near-equal groups: token i goes to floor(i * S / T)
    return torch.arange(tokens) * count // tokens


def response_objective(logp: Any, reward: float, cfg: AdaptConfig) -> tuple[Any, Any]:
    """(outputs, R) of one response from its token log-probabilities ``logp`` (differentiable):
    outputs[s] = Σ_{i∈s} p_i with R_s = Σ_{i∈s} (p̃_i − p_i), or for ``residual='logprob'`` the one
    row Σ_i log p_i with R = r/β. J's rows are the gradients of ``outputs`` (ROSA2 Eq. 11).
    Used per session by ``parametric_steps``."""
    import torch

    if cfg.residual == "logprob":
        return logp.sum()[None], torch.tensor([reward / cfg.beta])
    p = logp.exp()
    index = segment_index(int(logp.numel()), cfg.granularity, cfg.max_segments).to(p.device)
    count = int(index.max()) + 1
    outputs = torch.zeros(count, device=p.device).index_add(0, index, p)
    residual = torch.zeros(count, device=p.device).index_add(0, index, target_residual(p.detach(), reward, cfg.beta))
    return outputs, residual


def damped_min_norm_step(jacobian: Any, residual: Any, eta: float, damping: float) -> tuple[Any, float]:
    """Δθ = η Jᵀ (JJᵀ + λ·mean(diag JJᵀ)·I)⁻¹ R (ROSA2 Eq. 11, minimum-norm form). Returns (Δθ, mean
    diag of JJᵀ). An S×S solve in float64; a zero Jacobian (no direction to move in) gives Δθ = 0."""
    import torch

    gram = (jacobian @ jacobian.T).double().cpu()
    scale = float(gram.diagonal().mean())
    if scale == 0.0:
        return torch.zeros(jacobian.shape[1], device=jacobian.device), 0.0
    system = gram + damping * scale * torch.eye(gram.shape[0], dtype=gram.dtype)
    # lstsq (gelsd) also copes with damping = 0 and a rank-deficient token-level JJᵀ
    coeff = torch.linalg.lstsq(system, residual.double().cpu()[:, None], driver="gelsd").solution[:, 0]
    return eta * (jacobian.T @ coeff.to(jacobian.device, jacobian.dtype)), scale


@contextmanager
def update_memory(model: Any, cfg: AdaptConfig) -> Iterator[None]:
    """The update's forward/backward with bounded activation memory: with
    ``cfg.checkpoint_activations`` every transformer block keeps only its input and recomputes its
    activations during the backward (non-reentrant ``torch.utils.checkpoint``), so the update holds
    one block's activations instead of all of them. The step is the same: the recomputation is the
    same arithmetic on the same inputs. Only the blocks' own ``training`` flag is set (their
    children stay in eval mode, so no dropout switches on); everything is restored on exit."""
    import functools

    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)] if cfg.checkpoint_activations else []
    saved = [(m, m.gradient_checkpointing, m.training, m.__dict__.get("_gradient_checkpointing_func")) for m in blocks]
    recompute = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for m in blocks:
        m.gradient_checkpointing, m.training, m._gradient_checkpointing_func = True, True, recompute
    try:
        yield
    finally:
        for m, enabled, training, func in saved:
            m.gradient_checkpointing, m.training = enabled, training
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func


# ---------------------------------------------------------------------------------------------
# The adapter


def fresh_lora_a(shapes: list[Any], seed: int) -> Iterator[Any]:
    """PEFT's init of the A matrices (Kaiming-uniform, a=√5, float32), drawn in module order from one
    generator seeded with ``seed``: both engines start a problem's adapter from these draws."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for shape in shapes:
        fresh = torch.empty(tuple(shape), dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        yield fresh


def lora_config(cfg: AdaptConfig, base_model: str | None = None) -> Any:
    """PEFT's LoraConfig for ``cfg``'s adapter structure (no dropout, no bias): what a saved
    adapter's ``adapter_config.json`` says, so ``PeftModel.from_pretrained`` rebuilds θ exactly."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), lora_dropout=0.0, bias="none",
        base_model_name_or_path=base_model,
    )


def lora_structure(cfg: AdaptConfig) -> tuple[Any, ...]:
    """What the adapter's shape depends on (rank, alpha, target modules); the update knobs are not."""
    return (cfg.rank, cfg.alpha, tuple(cfg.target_modules))


def _find_targets(model: Any, target_modules: tuple[str, ...] | list[str]) -> list[tuple[str, Any]]:
    """The model's Linear modules LoRA wraps (``is_target``), or a ConfigError naming what matches none."""
    import torch

    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    refuse_unknown_targets([name for name, _ in linears], target_modules)
    return [(name, module) for name, module in linears if is_target(name, target_modules)]


class RowLoRA:
    """θ: LoRA adapters in ``slots`` independent slots θ_0..θ_{slots-1}, one per live session.

    Every target Linear carries A:[slots, r, in] and B:[slots, out, r] (float32 whatever the
    model's dtype, so accumulated steps are not rounded to bfloat16). Inside ``with
    lora.rows(slot_ids)`` batch row i runs under slot ``slot_ids[i]``:
    y = W x + (α/r)·B_{slot} A_{slot} x. Outside it every hook is a no-op: the frozen base model,
    which is what the semantic stream's local critic reads, so the critic never needs a copy of
    the model. The hooks leave the model's modules and weights untouched; ``remove()`` restores it
    exactly. PEFT's convention holds per slot (A ~ kaiming-uniform(a=√5), B = 0: θ starts at zero
    and the first update moves only B) and a slot saves and loads PEFT's file layout, so
    ``PeftModel.from_pretrained`` and ``rosa2 adapters`` read what a session adapted.
    """

    def __init__(self, model: Any, cfg: AdaptConfig, slots: int) -> None:
        import torch

        if slots < 1:
            raise ConfigError(f"slots={slots!r} must be >= 1")
        self.cfg = cfg
        self.slots = slots
        self.scale = cfg.alpha / cfg.rank
        self.targets = _find_targets(model, cfg.target_modules)
        device = self.targets[0][1].weight.device
        self.A = [torch.zeros(slots, cfg.rank, m.in_features, device=device) for _, m in self.targets]
        self.B = [torch.zeros(slots, m.out_features, cfg.rank, device=device) for _, m in self.targets]
        self._rows: Any = None
        self._active: tuple[int, ...] | None = None
        self._gathered: dict[int, Any] = {}  # per target, while no grad is taken: (A[rows], B[rows]), or None when B[rows] = 0
        self._handles = [linear.register_forward_hook(self._hook(i)) for i, (_, linear) in enumerate(self.targets)]

    # -- the forward -------------------------------------------------------------------------
    def _hook(self, index: int) -> Any:
        import torch

        def hook(module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
            rows = self._rows
            if rows is None:
                return output
            x = inputs[0]
            if x.shape[0] != rows.shape[0]:
                raise RuntimeError(f"RowLoRA: batch has {x.shape[0]} rows but {rows.shape[0]} slot ids are set")
            if torch.is_grad_enabled():  # the update: the gathers are part of the graph to A, B
                a, b = self.A[index][rows], self.B[index][rows]
                flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
                delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
                return output + (self.scale * delta).reshape(output.shape).to(output.dtype)
            # generation: θ is fixed for the whole call, so gather once, not at every decoded token
            if index not in self._gathered:
                b = self.B[index][rows]
                self._gathered[index] = (self.A[index][rows], b) if bool(b.any()) else None
            if self._gathered[index] is None:  # B = 0 in every row (a problem's first turn): W x exactly
                return output
            a, b = self._gathered[index]  # [b, r, in], [b, out, r]
            low = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype), a.transpose(1, 2))
            out = output.view(x.shape[0], -1, output.shape[-1])
            if out.dtype == b.dtype:  # W x + s·B A x in place: no [b, tokens, out] temporaries
                out.baddbmm_(low, b.transpose(1, 2), alpha=self.scale)
            else:
                out.add_(torch.bmm(low, b.transpose(1, 2)), alpha=self.scale)
            return output

        return hook

    @contextmanager
    def rows(self, slot_ids: Any) -> Iterator[None]:
        """Apply slot ``slot_ids[i]`` to batch row i inside the block."""
        import torch

        slot_ids = tuple(int(s) for s in slot_ids)
        bad = [s for s in slot_ids if not 0 <= s < self.slots]
        if bad:
            raise ValueError(f"slot ids {bad} outside 0..{self.slots - 1}")
        previous = self._rows, self._active, self._gathered
        self._rows, self._active = torch.tensor(slot_ids, dtype=torch.long, device=self.A[0].device), slot_ids
        self._gathered = {}
        try:
            yield
        finally:
            self._rows, self._active, self._gathered = previous

    def state(self) -> tuple[Any, ...]:
        """What a KV cache computed now depends on besides its tokens: the active slots and the
        in-place version counter of every adapter tensor (bumped by each step, reset and load)."""
        return (id(self), self._active, tuple(t._version for t in self.tensors()))

    # -- the parameters θ_slot --------------------------------------------------------------
    def reset(self, slot: int, seed: int) -> None:
        """θ_slot ← 0 for a new problem: A re-drawn from ``seed`` (PEFT's init), B zeroed. The seed
        makes a problem's adapter independent of which problems ran before it or beside it."""
        for a, b, fresh in zip(self.A, self.B, fresh_lora_a([a.shape[1:] for a in self.A], seed)):
            a[slot].copy_(fresh)
            b[slot].zero_()

    def is_zero(self, slot: int) -> bool:
        """True when slot ``slot`` adds nothing to the base weights (every B·A = 0)."""
        return all(bool((b[slot] @ a[slot]).eq(0).all()) for a, b in zip(self.A, self.B))

    def tensors(self) -> list[Any]:
        """The slot-stacked parameter tensors, in a fixed order: A_0, B_0, A_1, B_1, ..."""
        return [t for pair in zip(self.A, self.B) for t in pair]

    def slot_numel(self) -> int:
        return sum(t[0].numel() for t in self.tensors())

    def flat(self, slot: int, tensors: Any = None) -> Any:
        """θ_slot (or a gradient laid out like ``tensors()``) as one flat vector."""
        import torch

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

    # -- persistence: one slot in PEFT's layout ------------------------------------------------
    def _key(self, name: str, matrix: str) -> str:
        # PeftModel wraps the model as base_model.model; the adapter name is dropped on save
        return f"base_model.model.{name}.lora_{matrix}.weight"

    def save(self, slot: int, path: str | Path, base_model: str | None = None) -> Path:
        """Write θ_slot as ``adapter_config.json`` + ``adapter_model.safetensors`` (the keys
        ``get_peft_model_state_dict`` writes) and ``rosa2.json``; ``base_model`` is the model's source."""
        from safetensors.torch import save_file

        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} outside 0..{self.slots - 1}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {}
        for (name, _), a, b in zip(self.targets, self.A, self.B):
            state[self._key(name, "A")] = a[slot].detach().to("cpu", copy=True)
            state[self._key(name, "B")] = b[slot].detach().to("cpu", copy=True)
        save_file(state, str(path / ADAPTER_WEIGHTS))
        write_adapter_config(path, lora_config(self.cfg), base_model)
        return path

    def load(self, slot: int, path: str | Path) -> None:
        """Set θ_slot from an adapter directory in PEFT's layout with this structure (rank, alpha,
        target modules), e.g. one ``save`` wrote."""
        from peft import LoraConfig
        from safetensors.torch import load_file

        path = check_adapter_dir(path)
        saved = LoraConfig.from_pretrained(str(path))
        mine = {"rank": self.cfg.rank, "alpha": self.cfg.alpha, "targets": sorted(self.cfg.target_modules)}
        theirs = {"rank": saved.r, "alpha": saved.lora_alpha, "targets": sorted(saved.target_modules)}
        if mine != theirs:
            raise ConfigError(f"adapter at {path} has LoRA structure {theirs}; this engine expects {mine}")
        weights = load_file(str(path / ADAPTER_WEIGHTS))
        missing = [self._key(n, m) for n, _ in self.targets for m in "AB" if self._key(n, m) not in weights]
        if missing:
            raise ConfigError(f"adapter at {path} lacks {len(missing)} tensors this model needs, e.g. {missing[0]}")
        for (name, _), a, b in zip(self.targets, self.A, self.B):
            a[slot].copy_(weights[self._key(name, "A")])
            b[slot].copy_(weights[self._key(name, "B")])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ---------------------------------------------------------------------------------------------
# The update for B sessions: one forward, one (vmapped) backward, B closed-form steps


@dataclass
class UpdateItem:
    """One session's parametric update: y_t = ``response_ids`` in context ``prompt_ids``, reward r_t."""

    slot: int
    prompt_ids: Any
    response_ids: Any
    reward: float


def parametric_steps(
    model: Any,
    lora: RowLoRA,
    cfg: AdaptConfig,
    items: list[UpdateItem],
    *,
    max_tokens: int = 1024,
    segment_chunk: int = 16,
) -> list[ParametricStep]:
    """θ_b ← θ_b + Δθ_b for every item, each toward its own target policy (ROSA2 Eq. 11 as this
    module reconstructs it), from one forward and one backward per micro-batch of sessions.

    Why one backward suffices: the objective Σ_b Σ_{i∈s} p_{b,i} (or log p for ``residual=logprob``)
    touches slot b's A, B only through row b, so its gradient restricted to slot b is row s of
    session b's J. With S > 1 segments the S rows come from one vmapped backward over the basis
    vectors e_s (``is_grads_batched``), ``segment_chunk`` of them at a time to bound memory; no
    P×P matrix is formed. Memory: sessions go through the backward in micro-batches of at most
    ``max_tokens`` context + response tokens (one session at least), and ``cfg.checkpoint_activations``
    keeps only each block's input (``update_memory``), so the update's activation memory is bounded
    by the token budget, not by B or by how long the sessions have run. A batch of one is a plain
    session's update."""
    import torch

    from rosa2.policy import left_pad

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
        ids, mask, positions = left_pad([torch.cat([item.prompt_ids, item.response_ids]) for item in group], 0)
        for p in params:
            p.requires_grad_(True)
        try:
            with torch.enable_grad(), _frozen(model), lora.rows(slots), update_memory(model, cfg):
                # logits of the positions that predict the response tokens only; pad columns are masked
                logits = model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1, use_cache=False
                ).logits[:, :-1].float()
                logp_all = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, -width:, None])[..., 0]
                objectives = [response_objective(logp_all[b, width - n :], item.reward, cfg) for b, (item, n) in enumerate(zip(group, lengths))]
                count = max(int(out.numel()) for out, _ in objectives)
                outputs = torch.stack(
                    [torch.nn.functional.pad(out, (0, count - int(out.numel()))) for out, _ in objectives]
                )  # [b, S]: zero rows pad sessions with fewer segments and get no gradient
                rows = segment_grads(outputs, params, segment_chunk)  # per param: [S, slots, ...]
        finally:
            for p in params:
                p.requires_grad_(False)
        seconds = (time.perf_counter() - start) / len(group)
        batch_tokens = len(group) * int(ids.shape[1])
        for k, item, (out, residual) in zip(chunk, group, objectives):
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
                batch_tokens=batch_tokens,
            )
    return steps


def token_batches(keys: list[int], tokens: list[int], max_tokens: int) -> list[list[int]]:
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
    restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def segment_grads(outputs: Any, params: list[Any], chunk: int = 16) -> list[Any]:
    """∇ Σ_b outputs[b, s] for every segment s, as [S, *param.shape] per parameter tensor: the
    rows of J from one batched backward over the basis vectors (``chunk`` at a time), never S passes."""
    import torch

    count = outputs.shape[1]
    if count == 1:
        return [g[None] for g in torch.autograd.grad(outputs.sum(), params)]
    parts: list[list[Any]] = []
    for lo in range(0, count, chunk):
        hi = min(lo + chunk, count)
        basis = torch.zeros(hi - lo, *outputs.shape, dtype=outputs.dtype, device=outputs.device)
        basis[torch.arange(hi - lo), :, torch.arange(lo, hi)] = 1.0
        parts.append(list(torch.autograd.grad(outputs, params, grad_outputs=basis, is_grads_batched=True, retain_graph=hi < count)))
    return [torch.cat(group) for group in zip(*parts)]

# ---------------------------------------------------------------------------------------------
# Adapters anyone can load: the config PEFT reads, rosa2.json beside it, and loading one back


def base_metadata(source: str | None) -> dict[str, Any]:
    """What an adapter says about its base model, from the ``source`` rosa2 loaded it from.

    ``base_model`` is the portable name written into ``adapter_config.json``'s
    ``base_model_name_or_path``: the hub id when one is known (the embedded model's is
    ``EMBEDDED_HUB_ID``; a hub id source is its own), else the local directory (no hub id exists
    for it). ``rosa2_model`` is what ``--model`` takes to load the same weights with rosa2 on any
    machine; ``local_path`` is where this machine read them (None for a hub id)."""
    from rosa2 import models

    if not source:
        return {"base_model": None, "rosa2_model": None, "local_path": None}
    path = Path(source)
    if path.is_dir() and path.resolve() == models.embedded_cache_dir().resolve():
        return {
            "base_model": EMBEDDED_HUB_ID, "rosa2_model": "embedded", "local_path": str(path.resolve()),
            "weights": f"{models.EMBEDDED_GGUF} of {models.EMBEDDED_PIP} (sha256 {models.EMBEDDED_GGUF_SHA256}) "
            f"dequantised to float32: the weights this adapter was fitted to. The hub's {EMBEDDED_HUB_ID} holds "
            "the unquantised originals, on which the adapter's logits differ by the quantisation error",
        }
    if path.is_dir():
        return {"base_model": str(path.resolve()), "rosa2_model": str(path.resolve()), "local_path": str(path.resolve())}
    return {"base_model": source, "rosa2_model": source, "local_path": None}


def write_adapter_config(path: Path, config: Any, source: str | None) -> None:
    """Write ``adapter_config.json`` as ``peft.AutoPeftModelForCausalLM.from_pretrained(path)`` reads
    it (``task_type`` CAUSAL_LM, the base under its portable name, ``base_metadata``) and
    ``rosa2.json`` beside it with the whole ``base_metadata``. Used by both engines' saves."""
    base = base_metadata(source)
    config = copy.deepcopy(config)
    config.task_type = "CAUSAL_LM"
    config.base_model_name_or_path = base["base_model"]
    config.save_pretrained(str(path))
    (Path(path) / METADATA_FILE).write_text(json.dumps(base, indent=1) + "\n")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """``rosa2.json`` of an adapter directory ({} for an adapter saved before it existed)."""
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def check_adapter_dir(path: str | Path) -> Path:
    """``path`` as a directory holding a PEFT adapter, or a ConfigError naming what is missing."""
    path = Path(path).expanduser()
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / name).is_file()]
    if not path.is_dir() or missing:
        what = "is not a directory" if not path.is_dir() else f"has no {' or '.join(missing)}"
        raise ConfigError(f"adapter {str(path)!r} {what}; expected a directory written by --save-adapter or `rosa2 adapters pull`")
    return path


def merge_adapter(loaded: LoadedModel, path: str | Path) -> LoadedModel:
    """``loaded`` with the saved adapter's θ merged into its weights (W + (α/r)·B·A per target):
    the model ``--adapter`` runs. A session on it starts its own θ at 0 on top of the merged
    weights, so the semantic stream's base critic (adapter off) sees the merged model too."""
    from peft import PeftModel

    path = check_adapter_dir(path)
    fitted = read_metadata(path).get("base_model") or "an unrecorded base"
    try:
        model = PeftModel.from_pretrained(loaded.model, str(path)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatch, missing target modules
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"adapter {str(path)!r} (fitted to {fitted}) does not fit model {loaded.source}: {first}"
        ) from None
    return LoadedModel(model=model.eval(), tokenizer=loaded.tokenizer, source=loaded.source, device=loaded.device)
