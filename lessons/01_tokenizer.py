# %% [markdown]
# # Lesson 01 · The tokenizer: from text to the ids that CLIP reads
#
# Stable Diffusion never sees letters. Its text encoder (lesson 02) reads a row of integers, one per
# *token*, and looks each one up in a table of vectors. The tokenizer decides what the tokens are.
# SD 1.x uses CLIP's tokenizer (Radford et al. 2021, arXiv 2103.00020, Sec. 2.4: "a lower-cased
# byte pair encoding (BPE) representation of the text with a 49,152 vocab size").
#
# BPE (Sennrich et al. 2016, arXiv 1508.07909, Algorithm 1) starts from single characters and learns *merges*: count
# every adjacent pair of symbols in a corpus, glue the most frequent pair into one new symbol, and
# repeat. Frequent words end up as one token, rare words as a few pieces, and nothing is ever unknown
# because the pieces bottom out in the 256 byte values. CLIP adds two details: a word's last symbol
# carries an end-of-word mark `</w>` (so `star</w>` at the end of a word differs from `star` inside
# `starfish`), and "the text sequence is bracketed with [SOS] and [EOS] tokens" (Sec. 2.4): a start
# token and an end token.
#
# This is also where textual inversion begins: the learned word `S*` is a *placeholder* token that
# the vocabulary did not have, so that it gets an id of its own and, later, a vector of its own.
#
# Steps (3, 4 and 5 end by matching a reference):
# 1. text -> bytes -> printable characters (CLIP's byte-to-unicode table)
# 2. text -> words (CLIP's regex), the last character of each marked `</w>`
# 3. learn merges on the toy world's captions, by hand -> equal to `minti.toy.bpe.train_bpe`
# 4. encode with the merges, by hand -> equal to `Tokenizer.encode`
# 5. CLIP's real vocabulary -> the known ids of "a photo of a cat" (needs the open_clip package,
#    which requirements.txt does not install: without it the lesson says that it skipped this check)
# 6. a placeholder is one token
# 7. SD's 77 positions: truncate keeping the end token, pad with the end token
#
# Run: `python lessons/01_tokenizer.py` (a few seconds). The picture goes to `lessons/out/`.

# %%
import argparse
import os
import sys
import textwrap
from collections import Counter
from pathlib import Path

parser = argparse.ArgumentParser(
    description="Lesson 01: CLIP's byte-level BPE tokenizer, learned and applied by hand.",
    epilog="No options: the lesson has one mode (MINTI_FAST=1 changes nothing here). Environment: "
           "MINTI_REQUIRE_OPTIONAL=1 makes the lesson fail, instead of skipping step 5, when CLIP's "
           "vocabulary (shipped with the open_clip package) is not installed. Pictures go to lessons/out/.")
parser.parse_known_args()  # known only: a notebook kernel passes arguments of its own

import matplotlib

matplotlib.use("Agg")  # write PNGs; no window needed
import matplotlib.pyplot as plt
import regex

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # script or notebook
sys.path.insert(0, str(HERE.parent))  # so that `import minti` finds the repository's minti/
OUT = HERE / "out"
OUT.mkdir(exist_ok=True)
REQUIRE_OPTIONAL = os.environ.get("MINTI_REQUIRE_OPTIONAL") == "1"


def show(*parts):
    """print, wrapped at 100 characters: the token lists of this lesson are long."""
    print(textwrap.fill(" ".join(str(p) for p in parts), 100, subsequent_indent="    "))


from minti.toy import world as toyworld
from minti.tokenizer import BYTE_TO_CHAR, WORD_PATTERN, Tokenizer, normalize_like_transformers
from minti.io.tokenizer_files import clip_tokenizer
from minti.toy.bpe import train_bpe

# %% [markdown]
# ## Step 1: bytes, and a printable character for each
#
# Byte-level BPE works on the UTF-8 bytes of the text, so any string, in any script, with emoji, can
# be encoded. But the vocabulary and merges files are text files with one space-separated merge per
# line, so each byte is first given a printable stand-in: printable Latin-1 bytes stand for
# themselves, the 68 others (space, control characters...) move to U+0100 and up.

# %%
for text in ["star", "café"]:
    data = text.encode("utf-8")
    print(f"{text!r}: bytes {list(data)} -> symbols {[BYTE_TO_CHAR[b] for b in data]}")
print(f"byte 0x20 (space) is written {BYTE_TO_CHAR[0x20]!r}; byte 0x0A (newline) is {BYTE_TO_CHAR[0x0A]!r}")
# 'é' is two bytes in UTF-8, so it is two symbols, 'Ã' and '©': a word BPE never saw still encodes.

# %% [markdown]
# ## Step 2: words
#
# CLIP lower-cases the text and cuts it into words with one regular expression: contractions, runs
# of letters, single digits, runs of other symbols. Whitespace matches nothing and disappears: CLIP's
# tokens carry no spaces; the `</w>` mark remembers where a word ended. BPE never merges across
# words.

