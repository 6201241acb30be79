"""A tiny, randomly initialised Stable Diffusion pipeline folder for tests and CPU smoke runs.

`build_tiny_sd(out_dir)` writes a diffusers folder (model_index.json, unet/, text_encoder/,
tokenizer/, vae/, scheduler/) that `diffusers.StableDiffusionPipeline.from_pretrained(out_dir)` and
`sfd_fast.sd.loading.load_stable_diffusion(out_dir)` both load. Nothing is downloaded.

Geometry mirrors SD1.5 where it matters to the engine:
  * text embeddings are (B, 77, D) (D = 32 here instead of 768);
  * latents have 4 channels and the VAE downsamples by 8 (4 VAE blocks), so `sample_size=16`
    latents decode to 128x128 pixels; the VAE scaling factor is SD's 0.18215;
  * the scheduler config is SD1.5's (scaled_linear 0.00085 -> 0.012, T = 1000, clip_sample False).

The tokenizer is a real CLIP byte-level BPE (same normaliser / pre-tokeniser / `</w>` suffix as
openai/clip-vit-large-patch14) with a small vocabulary: the 256 byte symbols (+ their `</w>`
word-final forms), merges learnt on a built-in word list plus every `*.txt` prompt file shipped in
`configs/prompts/` (so the shipped prompts tokenize into whole words and fit in 77 tokens), and the
two special tokens. Unknown words fall back to byte/character tokens, never to `<unk>` for ASCII.

CLI:  python -m sfd_fast.sd.tiny OUT_DIR [--prediction v_prediction] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import torch

SD15_SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
    clip_sample=False,
    steps_offset=1,
    trained_betas=None,
    variance_type="fixed_small",
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# A generic English word list so that prompts outside the shipped files still tokenize into words
# more often than not (character fallback covers the rest).
_BASE_TEXT = """
a an the of in on at by with and or for to from into over under near behind above below
photo photograph picture image portrait painting drawing sketch illustration render poster art
style detailed high quality resolution sharp focus realistic photorealistic cinematic lighting
man woman boy girl child person people face smiling sitting standing walking running wearing
holding looking playing reading red blue green yellow black white grey gray orange purple pink
brown golden dark bright light small large big tiny old young new beautiful cute happy sad
cat dog horse bird fish car house tree flower city street forest mountain river lake sea ocean
beach sky sun moon night day morning evening sunset sunrise rain snow cloud clouds water fire
nude naked nudity nsfw sexual explicit topless clothed dressed background studio 4k 8k hd
""".split()


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP bytes_to_unicode: 256 printable symbols, one per byte, in CLIP's vocab order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _byte_encoder() -> dict[int, str]:
    """byte value -> its CLIP symbol (the alphabet above is in vocab order, not byte order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    rest = [b for b in range(256) if b not in bs]
    return dict(zip(bs + rest, _byte_alphabet()))


def shipped_prompt_dir() -> Path:
    """`configs/prompts/` of the source checkout (may not exist in an installed package)."""
    return Path(__file__).resolve().parents[2] / "configs" / "prompts"


def _corpus(extra_texts=()) -> list[str]:
    texts = [" ".join(_BASE_TEXT)]
    d = shipped_prompt_dir()
    if d.is_dir():
        for f in sorted(d.glob("*.txt")):
            texts.extend(f.read_text(encoding="utf-8", errors="replace").splitlines())
    texts.extend(extra_texts)
    return texts


_PRETOKEN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+""")


def _corpus_words(texts) -> dict[tuple[str, ...], int]:
    """Word -> frequency, words as CLIP symbol tuples ('a', 'b', 'c</w>') after CLIP's normalising.

    Mirrors CLIP's pre-tokeniser for ASCII text (lowercase, letters runs, single digits, punctuation
    runs, contractions) and maps bytes through CLIP's byte alphabet.
    """
    byte_to_sym = _byte_encoder()
    words: dict[tuple[str, ...], int] = {}
    for text in texts:
        text = re.sub(r"\s+", " ", text).lower()
        for w in _PRETOKEN.findall(text):
            sym = [byte_to_sym[b] for b in w.encode("utf-8")]
            sym[-1] += "</w>"
            key = tuple(sym)
            words[key] = words.get(key, 0) + 1
    return words


def build_clip_bpe(extra_texts=()) -> tuple[dict[str, int], list[str]]:
    """Learn a small CLIP-compatible BPE (vocab, merges) on the built-in corpus; deterministic.

    Plain BPE training (most frequent adjacent pair first, ties broken lexicographically) until every
    corpus word is one symbol. BPE encoding replays the merges in rank order, so each corpus word
    encodes to exactly one token. (The `tokenizers` trainer is not used: its merge order is not
    reproducible across runs.) The vocab is laid out like CLIP's: 256 byte symbols, the same with
    `</w>`, merge results in merge order, then <|startoftext|>, <|endoftext|>.
    """
    words = {w: f for w, f in _corpus_words(_corpus(extra_texts)).items() if len(w) > 1}
    seqs = [list(w) for w in words]
    freqs = list(words.values())
    # Incremental pair statistics: counts and the set of words containing each pair.
    counts: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}

    def add(i, sign):
        s, f = seqs[i], freqs[i]
        for pair in zip(s, s[1:]):
            counts[pair] = counts.get(pair, 0) + sign * f
            if sign > 0:
                where.setdefault(pair, set()).add(i)

    for i in range(len(seqs)):
        add(i, +1)
    merges: list[str] = []
    while True:
        live = [(c, p) for p, c in counts.items() if c > 0]
        if not live:
            break
        best = min(live, key=lambda cp: (-cp[0], cp[1]))[1]
        merges.append(f"{best[0]} {best[1]}")
        joined = best[0] + best[1]
        for i in sorted(where.pop(best, ())):
            add(i, -1)
            s, out, k = seqs[i], [], 0
            while k < len(s):
                if k + 1 < len(s) and (s[k], s[k + 1]) == best:
                    out.append(joined)
                    k += 2
                else:
                    out.append(s[k])
                    k += 1
            seqs[i] = out
            add(i, +1)
        counts.pop(best, None)

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for sym in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(sym, len(vocab))
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for sym in (BOS, EOS):
        vocab.setdefault(sym, len(vocab))
    return vocab, merges


def build_tiny_tokenizer(extra_texts=()):
    """A `CLIPTokenizer` (model_max_length 77) over the small learnt vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = build_clip_bpe(extra_texts)
    with tempfile.TemporaryDirectory() as d:
        _write_vocab_files(Path(d), vocab, merges)
        tok = CLIPTokenizer.from_pretrained(d, model_max_length=77)
    return tok, vocab, merges


