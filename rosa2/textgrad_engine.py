"""TextGrad on our own models: the engines and the computation graph of one semantic update.

Importing this module imports ``textgrad`` (~0.1 s: without its LiteLLM engine, see
``_without_litellm``); ``rosa2.semantic`` imports it lazily, on the first ``SemanticStream``.
``import rosa2`` has already pointed TextGrad's log folder under the project home and made litellm
(which mlflow may still import) read its price list locally (``rosa2.env``).

Two LLM calls per refinement, both through TextGrad's own machinery:

1. **backward** — the loss is the user's verdict on the failed answer y_t (a
   ``StringBasedFunction``: no LLM call, the environment already judged y_t). ``loss.backward``
   asks the critic for feedback on the next message x_{t+1} given the problem, the earlier turns,
   y_t and the verdict: the textual gradient.
2. **step** — ``TGD.step`` asks the critic to rewrite x_{t+1} with that feedback; the reply must
   carry ``<IMPROVED_VARIABLE>`` tags, else TextGrad raises IndexError. A missing tag is never the
   reason a refinement fails: the local engine starts the reply with the opening tag already in
   place and stops at the closing one; an OpenAI-compatible endpoint is asked once more with a
   format reminder when its reply lacks them (``OpenAIEngine``). Whether the reply is then a
   refinement at all is ``rosa2.semantic.classify``'s call.

Batching: TextGrad calls its engine one prompt at a time. ``ChatEngine.run_batched`` runs a list
of such single-call steps twice: a planning pass records each step's prompt (the engine raises
before generating), one batched generation answers them all, a replay pass serves the answers.

Budgets: the critique is generated up to ``max_new_tokens`` (or EOS: TextGrad's backward template
gives its reply no closing marker), the update up to ``update_tokens`` (or its closing tag);
each reply cut by its own budget is ``truncated``. A local critic's row also stops once it repeats
itself (``loop_tokens`` tokens of the reply again, verbatim: under greedy decoding the text after
a repeat is the text after its first copy, so the rest of the budget would only buy more loop):
the reply is cut there and is ``truncated`` too, as the budget would have cut it. A batch decodes
until its last row stops, so one looping row used to cost every row the whole budget.

Shared prefixes: about half of every critic prompt is text that does not depend on the session
(TextGrad's ~270-390-token system prompts and its templates up to the problem statement), and a
session's next critique and update repeat its own earlier ones further (the problem, the earlier
turns: TextGrad lists the inputs in that order). ``rosa2.kvcache.PromptStore`` (semantic
``session_cache``) keeps each prompt's KV and starts a later prompt after the longest token prefix
it shares with a stored one; without it ``rosa2.kvcache.PrefixStore`` keeps the template head
alone. Either way the same tokens at the same positions: the same attention.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from rosa2.errors import Rosa2Error


def _without_litellm() -> None:
    """Keep ``import textgrad`` from loading litellm and openai.

    TextGrad's engine package imports its experimental LiteLLM engine, for ``get_engine`` names
    that start with "experimental:", which rosa2 never asks for: its critics are ``LocalEngine``
    and ``OpenAIEngine`` below (the latter imports openai itself, when used). That one import cost
    every process with a words stream ~150 MB of RSS and ~2.9 s (measured: RSS +152 MB and 3.7 s
    for ``import textgrad`` against +5 MB and 0.09 s without it), a third of what the rosa2 arm
    of ``rosa2 bench`` held above the baseline arm. A stand-in module takes its place; asking
    TextGrad for that engine raises. Nothing changes when TextGrad was already imported."""
    if "textgrad" in sys.modules or "textgrad.engine_experimental" in sys.modules:
        return

    class LiteLLMEngine:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise Rosa2Error(
                "TextGrad's experimental LiteLLM engine is not loaded in rosa2 (it imports litellm, ~150 MB); "
                "for an endpoint use semantic.critic='openai' with semantic.api_base"
            )

    package = types.ModuleType("textgrad.engine_experimental")
    package.__path__ = []  # a package with no files: only the stand-in below is importable from it
    stand_in = types.ModuleType("textgrad.engine_experimental.litellm")
    stand_in.LiteLLMEngine = LiteLLMEngine  # type: ignore[attr-defined]
    package.litellm = stand_in  # type: ignore[attr-defined]
    sys.modules[package.__name__] = package
    sys.modules[stand_in.__name__] = stand_in


_without_litellm()

import textgrad as tg  # noqa: E402  (after the stand-in)
from textgrad.autograd import StringBasedFunction  # noqa: E402
from textgrad.engine import EngineLM  # noqa: E402

from rosa2.kvcache import PrefixStore, PromptStore, common_prefix, croppable, preallocated_cache, side_by_side  # noqa: E402
from rosa2.policy import reply_length, stop_ids  # noqa: E402

# TextGrad logs every prompt at INFO to its own file (TEXTGRAD_LOG_DIR, under the project home);
# propagated to the root logger those lines flooded the console of `rosa2 run` through Prefect.
logging.getLogger("textgrad").propagate = False

T = TypeVar("T")
Key = tuple[str, str]  # (system prompt, prompt)

TGD_TAGS = ("<IMPROVED_VARIABLE>", "</IMPROVED_VARIABLE>")

# Role descriptions matter to TextGrad ("being specific often helps quite a bit"), but its
# templates repeat the variable's role 4-5 times per prompt, after the shared prefix: every token
# here costs 4-5 prefill tokens per critic call (a 46-token role made ~20% of a critique prompt).
MESSAGE_ROLE = "the user's next message after the assistant's rejected answer, meant to lead it to find and fix its mistake"
EMPTY_MESSAGE_ROLE = MESSAGE_ROLE + " (the user wrote nothing yet: the whole message has to be written)"
VERDICT_PURPOSE = (
    "the user checks whether the assistant's answer solves the problem; the assistant will then read "
    "the user's next message and try again"
)
VERDICT = "Rejected: the assistant's answer does not solve the problem correctly."
CONSTRAINTS = [
    "The improved variable is only the message itself, written by the user to the assistant, in at most three sentences.",
    "Say what the assistant should check or redo; do not state a final answer.",
]
# semantic.target = system (the paper's motivation study, Sec. 2.1): one system prompt per problem
SYSTEM_ROLE = "the system prompt the assistant reads before the problem, meant to make it solve the problem correctly"
EMPTY_SYSTEM_ROLE = SYSTEM_ROLE + " (there is none yet: the whole prompt has to be written)"
SYSTEM_CONSTRAINTS = [
    "The improved variable is only the system prompt itself, instructions to the assistant, in at most three sentences.",
    "Say how the assistant should work on problems like this one; do not state a final answer.",
]


# semantic.prompts = compact: our own short critique and update prompts, through the same TextGrad
# graph (the verdict function's backward writes the critique, a TGD step applies it). Each names
# only what the critic needs: the inputs in full, the verdict, the variable's role, the constraints.
COMPACT_CRITIC_SYSTEM = "You review a tutoring exchange and say, briefly and concretely, how one text in it should change."
COMPACT_CRITIQUE = (
    "{inputs}\n\nVerdict on the latest answer: {verdict}\n\nThe text to improve is {role}. In at most three sentences, say what "
    "it should point out or ask for so that the next answer is correct. Do not solve the problem."
)
COMPACT_UPDATE_SYSTEM = (
    "You rewrite one text as asked. Reply with the new text only, between {new_variable_start_tag} and "
    "{new_variable_end_tag}."
)
COMPACT_UPDATE = (
    "Text ({role}):\n{value}\n\nFeedback on it:\n{feedback}\n\n{constraints}\n\nWrite the improved text "
    "between {start} and {end}."
)


def compact_inputs(inputs: dict[str, tg.Variable]) -> str:
    """The inputs as ``COMPACT_CRITIQUE`` shows them: the conversation as one transcript (problem,
    earlier turns, the rejected answer as the latest "Assistant:" turn), then the rest. Turn t+1's
    transcript then starts with turn t's, token for token up to the end of y_t, so a session's
    critique prompts repeat as a prefix (``rosa2.kvcache.PromptStore`` serves it)."""
    parts = []
    for name, v in inputs.items():
        if name == "earlier_turns":
            parts.append(v.get_value())  # "Assistant: ...\n\nUser: ..." (transcript())
        elif name == "rejected_answer":
            parts.append(f"Assistant: {v.get_value()}")
        else:
            parts.append(f"{name.replace('_', ' ').capitalize()}: {v.get_value()}")
    return "\n\n".join(parts)


class CompactVerdict(StringBasedFunction):
    """The verdict as a TextGrad function whose backward asks ``COMPACT_CRITIQUE`` (one call per
    variable that requires a gradient), in place of TextGrad's string-function templates."""

    def backward(self, response: tg.Variable, function_purpose: str, inputs: dict[str, tg.Variable], backward_engine: EngineLM) -> None:
        shown = compact_inputs(inputs)
        for variable in response.predecessors:
            if not variable.requires_grad:
                continue
            prompt = COMPACT_CRITIQUE.format(inputs=shown, verdict=response.get_value(), role=variable.get_role_description())
            feedback = backward_engine(prompt, system_prompt=COMPACT_CRITIC_SYSTEM)
            gradient = tg.Variable(feedback, requires_grad=False, role_description=f"feedback to {variable.get_role_description()}")
            variable.gradients.add(gradient)
            variable.gradients_context[gradient] = None  # the update prompt shows the feedback alone


