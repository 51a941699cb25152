"""The prompt syntax of multiresolution textual inversion (minti/io/prompt_syntax.py, minti/multires.py).

1. Every form parses (`<name|t|>`, `<name(t)>`, `<name[t]>`, `<name>`, t as 0, .8, 0.5, 1, 1.0), several
   words in one prompt mixed with plain concepts and ordinary text; a '<' that is not a word stays text.
2. Every kind of error quotes the prompt and puts its caret under the right characters.
3. Time: a sampling step's bucket is training's floor(timestep * T / 1000) for many T, and `resolve`
   follows the paper's three definitions, checked in exact fractions for every timestep.
4. PromptWords: plain words added to the tokenizer once; the conditioning of a step against the prompt
   built by hand; clear errors for clashing names and bad use.
The sampling-side checks (the context the UNet gets at each step) are in test_multires_sampling.py.
"""
import math
from fractions import Fraction

import pytest
import torch

from minti.toy.bpe import train_bpe
from minti.clip import CLIPTextConfig, CLIPTextModel
from minti.io.concepts import Concept, ConceptError
from minti.textual_inversion import time_bucket
from minti.multires import resolve, timestep_of
from minti.io.prompt_syntax import PromptError, PromptWords, Word, parse_prompt, prompt_name

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)

NAMES = ["cat", "jane", "dog", "mycat"]


def words(pieces):
    return [(w.name, w.mode, w.t_fixed) for w in pieces[1::2]]


# ----------------------------------------------------------------------------------------------
# 1. parsing

@pytest.mark.parametrize("written, mode, t", [
    ("<cat|0|>", "fixed", 0.0), ("<cat|0.5|>", "fixed", 0.5), ("<cat|.8|>", "fixed", 0.8),
    ("<cat|1|>", "fixed", 1.0), ("<cat|1.0|>", "fixed", 1.0),
    ("<cat(0)>", "semi", 0.0), ("<cat(.8)>", "semi", 0.8), ("<cat(1)>", "semi", 1.0),
    ("<cat(0.25)>", "semi", 0.25),
    ("<cat[0]>", "fully", 0.0), ("<cat[0.5]>", "fully", 0.5), ("<cat[1.]>", "fully", 1.0),
    ("<cat>", "fully", 0.0),  # a bare word: fully resolution-dependent over the whole range
    ("<cat( 0.3 )>", "semi", 0.3),  # spaces inside the brackets are allowed
    ("<CAT(0.5)>", "semi", 0.5),  # names ignore case, as the tokenizer's placeholders do
])
def test_every_form_parses(written, mode, t):
    prompt = f"a photo of {written} on a table"
    pieces = parse_prompt(prompt, NAMES)
    start = prompt.index("<")
    assert pieces == ["a photo of ", Word(written[1:4], mode, t, start, start + len(written)), " on a table"]


def test_several_words_mixed_with_plain_concepts_and_text():
    prompt = "A photo of <cat(0.5)> made with <jane|0.1|>, <dog> and mycat next to <cat[.8]><jane>"
    pieces = parse_prompt(prompt, NAMES)
    assert pieces[::2] == ["A photo of ", " made with ", ", ", " and mycat next to ", "", ""]
    assert words(pieces) == [("cat", "semi", 0.5), ("jane", "fixed", 0.1), ("dog", "fully", 0.0),
                             ("cat", "fully", 0.8), ("jane", "fully", 0.0)]
    for w in pieces[1::2]:  # the spans point at the words
        assert prompt[w.start] == "<" and prompt[w.end - 1] == ">" and w.name in prompt[w.start:w.end]


@pytest.mark.parametrize("prompt, text", [
    ("x < y and 1<2", "x < y and 1<2"),  # a '<' not followed by a name
    ("I <3 you", "I <3 you"),  # followed by a name-like run that is not closed and not a concept
    ("<> <", "<> <"),
    ("a \\<b>bold\\</b> sign", "a <b>bold</b> sign"),  # \< is a literal '<', even before a name and '>'
    ("no words at all", "no words at all"),
    ("", ""),
])
def test_angle_brackets_that_are_not_words_stay_text(prompt, text):
    assert parse_prompt(prompt, NAMES) == [text]


def test_prompt_name_strips_the_brackets_of_a_token():
    tokens = ["<cat>", "cat", "<cat-toy>", "*", "<>"]
    assert [prompt_name(t) for t in tokens] == ["cat", "cat", "cat-toy", "*", "<>"]


