"""The semantic stream (Words): x*_{t+1} ← semantic_update(question, H, y_t, x_{t+1}) (docs/algorithm.md §3).

After a rejected answer y_t, the user's next message x_{t+1} is rewritten into a clearer, more
instructive x*_{t+1} by TextGrad: critique (the textual gradient of the user's verdict with
respect to the message, ``loss.backward``), then apply the critique to the message
(``TGD.step``). Two LLM calls per refinement. When the user said nothing (feedback mode
``none``), the same two calls synthesise a corrective message from the failure alone.

The critic is, by default, the policy's own base model θ_base (the LoRA adapter of the
parametric stream switched off); a separate model (hub id or local directory) or an
OpenAI-compatible endpoint can be configured (``SemanticConfig.critic``). The stream never sees
the reference answer: no argument carries it.

``SemanticConfig.target`` picks the text TextGrad optimises: ``message`` (x_{t+1}, Algorithm 1
line 14) or ``system`` (the system prompt, one per problem, optimised across its turns: the
paper's motivation study, Sec. 2.1; the user's raw message then enters the history unchanged).

Every refinement is classified (``classify``): ``refined`` (new text for the assistant), ``copied``
(the reply restates the instructions, the variable's role, the problem, the failed answer or the
raw text instead of writing one), ``empty`` or ``truncated`` (cut by ``max_new_tokens`` before the
closing tag). Only a ``refined`` reply enters the history; any other keeps the raw text (or
``DEFAULT_CORRECTIVE`` when the raw message is empty) and counts as a fallback, with ‖Δx‖² NaN.
A 135M critic such as the embedded SmolLM2 cannot write feedback: expect it to fall back nearly
always (README), and read ``semantic_refined_rate`` before reading a textgrad / rosa2 cell.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from rosa2.config import ModelConfig, SemanticConfig

if TYPE_CHECKING:
    from rosa2.policy import Policy
    from rosa2.textgrad_engine import ChatEngine

Message = dict[str, str]


class Item(NamedTuple):
    """One rejected turn to refine."""

    question: str  # the problem as first asked
    history: list[Message]  # H_t
    response: str  # the rejected answer y_t
    message: str  # the simulated user's raw next message x_{t+1}


DEFAULT_CORRECTIVE = (
    "Your previous answer is not correct. Re-read the problem, check every step of your reasoning, "
    "find the mistake and give a corrected final answer."
)


CLASSES = ("refined", "copied", "empty", "truncated")


@dataclass
class Refinement:
    """One semantic update x_{t+1} → x*_{t+1} (or, for target=system, of the system prompt)."""

    text: str  # what enters the history: x*_{t+1} (or the system prompt) when refined, else the raw text
    original: str  # the raw text: x_{t+1} ("" when feedback mode is none), or the system prompt before
    critique: str  # the textual gradient (TextGrad's feedback on the variable)
    kind: str  # one of CLASSES
    reply: str  # what the critic wrote between the tags (kept for review whatever its class)
    synthesised: bool  # x_{t+1} was empty and a corrective message was synthesised
    delta_x_sq: float  # ‖Δx‖²: see SemanticStream.delta_x_sq; NaN when not refined
    seconds: float  # wall-clock of this refinement (refine_many: the batch's time split evenly)
    target: str = "message"  # SemanticConfig.target

    @property
    def fallback(self) -> bool:
        """The raw text was kept: the arm did not get a refinement on this turn."""
        return self.kind != "refined"


_WORD = re.compile(r"[a-z0-9]+")
COPY_NGRAM = 4  # a run of this many words found in a source counts as copied from it
COPY_SHARE = 0.5  # a reply whose words are at least this share copied is not a new message


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def copied_share(reply: str, sources: list[str]) -> float:
    """Share of the reply's words inside a run of ``COPY_NGRAM`` words that also occurs in one of
    ``sources`` (the reply copying them), 1.0 for a reply that equals a source word for word."""
    words = _words(reply)
    if not words:
        return 0.0
    grams: set[tuple[str, ...]] = set()
    for source in sources:
        sw = _words(source)
        if sw == words:
            return 1.0
        grams.update(tuple(sw[i : i + COPY_NGRAM]) for i in range(len(sw) - COPY_NGRAM + 1))
    covered = [False] * len(words)
    for i in range(len(words) - COPY_NGRAM + 1):
        if tuple(words[i : i + COPY_NGRAM]) in grams:
            covered[i : i + COPY_NGRAM] = [True] * COPY_NGRAM
    return sum(covered) / len(words)


def instruction_texts() -> list[str]:
    """What the critic is told (roles, constraints, the verdict, TextGrad's own phrasing): a reply
    that restates it talks about the task instead of writing to the assistant."""
    from rosa2 import textgrad_engine as te

    return [
        te.MESSAGE_ROLE, te.EMPTY_MESSAGE_ROLE, te.SYSTEM_ROLE, te.EMPTY_SYSTEM_ROLE, te.VERDICT, te.VERDICT_PURPOSE,
        *te.CONSTRAINTS, *te.SYSTEM_CONSTRAINTS, te.COMPACT_CRITIC_SYSTEM, te.COMPACT_CRITIQUE, te.COMPACT_UPDATE,
        "the improved variable is", "this is the improved variable", "here is the improved variable",
        "the improved version of the variable", "the variable is the", "improved variable",
    ]


def classify(reply: str, truncated: bool, sources: list[str]) -> str:
    """refined | copied | empty | truncated for what the critic wrote between the tags.

    ``truncated`` wins (a cut reply is unfinished whatever it says); ``copied`` when the reply
    mentions "improved variable" (it describes the task) or at least ``COPY_SHARE`` of its words
    are runs copied from ``sources`` (the instructions, the problem, the failed answer, the raw
    text) — ``instruction_texts`` plus what ``refine_many`` passes."""
    if truncated:
        return "truncated"
    if not reply.strip():
        return "empty"
    if "improved variable" in " ".join(_words(reply)) or copied_share(reply, sources) >= COPY_SHARE:
        return "copied"
    return "refined"


def build_engine(policy: "Policy", cfg: SemanticConfig) -> "ChatEngine":
    """The TextGrad engine that writes critiques and updates, from ``cfg.critic``."""
    from rosa2 import models
    from rosa2.kvcache import PrefixStore, PromptStore
    from rosa2.textgrad_engine import LocalEngine, OpenAIEngine

    sizes = {"max_new_tokens": cfg.max_new_tokens, "update_tokens": cfg.update_tokens or None, "batch_size": cfg.batch_size}
    if cfg.critic == "openai":
        assert cfg.api_base and cfg.api_model  # SemanticConfig checked it
        return OpenAIEngine(cfg.api_base, cfg.api_model, cfg.api_key_env, guided=cfg.api_guided, **sizes)
    # session_cache: every prompt's KV, found by its tokens (PromptStore); else the shared head only
    caches: dict[str, Any] = {"prompts": PromptStore()} if cfg.session_cache else {"prefixes": PrefixStore()}
    local = {**caches, **sizes, "loop_tokens": cfg.loop_tokens}
    if cfg.critic == "base":
        return LocalEngine(policy, name=f"base:{policy.source}", **local)
    loaded = models.load(ModelConfig(name=cfg.critic, device=str(policy.device)))
    return LocalEngine(loaded, name=loaded.source, **local)


class SemanticStream:
    """The semantic stream: ``refine`` one rejected turn, or ``refine_many`` across sessions at once.

    ``engine`` is the TextGrad engine (replaceable, e.g. by a subclass that records its prompts);
    ``counts`` tallies the refinement classes, ``fallbacks`` every class but refined; ``calls``
    counts LLM calls (2 per refinement)."""

    def __init__(self, policy: "Policy", cfg: SemanticConfig | None = None) -> None:
        self.policy = policy
        self.cfg = cfg or SemanticConfig()
        self.engine = build_engine(policy, self.cfg)
        self.counts = {kind: 0 for kind in CLASSES}

    @property
    def fallbacks(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind != "refined")

    @property
    def calls(self) -> int:
        return self.engine.calls

    def refine(self, question: str, history: list[Message], response: str, message: str) -> Refinement:
        """x*_{t+1} for one rejected answer ``response`` (y_t) given the ``question`` and history H."""
        return self.refine_many([Item(question, history, response, message)])[0]

    def current_system(self, history: list[Message]) -> str:
        """The system prompt in force for ``history`` (target=system): its own, else the configured one."""
        if history and history[0]["role"] == "system":
            return history[0]["content"]
        return self.policy.generation.system_prompt or ""

    def refine_many(self, items: list[Item]) -> list[Refinement]:
        """Refine many (question, H, y_t, x_{t+1}) at once: each of the two LLM calls is batched."""
        from rosa2.textgrad_engine import Update

        if not items:
            return []
        start = time.perf_counter()
        system = self.cfg.target == "system"
        items = [Item(*item) for item in items]
        originals = [self.current_system(item.history) if system else item.message for item in items]
        updates = [
            Update.build(self.engine, item.question, item.history, item.response, item.message,
                         system=original if system else None, prompts=self.cfg.prompts)
            for item, original in zip(items, originals)
        ]
        self.engine.run_batched([u.backward for u in updates])
        stepped = self.engine.run_batched([u.step for u in updates])
        seconds = (time.perf_counter() - start) / len(items)
        instructions = instruction_texts()
        out = []
        for (question, _, response, message), original, update, reply in zip(items, originals, updates, stepped):
            kind = classify(reply.text, reply.truncated, [*instructions, question, response, message, original])
            self.counts[kind] += 1
            if kind == "refined":
                text, delta = reply.text, self.delta_x_sq(original, reply.text)
            else:  # the raw text stays; an empty user message still needs words to the assistant
                text = original if (system or original.strip()) else DEFAULT_CORRECTIVE
                delta = math.nan
            out.append(
                Refinement(
                    text=text,
                    original=original,
                    critique=update.critique,
                    kind=kind,
                    reply=reply.text,
                    synthesised=not system and not message.strip(),
                    delta_x_sq=delta,
                    seconds=seconds,
                    target=self.cfg.target,
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

        table = self.policy.model.get_input_embeddings()  # no adapter slot touches the embeddings
        ids = self.policy.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            if not ids:
                return torch.zeros(table.embedding_dim, dtype=torch.float32, device=self.policy.device)
            return table(torch.tensor(ids, device=self.policy.device)).float().mean(0)
