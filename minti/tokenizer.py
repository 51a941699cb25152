"""CLIP's byte-level BPE tokenizer, written from scratch.

Follows openai/CLIP `simple_tokenizer.py` (byte-to-unicode table, CLIP's split regex, BPE with `</w>`
word ends) and reproduces, id for id, the tokenizer Stable Diffusion 1.x users get from diffusers:
transformers' `CLIPTokenizer` (the `tokenizers`-backed one of transformers 5). Adds placeholder
words for textual inversion. Its files (an SD 1.x `tokenizer/` folder, CLIP's bpe .txt.gz) are read
and written in io/tokenizer_files.py; the toy world's small vocabulary is learned in toy/bpe.py.
"""
import html
import unicodedata

import ftfy
import regex
import torch

CONTEXT_LENGTH = 77  # CLIP's text context: SD 1.x always conditions on 77 positions
BOS = "<|startoftext|>"  # CLIP's start token (id 49406 in CLIP's vocabulary)
EOS = "<|endoftext|>"  # CLIP's end token (49407); SD 1.x also pads with it

# CLIP's pre-tokenizer: contractions, runs of letters, single digits, runs of anything else.
# Whitespace matches nothing and so disappears. (`regex`, not `re`: `re` has no \p{L} / \p{N}.)
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SPECIAL_PATTERN = regex.escape(BOS) + "|" + regex.escape(EOS)
WHITESPACE = regex.compile(r"\s+")  # `regex`'s \s is Unicode White_Space, exactly as in `tokenizers`
CLEANUPS = ("transformers", "clip")


def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to one printable unicode character.

    Byte-level BPE works on the UTF-8 bytes of the text, so any string can be encoded and no word is
    ever unknown. But merges.txt and vocab.json are text: their symbols must be strings, and bytes
    such as space, newline or NUL would break the space-separated merges file (and are unreadable).
    So bytes that are printable Latin-1 characters stand for themselves, and the 68 others (control
    characters, space, NBSP, soft hyphen) are moved to U+0100 and up, in order: byte 0x20 (space) is
    'Ġ', 0x0A is 'Ċ'. The insertion order of this dict is the order of ids 0-255 in CLIP's vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    moved = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + moved)
            moved += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def normalize_like_transformers(text: str) -> str:
    """transformers' CLIPTokenizer normalizer: NFC, whitespace runs to one space, lower-case.

    transformers 5 runs no ftfy and no html unescaping. It lower-cases character by character, so a
    final capital sigma becomes 'σ' where Python's str.lower() would give 'ς' (the only
    context-dependent rule in str.lower()). Equal to `tokenizers` for every character in Python's
    Unicode database (14.0 on Python 3.11); characters assigned later may be classified differently.
    """
    text = unicodedata.normalize("NFC", text)
    text = WHITESPACE.sub(" ", text)
    return text.replace("Σ", "σ").lower()