# ----------------------------------------------------------------------------------------------
# 2. errors, each with the prompt and a caret under the place

def caret(error: PromptError, prompt: str):
    """(column, width) of the caret line under the quoted prompt in the message."""
    lines = str(error).split("\n")
    i = lines.index("  " + prompt)
    marks = lines[i + 1][2:]
    start = len(marks) - len(marks.lstrip(" "))
    return start, len(marks.strip())


@pytest.mark.parametrize("prompt, at, width, says", [
    ("a <cat(0.5> b", 10, 1, "Expected ')' to close '('"),  # unclosed bracket
    ("a <cat|0.5> b", 10, 1, "Expected '|' to close '|'"),
    ("a <cat[0.5)> b", 10, 1, "Expected ']' to close '['"),  # mismatched brackets
    ("a <cat(0.5) b", 11, 1, "Expected '>' to close <cat"),  # unclosed word
    ("a <cat(0.5)", 11, 1, "Expected '>' to close <cat"),  # ... at the end of the prompt
    ("a <cat(0.5)(0.3)>", 11, 1, "Expected '>' to close <cat"),  # two resolutions
    ("a <cat|0.5||>", 11, 1, "Expected '>' to close <cat"),
    ("a <cat on a mat", 2, 4, "<cat is not closed"),  # a known name that is not closed
    ("a <cat", 2, 4, "<cat is not closed"),
    ("a <cat, b>", 2, 4, "<cat is not closed"),
    ("a <cat()> b", 6, 2, "No resolution between '(' and ')'"),  # empty t
    ("a <cat||>", 6, 2, "No resolution between '|' and '|'"),
    ("a <cat(0.5 0.3)> b", 7, 5, "one resolution t, found more"),  # two numbers
    ("a <cat[0.5,0.3]>", 7, 4, "one resolution t, found more"),
    ("a <cat(abc)>", 7, 1, "Expected a resolution t in [0, 1]"),
    ("a <cat(1e-1)>", 8, 1, "Expected ')' to close '('"),
    ("a <cat(1.5)> b", 7, 3, "Resolution 1.5 is not in [0, 1]"),  # out of range
    ("a <cat(-0.1)> b", 7, 4, "Resolution -0.1 is not in [0, 1]"),
    ("a <cat|3|> b", 7, 1, "Resolution 3 is not in [0, 1]"),
    ("a <(0.5)> b", 2, 2, "needs a name"),
    ("a <catt(0.5)> b", 2, 11, "<catt> is not a loaded concept"),  # unknown name, with time syntax
    ("a <kat> b", 2, 5, "<kat> is not a loaded concept"),  # unknown name in angle brackets: a typo
    ("<lora:style:0.8> a cat", 0, 16, "<lora:style:0.8> is not a loaded concept"),
])
def test_errors_quote_the_prompt_and_point_at_the_place(prompt, at, width, says):
    with pytest.raises(PromptError) as info:
        parse_prompt(prompt, NAMES)
    assert says in str(info.value)
    assert caret(info.value, prompt) == (at, width)
    assert info.value.position == at and info.value.prompt == prompt


def test_error_hints():
    with pytest.raises(PromptError, match=r"Did you mean <cat>\?") as info:
        parse_prompt("a <catt>", NAMES)
    assert "<cat>, <dog>, <jane>, <mycat>" in str(info.value) and "\\<" in str(info.value)
    # The paper's code takes bucket indices of 10; its (k) silences bucket k too.
    with pytest.raises(PromptError, match=r"its <jane\|3\|> is <jane\|0.3\|> here"):
        parse_prompt("<jane|3|>", NAMES)
    with pytest.raises(PromptError, match=r"its <jane\(3\)> is <jane\(0.4\)> here"):
        parse_prompt("<jane(3)>", NAMES)
    with pytest.raises(PromptError, match="not a loaded concept"):  # nothing loaded: every word is unknown
        parse_prompt("a <cat>", [])


def test_error_line_stays_aligned_for_multiline_prompts():
    prompt = "first line\n<cat(2)>"
    with pytest.raises(PromptError) as info:
        parse_prompt(prompt, NAMES)
    assert caret(info.value, "first line <cat(2)>") == (16, 1)


# ----------------------------------------------------------------------------------------------
# 3. time

