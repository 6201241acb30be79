"""Text conditioning for Stable Diffusion SFD: the CLIP embedding cache and the forgetting task.

TextEncoderCache: CLIP embeddings with a per-prompt cache. TextForgetTask: the per-row conditions
of spec §1b (see the comment block above the class).

The reference (SFD:SD sd_util `sid_sd_sampler` / `sid_sd_denoise`) tokenizes and runs the text
encoder for every generator call and every denoiser call, including the unconditional batch
[""]*B, even at guidance 1: per iteration the same prompts are encoded up to ~10 times. The text
encoder is frozen and deterministic, so an embedding depends only on the prompt string.
`TextEncoderCache` encodes each distinct prompt once:
  * always-cached: "" and every prompt encoded with cache=True (forget, override, negative,
    validation prompts: a few hundred strings, i.e. ~ n * 77 * 768 * 2 bytes = 118 KB each in fp16);
  * remain prompts (up to millions of distinct captions): encoded once per call (duplicates inside
    a call share one row) and kept in an LRU bounded by `max_entries` (TextForgetTask caches them:
    a repeated caption skips the encoder; 1024 SD1.5 entries = 1024 * 77 * 768 * 4 B = 242 MB in
    fp32, half that with the bf16 text encoder of engine.precision=bf16).
Tokenization pads to 77 with "max_length" and truncates, exactly as the reference's
`tokenize_captions`; a prompt longer than 77 tokens triggers one warning per distinct prompt.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

from ..conditions import PhaseConditions, forget_row_targets
from ..engine.device import host_side, host_to_device
from .prompts import ForgetPromptSet, RemainPromptSet


class TextEncoderCache:
    """encode(prompts) -> (B, max_length, D) embeddings, each distinct prompt encoded once.

    text_encoder: a CLIPTextModel (frozen); its dtype is kept (fp16 model -> fp16 embeddings).
    tokenizer: a CLIPTokenizer (transformers 5 "tokenizers" backend or a slow/fast v4 tokenizer).
    max_entries: LRU cap on non-pinned entries. Pinned entries ("" and `pin(...)`) never expire.
    chunk: rows per text-encoder call when many new prompts arrive at once (bounds activation memory).
    """

    def __init__(self, text_encoder, tokenizer, device=None, max_length: int = 77,
                 max_entries: int = 1024, chunk: int = 256):
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
        with host_side():  # host tensors; _run_encoder copies them through pinned memory
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
            ids = host_to_device(self.tokenize(part), torch.long, self.device)  # pinned, non_blocking
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

    def __len__(self) -> int:
        return len(self._pinned) + len(self._lru)

    def clear(self) -> None:
        self._pinned.clear()
        self._lru.clear()


# ---------------------------------------------------------------------------------------------------
# TextForgetTask
# ---------------------------------------------------------------------------------------------------
# Text-conditioned forgetting for Stable Diffusion SFD: the conditioning table of spec §1b.
#
# `TextForgetTask.draw(n_remain, n_forget, rng, device, phase)` returns the per-row text embeddings of
# ONE batch (remain rows, then forget rows) for one phase of the SFD step:
#
#     row     generator      fake score                        teacher     CFG uncond (fake / teacher)
#     remain  remain prompt  remain prompt                     remain      "" or a random negative
#                                                                           (sid_w_neg and use_neg[k])
#     forget  forget prompt  forget, or override with          override    "" or the pair's negative
#             (+ pos kw)     sg_w_override                                  (has_neg and use_neg[k])
#
# A row hit by context dropout gets "" as its generator prompt, fake-score prompt and uncond (the
# reference drops the prompt before sampling G too); the teacher is never dropped.
#
# k = 0 (kappa1, fake score in its own loss) in the "fake_score" phase, k = 1 (kappa2, fake score in
# the generator loss) in the "generator" phase, k = 2 (kappa4) for the teacher. Context dropout
# (`prompts.context_dropout`, 10%) applies in the fake-score phase only, and only when
# cfg_train_fake != 1 or cfg_eval_fake != 1 (reference training_loop L203-207).
#
# Encoding: every distinct string of a draw is encoded ONCE through the `TextEncoderCache`; all
# networks that need a prompt share the same rows. "", negatives, forget and override prompts are
# pinned in the cache at construction; remain captions go through the cache's bounded LRU.
# Host data (token ids, row indices) reaches the device through engine.device.host_to_device (pinned,
# non_blocking): a steady-state draw never waits for the GPU (tests/test_no_sync.py).
# An uncond tensor is only built when its network's guidance is != 1 (else it is None: unused).
#
# Deliberate differences from the reference (documented in docs/sd.md):
#   * `sg_w_override` applies in both phases whatever the dropout / negative-prompt settings; in the
#     fake-score phase G is still sampled from the forget prompt (reference §8.7: there it only acts
#     with dropout and negatives, and then also switches G's prompt, so the fake score would learn a
#     distribution the generator phase never queries it for);
#   * a remain row whose prompt is dropped to "" also gets "" as its uncond (reference §8.8 keeps the
#     negative prompt there, giving neg + kappa * ("" - neg)); forget rows already behaved this way.


PHASES = ("fake_score", "generator")


class TextForgetTask:
    """Draws per-row text conditions for SD concept forgetting (see the comment block above).

    cache: a TextEncoderCache. remain: RemainPromptSet. forget: a ForgetPromptSet, or one per
        concept (several concepts forgotten in one run; `target_names` names them, `weights` sets
        the share of forget rows each gets: equal weights = an exact 1/K share per batch).
    use_neg: (kappa1 fake-train, kappa2 fake-eval, kappa4 teacher) use negatives as CFG uncond.
    guidance: (cfg_train_fake, cfg_eval_fake, cfg_eval_real).
    use_cache=False: the reference's behaviour (every network's prompt list encoded separately, no
        cache); same RNG consumption and the same conditions, for equivalence tests.
    """

    def __init__(self, cache, remain: RemainPromptSet, forget: ForgetPromptSet,
                 use_neg=(False, False, True), sid_w_neg: bool = False, sg_w_override: bool = False,
                 context_dropout: float = 0.1, guidance=(1.0, 1.0, 1.0), use_cache: bool = True,
                 seed: int = 0, target_names: list[str] | None = None, weights: list[float] | None = None):
        self.forget_sets = list(forget) if isinstance(forget, (list, tuple)) else [forget]
        forget = self.forget_sets[0]  # negatives and keywords are shared by all concepts
        self.target_names = list(target_names or [f.concept_to_forget or "forget" for f in self.forget_sets])
        self.weights = list(weights) if weights else [1.0] * len(self.forget_sets)
        if len(self.target_names) != len(self.forget_sets) or len(self.weights) != len(self.forget_sets):
            raise ValueError("one target name and one weight per forget prompt set")
        if sid_w_neg and not forget.has_neg:
            raise ValueError("prompts.sid_w_neg needs negative prompts (prompts.neg_file)")
        self.cache = cache
        self.remain = remain
        self.forget = forget
        self.use_neg = tuple(bool(u) for u in use_neg)
        self.sid_w_neg = bool(sid_w_neg)
        self.sg_w_override = bool(sg_w_override)
        self.guidance = tuple(float(g) for g in guidance)
        # reference: context dropout only when the fake score is ever guided
        self.dropout = float(context_dropout) if (self.guidance[0] != 1 or self.guidance[1] != 1) else 0.0
        self.use_cache = use_cache
        # Prompt picks are host decisions (strings). Drawing them from a CUDA generator would need a
        # device->host copy (a sync) every draw, so on an accelerator they come from this CPU
        # generator instead; the trainer checkpoints its state (rng_state / set_rng_state).
        # On CPU the trainer's own generator is used, so one stream drives the whole run.
        self.host_rng = torch.Generator("cpu").manual_seed(seed + 7919)
        self.last_prompts: dict[str, list[str]] = {}
        if use_cache:
            cache.pin([p for f in self.forget_sets for p in f.all_prompts()])

    # -- prompts (strings) ---------------------------------------------------------------------------
    def draw_prompts(self, n_remain: int, n_forget: int, rng: torch.Generator, phase: str) -> dict:
        """The conditioning table as strings, one list of n_remain + n_forget per role.

        RNG order (fixed, so a run replays exactly): remain prompts, remain negatives (sid_w_neg),
        forget triples, dropout flags (fake-score phase with dropout on)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if rng.device.type != "cpu":
            rng = self.host_rng  # no device->host sync for string choices
        with host_side():  # every tensor below is on the host (a CPU generator's draws)
            return self._draw_prompts(n_remain, n_forget, rng, phase)

    def _draw_prompts(self, n_remain: int, n_forget: int, rng: torch.Generator, phase: str) -> dict:
        remain = self.remain.sample(n_remain, rng) if n_remain else []
        remain_neg = self._sample_negatives(n_remain, rng) if (self.sid_w_neg and n_remain) else None
        forget, override, neg, target = self._sample_forget(n_forget, rng)
        n = n_remain + n_forget

        gen = remain + forget
        fake = remain + (override if self.sg_w_override else forget)
        teacher = remain + override
        neg_rows = (remain_neg if remain_neg is not None else [""] * n_remain) + \
                   (neg if neg is not None else [""] * n_forget)
        has_neg_row = [remain_neg is not None] * n_remain + [neg is not None] * n_forget

        if phase == "fake_score" and self.dropout > 0 and n:
            drop = (torch.rand(n, generator=rng, device=rng.device) < self.dropout).tolist()
            gen = ["" if d else p for p, d in zip(gen, drop)]
            fake = ["" if d else p for p, d in zip(fake, drop)]
            neg_rows = ["" if d else p for p, d in zip(neg_rows, drop)]

        k = 0 if phase == "fake_score" else 1
        fake_uncond = [nr if (self.use_neg[k] and h) else "" for nr, h in zip(neg_rows, has_neg_row)]
        teacher_uncond = [nr if (self.use_neg[2] and h) else "" for nr, h in zip(neg_rows, has_neg_row)]
        fake_guidance = self.guidance[0] if phase == "fake_score" else self.guidance[1]
        return {
            "generator": gen, "fake": fake, "teacher": teacher,
            "fake_uncond": fake_uncond if fake_guidance != 1 else None,
            "teacher_uncond": teacher_uncond if self.guidance[2] != 1 else None,
            "is_forget": [False] * n_remain + [True] * n_forget,
            "target": [-1] * n_remain + target,
        }

    def _sample_forget(self, n: int, rng: torch.Generator):
        """(forget, override, neg or None, target index) lists for n forget rows across the concepts.
        One concept: exactly the single-concept draws (no extra RNG use)."""
        if not n:
            return [], [], None, []
        if len(self.forget_sets) == 1:
            return (*self.forget.sample(n, rng), [0] * n)
        target = forget_row_targets(n, self.weights, rng, rng.device).tolist()
        forget, override, neg = [""] * n, [""] * n, ([""] * n if self.forget.has_neg else None)
        for k, prompt_set in enumerate(self.forget_sets):
            rows = [i for i, t in enumerate(target) if t == k]
            if not rows:
                continue
            f, o, ng = prompt_set.sample(len(rows), rng)
            for j, i in enumerate(rows):
                forget[i], override[i] = f[j], o[j]
                if neg is not None:
                    neg[i] = ng[j]
        return forget, override, neg, target

    def rng_state(self) -> torch.Tensor:
        return self.host_rng.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.host_rng.set_state(state)

    def _sample_negatives(self, n: int, rng: torch.Generator) -> list[str]:
        negs = self.forget.neg_prompts
        idx = torch.randint(len(negs), (n,), generator=rng, device=rng.device).tolist()
        return [negs[i] for i in idx]

    # -- embeddings ----------------------------------------------------------------------------------
    def encode_roles(self, prompts: dict, device) -> dict:
        """{role: (B, 77, D) tensor or None}: each distinct string encoded once for all roles."""
        roles = ("generator", "fake", "teacher", "fake_uncond", "teacher_uncond")
        if not self.use_cache:  # reference behaviour: one encoder pass per role, nothing shared
            return {r: (self.cache.encode_uncached(prompts[r]).to(device) if prompts[r] is not None else None)
                    for r in roles}
        remain_set = set(prompts["generator"][:prompts["is_forget"].count(False)])
        remain_set |= set(prompts["teacher"][:prompts["is_forget"].count(False)])
        fixed, fresh = [], []
        for r in roles:
            if prompts[r] is None:
                continue
            for p in prompts[r]:
                (fresh if (p in remain_set and p != "") else fixed).append(p)
        fixed, fresh = list(dict.fromkeys(fixed)), list(dict.fromkeys(fresh))
        tables, index = [], {}
        if fixed:  # pinned (forget/override/neg/"") or LRU (keyword-augmented forget prompts)
            tables.append(self.cache.encode(fixed, cache=True))
            index.update({p: i for i, p in enumerate(fixed)})
        if fresh:  # remain captions: the cache's bounded LRU (hits skip the encoder; misses encoded once)
            off = len(index)
            tables.append(self.cache.encode(fresh, cache=True))
            index.update({p: off + i for i, p in enumerate(fresh)})
        table = (torch.cat(tables) if len(tables) > 1 else tables[0]).to(device)
        out, seen = {}, {}
        for r in roles:
            if prompts[r] is None:
                out[r] = None
                continue
            key = tuple(prompts[r])
            if key not in seen:  # identical row lists share one tensor
                rows = host_to_device([index[p] for p in prompts[r]], torch.long, table.device)
                seen[key] = table.index_select(0, rows)
            out[r] = seen[key]
        return out

    def draw(self, n_remain: int, n_forget: int, rng: torch.Generator, device, phase: str) -> PhaseConditions:
        prompts = self.draw_prompts(n_remain, n_forget, rng, phase)
        self.last_prompts = prompts
        e = self.encode_roles(prompts, device)
        is_forget = torch.arange(n_remain + n_forget, device=device) >= n_remain
        target = host_to_device(prompts["target"], torch.long, device)  # pinned, non_blocking: no sync
        return PhaseConditions(e["generator"], e["fake"], e["teacher"], e["fake_uncond"], e["teacher_uncond"],
                               is_forget, target)
