"""A byte-level BPE trainer that learns the toy world's small vocabulary, in CLIP's file layout.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units") on words cut exactly as minti.tokenizer cuts them, so the result is a vocabulary that
minti's `Tokenizer` and transformers' `CLIPTokenizer` both read (CLIP's own 48,894 merges were
learned the same way, on far more text). Lesson 01 retraces it step by step.
"""
from collections import Counter

from ..tokenizer import BOS, EOS, Tokenizer, base_tokens


def _merge(word: tuple, pair: tuple) -> tuple:
    """`word` with every occurrence of `pair` joined into one symbol, left to right."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _count_pairs(pairs: Counter, word: tuple, n: int) -> None:
    """Add n (or remove, n < 0) occurrences of each adjacent pair of `word` to `pairs`."""
    for pair in zip(word, word[1:]):
        pairs[pair] += n
        if pairs[pair] == 0:
            del pairs[pair]


def train_bpe(texts: list[str], vocab_size: int, cleanup: str = "transformers") -> Tokenizer:
    """Learn a BPE vocabulary of at most `vocab_size` tokens from `texts`, in CLIP's layout.

    Words are cut exactly as `encode` cuts them. Then, repeatedly, the adjacent pair of symbols
    seen most often (counting each word as often as it occurs) becomes a merge and a new token;
    ties go to the pair that sorts first, so the result depends only on the word counts. Stops
    at `vocab_size`, or earlier once every word is a single token.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of str")
    base = base_tokens()
    if not isinstance(vocab_size, int) or vocab_size < len(base) + 2:
        raise ValueError(f"vocab_size must be at least {len(base) + 2} (256 bytes, the same with '</w>', "
                         f"BOS and EOS), got {vocab_size!r}")
    pre = Tokenizer({t: i for i, t in enumerate(base + [BOS, EOS])}, [], cleanup)  # cuts words as encode
    counts = Counter(w for text in texts for w in pre.pre_tokenize(text) if isinstance(w, str))
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in sorted(counts.items())}
    pairs = Counter()  # adjacent pair -> how often it occurs, over all words
    for word, n in words.items():
        _count_pairs(pairs, word, n)
    tokens, known, merges = list(base), set(base), []
    while len(tokens) + 2 < vocab_size and pairs:
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        if "".join(best) not in known:  # two merges can make one token ('a'+'bc', 'ab'+'c')
            tokens.append("".join(best))
            known.add(tokens[-1])
        for word in [w for w in words if best[0] in w]:  # only words that hold the pair change
            merged = _merge(word, best)
            if merged != word:
                n = words.pop(word)
                words[merged] = n
                _count_pairs(pairs, word, -n)
                _count_pairs(pairs, merged, n)
    return Tokenizer({t: i for i, t in enumerate(tokens + [BOS, EOS])}, merges, cleanup)
