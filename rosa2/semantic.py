"""The semantic stream (Words): x*_{t+1} ← semantic_update(question, H, y_t, x_{t+1}) (DESIGN §2).

After a rejected answer y_t, the user's next message x_{t+1} is rewritten into a clearer, more
instructive x*_{t+1} by TextGrad: critique (the textual gradient of the user's verdict with
respect to the message, ``loss.backward``), then apply the critique to the message
(``TGD.step``). Two LLM calls per refinement. When the user said nothing (feedback mode
``none``), the same two calls synthesise a corrective message from the failure alone.

The critic is, by default, the policy's own base model θ_base (the LoRA adapter of the
parametric stream switched off); a separate model (hub id or local directory) or an
OpenAI-compatible endpoint can be configured (``SemanticConfig.critic``). The stream never sees
the reference answer: no argument carries it.

Small models often omit TextGrad's ``<IMPROVED_VARIABLE>`` tags; the refinement then keeps the
raw message (or ``DEFAULT_CORRECTIVE`` when the raw message is empty) and counts a fallback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rosa2.config import ModelConfig, SemanticConfig

if TYPE_CHECKING:
    from rosa2.policy import Policy
    from rosa2.textgrad_engine import ChatEngine

Message = dict[str, str]
Item = tuple[str, list[Message], str, str]  # (question, history H, failed answer y_t, raw message x_{t+1})

DEFAULT_CORRECTIVE = (
    "Your previous answer is not correct. Re-read the problem, check every step of your reasoning, "
    "find the mistake and give a corrected final answer."
)


@dataclass
class Refinement:
    """One semantic update x_{t+1} → x*_{t+1}."""

    text: str  # x*_{t+1}: what enters the history
    original: str  # x_{t+1}: the raw user message ("" when feedback mode is none)
    critique: str  # the textual gradient (TextGrad's feedback on the message)
    fallback: bool  # the reply lacked TextGrad's <IMPROVED_VARIABLE> tags -> raw message (or DEFAULT_CORRECTIVE) kept
    synthesised: bool  # x_{t+1} was empty and a corrective message was synthesised
    delta_x_sq: float  # ‖Δx‖²: see SemanticStream.delta_x_sq
    seconds: float  # wall-clock of this refinement (refine_many: the batch's time split evenly)


def build_engine(policy: "Policy", cfg: SemanticConfig) -> "ChatEngine":
    """The TextGrad engine that writes critiques and updates, from ``cfg.critic``."""
    from rosa2 import models
    from rosa2.kvcache import PrefixStore
    from rosa2.textgrad_engine import LocalEngine, OpenAIEngine

    sizes = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size}
    if cfg.critic == "openai":
        assert cfg.api_base and cfg.api_model  # SemanticConfig checked it
        return OpenAIEngine(cfg.api_base, cfg.api_model, cfg.api_key_env, **sizes)
    if cfg.critic == "base":
        return LocalEngine(policy, name=f"base:{policy.source}", prefixes=PrefixStore(), **sizes)
    loaded = models.load(ModelConfig(name=cfg.critic, device=str(policy.device)))
    return LocalEngine(loaded, name=loaded.source, prefixes=PrefixStore(), **sizes)


class SemanticStream:
    """The semantic stream: ``refine`` one rejected turn, or ``refine_many`` across sessions at once.

    ``engine`` is the TextGrad engine (replaceable, e.g. by a subclass that records its prompts);
    ``fallbacks`` counts tag-less replies; ``calls`` counts LLM calls (2 per refinement)."""

    def __init__(self, policy: "Policy", cfg: SemanticConfig | None = None) -> None:
        self.policy = policy
        self.cfg = cfg or SemanticConfig()
        self.engine = build_engine(policy, self.cfg)
        self.fallbacks = 0

    @property
    def calls(self) -> int:
        return self.engine.calls

    def refine(self, question: str, history: list[Message], response: str, message: str) -> Refinement:
        """x*_{t+1} for one rejected answer ``response`` (y_t) given the ``question`` and history H."""
        return self.refine_many([(question, history, response, message)])[0]

    def refine_many(self, items: list[Item]) -> list[Refinement]:
        """Refine many (question, H, y_t, x_{t+1}) at once: each of the two LLM calls is batched."""
        from rosa2.textgrad_engine import Update

        if not items:
            return []
        start = time.perf_counter()
        updates = [Update.build(self.engine, *item) for item in items]
        self.engine.run_batched([u.backward for u in updates])
        stepped = self.engine.run_batched([u.step for u in updates])
        seconds = (time.perf_counter() - start) / len(items)
        out = []
        for (_, _, _, message), update, text in zip(items, updates, stepped):
            fallback = not (text and text.strip())
            if fallback:
                self.fallbacks += 1
                text = message if message.strip() else DEFAULT_CORRECTIVE
            out.append(
                Refinement(
                    text=text,
                    original=message,
                    critique=update.critique,
                    fallback=fallback,
                    synthesised=not message.strip(),
                    delta_x_sq=self.delta_x_sq(message, text),
                    seconds=seconds,
                )
            )
        return out

    def delta_x_sq(self, x: str, x_star: str) -> float:
        """‖Δx‖² = ‖ē(x*) − ē(x)‖²₂, where ē(s) is the mean of the policy's base-model input
        embeddings over the tokens of s (no special tokens, adapter off) and ē("") = 0.

        0 when the text is unchanged; a lexical, context-free distance (no forward pass)."""
        if x == x_star:
            return 0.0
        return float(((self._mean_embedding(x_star) - self._mean_embedding(x)) ** 2).sum())

    def _mean_embedding(self, text: str) -> Any:
        import torch

        from rosa2.textgrad_engine import adapter_disabled

        model = self.policy.model
        table = model.get_input_embeddings()
        ids = self.policy.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad(), adapter_disabled(model):
            if not ids:
                return torch.zeros(table.embedding_dim, dtype=torch.float32, device=self.policy.device)
            return table(torch.tensor(ids, device=self.policy.device)).float().mean(0)
