"""Solutions to lesson 01's exercises (run: python lessons/solutions/01_tokenizer.py)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from minti.io.tokenizer_files import clip_tokenizer
from minti.toy.bpe import train_bpe
from minti.toy import world

captions = [c for c in world.caption_corpus(2000, seed=0) if c]

# 1. A small vocabulary: 540 = 512 byte symbols + 26 merges + start + end. The merges go to the most
# frequent pairs first, so the words that stay in pieces are the rare ones: the longer colour,
# pattern and shape names that few captions use, while "a", "of", "photo" are whole early.
small = train_bpe(captions, vocab_size=540)
pieces = {w: len(small.encode(w)) - 2 for w in sorted(world.VOCABULARY)}
broken = sorted((w for w, n in pieces.items() if n > 1), key=lambda w: -pieces[w])
counts = {w: sum(c.split().count(w) for c in captions) for w in world.VOCABULARY}
print(f"1. vocab 540: {len(small.merges)} merges; {len(broken)} of {len(pieces)} words stay in pieces")
print("   most pieces:", ", ".join(f"{w} ({pieces[w]})" for w in broken[:6]))
whole = [w for w in pieces if pieces[w] == 1]
median_broken = sorted(counts[w] for w in broken)[len(broken) // 2]
print(f"   whole words appear >= {min(counts[w] for w in whole)} times in the corpus; the median broken "
      f"word {median_broken} times")
assert len(small.merges) == 540 - 512 - 2 and broken and whole, "26 merges: some words whole, some not"
assert min(counts[w] for w in whole) >= median_broken, "the whole words should be the frequent ones"

# 2. The two cleanups differ where html unescaping or ftfy changes the text: "&amp;" is "&" to CLIP.
# 3. Rare strings cost several tokens in CLIP's vocabulary; a placeholder added to it costs one.
# Both need CLIP's vocabulary, from the open_clip package (not in requirements.txt).
try:
    transformers_tok, clip_tok = clip_tokenizer("transformers"), clip_tokenizer("clip")
except FileNotFoundError as missing:
    if os.environ.get("MINTI_REQUIRE_OPTIONAL") == "1":
        raise SystemExit(f"MINTI_REQUIRE_OPTIONAL=1 and exercises 2-3 cannot run: {missing}")
    transformers_tok = clip_tok = None
    print("2-3. SKIPPED, NOT checked: they need CLIP's vocabulary (`pip install --no-deps open-clip-torch`)")
if clip_tok is not None:
    text = "salt &amp; pepper"
    a, b = transformers_tok.encode(text), clip_tok.encode(text)
    print(f"2. {text!r}:\n   transformers cleanup {a}\n   clip cleanup         {b}")
    assert a != b
    assert b == transformers_tok.encode("salt & pepper"), "the clip cleanup reads '&amp;' as '&'"
    lengths = {s: len(clip_tok.encode(s)) - 2 for s in ("sks", "<sks>", "ada lovelace")}
    for s, n in lengths.items():
        print(f"3. {s!r}: {n} token" + "s" * (n != 1))
    placeholder = clip_tok.add_tokens(["<sks>"])[0]
    print(f"   added as a placeholder, '<sks>' is 1 token (id {placeholder})")
    assert lengths["sks"] == 1 and lengths["<sks>"] == 3, "'sks' is one rare token; '<', 'sks', '>'"
    assert clip_tok.encode("<sks>") == [clip_tok.bos_id, placeholder, clip_tok.eos_id]
    print("   DreamBooth reuses an existing rare token (its old meaning is weak, so fine-tuning can")
    print("   overwrite it); textual inversion adds a new token with its own vector, so it needs none.")
print("solved")
