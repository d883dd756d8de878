"""KV caches kept between generations: what a later prompt shares with an earlier one is not
prefilled again.

Two users, one rule (reuse only the exact token prefix, at the same positions, computed by the
same weights, so the attention over it is the same arithmetic):

- ``PrefixStore``: the semantic stream's local critic reads TextGrad prompts whose first half
  (system prompt + template text up to the problem) is the same in every call.
- ``PromptStore``: the critic's whole prompts, found by their tokens: a session's next critique
  repeats its problem and earlier turns, so each prompt prefills only after the longest prefix it
  shares with a stored one (``semantic.session_cache``; LRU-bounded in tokens).
- ``TurnCache``: a session's prompt at turn t+1 is its prompt at turn t, the answer y_t and the
  next user message. While the policy's weights are unchanged (baseline, textgrad, the words-only
  turns of a Switch run) the KV of turn t serves turn t+1; a parametric step, reset or load
  changes an adapter tensor's version counter and the cache is dropped.

Caches must be croppable (transformers' ``DynamicLayer``); models with sliding-window or linear
attention layers simply get no reuse.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the longest token prefix every row starts with."""
    first, n = rows[0], min(map(len, rows))
    for row in rows[1:]:
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return n


def croppable(cache: Any) -> bool:
    return all(
        bool(getattr(layer, "is_croppable", False)) and not getattr(layer, "is_sliding", False) for layer in cache.layers
    )


def prefill(model: Any, cache: Any, ids: list[int], start: int, chunk: int) -> Any:
    """Extend ``cache`` (None: a new one) with ``ids[start:]`` at batch 1, ``chunk`` tokens per forward."""
    import torch

    device = next(model.parameters()).device
    for begin in range(start, len(ids), chunk):
        piece = torch.tensor([ids[begin : begin + chunk]], device=device)
        cache = model(input_ids=piece, cache=cache, use_cache=True, logits_to_keep=1).cache
    return cache


def preallocated_cache(model: Any, batch: int, length: int, prefix: Any = None) -> Any:
    """A KV cache for ``batch`` rows of up to ``length`` tokens, allocated once (transformers'
    ``StaticCache``), holding ``prefix`` (a batch-1 cache) in every row. The default cache grows by
    concatenation, copying all of itself at every decoded token: on 8 critic prompts of ~1k tokens
    that was ~10% of the critic's time and fragmented the heap it leaves behind."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=length)
    if prefix is not None:
        for layer, source in zip(cache.layers, prefix.layers):
            layer.update(source.keys.expand(batch, -1, -1, -1), source.values.expand(batch, -1, -1, -1))
    return cache


class PrefixStore:
    """KV caches of the prompt prefixes a local critic reads again and again, keyed by system prompt.

    For a batch of prompts ``prefill`` returns (P, cache): the cache (batch 1) of the first P tokens
    every prompt shares, reusing the stored prefix of the same system prompt for as far as it
    matches and computing only the rest (``chunk`` tokens per forward). A stored prefix shrinks to
    what later prompts actually share (TextGrad's system prompt and template text, up to the first
    session-specific token), so a one-at-a-time run learns it from its second call. At most
    ``entries`` prefixes are kept (LRU); each costs its KV (~46 KB per token on SmolLM2-135M).
    Valid because the critic is the frozen base model; a new model object clears the store."""

    def __init__(self, entries: int = 4, min_tokens: int = 32, chunk: int = 256) -> None:
        self.entries, self.min_tokens, self.chunk = entries, min_tokens, chunk
        self._store: OrderedDict[str, tuple[list[int], Any]] = OrderedDict()
        self._model_id: int | None = None
        self.reused_tokens = 0  # prefix tokens served from the store, summed over rows and calls

    def prefill(self, model: Any, system: str, rows: list[list[int]]) -> tuple[int, Any]:
        """(P, batch-1 cache of rows[0][:P]) with P the rows' shared prefix, each row keeping at
        least one token to prefill; (0, None) when they share too little to bother."""
        if id(model) != self._model_id:
            self._store.clear()
            self._model_id = id(model)
        shared = min(common_prefix(rows), min(map(len, rows)) - 1)
        if shared < self.min_tokens:
            return 0, None
        ids = rows[0][:shared]
        reuse, cache = 0, None
        if system in self._store:
            stored, stored_cache = self._store.pop(system)
            reuse = common_prefix([stored, ids])
            if reuse >= self.min_tokens:
                if reuse < len(stored):
                    stored_cache.crop(reuse - len(stored))
                    stored = stored[:reuse]
                self._store[system] = (stored, stored_cache)
                cache = copy.deepcopy(stored_cache)
            else:
                reuse = 0
        self.reused_tokens += reuse * len(rows)
        cache = prefill(model, cache, ids, reuse, self.chunk)
        if system not in self._store:
            if not croppable(cache):
                return 0, None  # a cache this store cannot cut back (sliding window, linear attention)
            self._store[system] = (ids, copy.deepcopy(cache))
            while len(self._store) > self.entries:
                self._store.popitem(last=False)
        return shared, cache


def sliced(model: Any, cache: Any, n: int) -> Any:
    """A new cache holding the first ``n`` tokens of ``cache`` (a batch-1 ``DynamicCache``), which
    is left as it is: the new cache's later tokens go to tensors of its own."""
    from transformers import DynamicCache

    out = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[:, :, :n], layer.values[:, :, :n], i)
    return out


