"""minti.tokenizer against transformers' CLIPTokenizer (what SD 1.x pipelines use) and open_clip's
SimpleTokenizer (openai/CLIP's code), id for id, on generated text that exercises every branch.
transformers reads vocab.json / merges.txt converted from CLIP's own merges file by conftest's
clip_vocabulary, never files that minti wrote (else a vocabulary bug in minti would be in both sides).

transformers 5's CLIPTokenizer (tokenizers-backed) does NFC + whitespace + per-character lower-casing;
openai/CLIP does ftfy + html unescaping twice + str.lower(). minti's default cleanup matches the first,
`cleanup="clip"` the second. Where the two references disagree, the reason is asserted exactly.
"""
import json
import random
import re
from collections import Counter

import pytest
import regex
import torch
import transformers


from minti.io import tokenizer_files as tokenizer_module
from minti.tokenizer import BOS, EOS, Tokenizer
from minti.io.tokenizer_files import clip_tokenizer, read_clip_bpe, read_tokenizer_folder, write_tokenizer_folder
from minti.toy.bpe import train_bpe

# ---- generated text ---------------------------------------------------------------------------

FRAGMENTS = {
    "words": ["a photo of", "cat", "dog", "sculpture", "in the style of", "on a blue background", "Painting",
              "HIGH QUALITY", "Van Gogh", "cyberpunk city at night", "teddy bear", "x", "I", "ok"],
    "accents": ["café", "naïve", "Ångström", "crème brûlée", "São Paulo", "Łódź", "e\u0301te\u0301",
                "A\u030angstro\u0308m", "ÉCOLE", "straße", "İstanbul", "DİYARBAKIR", "ΟΔΥΣΣΕΥΣ", "Σοφία ΚΑΣ",
                "Москва", "ПРИВЕТ"],
    "cjk": ["日本語", "中文字符", "한국어", "ひらがな", "カタカナ", "東京タワー"],
    "scripts": ["مرحبا", "שלום", "नमस्ते", "สวัสดี", "ሰላም", "Ⅻ", "٣٤٥", "½", "x²", "①"],
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "❤️",
              "🧑🏿‍🚀", "👩🏻‍❤️‍💋‍👨🏼", "✨✨", "🐱"],  # ZWJ sequences, skin tones, flags
    "html": ["&amp;", "&#39;", "&quot;", "&lt;b&gt;", "&amp;amp;", "&amp;#39;", "&eacute;", "&nbsp;",
             "&#x263A;", "Tom &amp; Jerry", "&amp;amp;amp;"],
    "contractions": ["it's", "don't", "we're", "they've", "I'm", "we'll", "he'd", "IT'S", "DON'T", "WE'RE",
                     "THEY'VE", "I'M", "WE'LL", "HE'D", "'s", "'S", "cat's", "'tis", "o'clock",
                     "rock'n'roll"],
    "digits": ["12345", "3.14", "1,000,000", "2024-01-01", "0", "42nd", "v1.5", "512x512", "007"],
    "punctuation": ["!!!", "...", "?!?", "--", "—", "(((", ")))", "[x]", "{y}", "#$%^&*", "~~~", "<<>>",
                    "...!?", "\"quoted\"", "“curly”", "‘single’", "«guillemets»", ",", ".", ";:", "@user",
                    "a/b\\c", "_"],
    "whitespace": ["\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "   ", "\x0b", "\x0c", "\x85",
                   "\u2003"],
    "mojibake": ["cafÃ©", "Ã¼ber", "donâ€™t", "â€œquotedâ€\x9d", "SchÃ¶n", "seÃ±or", "Ã‰COLE", "piÃ¹"],
    "unusual": ["\ufb01ne", "ＡＢＣ", "１２３", "\x00", "\x07", "\x7f", "\x1c", "\u200b", "\u200d", "\ufeff",
                "\u00ad", "a\u0308\u0304", "\u0301", "ſ", "'ſ", "\u212a", "ǅ"],
    "special": ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<start_of_text>", "<|endoftext|>x"],
}
SEPARATORS = [" ", " ", " ", "", "  ", "\t", "\n", "\u00a0", ", ", "."]
PLACEHOLDERS = ["<my-cat>", "<my-cat>_1", "<my-cat>_2", "<Style-X>", "zqxv", "<a b>"]


