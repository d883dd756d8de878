"""The policy π: a causal LM + tokenizer, the chat template, and one generation config.

Every stream talks to the model through this class: the session loop generates with it, the
parametric stream scores responses with ``encode`` and the semantic stream's local engine reuses
the same weights with the adapter switched off.

``generate`` keeps the KV cache it ends with (``rosa2.kvcache.TurnCache``): the next prompt of the
same conversation starts with that prompt and answer, so while the weights are unchanged only the
new user message is prefilled. A parametric step changes the weights and the cache is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rosa2.config import GenerationConfig
from rosa2.errors import Rosa2Error
from rosa2.kvcache import TurnCache
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
    seconds: float

    @property
    def tokens(self) -> int:
        return int(self.response_ids.numel())


class Policy:
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

    def generate(self, messages: list[Message], *, max_new_tokens: int | None = None, seed: int | None = None) -> Reply:
        import torch

        cfg = self.generation
        prompt = self.prompt_ids(messages)
        if max_new_tokens and max_new_tokens > cfg.max_new_tokens:
            self.check_context(int(prompt.numel()), max_new_tokens)
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
        start = time.perf_counter()
        with torch.no_grad():
            _, cache = self.turn_cache.take(self.model, prompt.tolist())
            out = self.model.generate(
                input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None], cache=cache,
                return_dict_in_generate=True, **kwargs,
            )
        self.turn_cache.keep(self.model, out.sequences[0].tolist(), out.cache)
        response = out.sequences[0, prompt.numel():]
        response = response[: reply_length(response.tolist(), stop_ids(self.tokenizer))]
        text = self.tokenizer.decode(response, skip_special_tokens=True)
        return Reply(text=text, prompt_ids=prompt, response_ids=response, seconds=time.perf_counter() - start)
