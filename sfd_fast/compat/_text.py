"""Cached text embeddings for the compat SD functions.

The reference tokenizes (slow Python CLIP tokenizer) and runs the text encoder on every sampler and
denoiser call, and also encodes [""] * B (or the negative prompts) even at guidance 1. Here each
(tokenizer, text encoder) pair gets one `sfd_fast.sd.text.TextEncoderCache` (a bounded LRU of
`CACHE_SIZE` prompts; "" and up to `MAX_PINNED` distinct negative prompts are pinned), so a prompt
is tokenized and encoded once while it stays in use.

Safety when the text encoder changes. A cache entry is valid only for the weights that produced
it, so each pair's cache carries a fingerprint of its encoder, checked on every call and the cache
emptied when it differs:
  * per parameter and buffer: autograd's version counter `_version` (bumped by every in-place
    write: optimizer steps, `load_state_dict`, `copy_` under no_grad), `data_ptr()`, dtype and
    device (a `.to(...)`, or `param.data = ...`, replaces the storage);
  * the module's `training` flag: in train mode (dropout may be active) nothing is cached at all.
This costs a Python pass over the encoder's tensors per call (~200 tensors for CLIP-L, tens of
microseconds), far below one encoder pass. Not detected: writes through `param.data.<op>_()`
(`.data` has its own version counter); call `clear_text_cache()` after such a write.
Keys hold weak references, so a cache dies with its text encoder; at most `MAX_PAIRS` pairs are
kept (least recently used dropped).
"""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict

import torch

CACHE_SIZE = 256   # prompts per (tokenizer, encoder): ~236 KB each for SD1.5 in fp32 (77 x 768 x 4 B)
MAX_PINNED = 64    # distinct negative prompts kept forever per pair (beyond that they go to the LRU)
MAX_PAIRS = 8

_PAIRS: "OrderedDict[tuple[int, int], _Entry]" = OrderedDict()


def _fingerprint(module) -> tuple:
    tensors = itertools.chain(module.parameters(), module.buffers())
    return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in tensors)


class _Entry:
    def __init__(self, tokenizer, text_encoder):
        from ..sd.text import TextEncoderCache

        self.tokenizer_ref = weakref.ref(tokenizer)
        self.encoder_ref = weakref.ref(text_encoder)
        self.fingerprint = _fingerprint(text_encoder)
        self.cache = TextEncoderCache(text_encoder, tokenizer, max_length=tokenizer.model_max_length,
                                      max_entries=CACHE_SIZE)
        self.pinned: set[str] = set()

    def alive_for(self, tokenizer, text_encoder) -> bool:
        return self.tokenizer_ref() is tokenizer and self.encoder_ref() is text_encoder

    def refresh(self, text_encoder) -> None:
        fp = _fingerprint(text_encoder)
        if fp != self.fingerprint:
            self.fingerprint = fp
            self.cache.clear()
            self.pinned.clear()
            self.cache.device = next(text_encoder.parameters()).device


def _entry(tokenizer, text_encoder) -> _Entry:
    key = (id(tokenizer), id(text_encoder))
    e = _PAIRS.get(key)
    if e is None or not e.alive_for(tokenizer, text_encoder):  # new pair, or ids reused after GC
        e = _PAIRS[key] = _Entry(tokenizer, text_encoder)
    else:
        e.refresh(text_encoder)
    _PAIRS.move_to_end(key)
    while len(_PAIRS) > MAX_PAIRS:
        _PAIRS.popitem(last=False)
    return e


def text_embeddings(text_encoder, tokenizer, prompts: list[str], device, pin: bool = False) -> torch.Tensor:
    """(B, L, D) last hidden states of `prompts` (no grad), as the reference's
    `text_encoder(tokenizer(prompts, padding="max_length", truncation=True).input_ids)[0]`.

    pin=True keeps these prompts (negative prompts) out of the LRU, up to MAX_PINNED per pair.
    Prompts longer than the tokenizer's max length are truncated (with one warning per prompt).
    """
    entry = _entry(tokenizer, text_encoder)
    if text_encoder.training:  # dropout may be active: encode every call, cache nothing
        return entry.cache.encode_uncached(prompts).to(device)
    if pin:
        new = [p for p in dict.fromkeys(prompts) if p not in entry.pinned]
        if new and len(entry.pinned) + len(new) <= MAX_PINNED:
            entry.cache.pin(new)
            entry.pinned.update(new)
    return entry.cache.encode(prompts, cache=True).to(device)


def clear_text_cache() -> None:
    """Forget every cached text embedding (e.g. after editing encoder weights through `.data`)."""
    _PAIRS.clear()