def make_texts(n, seed=0, placeholders=False):
    """Deterministic varied strings: 1-8 fragments (some very long: > 77 tokens), random case and
    separators; with `placeholders`, placeholder words in every position and case."""
    rng = random.Random(seed)
    kinds = sorted(FRAGMENTS)
    texts = []
    for i in range(n):
        count = rng.choice([1, 2, 3, 4, 6, 8]) if i % 15 else rng.randint(30, 60)
        parts = []
        for _ in range(count):
            part = rng.choice(FRAGMENTS[rng.choice(kinds)])
            if placeholders and rng.random() < 0.4:
                part = rng.choice(PLACEHOLDERS) + rng.choice(["", "", ".", ",", "'s", "!", "x"])
            if rng.random() < 0.15:
                part = part.upper()
            parts.append(part)
            parts.append(rng.choice(SEPARATORS))
        texts.append("".join(parts[:-1] if rng.random() < 0.7 else parts))
    return texts


FIXED_TEXTS = ["", " ", "\t\n ", "a", "A photo of a cat", "a photo of a <my-cat>"] + \
    [f for kind in sorted(FRAGMENTS) for f in FRAGMENTS[kind]]
TEXTS = FIXED_TEXTS + make_texts(1100)
PLACEHOLDER_TEXTS = ["<my-cat>", "<my-cat> on a beach", "a photo of <MY-CAT>",
                     "<my-cat>,<my-cat>_1.<my-cat>_2!", "x<my-cat>y", "<my-cat><my-cat>", "<My-Cat>_1's toy",
                     "(<style-x>)", "<a  b>", "<A\tB>",
                     "zqxvzqxv", "azqxvb", "<my-cat>_3", "<my-cat>_12", "<|endoftext|><my-cat>"] + \
    make_texts(300, seed=1, placeholders=True)

# ---- references ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_clip_tok(open_clip_tokenizer_module, clip_bpe_path):
    return open_clip_tokenizer_module.SimpleTokenizer(clip_bpe_path)


@pytest.fixture(scope="module")
def ours(clip_bpe_path):
    return read_clip_bpe(clip_bpe_path)


