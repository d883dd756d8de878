"""The policy π: a causal LM + tokenizer, the chat template, and one generation config.

Every stream talks to the model through this class: the session loop generates with it, the
parametric stream scores its responses on the same model and the semantic stream's local engine
reuses the same weights with no adapter slot active (the base model).

``generate`` (one conversation) keeps the KV cache it ends with (``rosa2.kvcache.TurnCache``): the
next prompt of the same conversation starts with that prompt and answer, so while the weights are
unchanged only the new user message is prefilled; a parametric step changes the weights and the
cache is dropped. ``generate_many`` answers B conversations in one left-padded batch, row b under
its session's adapter slot.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from rosa2.config import GenerationConfig
from rosa2.errors import Rosa2Error
from rosa2.kvcache import TurnCache, preallocated_cache
from rosa2.models import LoadedModel

Message = dict[str, str]
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class ContextTooLong(Rosa2Error):
    """A prompt that, with the answer budget, does not fit the model's context window."""


def context_length(model: Any) -> int | None:
    """The model's context window in tokens (from its config), or None when it does not say."""
    config = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stop_ids(tokenizer: Any) -> set[int]:
    """The tokens that end a reply: every EOS id of the tokenizer and its pad id."""
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) | {tokenizer.pad_token_id}


def reply_length(tokens: list[int], stops: set[int]) -> int:
    """How many of the generated ``tokens`` are the reply: up to the first stop token."""
    return next((i for i, tok in enumerate(tokens) if tok in stops), len(tokens))


@dataclass
class Reply:
    text: str
    prompt_ids: Any  # 1-D LongTensor: the templated history
    response_ids: Any  # 1-D LongTensor: the generated tokens (eos stripped)
    seconds: float  # wall time of the generation; in a batch, this row's share of it

    @property
    def tokens(self) -> int:
        return int(self.response_ids.numel())


def left_pad(sequences: list[Any], pad_id: int) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids) for 1-D id tensors, left-padded to one length.

    Left padding keeps every row's last prompt token at the same column, so decoding appends in
    lockstep; positions count real tokens only, so a padded row sees what an unpadded one sees.
    """
    import torch

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


class Policy:
    """π(· | H; θ_base + θ): generation under an adapter slot of ``rosa2.adapter.RowLoRA`` (``lora``,
    ``slots``) or, without one, the base model."""

    def __init__(self, loaded: LoadedModel, generation: GenerationConfig | None = None) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.source = loaded.source
        self.generation = generation or GenerationConfig()
        self.turn_cache = TurnCache()

    def prompt_ids(self, messages: list[Message]) -> Any:
        """Token ids of the history with the generation prompt appended (1-D, on device)."""
        system = self.generation.system_prompt
        if system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": system}, *messages]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        self.check_context(int(ids.shape[-1]), self.generation.max_new_tokens)
        return ids[0].to(self.device)

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse, before any compute, a prompt that leaves no room for the answer budget in the
        model's context (beyond it a model computes for minutes and answers from positions it never saw)."""
        context = context_length(self.model)
        if context is not None and prompt_tokens + max_new_tokens > context:
            raise ContextTooLong(
                f"the prompt is {prompt_tokens} tokens and the answer may take {max_new_tokens} more, but the "
                f"model's context is {context} tokens; shorten the prompt to at most {max(context - max_new_tokens, 0)} "
                "tokens (or lower --max-new-tokens)"
            )

    def _decoding(self, max_new_tokens: int | None, seed: int | None) -> dict[str, Any]:
        """``generate`` keyword arguments of this generation config (the RNG seeded when sampling)."""
        import torch

        cfg = self.generation
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens or cfg.max_new_tokens,
            "do_sample": cfg.do_sample,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if cfg.do_sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
            torch.manual_seed(cfg.seed if seed is None else seed)
        else:  # silence the model's own sampling defaults under greedy decoding
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def _reply(self, prompt: Any, generated: Any, seconds: float) -> Reply:
        response = generated[: reply_length(generated.tolist(), stop_ids(self.tokenizer))]
        text = self.tokenizer.decode(response, skip_special_tokens=True)
        return Reply(text=text, prompt_ids=prompt, response_ids=response, seconds=seconds)

    def generate(
        self, messages: list[Message], *, max_new_tokens: int | None = None, seed: int | None = None,
        lora: Any = None, slot: int = 0,
    ) -> Reply:
        """One reply to ``messages``, under adapter slot ``slot`` of ``lora`` (None: the base model).

        The one-conversation path: the KV cache it ends with is kept (``turn_cache``) and serves the
        next prompt of the same conversation while the weights are unchanged."""
        import torch

        prompt = self.prompt_ids(messages)
        if max_new_tokens and max_new_tokens > self.generation.max_new_tokens:
            self.check_context(int(prompt.numel()), max_new_tokens)
        kwargs = self._decoding(max_new_tokens, seed)
        start = time.perf_counter()
        with torch.no_grad(), lora.rows([slot]) if lora is not None else nullcontext():
            weights = lora.state() if lora is not None else None
            _, cache = self.turn_cache.take(self.model, prompt.tolist(), weights)
            out = self.model.generate(
                input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None], cache=cache,
                return_dict_in_generate=True, **kwargs,
            )
        self.turn_cache.keep(self.model, out.sequences[0].tolist(), out.cache, weights)
        return self._reply(prompt, out.sequences[0, prompt.numel():], time.perf_counter() - start)

    def generate_many(
        self, prompts: list[Any], *, lora: Any = None, slots: list[int] | None = None, seed: int | None = None,
        max_new_tokens: int | None = None,
    ) -> list[Reply]:
        """Replies to B templated prompts (``prompt_ids``) at once, row i under slot ``slots[i]``.

        Greedy decoding gives the tokens of B ``generate`` calls up to float rounding of the padded
        batch (tests/test_session.py bounds it). Sampling draws from one RNG seeded with ``seed``
        for the whole batch, so sampled text depends on the batch it ran in."""
        import torch

        ids, mask, _ = left_pad(prompts, self.tokenizer.pad_token_id)
        kwargs = self._decoding(max_new_tokens, seed)
        if self.generation.static_cache:
            kwargs["cache"] = preallocated_cache(self.model, len(prompts), int(ids.shape[1]) + kwargs["max_new_tokens"])
        start = time.perf_counter()
        with torch.no_grad(), lora.rows(slots) if lora is not None else nullcontext():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        share = (time.perf_counter() - start) / len(prompts)
        return [self._reply(prompt, out[i, ids.shape[1] :], share) for i, prompt in enumerate(prompts)]