class CompactTGD(tg.TGD):
    """TGD with ``COMPACT_UPDATE`` as its prompt; step(), the tags and their parsing are TextGrad's."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(optimizer_system_prompt=COMPACT_UPDATE_SYSTEM, **kwargs)

    def _update_prompt(self, variable: tg.Variable) -> str:
        return COMPACT_UPDATE.format(
            role=variable.get_role_description(), value=variable.get_value(), feedback=variable.get_gradient_text(),
            constraints=self.constraint_text, start=self.new_variable_tags[0], end=self.new_variable_tags[1],
        )


class _Planned(Exception):
    """Raised by an engine in planning mode instead of generating: carries the prompt it was given."""

    def __init__(self, key: Key) -> None:
        super().__init__("planned")
        self.key = key


def is_update_call(key: Key) -> bool:
    """TGD's update call (its system prompt names the tags); the backward call's does not."""
    return TGD_TAGS[0] in key[0]


@dataclass
class Completion:
    """One generated reply and whether it was cut by ``max_new_tokens`` (no natural end: no EOS,
    and for an update call no closing tag)."""

    text: str
    truncated: bool = False
    tokens: int = 0  # generated tokens in the reply (local engine; the prefilled opening tag not counted)
    looped: bool = False  # cut where it began to repeat itself (local engine; also ``truncated``)


class LoopStop:
    """A ``generate`` stopping criterion: a row is done once its generated part (after column
    ``width``) ends with an n-gram it already held. Each call adds the n-gram that ends at the
    newest token, so every row is checked once per decoded token. ``kept[i]`` is how many of row
    i's generated tokens came before the first repeat's second copy began (None: no repeat)."""

    def __init__(self, width: int, n: int, rows: int) -> None:
        self.width, self.n = width, n
        self.seen: list[set[tuple[int, ...]]] = [set() for _ in range(rows)]
        self.kept: list[int | None] = [None] * rows

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        generated = input_ids.shape[1] - self.width
        if generated >= self.n:
            for row, gram in enumerate(map(tuple, input_ids[:, -self.n :].tolist())):
                if gram in self.seen[row] and self.kept[row] is None:
                    self.kept[row] = generated - self.n
                self.seen[row].add(gram)
        return torch.tensor([k is not None for k in self.kept], dtype=torch.bool, device=input_ids.device)

    def looped(self, row: int, end: int) -> int | None:
        """Row ``row``'s kept length if its first repeat lies within its first ``end`` tokens (the
        reply proper: before EOS, the closing tag or its budget), else None."""
        kept = self.kept[row]
        return kept if kept is not None and kept + self.n <= end else None


class ChatEngine(EngineLM):
    """A TextGrad engine (``EngineLM``) over a chat model; subclasses implement ``_complete``.

    ``calls`` counts the prompts actually generated (one per LLM call, batched or not);
    ``last`` is the completion the latest call returned (``Update.step`` reads whether it was cut)."""

    def __init__(self, model_string: str, max_new_tokens: int, batch_size: int, update_tokens: int | None = None) -> None:
        self.model_string = model_string
        self.max_new_tokens = max_new_tokens  # the critique call's budget
        self.update_tokens = update_tokens or max_new_tokens  # TGD's update call's budget
        self.batch_size = batch_size
        self.calls = 0
        # token counts summed over calls (LocalEngine fills them): prompt = the prompts' real tokens;
        # prefilled = prompt columns computed (padding included, cached ones not); reused = prompt
        # tokens served from a cache; decoded = decode steps x rows; reply = the replies' own tokens
        # looped = replies cut where they began to repeat themselves (LocalEngine's ``loop_tokens``)
        self.tokens = dict.fromkeys(("prompt", "prefilled", "reused", "decoded", "reply", "looped"), 0)
        self.last: Completion | None = None
        self._planning = False
        self._replies: dict[Key, list[Completion]] = {}

    def generate(self, prompt: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
        if not isinstance(prompt, str):
            raise Rosa2Error(f"the semantic stream's engine takes text prompts only, got {type(prompt).__name__}")
        key = (system_prompt or self.system_prompt, prompt)
        if self._replies.get(key):
            self.last = self._replies[key].pop(0)
        elif self._planning:
            raise _Planned(key)
        else:
            self.last = self.complete([key])[0]
        return self.last.text

    def __call__(self, prompt: Any, **kwargs: Any) -> str:  # EngineLM.__call__ returns None
        return self.generate(prompt, **kwargs)

    def budget(self, key: Key) -> int:
        """New tokens the call may generate: ``update_tokens`` for TGD's update, ``max_new_tokens`` else."""
        return self.update_tokens if is_update_call(key) else self.max_new_tokens

    def complete(self, keys: list[Key]) -> list[Completion]:
        """Generate one reply per (system prompt, prompt), ``batch_size`` at a time, critiques and
        updates in batches of their own (each kind has its own budget); replies in the keys' order."""
        replies: list[Completion | None] = [None] * len(keys)
        for update in (False, True):
            rows = [i for i, key in enumerate(keys) if is_update_call(key) == update]
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                for i, reply in zip(chunk, self._complete([keys[i] for i in chunk])):
                    replies[i] = reply
                self.calls += len(chunk)
        return replies  # type: ignore[return-value]

    def _complete(self, keys: list[Key]) -> list[Completion]:
        raise NotImplementedError

    def run_batched(self, steps: list[Callable[[], T]]) -> list[T]:
        """Run steps that each make (at most) one engine call, generating all their calls together.

        A step that makes a second call still works: that call is generated on its own."""
        results: list[Any] = [None] * len(steps)
        waiting: list[tuple[int, Key]] = []
        self._planning = True
        try:
            for i, step in enumerate(steps):
                try:
                    results[i] = step()
                except _Planned as planned:
                    waiting.append((i, planned.key))
        finally:
            self._planning = False
        try:
            keys = [key for _, key in waiting]
            for key, reply in zip(keys, self.complete(keys)):
                self._replies.setdefault(key, []).append(reply)
            for i, _ in waiting:
                results[i] = steps[i]()
        finally:
            self._replies.clear()
        return results