@pytest.mark.parametrize("T", [1, 2, 3, 4, 7, 10, 16, 20, 33, 100, 128, 1000])
def test_sampling_bucket_is_trainings_bucket(T):
    """Training conditions timestep tau on bucket floor(tau * T / 1000); sampling must use the same."""
    sampled = [resolve(Word("cat", "fully", 0.0, 0, 5), tau, T) for tau in range(1000)]
    assert sampled == [tau * T // 1000 for tau in range(1000)]
    assert time_bucket(torch.arange(1000), T).tolist() == sampled  # training's buckets, a tensor of timesteps
    # A time t names the timestep round(1000 t); t = 1 (pure noise, timestep 1000) is in the last bucket.
    assert [timestep_of(t) for t in (0.0, 0.29, 0.981, 1.0)] == [0, 290, 981, 1000]
    assert time_bucket(timestep_of(1.0), T) == T - 1 and time_bucket(timestep_of(0.29), 100) == 29


def expected_bucket(mode, t_fixed: str, tau: int, T: int):
    """The paper's definitions in exact fractions: the bucket a word uses at timestep tau (None: silent)."""
    t, tf = Fraction(tau, 1000), Fraction(t_fixed)

    def bucket(x):
        return min(math.floor(x * T), T - 1)

    if mode == "fixed":
        return bucket(tf)
    if t >= tf:
        return bucket(t)
    return bucket(tf) if mode == "fully" else None


@pytest.mark.parametrize("T", [1, 3, 10])
@pytest.mark.parametrize("t_fixed", ["0", "0.3", ".5", "0.55", "0.999", "1"])
def test_resolve_follows_the_three_definitions_at_every_timestep(T, t_fixed):
    for mode, opener, closer in [("fixed", "|", "|"), ("semi", "(", ")"), ("fully", "[", "]")]:
        [word] = parse_prompt(f"<cat{opener}{t_fixed}{closer}>", ["cat"])[1::2]
        got = [resolve(word, tau, T) for tau in range(1000)]
        assert got == [expected_bucket(mode, t_fixed, tau, T) for tau in range(1000)], mode
    # A plain concept (resolutions None) is a word with T = 1; (t) still silences it below t_fixed.
    [semi] = parse_prompt(f"<dog({t_fixed})>", ["dog"])[1::2]
    assert [resolve(semi, tau, None) for tau in range(1000)] == [
        expected_bucket("semi", t_fixed, tau, 1) for tau in range(1000)]


# ----------------------------------------------------------------------------------------------
# 4. PromptWords: tokenizer, errors

def tiny(width=16):
    tok = train_bpe(["a photo of a cat on a table", "made with a dog"], 600)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=20, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id)).eval()
    return tok, encoder


def test_placeholders_are_added_to_the_tokenizer_once():
    tok, encoder = tiny()
    base = len(tok)
    concepts = [Concept("<cat>", torch.randn(10, 2, 16)), Concept("<dog>", torch.randn(3, 16))]
    first = PromptWords(concepts, tok, encoder).conditioning("a <cat(0.5)>")
    # The plain word's 3 placeholders; a multiresolution word is never tokenized: each step splices its
    # bucket's vectors into the prompt's token vectors (no word per bucket, no word of zeros).
    assert len(tok) == base + 3
    again = PromptWords(concepts, tok, encoder).conditioning("a <cat(0.5)>")
    assert len(tok) == base + 3
    for tau in (999, 500, 499, 0):
        torch.testing.assert_close(first(tau), again(tau), rtol=0, atol=0)


def encode_by_hand(tok, encoder, pieces):
    """Start token, each piece (a text's own tokens, or vectors [n, D]), end token, end-token padding."""
    table = encoder.text_model.embeddings.token_embedding.weight
    rows = [table[[tok.bos_id]]] + [table[tok.encode(p)[1:-1]] if isinstance(p, str) else p for p in pieces]
    rows = torch.cat(rows + [table[[tok.eos_id]]])
    rows = torch.cat([rows, table[[tok.eos_id] * (encoder.config.max_position_embeddings - len(rows))]])
    with torch.no_grad():
        return encoder(None, inputs_embeds=rows[None])[0]


