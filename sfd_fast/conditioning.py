"""Text conditioning for Stable Diffusion SFD: CLIP embeddings with a per-prompt cache.

The reference (SFD:SD sd_util `sid_sd_sampler` / `sid_sd_denoise`) tokenizes and runs the text
encoder for every generator call and every denoiser call, including the unconditional batch
[""]*B, even at guidance 1: per iteration the same prompts are encoded up to ~10 times. The text
encoder is frozen and deterministic, so an embedding depends only on the prompt string.
`TextEncoderCache` encodes each distinct prompt once:
  * always-cached: "" and every prompt encoded with cache=True (forget, override, negative,
    validation prompts: a few hundred strings, i.e. ~ n * 77 * 768 * 2 bytes = 118 KB each in fp16);
  * remain prompts (millions of distinct captions): encoded once per call (duplicates inside a
    call share one row) and kept only with cache=True, in an LRU bounded by `max_entries`.
Tokenization pads to 77 with "max_length" and truncates, exactly as the reference's
`tokenize_captions`; a prompt longer than 77 tokens triggers one warning per distinct prompt.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import torch


class TextEncoderCache:
    """encode(prompts) -> (B, max_length, D) embeddings, each distinct prompt encoded once.

    text_encoder: a CLIPTextModel (frozen); its dtype is kept (fp16 model -> fp16 embeddings).
    tokenizer: a CLIPTokenizer (transformers 5 "tokenizers" backend or a slow/fast v4 tokenizer).
    max_entries: LRU cap on non-pinned entries. Pinned entries ("" and `pin(...)`) never expire.
    chunk: rows per text-encoder call when many new prompts arrive at once (bounds activation memory).
    """

    def __init__(self, text_encoder, tokenizer, device=None, max_length: int = 77,
                 max_entries: int = 4096, chunk: int = 256):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(text_encoder.parameters()).device
        self.max_length = max_length
        self.max_entries = max_entries
        self.chunk = chunk
        self._pinned: dict[str, torch.Tensor] = {}
        self._lru: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._warned: set[str] = set()
        self.encoded_rows = 0  # prompts actually run through the text encoder (for tests / stats)

    # -- tokenization --------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_length) input ids, padded with "max_length" and truncated (reference semantics)."""
        self._warn_truncation(prompts)
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                              truncation=True, return_tensors="pt").input_ids

    def warn_if_truncated(self, prompts) -> None:
        """Warn now (once per prompt) about prompts longer than max_length, e.g. before training."""
        self._warn_truncation(list(prompts))

    def _warn_truncation(self, prompts) -> None:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._warned]
        if not todo:
            return
        # Untruncated lengths (incl. BOS/EOS); verbose=False silences transformers' own
        # "sequence length is longer than the specified maximum" message.
        lengths = [len(ids) for ids in self.tokenizer(todo, truncation=False, verbose=False).input_ids]
        for p, n in zip(todo, lengths):
            if n > self.max_length:
                self._warned.add(p)
                warnings.warn(f"prompt has {n} tokens and is truncated to {self.max_length}: {p!r}",
                              stacklevel=3)

    # -- encoding ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _run_encoder(self, prompts: list[str]) -> torch.Tensor:
        """Text encoder on new prompts, chunked; returns (n, L, D) on self.device."""
        out = []
        for i in range(0, len(prompts), self.chunk):
            part = prompts[i:i + self.chunk]
            ids = self.tokenize(part).to(self.device)
            kwargs = {}
            if getattr(self.text_encoder.config, "use_attention_mask", False):
                # SD1.x passes no mask (CLIP pads with EOS under a causal mask); only models whose
                # config asks for one get it (as diffusers' pipeline does).
                kwargs["attention_mask"] = (ids != self.tokenizer.pad_token_id).long()
            out.append(self.text_encoder(ids, **kwargs)[0])
            self.encoded_rows += len(part)
        return torch.cat(out) if len(out) > 1 else out[0]

    def encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        """Same math as `encode`, no cache: every row runs through the encoder (for tests)."""
        return self._run_encoder(list(prompts))

    def _lookup(self, p: str):
        e = self._pinned.get(p)
        if e is None:
            e = self._lru.get(p)
            if e is not None:
                self._lru.move_to_end(p)
        return e

    def encode(self, prompts: list[str], cache: bool = True) -> torch.Tensor:
        """(B, max_length, D) embeddings for `prompts` (a fresh tensor; the cache is not aliased).

        cache=True: new prompts are stored (LRU). cache=False (remain captions): new prompts are
        encoded once for this call and dropped; cached ones (e.g. "" from context dropout) are
        still reused. "" is always pinned.
        """
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        found: dict[str, torch.Tensor] = {}
        new: list[str] = []
        for p in dict.fromkeys(prompts):  # distinct, in first-seen order
            e = self._lookup(p)
            if e is None:
                new.append(p)
            else:
                found[p] = e
        if new:
            emb = self._run_encoder(new)
            for p, e in zip(new, emb):
                found[p] = e
                if p == "":
                    self._pinned[p] = e
                elif cache:
                    self._lru[p] = e
            while len(self._lru) > self.max_entries:
                self._lru.popitem(last=False)
        return torch.stack([found[p] for p in prompts])

    def pin(self, prompts) -> None:
        """Encode (if needed) and keep `prompts` forever (forget / override / negative prompts)."""
        distinct = list(dict.fromkeys(prompts))
        new = [p for p in distinct if self._lookup(p) is None]
        if new:
            for p, e in zip(new, self._run_encoder(new)):
                self._pinned[p] = e
        for p in distinct:
            if p in self._lru:
                self._pinned[p] = self._lru.pop(p)

    def empty(self, batch: int) -> torch.Tensor:
        """(batch, L, D) embedding of the empty prompt (the CFG unconditional branch)."""
        return self.encode([""]).expand(batch, -1, -1).contiguous()

    def __len__(self) -> int:
        return len(self._pinned) + len(self._lru)

    def clear(self) -> None:
        self._pinned.clear()
        self._lru.clear()