# %%
print("CLIP's word pattern:", WORD_PATTERN)
sample = "A photo of 2 STRIPED stars, isn't it?"
print(regex.findall(WORD_PATTERN, normalize_like_transformers(sample)))


def words(text):
    """The words of text, as BPE sees them: lower-cased, cut by the regex, bytes as symbols."""
    return ["".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))
            for word in regex.findall(WORD_PATTERN, normalize_like_transformers(text))]


# The corpus: captions of the toy world, the synthetic scenes minti's toy model (a tiny SD, lesson 08)
# is trained on.
captions = [c for c in toyworld.caption_corpus(2000, seed=0) if c]  # ~10% are empty (lesson 07's guidance)
show(len(captions), "captions, e.g.", captions[:3])
word_counts = Counter(word for text in captions for word in words(text))
show(len(word_counts), "distinct words:", dict(word_counts.most_common(6)), "...")

# %% [markdown]
# ## Step 3: learn the merges
#
# Every word starts as its characters, the last one marked: `star` is `s t a r</w>`. Then, over and
# over: count each adjacent pair of symbols, weighting a word by how often it occurs; the most
# frequent pair becomes a merge and a new token. Ties go to the pair that sorts first, so the result
# depends only on the counts. Stop when every word is a single token (or the vocabulary is full).