def _write_vocab_files(d: Path, vocab: dict[str, int], merges: list[str]) -> None:
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_tiny_sd(out_dir, prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 16,
                  extra_texts=(), block_out_channels: tuple = (32, 64)) -> Path:
    """Write a tiny random SD1.5-shaped pipeline to `out_dir` and return it as a Path.

    prediction_type: "epsilon" or "v_prediction" (stored in scheduler/scheduler_config.json).
    seed: weights are initialised under a forked, seeded torch RNG (global RNG state untouched).
    sample_size: latent side (pixels = 8 * sample_size).
    extra_texts: extra strings whose words are added to the tokenizer's merges.
    block_out_channels: the UNet's two widths (multiples of 16, the GroupNorm groups); wider UNets
        make weights and activations dominate allocator noise (tests/test_memory_peak.py).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab, merges = build_tiny_tokenizer(extra_texts)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4,
            block_out_channels=tuple(block_out_channels), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
            hidden_act="quick_gelu",
        ))
        # 4 blocks -> downsampling factor 2**3 = 8, as SD's VAE.
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
            sample_size=8 * sample_size, scaling_factor=0.18215,
        )
    scheduler = DDPMScheduler(prediction_type=prediction_type, **SD15_SCHEDULER)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    # transformers 5 saves only tokenizer.json; keep the classic files too so older (slow)
    # tokenizers and other tools can read the folder.
    _write_vocab_files(out_dir / "tokenizer", vocab, merges)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a tiny random Stable Diffusion pipeline folder.")
    p.add_argument("out_dir")
    p.add_argument("--prediction", default="epsilon", choices=["epsilon", "v_prediction"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-size", type=int, default=16, help="latent side (pixels = 8x)")
    a = p.parse_args(argv)
    out = build_tiny_sd(a.out_dir, a.prediction, a.seed, a.sample_size)
    print(out)


if __name__ == "__main__":
    main()
