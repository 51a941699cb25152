"""Solutions to lesson 01's exercises (run: python lessons/solutions/01_tokenizer.py)."""
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
assert min(counts[w] for w in whole) >= sorted(counts[w] for w in broken)[len(broken) // 2], "frequency"
print(f"   whole words appear >= {min(counts[w] for w in whole)} times in the corpus; the median broken "
      f"word {sorted(counts[w] for w in broken)[len(broken) // 2]} times")

# 2. The two cleanups differ where html unescaping or ftfy changes the text: "&amp;" is "&" to CLIP.
try:
    transformers_tok, clip_tok = clip_tokenizer("transformers"), clip_tokenizer("clip")
    text = "salt &amp; pepper"
    a, b = transformers_tok.encode(text), clip_tok.encode(text)
    print(f"2. {text!r}:\n   transformers cleanup {a}\n   clip cleanup         {b}")
    assert a != b
    # 3. Rare strings cost several tokens in CLIP's vocabulary; a placeholder added to it costs one.
    for s in ("sks", "<sks>", "ada lovelace"):
        print(f"3. {s!r}: {len(clip_tok.encode(s)) - 2} tokens")
    print("   DreamBooth reuses an existing rare token (its old meaning is weak, so fine-tuning can")
    print("   overwrite it); textual inversion adds a new token with its own vector, so it needs none.")
except (FileNotFoundError, RuntimeError, ImportError, ValueError) as e:
    print("2-3. need CLIP's vocabulary (pip install open_clip_torch):", str(e)[:60])
print("solved")