# %%
def merge(word, pair):
    """word (a tuple of symbols) with each occurrence of pair glued into one symbol, left to right."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(word_counts):
    split = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in word_counts.items()}  # symbols -> count
    merges = []
    while True:
        pairs = Counter()
        for symbols, n in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:  # every word is one symbol
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # most frequent; ties: first in order
        merges.append(best)
        split = {merge(symbols, best): n for symbols, n in split.items()}


my_merges = learn_merges(word_counts)
show(len(my_merges), "merges; the first ten:", my_merges[:10])
whole = [m for m in my_merges if m[1].endswith("</w>") and "".join(m)[:-4] in toyworld.VOCABULARY]
show("the first merges that complete a whole word:", ["".join(m) for m in whole[:5]])

# %% [markdown]
# minti's trainer (`train_bpe`, used to make the toy model's vocabulary) does the same, counting
# pairs incrementally. It lays the vocabulary out as CLIP does: the 256 byte symbols, the same 256
# with `</w>`, one token per merge, then the start and end tokens. A vocabulary size above what the
# corpus needs lets it run until every word is one token, as ours did.

# %%
tok = train_bpe(captions, vocab_size=2000)
print(f"minti's trainer: {len(tok.merges)} merges, {len(tok)} tokens "
      f"(512 byte symbols + {len(tok) - 514} merged tokens + start + end)")
assert tok.merges == my_merges, "our merges differ from train_bpe's"

# %% [markdown]
# The picture: how many tokens a caption takes as merges are learned. It starts at about one token
# per character and ends at one token per word.


# %%
def with_merges(tok, k):
    """The same vocabulary, using only the first k merges."""
    return Tokenizer(tok.vocab, tok.merges[:k])


ks = list(range(0, len(tok.merges) + 1, 5)) + [len(tok.merges)]
per_caption = [sum(len(with_merges(tok, k).encode(c)) - 2 for c in captions[:300]) / 300 for k in ks]
words_per_caption = sum(len(regex.findall(WORD_PATTERN, c)) for c in captions[:300]) / 300
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(ks, per_caption, marker=".")
ax.axhline(words_per_caption, color="gray", linestyle="--",
           label=f"words per caption ({words_per_caption:.1f})")
ax.set_xlabel("merges learned")
ax.set_ylabel("tokens per caption")
ax.set_title("BPE on the toy captions")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "01_bpe_merges.png", dpi=100)
show(f"tokens per caption: {per_caption[0]:.1f} with no merges, {per_caption[-1]:.1f} with all "
      f"-> lessons/out/01_bpe_merges.png")

# %% [markdown]
# ## Step 4: encode with the merges
#
# To encode a word, start from its marked characters and keep applying the merge that was learned
# *earliest* (lowest rank) among the adjacent pairs present, until none applies. Then look the
# symbols up in the vocabulary and add the start and end tokens. A word the corpus never had still
# encodes, in pieces.


# %%
def bpe(word, ranks):
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == float("inf"):
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def encode(tok, text):
    ranks = {pair: rank for rank, pair in enumerate(tok.merges)}
    ids = [tok.bos_id]
    for word in words(text):
        ids += [tok.vocab[p] for p in bpe(word, ranks)]
    return ids + [tok.eos_id]


for text in ["a photo of a striped orange star", "a photo of a cat", "a zebra, please"]:
    ids = encode(tok, text)
    show(f"{text!r}: {[tok.id_to_token[i] for i in ids]}")
    assert ids == tok.encode(text), "our encoding differs from Tokenizer.encode"
# ids 0-511 are the same in every CLIP-style vocabulary: one-letter words such as 'a' (id 320) keep
# their id in CLIP's real vocabulary too.

# %% [markdown]
# ## Step 5: CLIP's real vocabulary
#
# SD 1.x's tokenizer is the same algorithm with 48,894 merges learned by OpenAI on web text. The
# released vocabulary has 49,408 tokens: the 256 byte symbols, the same 256 with `</w>`, one per
# merge, and the start and end tokens, ids 49406 and 49407. (The paper's "49,152" is 256 + 48,894 +
# 2: it does not count the `</w>` copies.) The file ships with the `open_clip` package, which this
# project's requirements.txt does not install: with it, encode the classic prompt and compare with
# the ids every SD 1.x pipeline produces for it; without it, the lesson says plainly that this check
# did not run (`MINTI_REQUIRE_OPTIONAL=1` turns the skip into a failure, as the project's test does).

# %%
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" in every SD 1.x pipeline
try:
    clip = clip_tokenizer()
except FileNotFoundError as missing:
    if REQUIRE_OPTIONAL:
        raise SystemExit(f"MINTI_REQUIRE_OPTIONAL=1 and step 5 cannot run: {missing}")
    clip = None
    show("SKIPPED: step 5's check (CLIP's real ids for 'a photo of a cat') did NOT run, because CLIP's "
         "vocabulary file is not installed. To run it: `pip install --no-deps open-clip-torch` "
         "(the file only; no torchvision needed), then run this lesson again.")
if clip is not None:
    show(f"CLIP: {len(clip)} tokens, {len(clip.merges)} merges; its first merges: {clip.merges[:6]}")
    for text in ["a photo of a cat", "textual inversion", "café 🙂"]:
        show(f"  {text!r}: {[clip.id_to_token[i] for i in clip.encode(text)]}")
    assert len(clip) == 256 + 256 + len(clip.merges) + 2 == 49408 and len(clip.merges) == 48894
    assert encode(clip, "a photo of a cat") == clip.encode("a photo of a cat") == CAT_IDS

# %% [markdown]
# ## Step 6: a placeholder is one token
#
# Textual inversion needs a word for the new concept. A made-up string such as `<my-star>` would be
# cut into pieces of existing words, each with its own meaning. Added as a placeholder, it is
# matched before BPE runs and becomes one token with a fresh id after the vocabulary. The text
# encoder's table has no row for that id yet: lesson 02 shows how its vector comes in.

# %%
prompt = "a photo of <my-star> on blue"
before = tok.encode(prompt)
new_id = len(tok)
assert tok.add_tokens(["<my-star>"]) == [new_id]
after = tok.encode(prompt)
show("before:", [tok.id_to_token[i] for i in before])
show("after: ", [tok.id_to_token[i] for i in after], "; <my-star> is id", new_id)
assert after.count(new_id) == 1 and len(after) < len(before)

# %% [markdown]
# ## Step 7: always 77 positions
#
# CLIP's released text encoder has 77 positions (the paper, Sec. 2.4: "the max sequence length was
# capped at 76"), and SD 1.x always fills all 77 of them: a long prompt is cut,
# keeping the end token last; a short one is padded **with the end token** (openai/CLIP pads with 0,
# but SD's pipelines pad with the end token, and SD conditions on all 77 outputs, padding included:
# padding with anything else changes the picture).

# %%
long_prompt = " ".join(["a striped orange star"] * 30)
batch = tok([prompt, long_prompt], length=77)
show("batch:", tuple(batch.shape), "; short prompt's row ends with", batch[0, -4:].tolist(),
      "; long prompt's row ends with", batch[1, -3:].tolist(), f"(end token = {tok.eos_id})")
assert batch[0].tolist() == after + [tok.eos_id] * (77 - len(after))
assert batch[1, -1] == tok.eos_id and batch[1, :-1].tolist() == tok.encode(long_prompt)[:76]

# %% [markdown]
# ## Check

# %%
print(f"check passed: hand-written BPE training ({len(my_merges)} merges) and encoding equal minti's "
      "Tokenizer"
      + (";\n  CLIP's 'a photo of a cat' is " + str(CAT_IDS) if clip is not None else
         ";\n  step 5 SKIPPED: CLIP's vocabulary is not installed, its known ids were NOT checked"))

# %% [markdown]
# ## Exercises
#
# 1. Train with a small `vocab_size` (say 540): which words stay in pieces, and why those?
# 2. `Tokenizer(..., cleanup="clip")` reproduces openai/CLIP, which runs ftfy and unescapes HTML
#    first. Find a prompt whose ids differ between the two cleanups (hint: `&amp;`).
# 3. With CLIP's vocabulary: how many tokens do "sks", "<sks>" and your own name take? Why do
#    DreamBooth users pick rare short words, and why does textual inversion not need to?
#
# Solutions: `python lessons/solutions/01_tokenizer.py` prints "solved" when its asserts hold; run
# the same asserts on your own answers: (1) `len(merges) == vocab_size - 514`, and the words left
# whole occur at least as often as the median word left in pieces; (2) the "clip" cleanup of
# `salt &amp; pepper` equals the default cleanup of `salt & pepper`; (3) "sks" is 1 token, "<sks>"
# 3, and 1 once added as a placeholder.