class LocalEngine(ChatEngine):
    """A transformers causal LM behind TextGrad: chat template, greedy decoding, the base model.

    ``holder`` is anything with ``model``, ``tokenizer`` and ``device`` (a Policy, a LoadedModel).
    On the policy's own model the critic is θ_base because it runs outside every
    ``RowLoRA.rows(...)`` block: no adapter slot is active, so no copy of the model is needed. TGD's update
    call is answered with ``<IMPROVED_VARIABLE>`` already at the start of the reply (appended after
    the chat template's generation prompt) and generation stops at the closing tag, so the critic
    writes only the new text and never fails on the format.
    ``prefixes`` serves the prompts' shared prefix from cache (None: every call prefills it all);
    the rest of the prompt is prefilled ``prefill_chunk`` tokens at a time, so the prefill's
    activations scale with the chunk, not with TextGrad's ~1k-token prompts (on CPU the peak RSS
    is dominated by the KV cache itself: ~46 KB per token per row on SmolLM2-135M)."""

    def __init__(
        self,
        holder: Any,
        *,
        name: str,
        max_new_tokens: int,
        batch_size: int,
        update_tokens: int | None = None,
        loop_tokens: int = 0,
        prefixes: PrefixStore | None = None,
        prompts: PromptStore | None = None,
        prefill_chunk: int = 256,
    ) -> None:
        super().__init__(name, max_new_tokens, batch_size, update_tokens)
        self.loop_tokens = loop_tokens  # stop a row that repeats this many tokens verbatim (0: off)
        self.holder = holder
        self.prefixes = prefixes
        self.prompts = prompts
        self.prefill_chunk = prefill_chunk

    @property
    def tokenizer(self) -> Any:
        return self.holder.tokenizer

    def _chat_ids(self, system: str, prompt: str) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        try:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        except Exception:  # templates without a system role (e.g. Gemma): fold it into the user turn
            merged = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
            out = self.tokenizer.apply_chat_template(merged, add_generation_prompt=True, return_dict=True)
        return list(out["input_ids"])

    def _shared_prefix(self, model: Any, system: str, rows: list[list[int]], budget: int) -> tuple[Any, Any, Any, int]:
        """``prefixes``: the rows' shared prefix from the store at batch 1, then each row's own part
        left-padded so every row's own part ends at the same column (positions count real tokens)."""
        import torch

        pad, device = self.tokenizer.pad_token_id, self.holder.device
        before = 0 if self.prefixes is None else self.prefixes.reused_tokens
        shared, prefix = (0, None) if self.prefixes is None else self.prefixes.prefill(model, system, rows)
        reused = (0 if self.prefixes is None else self.prefixes.reused_tokens - before) // len(rows)
        width = shared + max(len(r) - shared for r in rows)
        cache = preallocated_cache(model, len(rows), width + budget, prefix)
        input_ids = torch.tensor([r[:shared] + [pad] * (width - len(r)) + r[shared:] for r in rows], device=device)
        mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * (len(r) - shared) for r in rows], device=device)
        self.tokens["reused"] += reused * len(rows)
        self.tokens["prefilled"] += (shared - reused) + len(rows) * (width - shared)
        return input_ids, mask, cache, width

    def _own_prompts(self, model: Any, rows: list[list[int]], budget: int) -> tuple[Any, Any, Any, int]:
        """``prompts``: each row but its last token prefilled at batch 1 after the longest prompt
        prefix the store holds (any earlier call's: the same session's last turn, the template), the
        rows' KV then laid side by side, padding after each (masked), and the last tokens in one
        column: generate's first forward computes only them. No row is padded in the prefill."""
        import torch

        assert self.prompts is not None
        pad, device = self.tokenizer.pad_token_id, self.holder.device
        width = max(map(len, rows))
        head = common_prefix(rows) if len(rows) > 1 else 0  # what every row shares: not one session's
        self.prompts.new_batch()
        caches = []
        for r in rows:
            reused, row_cache = self.prompts.prefill(model, r[:-1], session_after=head)
            caches.append(row_cache)
            self.tokens["reused"] += reused
            self.tokens["prefilled"] += len(r) - 1 - reused
        cache = side_by_side(model, caches, [len(r) - 1 for r in rows], width - 1, width + budget)
        input_ids = torch.tensor([r[:-1] + [pad] * (width - len(r)) + r[-1:] for r in rows], device=device)
        mask = torch.tensor([[1] * (len(r) - 1) + [0] * (width - len(r)) + [1] for r in rows], device=device)
        self.tokens["prefilled"] += len(rows)  # the last column, in generate's first forward
        return input_ids, mask, cache, width

    def _complete(self, keys: list[Key]) -> list[Completion]:
        import torch
        from transformers import StoppingCriteriaList

        opening = self.tokenizer(TGD_TAGS[0], add_special_tokens=False)["input_ids"]
        prefilled = [is_update_call(key) for key in keys]
        budgets = [self.budget(key) for key in keys]
        budget = max(budgets)
        rows = [self._chat_ids(system, prompt) + (opening if tagged else []) for (system, prompt), tagged in zip(keys, prefilled)]
        model = self.holder.model
        self.tokens["prompt"] += sum(map(len, rows))
        with torch.no_grad():
            if self.prompts is not None and layered(model):
                input_ids, mask, cache, width = self._own_prompts(model, rows, budget)
            else:
                input_ids, mask, cache, width = self._shared_prefix(model, keys[0][0], rows, budget)
            loops = LoopStop(width, self.loop_tokens, len(rows)) if self.loop_tokens else None
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                cache=cache,
                prefill_chunk_size=self.prefill_chunk,
                max_new_tokens=budget,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
                stop_strings=[TGD_TAGS[1]],
                tokenizer=self.tokenizer,
                stopping_criteria=StoppingCriteriaList([loops] if loops is not None else []),
            )
        stops = stop_ids(self.tokenizer)
        replies = []
        self.tokens["decoded"] += (out.shape[1] - width) * len(rows)
        for i, (row, tagged, limit) in enumerate(zip(out[:, width:].tolist(), prefilled, budgets)):
            row = row[:limit]  # a row with a smaller budget than the batch's: greedy, so the same start
            end = reply_length(row, stops)
            looped = loops.looped(i, end) if loops is not None else None
            end = end if looped is None else looped
            self.tokens["reply"] += end
            self.tokens["looped"] += looped is not None
            text = self.tokenizer.decode(row[:end], skip_special_tokens=True)
            closed = TGD_TAGS[1] in text
            cut = (end >= limit or looped is not None) and not closed
            replies.append(Completion(TGD_TAGS[0] + text if tagged else text, truncated=cut, tokens=end, looped=cut and looped is not None))
        return replies