def side_by_side(model: Any, caches: list[Any], lengths: list[int], width: int, length: int) -> Any:
    """A ``StaticCache`` of ``len(caches)`` rows and ``length`` columns whose first ``width`` columns
    hold, row by row, the first ``lengths[i]`` tokens of batch-1 ``caches[i]`` and then zeros (the
    caller masks them): prompts prefilled one at a time, decoded together."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=length)
    for j, layer in enumerate(cache.layers):
        first = caches[0].layers[j]
        keys = first.keys.new_zeros((len(caches), first.keys.shape[1], width, first.keys.shape[3]))
        values = first.values.new_zeros((len(caches), first.values.shape[1], width, first.values.shape[3]))
        for i, (row, n) in enumerate(zip(caches, lengths)):
            keys[i, :, :n] = row.layers[j].keys[0, :, :n]
            values[i, :, :n] = row.layers[j].values[0, :, :n]
        layer.update(keys, values)
        del keys, values
    return cache


class PromptStore:
    """KV caches (batch 1) of whole critic prompts, found by their tokens: a new prompt starts its
    prefill after the longest token prefix it shares with any stored one, at least ``min_tokens``.

    What repeats between a session's critic calls is more than the template head ``PrefixStore``
    keeps: turn t+1's critique prompt repeats turn t's through the problem and the earlier turns
    (TextGrad lists the inputs in order: problem, earlier turns, failed answer, message), and so
    does its update prompt (the same role and, with a fixed user message, the same variable). The
    KV of those tokens at those positions is the same arithmetic, so it is served, not recomputed.

    ``prefill(model, ids, session_after=H)``: when the best match goes beyond ``H`` tokens (H = what
    every prompt of the batch shares, so beyond it the match is one session's own text) and was
    stored before the current batch (``new_batch``: a batch holds one call per session, so two of
    its prompts that share more, e.g. the same retry message, are still two sessions) the matched
    entry is superseded by the new prompt (it shares at least as much with the session's next
    call) and dropped. Otherwise entries leave least recently used first, keeping at most
    ``max_tokens`` tokens in all (~46 KB each on SmolLM2-135M in float32). Valid because the critic
    is the frozen base model; a new model object clears the store."""

    def __init__(self, max_tokens: int = 24576, min_tokens: int = 32, chunk: int = 256) -> None:
        self.max_tokens, self.min_tokens, self.chunk = max_tokens, min_tokens, chunk
        self._store: OrderedDict[int, tuple[list[int], Any]] = OrderedDict()
        self._next = 0
        self._batch = 0  # the first entry key of the current batch
        self._model_id: int | None = None
        self.reused_tokens = 0  # prompt tokens served from the store, summed over prompts
        self.computed_tokens = 0  # prompt tokens prefilled by the store's forwards

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self._store.values())

    def new_batch(self) -> None:
        """The prompts stored from now on are one batch's: none of them supersedes another."""
        self._batch = self._next

    def prefill(self, model: Any, ids: list[int], session_after: int = 0) -> tuple[int, Any]:
        """(reused, batch-1 cache of all of ``ids``), reused = how many of them came from the store."""
        if id(model) != self._model_id:
            self._store.clear()
            self._model_id = id(model)
        best, reuse = None, 0
        for key, (stored, _) in self._store.items():
            n = common_prefix([stored, ids])
            if n > reuse:
                best, reuse = key, n
        cache = None
        if best is not None and reuse >= self.min_tokens:
            stored, stored_cache = self._store[best]
            cache = sliced(model, stored_cache, reuse)
            if reuse > session_after > 0 and best < self._batch:
                del self._store[best]  # the session's newer prompt replaces it
            else:
                self._store.move_to_end(best)
        else:
            reuse = 0
        self.reused_tokens += reuse
        self.computed_tokens += len(ids) - reuse
        cache = prefill(model, cache, ids, reuse, self.chunk)
        if not croppable(cache):
            return reuse, cache  # sliding window, linear attention: computed, never stored
        self._store[self._next] = (list(ids), cache)
        self._next += 1
        while self.tokens > self.max_tokens and len(self._store) > 1:
            self._store.popitem(last=False)
        return reuse, cache


def weights_key(model: Any, adapter: Any = None) -> tuple[Any, ...]:
    """What the KV of a prompt depends on besides its tokens: the model object, the row adapter's
    ``state()`` (active slots, tensor versions: ``rosa2.adapter.RowLoRA``) and, for a PEFT-wrapped
    model, its active adapter and the in-place version counter of every LoRA tensor."""
    lora = tuple(p._version for name, p in model.named_parameters() if "lora_" in name)
    return (id(model), adapter, str(getattr(model, "active_adapter", "")), lora)


class TurnCache:
    """The KV cache of one session's last generation (prompt + answer), offered to its next prompt.

    ``take`` hands the cache over (cropped to the part the new prompt shares, at least
    ``min_tokens``, leaving the prompt's last token to prefill) when the weights are those that
    built it; ``keep`` stores the cache a generation ended with. One cache at a time: the KV of
    one conversation (~46 KB per token on SmolLM2-135M); ``clear`` frees it."""

    def __init__(self, min_tokens: int = 16) -> None:
        self.min_tokens = min_tokens
        self._ids: list[int] = []
        self._cache: Any = None
        self._key: tuple[Any, ...] | None = None
        self.reused_tokens = 0  # prompt tokens served from a previous turn, summed over generations

    def take(self, model: Any, ids: list[int], adapter: Any = None) -> tuple[int, Any]:
        cache, stored, key = self._cache, self._ids, self._key
        self.clear()
        if cache is None or key != weights_key(model, adapter) or not croppable(cache):
            return 0, None
        n = min(common_prefix([stored, ids]), len(ids) - 1, cache.get_seq_length())
        if n < self.min_tokens:
            return 0, None
        if n < cache.get_seq_length():
            cache.crop(n - cache.get_seq_length())
        self.reused_tokens += n
        return n, cache

    def keep(self, model: Any, ids: list[int], cache: Any, adapter: Any = None) -> None:
        self._ids, self._cache, self._key = ids, cache, weights_key(model, adapter)

    def clear(self) -> None:
        self._ids, self._cache, self._key = [], None, None
