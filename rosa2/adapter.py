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
P×P matrix is formed. θ is a PEFT LoRA adapter with PEFT's default init (A random, B = 0), so the
adapted model equals the base model until the first step; the first step moves only B.
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
from rosa2.policy import Policy

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


def check_target_modules(model: ModelConfig | LoadedModel, cfg: AdaptConfig) -> None:
    """Raise ConfigError naming every target module the model lacks (PEFT's suffix matching)."""
    names = linear_module_names(model)
    unknown = [t for t in cfg.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        allowed = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"target_modules {unknown} are not linear modules of this model; allowed: {allowed}")


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
    Shared by ``ParametricStream.step`` and the batched engine, so both take the same step."""
    import torch

    if cfg.residual == "logprob":
        return logp.sum()[None], torch.tensor([reward / cfg.beta])
    p = logp.exp()
    index = segment_index(int(logp.numel()), cfg.granularity, cfg.max_segments).to(p.device)
    count = int(index.max()) + 1
    outputs = torch.zeros(count, device=p.device).index_add(0, index, p)
    residual = torch.zeros(count, device=p.device).index_add(0, index, target_residual(p.detach(), reward, cfg.beta))
    return outputs, residual


def jacobian_rows(outputs: Any, params: list[Any]) -> Any:
    """J (S×P): row s = ∇_θ outputs[s], from ONE batched backward over the identity."""
    import torch

    eye = torch.eye(outputs.numel(), dtype=outputs.dtype, device=outputs.device)
    grads = torch.autograd.grad(outputs, params, grad_outputs=eye, is_grads_batched=True)
    return torch.cat([g.reshape(outputs.numel(), -1).float() for g in grads], dim=1)


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


def _adapter_name(cfg: AdaptConfig) -> str:
    """One PEFT adapter per LoRA structure, so engines that differ only in update knobs share it."""
    return f"r{cfg.rank}-a{cfg.alpha:g}-" + "+".join(cfg.target_modules).replace(".", "_")


def lora_config(cfg: AdaptConfig, base_model: str | None = None) -> Any:
    """PEFT's LoraConfig for ``cfg``'s adapter structure (no dropout, no bias): the one definition
    both engines attach and save."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), lora_dropout=0.0, bias="none",
        base_model_name_or_path=base_model,
    )


def attach_lora(policy: Policy, cfg: AdaptConfig) -> str:
    """Put a LoRA adapter with ``cfg``'s structure on the policy's model and make it active.

    The first call wraps ``policy.model`` in a PeftModel (so ``policy.model.disable_adapter()``
    gives the base model, as the semantic stream's local critic needs); later calls add or
    reuse named adapters on it. Returns the adapter name."""
    from peft import PeftModel, get_peft_model

    name = _adapter_name(cfg)
    lora = lora_config(cfg)
    if not isinstance(policy.model, PeftModel):
        policy.model = get_peft_model(policy.model, lora, adapter_name=name).eval()
    elif name not in policy.model.peft_config:
        policy.model.add_adapter(name, lora)
    policy.model.set_adapter(name)
    return name


class ParametricStream:
    """θ_t: a LoRA adapter, zero at the start of every problem, accumulated over its turns."""

    def __init__(self, policy: Policy, cfg: AdaptConfig) -> None:
        self.policy = policy
        self.cfg = cfg
        self.adapter_name = attach_lora(policy, cfg)
        # (A, B) weight pairs of this adapter, in module order: the coordinates of θ
        self.pairs = [
            (m.lora_A[self.adapter_name].weight, m.lora_B[self.adapter_name].weight)
            for m in policy.model.modules()
            if hasattr(m, "lora_A") and self.adapter_name in m.lora_A
        ]
        self.params = [w for pair in self.pairs for w in pair]

    def activate(self) -> None:
        """Make this stream's adapter the one the policy runs with (engines may share a model)."""
        self.policy.model.set_adapter(self.adapter_name)
        for w in self.params:
            w.requires_grad_(True)

    def reset(self, seed: int) -> None:
        """θ ← 0: B = 0 and A re-drawn with PEFT's init (Kaiming-uniform, a=√5) from ``seed``.

        Re-initialising in place keeps one PeftModel for every problem; the seed makes a
        problem's adapter independent of which problems ran before it."""
        import torch

        with torch.no_grad():
            for (a, b), fresh in zip(self.pairs, fresh_lora_a([a.shape for a, _ in self.pairs], seed)):
                a.copy_(fresh)
                b.zero_()

    def is_zero(self) -> bool:
        """True when the adapter adds nothing to the base weights (every B·A = 0)."""
        return all(bool((b @ a).eq(0).all()) for a, b in self.pairs)

    def step(self, prompt_ids: Any, response_ids: Any, reward: float) -> ParametricStep:
        """One closed-form step of θ toward the target policy on y = ``response_ids`` given the
        context ``prompt_ids`` (ROSA2 Eq. 11, reconstructed; see the module docstring)."""
        import torch

        start = time.perf_counter()
        cfg = self.cfg
        tokens = int(response_ids.numel())
        if tokens == 0:  # an empty answer has no likelihood to move
            return ParametricStep(0.0, 0, [], 0.0, time.perf_counter() - start)
        self.activate()
        ids = torch.cat([prompt_ids, response_ids]).to(self.policy.device)[None]
        with torch.enable_grad(), update_memory(self.policy.model, cfg):
            # logits of the positions that predict the response tokens only; no KV cache to keep
            logits = self.policy.model(input_ids=ids, logits_to_keep=tokens + 1, use_cache=False).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, -tokens:, None].long())[:, 0]
            outputs, residual = response_objective(logp, reward, cfg)
            jacobian = jacobian_rows(outputs, self.params)
        delta, scale = damped_min_norm_step(jacobian, residual, cfg.eta, cfg.damping)
        with torch.no_grad():
            offset = 0
            for w in self.params:
                w.add_(delta[offset : offset + w.numel()].view_as(w).to(w.dtype))
                offset += w.numel()
        return ParametricStep(
            delta_theta_sq=float(delta.double().pow(2).sum()),
            segments=int(outputs.numel()),
            residual=[float(x) for x in residual.detach().cpu()],
            gram_mean_diag=scale,
            seconds=time.perf_counter() - start,
        )

    # -- persistence: the adapter only, in PEFT's layout (PeftModel.from_pretrained reads it) --

    def save(self, path: str | Path) -> Path:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for the current θ, and
        ``rosa2.json`` (``write_adapter_config``)."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.policy.model, adapter_name=self.adapter_name)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / ADAPTER_WEIGHTS))
        write_adapter_config(path, self.policy.model.peft_config[self.adapter_name], self.policy.source)
        return path

    def load(self, path: str | Path) -> None:
        """Set θ from a directory written by ``save`` (same rank, alpha and target modules)."""
        from peft import LoraConfig
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        path = Path(path)
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ConfigError(f"adapter directory {path} has no {ADAPTER_WEIGHTS}; expected one written by save_adapter")
        saved = LoraConfig.from_pretrained(str(path))
        mine = {"rank": self.cfg.rank, "alpha": self.cfg.alpha, "targets": sorted(self.cfg.target_modules)}
        theirs = {"rank": saved.r, "alpha": saved.lora_alpha, "targets": sorted(saved.target_modules)}
        if mine != theirs:
            raise ConfigError(f"adapter at {path} has LoRA structure {theirs}; this engine expects {mine}")
        weights = load_peft_weights(str(path), device=str(self.policy.device))
        set_peft_model_state_dict(self.policy.model, weights, adapter_name=self.adapter_name)


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