def layered(model: Any) -> bool:
    """Whether the model's cache keeps every token of every layer (no sliding window, no linear
    attention): a batch-1 prompt cache can then be laid beside others (``side_by_side``); other
    models keep to the shared-prefix path, whose store refuses them in turn."""
    from transformers import DynamicCache

    return croppable(DynamicCache(config=model.config))


FORMAT_REMINDER = (
    "Your reply did not follow the required format. Reply again with only the improved variable, "
    f"between {TGD_TAGS[0]} and {TGD_TAGS[1]}, and nothing else."
)
# vLLM's OpenAI-compatible server constrains decoding to a regex through this extra body field
GUIDED_REGEX = r"<IMPROVED_VARIABLE>[^<]*</IMPROVED_VARIABLE>"


class OpenAIEngine(ChatEngine):
    """An OpenAI-compatible chat endpoint (vLLM, TGI, a hosted API) as the critic. Greedy.

    An update-call reply without both tags gets one bounded re-ask: the same conversation plus
    the reply and ``FORMAT_REMINDER``. ``guided=True`` also sends vLLM's ``guided_regex``
    (``GUIDED_REGEX``) with update calls, so a vLLM server cannot answer outside the tags; servers
    that do not know the field may reject it, so it is off by default (``--semantic-api-guided``)."""

    def __init__(
        self, api_base: str, api_model: str, api_key_env: str, *, max_new_tokens: int, batch_size: int,
        update_tokens: int | None = None, guided: bool = False,
    ) -> None:
        from openai import OpenAI

        super().__init__(api_model, max_new_tokens, batch_size, update_tokens)
        key = os.environ.get(api_key_env)
        if not key:
            raise Rosa2Error(
                f"critic='openai' reads its API key from ${api_key_env}, which is not set; set it "
                "(any value for an endpoint that needs none) or choose another variable with api_key_env"
            )
        self.client = OpenAI(base_url=api_base, api_key=key)
        self.guided = guided
        self.reasks = 0

    def _ask(self, messages: list[dict[str, str]], update: bool) -> Completion:
        extra = {"extra_body": {"guided_regex": GUIDED_REGEX}} if update and self.guided else {}
        response = self.client.chat.completions.create(
            model=self.model_string, messages=messages, max_tokens=self.update_tokens if update else self.max_new_tokens, temperature=0, **extra,  # type: ignore[arg-type]
        )
        choice = response.choices[0]
        return Completion(choice.message.content or "", truncated=choice.finish_reason == "length")

    def _complete(self, keys: list[Key]) -> list[Completion]:
        replies = []
        for key in keys:
            system, prompt = key
            messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            reply = self._ask(messages, is_update_call(key))
            if is_update_call(key) and not all(tag in reply.text for tag in TGD_TAGS):
                self.reasks += 1
                messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": FORMAT_REMINDER}]
                reply = self._ask(messages, True)
            replies.append(reply)
        return replies


