"""Fuzzing the prompt parser and the tokenizer with hypothesis: random unicode, brackets, bars, backslashes,
numbers and learned words' names, a bounded number of examples (250 per test, derandomized), no time limit.

The parser either returns text and Words that cover the prompt exactly (its escapes undone) or raises its
documented PromptError; never another exception. The tokenizer (CLIP's real vocabulary, with placeholders
added) gives the ids of transformers' CLIPTokenizer on all of it, transformers reading vocabulary files
written from CLIP's merges file without minti (conftest.clip_vocab_folder); so does the text of prompts
whose multi-vector words were written out.
"""
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minti.io.concepts import Concept
from minti.io.prompt_syntax import PromptError, Word, expand_prompt, parse_prompt
from minti.io.tokenizer_files import read_clip_bpe

NAMES = ["cat", "jane", "my-dog", "zqxjane"]  # as the loaded concepts' prompt names
PLACEHOLDERS = ["<cat>", "<cat>_1", "zqxjane", "zqxjane_1", "zqxjane_2", "<my-dog>"]
PIECES = ["<", ">", "|", "(", ")", "[", "]", "\\", "\\<", " ", ",", ".", ";", "0", "1", "0.5", ".5", "1.", "-",
          "+", "2", "10", "cat", "Jane", "MY-DOG", "my-dog", "<cat", "<jane|", "<cat>", "<cat>_1", "zqxjane", "<|endoftext|>",
          "é", "日本", "😀", "\n", "\t", "\u00a0", "\u200b", "a photo of "]
# Characters this Python's Unicode tables leave unassigned (category Cn) are left out: transformers' Rust
# regex knows a newer Unicode, where some of them are letters (e.g. U+323B0 after ':'), so the two split
# them differently; that is a difference of Unicode versions, not of tokenizers. Surrogates cannot be encoded.
CHARS = st.characters(exclude_categories=("Cn", "Cs"))
TEXT = st.one_of(st.text(CHARS, max_size=60),
                 st.lists(st.one_of(st.sampled_from(PIECES), st.text(CHARS, max_size=3)), max_size=30).map("".join))
# deadline=None: how long an example takes depends on the machine and its load, not on the code's correctness
FUZZ = settings(max_examples=250, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(TEXT)
def test_parser_covers_the_prompt_or_says_where_it_fails(prompt):
    try:
        pieces = parse_prompt(prompt, NAMES)
    except PromptError as e:
        assert 0 <= e.position <= len(prompt) and "^" in str(e)
        return
    texts, words = pieces[::2], pieces[1::2]
    assert len(texts) == len(words) + 1 and all(isinstance(t, str) for t in texts)
    at = 0
    for text, word in zip(texts, words + [None]):
        end = word.start if word is not None else len(prompt)
        assert text == prompt[at:end].replace("\\<", "<")  # the text between words, its escapes undone
        if word is not None:
            assert isinstance(word, Word) and word.name.lower() in NAMES and 0.0 <= word.t_fixed <= 1.0
            assert prompt[word.start] == "<" and prompt[word.end - 1] == ">" and word.mode in ("fixed", "semi",
                                                                                                 "fully")
            at = word.end


@pytest.fixture(scope="module")
def tokenizers(clip_bpe_path, clip_vocab_folder):
    """minti's tokenizer, read from CLIP's merges file, and transformers' CLIPTokenizer, reading the
    vocabulary files that conftest wrote from the same merges file without minti; placeholders added to
    both (as diffusers' textual_inversion.py adds them)."""
    ours = read_clip_bpe(clip_bpe_path)
    theirs = transformers.CLIPTokenizer.from_pretrained(str(clip_vocab_folder))
    ours.add_tokens(PLACEHOLDERS)
    theirs.add_tokens(PLACEHOLDERS)
    return ours, theirs


@FUZZ
@given(TEXT)
def test_tokenizer_equals_transformers(tokenizers, text):
    ours, theirs = tokenizers
    assert ours.encode(text) == theirs(text)["input_ids"], repr(text)


@FUZZ
@given(TEXT)
def test_truncated_ids_equal_transformers(tokenizers, text):
    ours, theirs = tokenizers
    expected = theirs([text], padding="max_length", truncation=True, max_length=77)["input_ids"]
    assert ours([text], 77).tolist() == expected, repr(text)


# A prompt with a multi-vector plain word in its text: the bare token "zqxjane" (3 vectors), or "<cat>"
# (2 vectors) escaped as "\\<cat>"; a plain word in brackets ("<cat>") is a Word, spliced in, not text.
WITH_WORDS = st.tuples(TEXT, st.sampled_from(["zqxjane", "\\<cat>"]), TEXT).map("".join)


def test_expanded_prompts_tokenize_as_transformers(tokenizers):
    """What the parser hands the tokenizer: the text between words, multi-vector words written out."""
    ours, theirs = tokenizers
    concepts = [Concept("<cat>", torch.zeros(2, 4)), Concept("zqxjane", torch.zeros(3, 4))]
    written_out = []  # per prompt that parses: how many words its text had to write out

    @FUZZ
    @given(WITH_WORDS)
    def check(text):
        try:
            pieces = parse_prompt(text, NAMES)
        except PromptError:
            return
        for piece in pieces[::2]:
            expanded = expand_prompt(piece, concepts)
            # every occurrence written out: "<cat>" -> "<cat> <cat>_1", "zqxjane" -> "... zqxjane_1 zqxjane_2"
            assert expanded.count("<cat>_1") == piece.count("<cat>"), (piece, expanded)
            assert expanded.count("zqxjane_2") == piece.count("zqxjane"), (piece, expanded)
            assert ours.encode(expanded) == theirs(expanded)["input_ids"], repr(expanded)
        written_out.append(sum(piece.count("<cat>") + piece.count("zqxjane") for piece in pieces[::2]))
    check()
    # the prompts really had words to write out (measured: 196 of the 250 parse, each with a word)
    assert sum(n > 0 for n in written_out) >= 150, (sum(n > 0 for n in written_out), len(written_out))