@pytest.fixture(scope="module")
def saved_by_minti(ours, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    write_tokenizer_folder(ours, str(folder))
    return folder


def load_transformers(folder):
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def hf(clip_vocab_folder):
    """transformers' CLIPTokenizer on files converted from CLIP's merges file without minti (conftest)."""
    return load_transformers(clip_vocab_folder)


@pytest.fixture(scope="module")
def ours_with_placeholders(clip_bpe_path):
    tok = read_clip_bpe(clip_bpe_path)
    tok.add_tokens(PLACEHOLDERS)
    return tok


@pytest.fixture(scope="module")
def hf_with_placeholders(clip_vocab_folder):
    tok = load_transformers(clip_vocab_folder)
    tok.add_tokens(PLACEHOLDERS)  # as diffusers' textual_inversion.py does
    return tok


def hf_ids(hf, texts):
    return hf(texts)["input_ids"]


# ---- the vocabulary ----------------------------------------------------------------------------


def test_clip_vocabulary_layout(ours):
    assert len(ours) == 49408 and ours.bos_id == 49406 and ours.eos_id == 49407
    assert ours.token_to_id("!") == 0 and ours.token_to_id("!</w>") == 256  # bytes, then bytes + </w>
    assert ours.token_to_id("a</w>") == 320 and ours.token_to_id("cat</w>") == 2368
    assert len(ours.merges) == 48894
    assert clip_tokenizer().vocab == ours.vocab  # found through the installed open_clip


def test_reference_files_equal_open_clip_vocabulary(clip_vocab_folder, open_clip_tok):
    """The files transformers reads in these tests (converted from CLIP's merges file by conftest, not
    by minti) are checked against open_clip's own table first.
    open_clip 3.x names the two special tokens '<start_of_text>' / '<end_of_text>' (same ids);
    openai/CLIP, transformers and SD 1.x's tokenizer/vocab.json use '<|startoftext|>' / '<|endoftext|>'."""
    vocab = json.loads((clip_vocab_folder / "vocab.json").read_text(encoding="utf-8"))
    expected = dict(open_clip_tok.encoder)
    expected["<|startoftext|>"] = expected.pop("<start_of_text>")
    expected["<|endoftext|>"] = expected.pop("<end_of_text>")
    assert vocab == expected and list(vocab.values()) == list(range(49408))
    lines = (clip_vocab_folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert [tuple(line.split(" ")) for line in lines[1:-1]] == sorted(open_clip_tok.bpe_ranks,
                                                                       key=open_clip_tok.bpe_ranks.get)


def test_saved_files_equal_the_reference_files(saved_by_minti, clip_vocab_folder):
    """minti's save() writes the vocabulary SD 1.x's tokenizer/ folder has (here: the reference files)."""
    def read(folder, name):
        return (folder / name).read_text(encoding="utf-8")
    assert json.loads(read(saved_by_minti, "vocab.json")) == json.loads(read(clip_vocab_folder, "vocab.json"))
    lines = read(saved_by_minti, "merges.txt").split("\n")
    assert lines[0].startswith("#version") and lines[-1] == ""
    assert lines[1:] == read(clip_vocab_folder, "merges.txt").split("\n")[1:]
    config = json.loads(read(saved_by_minti, "tokenizer_config.json"))
    assert config["model_max_length"] == 77 and config["pad_token"] == EOS
    hf, again = load_transformers(saved_by_minti), read_tokenizer_folder(str(saved_by_minti))
    assert hf_ids(hf, TEXTS[:200]) == [again.encode(t) for t in TEXTS[:200]]


def test_text_set_is_varied():
    assert len(TEXTS) >= 1000 and len(set(TEXTS)) > 1000 and "" in TEXTS
    for kind, fragments in FRAGMENTS.items():
        assert sum(any(f in t for f in fragments) for t in TEXTS) > 50, kind


# ---- ids: minti == transformers (default cleanup), minti == open_clip ("clip" cleanup) ---------------


def test_encode_equals_transformers(ours, hf):
    expected = hf_ids(hf, TEXTS)
    for text, ids in zip(TEXTS, expected):
        assert ours.encode(text) == ids, repr(text)


def test_batch_truncated_and_padded_equals_transformers(ours, hf):
    """SD 1.x: max_length 77, truncation keeps EOS last, padding with EOS (the pad token)."""
    long_ones = [t for t in TEXTS if len(hf_ids(hf, [t])[0]) > 77]
    assert len(long_ones) > 20
    expected = hf(TEXTS, padding="max_length", truncation=True, max_length=77,
                  return_tensors="pt")["input_ids"]
    got = ours(TEXTS, 77)
    assert got.dtype == torch.long and got.shape == (len(TEXTS), 77)
    assert torch.equal(got, expected)
    assert torch.equal(ours(TEXTS[:50], length=20), hf(TEXTS[:50], padding="max_length", truncation=True,
                                                      max_length=20, return_tensors="pt")["input_ids"])
    assert torch.equal(ours("a cat"), ours(["a cat"]))


# Where each reference treats a special-token name written in the text as a special token. Both
# find it with their split regex, which takes the leftmost match: inside a punctuation run
# ('#$%<|endoftext|>') the name is swallowed by the run and is ordinary text.
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # CLIP's, in all three
HF_NAMES = ("<|startoftext|>", "<|endoftext|>")  # transformers, openai/CLIP
OPEN_CLIP_NAMES = ("<start_of_text>", "<end_of_text>")  # open_clip 3.x


def found_by_split(names, text, ignore_case, before_punctuation=False):
    """Does the split regex (names first, then CLIP's) cut out one of `names` (and, if asked, one
    that punctuation follows right after)?"""
    pattern = "|".join(regex.escape(n) for n in names) + "|" + SPLIT
    for match in regex.finditer(pattern, text, flags=regex.IGNORECASE if ignore_case else 0):
        if match.group() in names and (not before_punctuation
                                       or regex.match(r"[^\s\p{L}\p{N}]", text[match.end():])):
            return True
    return False


def test_clip_cleanup_equals_open_clip(clip_bpe_path, open_clip_tok):
    """cleanup="clip" is openai/CLIP's tokenizer. It differs from open_clip 3.x only where one of them
    reads a special token out of the text, as the two name them differently."""
    assert open_clip_tok.pat.pattern == "<start_of_text>|<end_of_text>|" + SPLIT
    ours_clip = read_clip_bpe(clip_bpe_path, cleanup="clip")
    differ = set()
    for text in TEXTS:
        expected = [open_clip_tok.sot_token_id] + open_clip_tok.encode(text) + [open_clip_tok.eot_token_id]
        if ours_clip.encode(text) != expected:
            differ.add(text)
    predicted = {t for t in TEXTS if found_by_split(HF_NAMES, open_clip_tok.clean_fn(t), True)
                 or found_by_split(OPEN_CLIP_NAMES, open_clip_tok.clean_fn(t), True)}
    assert differ == predicted and len(predicted) > 10
    # batches: the same, except that open_clip pads with 0 where SD (and minti) pad with EOS
    same = [t for t in TEXTS if t not in predicted]
    expected = open_clip_tok(same, 77)
    ends = (expected == open_clip_tok.eot_token_id).int().cumsum(1) > 0
    expected = torch.where(ends & (expected == 0), torch.full_like(expected, ours_clip.eos_id), expected)
    assert torch.equal(ours_clip(same, 77), expected)


def test_disagreement_of_the_references_is_exactly_their_cleanup(hf, open_clip_tok):
    """transformers and open_clip give different ids exactly where
    (1) their text cleanups give different text: ftfy (mojibake, curly quotes, ligatures, full width,
        control characters), html entities, str.lower()'s final sigma (transformers: 'σ');
    (2) a special token is read out of the text: transformers takes '<|endoftext|>' exactly as
        written, anywhere; open_clip's regex takes '<end_of_text>'. And transformers' split regex
        isolates case variants ('<|EndOfText|>'), which its byte-level step cuts into '<|', name,
        '|>' as open_clip does, but apart from the punctuation after it ('|>' ',' vs '|>,');
    (3) "'ſ": open_clip's regex ignores case and long s folds to s, which makes a contraction.
    Nothing else: whitespace, letters, digits, contractions, emoji and BPE agree."""
    pre_tokenizer = str(hf.backend_tokenizer.pre_tokenizer)
    assert "|".join(n.replace("|", "\\|") for n in HF_NAMES) + "|" + SPLIT in pre_tokenizer
    normalizer = hf.backend_tokenizer.normalizer
    predicted = {}
    for text in TEXTS:
        hf_text, oc_text = normalizer.normalize_str(text), open_clip_tok.clean_fn(text)
        if regex.sub(r"^\s+|\s+$", "", regex.sub(r"\s+", " ", hf_text)) != oc_text:  # not str.strip: \x1c
            predicted[text] = "cleanup"
        elif any(n in text for n in HF_NAMES) or found_by_split(OPEN_CLIP_NAMES, oc_text, True) \
                or found_by_split(HF_NAMES, hf_text, False, before_punctuation=True):
            predicted[text] = "special"
        elif "'ſ" in oc_text:
            predicted[text] = "long s"
    expected = hf_ids(hf, TEXTS)
    differ = {t for t, ids in zip(TEXTS, expected) if ids != [49406] + open_clip_tok.encode(t) + [49407]}
    assert differ == set(predicted)
    for reason, count in Counter(predicted.values()).items():
        assert count >= 5, reason
    for example in ["&amp;", "cafÃ©", "“curly”", "ΟΔΥΣΣΕΥΣ", "<|endoftext|>", "'ſ", "\ufb01ne", "\x00"]:
        assert example in differ
    assert len(TEXTS) - len(differ) > 400  # and they agree on the rest


# ---- placeholders (textual inversion's new words) -------------------------------------------------


def test_placeholders_equal_transformers_add_tokens(ours_with_placeholders, hf_with_placeholders):
    tok, hf = ours_with_placeholders, hf_with_placeholders
    assert len(tok) == len(hf) == 49408 + len(PLACEHOLDERS)
    assert [tok.token_to_id(p) for p in PLACEHOLDERS] == hf.convert_tokens_to_ids(PLACEHOLDERS)
    expected = hf_ids(hf, PLACEHOLDER_TEXTS)
    hits = 0
    for text, ids in zip(PLACEHOLDER_TEXTS, expected):
        assert tok.encode(text) == ids, repr(text)
        hits += sum(i >= 49408 for i in ids)
    assert hits > 300
    got = tok(PLACEHOLDER_TEXTS, 77)
    assert torch.equal(got, hf(PLACEHOLDER_TEXTS, padding="max_length", truncation=True, max_length=77,
                               return_tensors="pt")["input_ids"])


def test_placeholder_matching_rules(ours_with_placeholders):
    tok = ours_with_placeholders
    cat, cat1, style = (tok.token_to_id(p) for p in ("<my-cat>", "<my-cat>_1", "<Style-X>"))
    a, comma = tok.token_to_id("a</w>"), tok.token_to_id(",</w>")
    assert tok.encode("a <MY-CAT>,")[1:-1] == [a, cat, comma]  # matched after lower-casing
    assert tok.encode("<my-cat>_1<my-cat>")[1:-1] == [cat1, cat]  # longest first
    assert tok.encode("a<style-x>a")[1:-1] == [a, style, a]  # found inside a word
    assert tok.encode("<my-cat>")[1:-1] == [cat]


def test_placeholders_saved_and_reloaded(ours_with_placeholders, tmp_path):
    """save() writes them as transformers does (added_tokens_decoder); transformers and minti both
    read them back; minti also reads the tokenizer.json that transformers 5 itself saves."""
    write_tokenizer_folder(ours_with_placeholders, str(tmp_path / "mine"))
    hf = load_transformers(tmp_path / "mine")
    again = read_tokenizer_folder(str(tmp_path / "mine"))
    assert again.added == ours_with_placeholders.added and len(hf) == len(again)
    texts = PLACEHOLDER_TEXTS[:100]
    assert hf_ids(hf, texts) == [again.encode(t) for t in texts]
    hf.save_pretrained(str(tmp_path / "by_transformers" / "tokenizer"))  # tokenizer.json, no vocab.json
    third = read_tokenizer_folder(str(tmp_path / "by_transformers"))  # the model folder above works too
    assert third.added == again.added and third.vocab == again.vocab
    assert [third.encode(t) for t in texts] == [again.encode(t) for t in texts]


# ---- decode ---------------------------------------------------------------------------------------


def test_decode_equals_transformers_and_round_trips(ours_with_placeholders, hf_with_placeholders):
    tok, hf = ours_with_placeholders, hf_with_placeholders
    for text in TEXTS[::3] + PLACEHOLDER_TEXTS[::3]:
        ids = tok.encode(text)
        decoded = tok.decode(ids)
        assert decoded == hf.decode(ids, skip_special_tokens=True), repr(text)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids), repr(text)
        # the decoded text is the same tokens again, except where special tokens stood in the text (they
        # are not decoded) or '\x1c' ends it (str.strip() in decode drops it, the tokenizer does not)
        if not {tok.bos_id, tok.eos_id} & set(ids[1:-1]) and "\x1c" not in text:
            assert tok.encode(decoded) == ids, repr(text)
    assert tok.decode(tok("A Photo of a CAT, please!")[0]) == "a photo of a cat , please !"
    assert tok.decode(torch.tensor(tok.encode("café 🐱"))) == "café 🐱"


# ---- the trainer ------------------------------------------------------------------------------------


def toy_captions(seed, n):
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "teal", "magenta"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "ring", "cross", "diamond"]
    sizes = ["small", "large", "tiny", "huge", ""]
    places = ["top left", "bottom right", "center", "left", "right"]
    return [f"a {rng.choice(sizes)} {rng.choice(colors)} {rng.choice(shapes)} in the {rng.choice(places)}, "
            f"on a {rng.choice(colors)} background" for _ in range(n)]