class Text(tg.Variable):
    """A TextGrad variable shown whole in every prompt.

    TextGrad's prompts show ``get_short_value()``, the first and last 10 words; the critic must
    read the whole failed answer and the whole user message (a traceback, say) to critique them."""

    def get_short_value(self, n_words_offset: int = 10) -> str:
        return self.value


def _verdict(**_: Any) -> str:
    # The environment has already scored y_t (r = -1); the loss only states it, never the gold answer.
    return VERDICT


def transcript(question: str, history: list[dict[str, str]]) -> str:
    """The earlier turns as plain text, without the problem statement itself (shown on its own)."""
    lines = []
    for message in history:
        if message["role"] == "user" and message["content"] == question:
            continue
        lines.append(f"{message['role'].capitalize()}: {message['content']}")
    return "\n\n".join(lines)


@dataclass
class Update:
    """One semantic update as a TextGrad graph: the message variable, its loss and its optimizer."""

    message: Text
    loss: Any
    optimizer: Any
    engine: ChatEngine

    @classmethod
    def build(
        cls, engine: ChatEngine, question: str, history: list[dict[str, str]], response: str, message: str,
        system: str | None = None, prompts: str = "textgrad",
    ) -> "Update":
        """The graph for the user's next ``message`` (``system`` None), or for the ``system``
        prompt (semantic.target = system; "" when there is none yet), the message then an input.
        ``prompts`` = compact swaps TextGrad's critique and update templates for ours (same graph)."""
        problem = Text(question, requires_grad=False, role_description="the problem the user asked the assistant to solve")
        inputs: dict[str, Text] = {"problem": problem}
        if system is not None:
            x = Text(system, requires_grad=True, role_description=SYSTEM_ROLE if system.strip() else EMPTY_SYSTEM_ROLE)
            inputs = {"system_prompt": x, "problem": problem}
        earlier = transcript(question, [m for m in history if m["role"] != "system"])
        if earlier:
            inputs["earlier_turns"] = Text(earlier, requires_grad=False, role_description="the conversation before the latest answer")
        inputs["rejected_answer"] = Text(response, requires_grad=False, role_description="the assistant's latest answer")
        if system is None:
            x = Text(message, requires_grad=True, role_description=MESSAGE_ROLE if message.strip() else EMPTY_MESSAGE_ROLE)
            inputs["next_user_message"] = x
        elif message.strip():
            inputs["next_user_message"] = Text(message, requires_grad=False, role_description="the user's next message")
        compact = prompts == "compact"
        loss = (CompactVerdict if compact else StringBasedFunction)(_verdict, VERDICT_PURPOSE)(
            inputs=inputs, response_role_description="the user's verdict on the assistant's latest answer"
        )
        constraints = CONSTRAINTS if system is None else SYSTEM_CONSTRAINTS
        optimizer = (CompactTGD if compact else tg.TGD)(parameters=[x], engine=engine, constraints=constraints)
        return cls(message=x, loss=loss, optimizer=optimizer, engine=engine)

    def backward(self) -> None:
        """LLM call 1: the textual gradient of the verdict with respect to the message."""
        self.loss.backward(engine=self.engine)

    @property
    def critique(self) -> str:
        return self.message.get_gradient_text()

    def step(self) -> "Completion":
        """LLM call 2: TGD applies the critique. The text between the tags (TGD's own parsing), or
        "" when the reply has no opening tag; ``truncated`` when the reply was cut before its end."""
        try:
            self.optimizer.step()
        except IndexError:
            return Completion("", truncated=bool(self.engine.last and self.engine.last.truncated))
        last = self.engine.last
        return Completion(self.message.value, truncated=bool(last and last.truncated))