def test_the_conditioning_of_each_step_is_the_prompt_with_each_words_vectors():
    """(Was a check of the text a prompt was rendered as, "a <cat@7> <cat@7>_1 and dog and dog"; prompts are
    no longer rendered: the same cases, checked on the conditioning against the prompt built by hand.)"""
    tok, encoder = tiny()
    cat, dog = Concept("<cat>", torch.randn(10, 2, 16)), Concept("dog", torch.randn(1, 16))
    w = PromptWords([cat, dog], tok, encoder)
    prompt = "a <cat(0.5)> and <dog> and dog"  # the plain word's bare token is the word too
    remove, zero = w.conditioning(prompt), w.conditioning(prompt, drop="zero")
    tol = dict(rtol=1e-5, atol=1e-5)
    expected = encode_by_hand(tok, encoder, ["a", cat.vectors[7], "and", dog.vectors, "and", dog.vectors])
    torch.testing.assert_close(remove(720)[0], expected, **tol)
    torch.testing.assert_close(zero(720)[0], expected, **tol)
    # Below 0.5 the word is cut out (the tokens after it move up) or two zero vectors.
    expected = encode_by_hand(tok, encoder, ["a", "and", dog.vectors, "and", dog.vectors])
    torch.testing.assert_close(remove(490)[0], expected, **tol)
    expected = encode_by_hand(tok, encoder, ["a", torch.zeros(2, 16), "and", dog.vectors, "and", dog.vectors])
    torch.testing.assert_close(zero(490)[0], expected, **tol)
    assert (remove(490) - zero(490)).abs().max() > 1e-3 and (remove(720) - remove(490)).abs().max() > 1e-3


def test_clear_errors_for_concepts_and_use():
    tok, encoder = tiny()
    cat = Concept("<cat>", torch.randn(4, 1, 16))
    with pytest.raises(ConceptError, match="Two concepts are called <cat>"):
        PromptWords([cat, Concept("CAT", torch.randn(1, 16))], tok, encoder)
    with pytest.raises(ConceptError, match="width 32"):
        PromptWords([Concept("<big>", torch.randn(4, 1, 32))], tok, encoder)
    with pytest.raises(ConceptError, match="cannot be written in a prompt"):
        PromptWords([Concept("<a|b>", torch.randn(4, 1, 16))], tok, encoder)
    words = PromptWords([cat, Concept("jane", torch.randn(4, 1, 16))], tok, encoder)
    with pytest.raises(PromptError, match="'Jane' is a multiresolution word") as info:
        words.parse("a painting by Jane")  # a bare multires token: which resolution?
    assert caret(info.value, "a painting by Jane") == (14, 4)
    assert words.parse("a <jane(0.5)> by janet")[1].name == "jane"  # only the whole word counts
    with pytest.raises(ValueError, match="drop must be one of"):
        words.conditioning("a <cat(0.5)>", drop="zeros")
    context_fn = words.conditioning("a <cat(0.5)>")
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, 1000\)"):
        context_fn(1000)
    with pytest.raises(ValueError, match="one timestep at a time"):
        context_fn(torch.tensor([10, 20]))
    assert context_fn(torch.tensor([981, 981])).shape == (1, 20, 16)  # a [B] tensor of one timestep is fine


def test_no_concepts_plain_prompts_and_time_dependence():
    tok, encoder = tiny()
    words = PromptWords([], tok, encoder)
    context = words.conditioning(["a photo of a cat", ""], n=2)
    with torch.no_grad():
        plain = encoder(tok(["a photo of a cat", ""], length=20))
    torch.testing.assert_close(context, plain.repeat_interleave(2, dim=0), rtol=0, atol=0)
    with pytest.raises(PromptError, match="not a loaded concept"):
        words.parse("a <cat>")
    words = PromptWords([Concept("<cat>", torch.randn(10, 1, 16)), Concept("<dog>", torch.randn(1, 16))],
                        tok, encoder)
    depends = {p: words.depends_on_time(p) for p in
               ["a cat", "a <dog>", "a <dog[0.5]>", "a <cat|0.5|>", "a <dog(0.5)>", "a <cat>", "a <cat[1]>",
                "a <cat(0)>", "a <dog(0)>"]}
    assert depends == {"a cat": False, "a <dog>": False, "a <dog[0.5]>": False, "a <cat|0.5|>": False,
                       "a <dog(0.5)>": True, "a <cat>": True, "a <cat[1]>": False, "a <cat(0)>": True,
                       "a <dog(0)>": False}
