"""Prompt files and prompt sets for Stable Diffusion SFD (reference: SFD:SD/training/dataset.py
`ForgetPromptDataset`, training/aesthetics_dataset.py).

All randomness comes from a `torch.Generator` passed by the caller (no numpy, no global RNG), and
every draw is one vectorised call per batch, so a run is reproducible from its generator state.

Differences from the reference (deliberate):
  * pairs are drawn uniformly with replacement (the reference's InfiniteSampler shuffles with a
    window; both are uniform in distribution);
  * blank lines are dropped by `read_prompt_file` (the reference keeps them as "" prompts);
  * `concept_to_override=None` is a clear error instead of an assert inside the data loader
    (except for concept "" as in the nudity setting, where override = forget prompt);
  * the concept is matched literally (regex-escaped), case-insensitively; a "|" in the concept
    still separates alternatives, as the reference's raw regex did ("brad pitt|bradley pitt").
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch

REMAIN_FILES = ("aesthetics_6_plus.txt", "aesthetics_625_plus.txt", "aesthetics_65_plus.txt")


def read_prompt_file(path, what: str = "prompts", max_lines: int | None = None) -> list[str]:
    """One prompt per line, right-stripped; blank lines skipped. `what` names the file's role
    ("forget prompts", "negative prompts", ...) in errors. max_lines truncates (reference max_size)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {str(p)!r} does not exist (expected a text file with one prompt per line)")
    try:
        lines = [ln.rstrip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {str(p)!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                         "save it as UTF-8") from None
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise ValueError(f"{what} file {str(p)!r} is empty (expected one prompt per line)")
    return prompts[:max_lines] if max_lines else prompts


def read_remain_prompts(path) -> list[str]:
    """Remain prompts: a file, or a directory holding the first existing of aesthetics_6_plus.txt,
    aesthetics_625_plus.txt, aesthetics_65_plus.txt (the reference's --data_prompt_text)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in REMAIN_FILES:
            if (p / name).is_file():
                return read_prompt_file(p / name, "remain prompts")
        raise FileNotFoundError(f"remain-prompt directory {str(p)!r} holds none of {', '.join(REMAIN_FILES)}")
    return read_prompt_file(p, "remain prompts")


def concept_pattern(concept: str) -> re.Pattern:
    """Case-insensitive literal pattern for `concept`; "|" separates alternative spellings."""
    alts = [re.escape(a) for a in concept.split("|")]
    return re.compile("|".join(alts), flags=re.IGNORECASE)


def _randint(high: int, n: int, generator: torch.Generator) -> list[int]:
    # On the generator's device (the trainer's generator may be a CUDA one); .tolist() is the one
    # host sync per draw that picking strings needs.
    return torch.randint(high, (n,), generator=generator, device=generator.device).tolist()


class RemainPromptSet:
    """Remain (retain) prompts, drawn uniformly with replacement."""

    def __init__(self, prompts: list[str]):
        prompts = list(prompts)
        if not prompts:
            raise ValueError("RemainPromptSet needs at least one prompt")
        self.prompts = prompts

    @classmethod
    def from_path(cls, path) -> "RemainPromptSet":
        return cls(read_remain_prompts(path))

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        return [self.prompts[i] for i in _randint(len(self.prompts), n, generator)]


class ForgetPromptSet:
    """(forget, override[, negative]) prompt triples for the forget branches.

    forget_prompts: prompts containing the concept; None -> the concept itself (its "|"-split list).
    concept_to_forget / concept_to_override: override prompt = forget prompt with every
        case-insensitive occurrence of the concept replaced by the override (zip, 1:1 pairs).
    override_prompts: if given, pairs are the Cartesian product forget x override instead.
    pos_keywords: each sampled *forget* prompt gets one random keyword, "kw prompt" or
        "prompt, kw" with probability 0.5 each; the override prompt is left as is (reference).
    neg_prompts: one random negative per row (the CFG "uncond" branch where use_neg applies).
    val_prompts: only for the snapshot grid (`grid_prompts`), never sampled for training.
    """

    def __init__(self, forget_prompts: list[str] | None, concept_to_forget: str | None,
                 concept_to_override: str | None = None, override_prompts: list[str] | None = None,
                 pos_keywords: list[str] | None = None, neg_prompts: list[str] | None = None,
                 val_prompts: list[str] | None = None):
        if forget_prompts is None:
            if not concept_to_forget:
                raise ValueError("no forget prompts: give a forget prompt file or concept_to_forget")
            forget_prompts = concept_to_forget.split("|")
        forget_prompts = list(forget_prompts)
        if not forget_prompts:
            raise ValueError("forget prompt list is empty")
        self.forget_prompts = forget_prompts
        self.concept_to_forget = concept_to_forget
        self.concept_to_override = concept_to_override

        if override_prompts is not None:
            override_prompts = list(override_prompts)
            if not override_prompts:
                raise ValueError("override prompt list is empty")
            self.pairs = list(itertools.product(forget_prompts, override_prompts))
        else:
            self.pairs = list(zip(forget_prompts, self._substitute(forget_prompts)))
        self.override_prompts = list(dict.fromkeys(o for _, o in self.pairs))
        self.pos_keywords = list(pos_keywords) if pos_keywords else []
        self.neg_prompts = list(neg_prompts) if neg_prompts else []
        self.val_prompts = list(val_prompts) if val_prompts else []

    def _substitute(self, forget_prompts: list[str]) -> list[str]:
        concept, override = self.concept_to_forget, self.concept_to_override
        if concept is None:
            raise ValueError("concept_to_forget is required to build override prompts when no "
                             "override prompt file is given")
        if concept == "":
            # Nudity-style setting ("" -> ""): the teacher sees the forget prompt itself.
            if override:
                raise ValueError("concept_to_forget is empty but concept_to_override is "
                                 f"{override!r}: an empty concept cannot be substituted")
            return list(forget_prompts)
        if override is None:
            raise ValueError(f"concept_to_override is required to replace {concept!r} in the forget "
                             f"prompts (or give an override prompt file); e.g. 'a middle aged man'")
        pat = concept_pattern(concept)
        hits = [bool(pat.search(p)) for p in forget_prompts]
        if not any(hits):
            raise ValueError(f"concept_to_forget {concept!r} occurs in none of the "
                             f"{len(forget_prompts)} forget prompts (case-insensitive), so no "
                             f"override prompt would differ from its forget prompt; check the "
                             f"concept spelling or the forget prompt file")
        # A lambda replacement inserts `override` literally (no backslash/group processing).
        return [pat.sub(lambda _m: override, p) for p in forget_prompts]

    @classmethod
    def from_files(cls, forget_path=None, concept_to_forget=None, concept_to_override=None,
                   override_path=None, pos_path=None, neg_path=None, val_path=None,
                   max_size: int | None = 10000) -> "ForgetPromptSet":
        """Build from prompt files (the reference's --*_data_prompt_text options)."""
        rd = lambda p, what, m=None: read_prompt_file(p, what, m) if p else None  # noqa: E731
        return cls(rd(forget_path, "forget prompts", max_size), concept_to_forget, concept_to_override,
                   rd(override_path, "override prompts"), rd(pos_path, "positive keywords"),
                   rd(neg_path, "negative prompts"), rd(val_path, "validation prompts"))

    @classmethod
    def from_config(cls, pr) -> "ForgetPromptSet":
        """From a config.PromptsConfig ("" = not given). An empty concept_to_override with a
        non-empty concept and no override file is an error (nothing to substitute)."""
        override = pr.concept_to_override if (pr.concept_to_override or not pr.concept_to_forget) else None
        return cls.from_files(pr.forget_file or None, pr.concept_to_forget, override,
                              pr.override_file or None, pr.pos_file or None, pr.neg_file or None,
                              pr.val_file or None)

    @property
    def has_neg(self) -> bool:
        return bool(self.neg_prompts)

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, n: int, generator: torch.Generator):
        """-> (forget, override, neg_or_None): lists of n strings (neg None without negatives)."""
        idx = _randint(len(self.pairs), n, generator)
        forget = [self.pairs[i][0] for i in idx]
        override = [self.pairs[i][1] for i in idx]
        if self.pos_keywords:
            kw = _randint(len(self.pos_keywords), n, generator)
            front = (torch.rand(n, generator=generator, device=generator.device) < 0.5).tolist()
            forget = [f"{self.pos_keywords[k]} {p}" if fr else f"{p}, {self.pos_keywords[k]}"
                      for p, k, fr in zip(forget, kw, front)]
        neg = [self.neg_prompts[i] for i in _randint(len(self.neg_prompts), n, generator)] if self.neg_prompts else None
        return forget, override, neg

    def grid_prompts(self, n_forget: int = 8, n_total: int = 16) -> list[str]:
        """Snapshot-grid prompts like the reference: the first n_forget forget prompts (no keyword,
        unshuffled) followed by the validation prompts, n_total at most."""
        return (self.forget_prompts[:n_forget] + self.val_prompts)[:n_total]

    def all_prompts(self) -> list[str]:
        """Every distinct fixed prompt (forget, override, neg, ""), e.g. to pin in the text cache.
        Keyword-augmented forget prompts are not included (they are formed at sample time)."""
        return list(dict.fromkeys(["", *self.forget_prompts, *self.override_prompts, *self.neg_prompts]))


# ---------------------------------------------------------------------------------------------------
# several concepts in one run (prompts.concepts)
# ---------------------------------------------------------------------------------------------------

CONCEPT_KEYS = ("name", "concept_to_forget", "concept_to_override", "forget_file", "override_file",
                "val_file", "weight")


def concept_specs(pr) -> list[dict]:
    """The forget targets of a config.PromptsConfig as dicts with every CONCEPT_KEYS key: the entries
    of `prompts.concepts`, or the single-concept keys as a list of one. A concept without its own
    val_file uses prompts.val_file; `name` (stats, grids, eval) defaults to the concept itself."""
    raw = list(pr.concepts) or [{"concept_to_forget": pr.concept_to_forget,
                                 "concept_to_override": pr.concept_to_override,
                                 "forget_file": pr.forget_file, "override_file": pr.override_file,
                                 "val_file": pr.val_file}]
    specs = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise ValueError(f"prompts.concepts[{i}] must be an object with keys {', '.join(CONCEPT_KEYS)}")
        unknown = sorted(set(c) - set(CONCEPT_KEYS) - {k for k in c if k.startswith("_")})
        if unknown:
            raise ValueError(f"prompts.concepts[{i}] has unknown key(s) {unknown}; known: {', '.join(CONCEPT_KEYS)}")
        spec = {"concept_to_forget": "", "concept_to_override": "", "forget_file": "", "override_file": "",
                "val_file": pr.val_file, "weight": 1.0, **{k: v for k, v in c.items() if not k.startswith("_")}}
        spec["name"] = spec.get("name") or spec["concept_to_forget"] or Path(spec["forget_file"] or f"concept{i}").stem
        specs.append(spec)
    return specs


def forget_sets_from_config(pr) -> tuple[list[ForgetPromptSet], list[str], list[float]]:
    """(one ForgetPromptSet per concept, names, weights); pos / neg prompt files are shared."""
    sets = []
    specs = concept_specs(pr)
    for s in specs:
        override = s["concept_to_override"] if (s["concept_to_override"] or not s["concept_to_forget"]) else None
        sets.append(ForgetPromptSet.from_files(s["forget_file"] or None, s["concept_to_forget"], override,
                                               s["override_file"] or None, pr.pos_file or None,
                                               pr.neg_file or None, s["val_file"] or None))
    return sets, [s["name"] for s in specs], [float(s["weight"]) for s in specs]


def multi_grid_prompts(sets: list[ForgetPromptSet], n_forget: int = 8, n_total: int = 16) -> list[str]:
    """Snapshot-grid prompts, one row block per concept: its first n_forget / K forget prompts, then
    the validation prompts of all concepts. One concept: ForgetPromptSet.grid_prompts."""
    if len(sets) == 1:
        return sets[0].grid_prompts(n_forget, n_total)
    per = max(1, n_forget // len(sets))
    forget = [p for s in sets for p in s.forget_prompts[:per]]
    val = list(dict.fromkeys(p for s in sets for p in s.val_prompts))
    return (forget + val)[:max(n_total, len(forget))]