def test_trained_tokenizer_loads_in_transformers(tmp_path):
    texts = toy_captions(0, 400)
    tok = train_bpe(texts, vocab_size=600)
    assert len(tok) == 600 and len(tok.merges) == 600 - 514
    assert list(tok.vocab)[:512] == list(clip_tokenizer().vocab)[:512]  # CLIP's layout
    assert tok.bos_id == 598 and tok.eos_id == 599
    write_tokenizer_folder(tok, str(tmp_path))
    hf = load_transformers(tmp_path)
    held_out = toy_captions(1, 100) + ["a zebra-striped GLOWING pentagon!", "café 🐱 ΟΔΟΣ", "", "it's 42"]
    assert hf_ids(hf, held_out) == [tok.encode(t) for t in held_out]
    assert read_tokenizer_folder(str(tmp_path)).vocab == tok.vocab
    # the most frequent words became single tokens
    words = ("a</w>", "in</w>", "the</w>", "on</w>")
    assert tok.encode("a in the on")[1:-1] == [tok.token_to_id(w) for w in words]


def test_trainer_is_deterministic_and_stops_when_words_are_whole():
    texts = toy_captions(0, 200)
    first = train_bpe(texts, vocab_size=560)
    assert train_bpe(list(reversed(texts)), vocab_size=560).merges == first.merges  # order-free
    whole = train_bpe(texts, vocab_size=100_000)
    assert len(whole) < 1000
    words = {w for t in texts for w in re.findall(r"[a-z]+|,", t)}
    assert all(len(whole.encode(w)) == 3 for w in words)