def clean_like_clip(text: str) -> str:
    """openai/CLIP's (and open_clip's) cleanup: ftfy, html unescape twice, whitespace, lower-case.

    ftfy repairs mojibake ('cafÃ©' -> 'café'), curly quotes, ligatures and full-width letters and
    removes control characters; captions scraped from the web are often escaped twice ('&amp;amp;').
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()  # str.split: Python's whitespace, as open_clip


def base_tokens() -> list[str]:
    """The first 512 tokens of every CLIP-style vocabulary: each byte, then each byte + '</w>'."""
    chars = list(BYTE_TO_CHAR.values())
    return chars + [c + "</w>" for c in chars]


class Tokenizer:
    """CLIP byte-level BPE: text -> ids (`encode`, `__call__`) and back (`decode`).

    vocab: token -> id, in CLIP's layout (256 bytes, 256 bytes + '</w>', one token per merge, then
    BOS and EOS). merges: the learned pairs, best (earliest) first. cleanup: "transformers" (default)
    gives the ids of transformers' CLIPTokenizer, which SD 1.x pipelines use; "clip" the ids of
    openai/CLIP and open_clip (ftfy + html unescaping). They differ only on text that the two
    cleanups change (html entities, mojibake, curly quotes, final sigma...) and on special tokens
    written in the text.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], cleanup: str = "transformers"):
        if cleanup not in CLEANUPS:
            raise ValueError(f"cleanup must be one of {CLEANUPS}, got {cleanup!r}")
        if missing := [t for t in base_tokens() + [BOS, EOS] if t not in vocab]:
            raise ValueError(f"not a CLIP byte-level BPE vocabulary: {len(missing)} base tokens are missing, "
                             f"e.g. {missing[:3]} (each byte needs a token, with and without '</w>', "
                             f"and {BOS} / {EOS} must be there)")
        for a, b in merges:
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise ValueError(f"merge {a!r} {b!r} uses or makes a token that is not in the vocabulary")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("vocabulary ids must be 0 .. len(vocab) - 1, each used once")
        self.cleanup = cleanup
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.added: dict[str, int] = {}  # placeholder as the user wrote it -> id
        self._added_text: dict[str, int] = {}  # placeholder as it is matched (cleaned text) -> id
        self._added_pattern = None
        self._cache: dict[str, list[int]] = {}  # word -> ids: captions repeat the same few words
        if cleanup == "transformers":
            # transformers finds special tokens in the raw text, before normalizing (see pre_tokenize)
            self._special_pattern = regex.compile(f"({SPECIAL_PATTERN})")
            self._word_pattern = regex.compile(SPECIAL_PATTERN + "|" + WORD_PATTERN)
        else:
            # openai/CLIP finds them with the word regex, in the cleaned text, ignoring case (which also
            # makes "'ſ" a contraction: long s folds to s; transformers keeps "'" and "ſ" apart)
            self._special_pattern = None
            self._word_pattern = regex.compile(SPECIAL_PATTERN + "|" + WORD_PATTERN, regex.IGNORECASE)

    # ---- encoding ------------------------------------------------------------------------------

    def _clean(self, text: str) -> str:
        return normalize_like_transformers(text) if self.cleanup == "transformers" else clean_like_clip(text)

    def pre_tokenize(self, text: str) -> list:
        """Cut text into the words BPE sees (str, in byte-to-unicode form) and whole tokens (int ids).

        transformers' order: special tokens are found in the raw text; the rest is normalized; there
        placeholders are found; what is left is split by the word regex. openai/CLIP cleans the whole
        text first and finds its special tokens with the word regex.
        """
        # odd positions: the special tokens (openai/CLIP has no special pattern: the word regex finds them)
        segments = [text] if self._special_pattern is None else self._special_pattern.split(text)
        out = []
        for i, segment in enumerate(segments):
            if i % 2 == 1:
                out.append(self.vocab[segment])
                continue
            text = self._clean(segment)  # placeholders are found in the cleaned text (odd positions)
            parts = [text] if self._added_pattern is None else self._added_pattern.split(text)
            for j, part in enumerate(parts):
                if j % 2 == 1:
                    out.append(self._added_text[part])
                    continue
                for word in self._word_pattern.findall(part):
                    if word in (BOS, EOS) and self.cleanup == "clip":
                        out.append(self.vocab[word])  # openai/CLIP: a special token, even if cased
                        continue
                    # transformers: only '<|EndOfText|>' and such get here (the exact name was taken out
                    # above). Its split regex keeps the name as one piece, which its byte-level step then
                    # cuts again with GPT-2's regex (a no-op on every other piece).
                    words = ["<|", word[2:-2], "|>"] if word in (BOS, EOS) else [word]
                    out.extend("".join(BYTE_TO_CHAR[b] for b in w.encode("utf-8")) for w in words)
        return out

    def _bpe(self, word: str) -> list[int]:
        """Ids of one word: start from its characters (the last one marked '</w>'), then keep merging
        the adjacent pair that was learned earliest, until no adjacent pair is a merge."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranks = [self.ranks.get(pair, float("inf")) for pair in zip(parts, parts[1:])]
            best = min(ranks)
            if best == float("inf"):
                break
            i = ranks.index(best)  # leftmost first: 'aaa' with merge (a, a) is 'aa', 'a'
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids = [self.vocab[p] for p in parts]
        if len(self._cache) > 100_000:  # bound the memory of a long-running process
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of one text, with BOS first and EOS last; no truncation, no padding."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = [self.bos_id]
        for word in self.pre_tokenize(text):
            ids.extend([word] if isinstance(word, int) else self._bpe(word))
        ids.append(self.eos_id)
        return ids

    def __call__(self, texts, length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """LongTensor[B, length] for one text or a list of texts, as SD 1.x feeds its text encoder.

        Too long: cut, keeping EOS as the last token. Too short: padded with EOS (SD 1.x's pad token;
        openai/CLIP pads with 0, which SD does not do: SD conditions on all 77 positions).
        """
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a str or a list of str")
        if not isinstance(length, int) or length < 2:
            raise ValueError(f"length must be an int >= 2 (room for BOS and EOS), got {length!r}")
        rows = []
        for text in texts:
            ids = self.encode(text)
            if len(ids) > length:
                ids = ids[:length - 1] + [self.eos_id]
            rows.append(ids + [self.eos_id] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ids, as transformers' `decode`: words separated by one space, punctuation split
        off ('a cat , please'), lower-case; BOS and EOS (also the padding) are dropped unless asked."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        for i in ids:
            if not isinstance(i, int):
                raise TypeError(f"decode takes one sequence of int ids, got an item {i!r}; for a batch "
                                f"[B, L] use [tok.decode(row) for row in ids]")
            if i not in self.id_to_token:
                raise ValueError(f"id {i!r} is not in this vocabulary (0 .. {len(self) - 1})")
        special = (self.bos_id, self.eos_id) if skip_special_tokens else ()
        tokens = [self.id_to_token[i] for i in ids if i not in special]
        # characters of placeholders that are not in the byte table stand for their own UTF-8 bytes
        data = b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode("utf-8")
                        for c in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    # ---- placeholders --------------------------------------------------------------------------

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add placeholder words (e.g. '<my-cat>', '<my-cat>_1'); returns their new ids.

        Each is always one token, with an id after the vocabulary. As transformers' CLIPTokenizer does
        after `add_tokens` (its tokens are "normalized" AddedTokens), a placeholder is looked for in
        the *cleaned* text: it is cleaned itself (so '<My-Cat>' matches '<my-cat>' and '<MY-CAT>'), it
        is found anywhere, even inside a word ('x<my-cat>y' is x, <my-cat>, y), the text on each side
        is tokenized as if the placeholder were a space, no whitespace around it is removed, and
        where two could start at one place the longest wins ('<my-cat>_1' over '<my-cat>').
        A placeholder that is a vocabulary token, or that matches the same text as one already
        added, is refused: transformers would silently reuse the id or shadow the other word.
        """
        tokens = [tokens] if isinstance(tokens, str) else tokens
        matched = {}  # placeholder -> the cleaned text it is matched as; all are checked before any is added
        for token in tokens:
            if not isinstance(token, str) or not token.strip():
                raise ValueError(f"a placeholder must be a non-empty string that is not only whitespace, "
                                 f"got {token!r}")
            text = self._clean(token)
            if not text:
                raise ValueError(f"placeholder {token!r} is empty once the text is cleaned ({self.cleanup})")
            for form in (token, text):
                if form in self.vocab:
                    raise ValueError(f"placeholder {token!r} already exists in the vocabulary as {form!r} "
                                     f"(id {self.vocab[form]}): choose a word that is not a token, e.g. "
                                     f"'<{token.strip('<>')}>'")
            if token in self.added or text in self._added_text or text in matched.values():
                raise ValueError(f"placeholder {token!r} was already added (it is matched as {text!r}): "
                                 f"choose another word, or reuse the one added")
            matched[token] = text
        new_ids = list(range(len(self), len(self) + len(matched)))  # after the vocabulary and those added
        for i, (token, text) in zip(new_ids, matched.items()):
            self.added[token] = self._added_text[text] = i
            self.id_to_token[i] = text  # what transformers decodes it to
        # longest first: at one start position the regex takes the first alternative that matches
        alternatives = sorted(self._added_text, key=len, reverse=True)
        if alternatives:  # (with none, an empty pattern would match the empty string)
            self._added_pattern = regex.compile("(" + "|".join(regex.escape(t) for t in alternatives) + ")")
        return new_ids

    # ---- vocabulary ----------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary token ('cat</w>', in byte-to-unicode form) or of an added placeholder."""
        if token in self.added:
            return self.added[token]
        if token in self.vocab:
            return self.vocab[token]
        raise ValueError(f"{token!r} is neither a vocabulary token nor an added placeholder "
                         f"(a whole word ends in '</w>': 'cat</w>'; use encode() for text)")

    @property
    def bos_id(self) -> int:
        return self.vocab[BOS]

    @property
    def eos_id(self) -> int:
        return self.vocab[EOS]

    def __len__(self) -> int:
        return len(self.vocab) + len(self.added)