def test_trainer_merges_by_hand():
    # 'ab' three times, 'ac' once: (a, b</w>) is the most frequent pair, then (a, c</w>)
    tok = train_bpe(["ab ab", "ab ac"], vocab_size=516)
    assert tok.merges == [("a", "b</w>"), ("a", "c</w>")]
    # a tie (one each) goes to the pair that sorts first
    assert train_bpe(["ac ab"], vocab_size=515).merges == [("a", "b</w>")]
    assert train_bpe(["ac ab"], vocab_size=515).encode("ab ac")[1:-1] == [512, 97 - 33, 99 - 33 + 256]


# ---- bad input --------------------------------------------------------------------------------------


def test_bad_placeholders(clip_bpe_path):
    tok = read_clip_bpe(clip_bpe_path)
    tok.add_tokens(["<my-cat>"])
    exists = "already exists in the vocabulary"
    for bad, message in [("cat", exists), ("Cat", exists), ("cat</w>", exists), ("<my-cat>", "already added"),
                         ("<MY-CAT>", "already added"), ("", "not only whitespace"),
                         (" \t", "not only whitespace"), (5, "non-empty string")]:
        with pytest.raises(ValueError, match=message):
            tok.add_tokens([bad])
    assert len(tok) == 49409  # nothing half-added


def test_bad_input_errors(ours, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="length must be"):
        ours("a cat", length=1)
    with pytest.raises(TypeError, match="list of str"):
        ours(["a", 3])
    with pytest.raises(TypeError, match="takes a str"):
        ours.encode(None)
    with pytest.raises(ValueError, match="not in this vocabulary"):
        ours.decode([49408])
    with pytest.raises(TypeError, match="for a batch"):
        ours.decode(ours(["a", "b"]))
    with pytest.raises(ValueError, match="neither a vocabulary token"):
        ours.token_to_id("<never-added>")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_tokenizer_folder(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        read_tokenizer_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab"):
        read_clip_bpe(str(tmp_path / "missing.txt.gz"))
    with pytest.raises(ValueError, match="cleanup must be"):
        Tokenizer(ours.vocab, ours.merges, cleanup="ftfy")
    with pytest.raises(ValueError, match="not a CLIP byte-level BPE vocabulary"):
        Tokenizer({"a": 0, "b": 1}, [])
    (tmp_path / "vocab.json").write_text(json.dumps(ours.vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nthree tokens here\n")
    with pytest.raises(ValueError, match="two tokens"):
        read_tokenizer_folder(str(tmp_path))
    with pytest.raises(ValueError, match="vocab_size must be at least 514"):
        train_bpe(["a cat"], vocab_size=100)
    with pytest.raises(TypeError, match="list of str"):
        train_bpe("a cat", vocab_size=600)
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open-clip-torch"):
        clip_tokenizer()


def test_add_no_tokens_changes_nothing(clip_bpe_path):
    # Loaders call add_tokens with whatever placeholders a folder saved, often none.
    tok = read_clip_bpe(clip_bpe_path)
    before = tok.encode("a photo of a cat")
    assert tok.add_tokens([]) == []
    assert tok.encode("a photo of a cat") == before == [49406, 320, 1125, 539, 320, 2368, 49407]
