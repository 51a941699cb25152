"""How prompts write learned words, the errors that say what is wrong with one, and PromptWords, which
turns prompts with learned words into the conditioning of every sampling step (multires.py).

    "a photo of <cat(0.5)> made with <jane|0.1|>"  ->  ["a photo of ", Word, " made with ", Word, ""]

`<name|t|>`, `<name(t)>`, `<name[t]>` and `<name>` are the multiresolution modes (multires.py says what
they mean); `name` is a concept's token without brackets, matched ignoring case; t a number in [0, 1]
(0, 0.5, .8, 1). A prompt minti cannot read raises PromptError, which quotes the prompt with a caret line
under the place. expand_prompt writes a multi-vector word as its tokens, as diffusers does.
"""
import difflib
import re
from dataclasses import dataclass

import torch

from .. import multires
from ..schedulers import NUM_TRAIN_TIMESTEPS
from ..textual_inversion import add_words, splice, token_table
from .concepts import Concept, ConceptError, bare_name, check_width

NAME = re.compile(r"[^\s<>|()\[\]\\,;\"]+")  # up to a space, bracket, bar, backslash, comma, ';' or quote
NUMBER = re.compile(r" *([+-]?(?:\d+\.?\d*|\.\d+))? *")  # 0, 0.5, .8, 1, 1. (signs: to say "out of range")
MODES = {"|": ("|", "fixed"), "(": (")", "semi"), "[": ("]", "fully")}  # opener -> (closer, mode)


class PromptError(ValueError):
    """A prompt minti cannot read; the message quotes it and points at the place with a caret line."""

    def __init__(self, prompt: str, start: int, end: int, problem: str, hint: str = ""):
        self.prompt, self.position = prompt, start
        shown = re.sub(r"\s", " ", prompt)  # one line, and the caret stays under the right character
        caret = " " * start + "^" * max(1, end - start)
        super().__init__(f"{problem}:\n  {shown}\n  {caret}" + (f"\n{hint}" if hint else ""))


@dataclass(frozen=True)
class Word:
    """A learned word of a prompt: `<name|t|>` is Word("name", "fixed", t, start, end)."""

    name: str  # as written
    mode: str  # "fixed", "semi" or "fully"
    t_fixed: float  # in [0, 1]; 0 for a bare <name>
    start: int  # where it stands in the prompt, for error messages
    end: int


prompt_name = bare_name  # how a prompt calls a concept: its token without angle brackets ("<cat>" -> "cat")


def parse_prompt(prompt: str, names) -> list:
    """Split a prompt into ordinary text and learned words: [str, Word, str, ..., Word, str].

    names: the loaded concepts' names (prompt_name), matched ignoring case as the tokenizer matches
    placeholders. A '<' starts a word only when a name follows it and then '>', '|', '(' or '['; else it
    is text ("x < y", "I <3 you"). `<name>` with an unknown name is an error, not text: most likely a typo
    (or another tool's syntax, e.g. A1111's <lora:...>); `\\<` writes a literal '<'. A known name that is
    not closed ("a <cat on", "<cat(0.5)") is an error too.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"A prompt is a str, got {type(prompt).__name__}.")
    known = {n.lower() for n in names}
    pieces, text, i = [], "", 0
    while i < len(prompt):
        if prompt.startswith("\\<", i):
            text, i = text + "<", i + 2
            continue
        found = NAME.match(prompt, i + 1) if prompt[i] == "<" else None
        name = found.group(0) if found else ""
        j = i + 1 + len(name)
        after = prompt[j:j + 1]
        if prompt[i] != "<" or not (after in MODES or (after == ">" and name) or name.lower() in known):
            text, i = text + prompt[i], i + 1  # ordinary text, a '<' that starts no word included
            continue
        if after in MODES:
            word = _word_with_time(prompt, i, name, j)
        elif after == ">":
            word = Word(name, "fully", 0.0, i, j + 1)
        else:
            raise PromptError(prompt, i, j, f"<{name} is not closed",
                              f"Write <{name}>, <{name}|t|>, <{name}(t)> or <{name}[t]> with t in [0, 1].")
        if name.lower() not in known:
            close = difflib.get_close_matches(name.lower(), known, n=1)
            loaded = ", ".join(f"<{k}>" for k in sorted(known)) or "none"
            hint = (f"Did you mean <{close[0]}>? " if close else "") + f"Loaded concepts: {loaded}. "
            raise PromptError(prompt, word.start, word.end, f"<{name}> is not a loaded concept (a typo?)",
                              hint + "For a literal '<' in the text, write '\\<'.")
        pieces += [text, word]
        text, i = "", word.end
    return pieces + [text]


def _word_with_time(prompt: str, start: int, name: str, i: int) -> Word:
    """The word `<name` + `|t|>`, `(t)>` or `[t]>` whose opener stands at prompt[i]."""
    opener = prompt[i]
    closer, mode = MODES[opener]
    example = f"e.g. <{name}{opener}0.5{closer}>."
    if not name:
        raise PromptError(prompt, start, i + 1, "A learned word needs a name before its resolution",
                          "e.g. <cat(0.5)>.")
    found = NUMBER.match(prompt, i + 1)
    number, j = found.group(1), found.end()
    if number is None and prompt.startswith(closer, j):
        raise PromptError(prompt, i, j + 1, f"No resolution between {opener!r} and {closer!r}",
                          f"Write a number t in [0, 1], {example}")
    if number is None:
        raise PromptError(prompt, j, j + 1, f"Expected a resolution t in [0, 1] after {opener!r}", example)
    t = float(number)
    if not 0.0 <= t <= 1.0:
        hint = "t is the diffusion time: 0 = the last, least noisy step, 1 = pure noise."
        if t.is_integer() and t > 1:  # the paper's code takes bucket indices 0..9; its (k) silences k too
            same = (t + 1) / 10 if mode == "semi" else t / 10
            hint += (f" The paper's code takes bucket indices: with its 10 buckets, its "
                     f"<{name}{opener}{t:g}{closer}> is <{name}{opener}{same:g}{closer}> here.")
        raise PromptError(prompt, found.start(1), found.end(1), f"Resolution {number} is not in [0, 1]", hint)
    if not prompt.startswith(closer, j):
        if j < len(prompt) and prompt[j] in "0123456789.,+-":
            raise PromptError(prompt, found.start(1), j + 1, "A word takes one resolution t, found more",
                              example)
        raise PromptError(prompt, j, j + 1, f"Expected {closer!r} to close {opener!r}", example)
    if not prompt.startswith(">", j + 1):
        raise PromptError(prompt, j + 1, j + 2, f"Expected '>' to close <{name}", example)
    return Word(name, mode, t, start, j + 2)


def names_in_prompts(concepts) -> dict:
    """{lower-case prompt name: Concept}; refuses two concepts of one name and unwritable multires names."""
    named = {}
    for c in concepts:
        name = prompt_name(c.token)
        other = named.get(name.lower())
        if other is not None:
            raise ConceptError(f"Two concepts are called <{prompt_name(other.token)}> in prompts "
                               f"({other.token!r} and {c.token!r}; names ignore case): rename one "
                               "(load_concepts(path, token=...)).")
        if c.is_multires and not NAME.fullmatch(name):
            raise ConceptError(f"The multiresolution word {c.token!r} cannot be written in a prompt (spaces, "
                               "brackets, '|', ',' or ';' in its name): rename it with token=.")
        named[name.lower()] = c
    return named


def refuse_bare_multires_words(prompt: str, pieces: list, concepts) -> None:
    """A multires token written as plain text ("a painting by Jane") would silently be text: say which
    resolution instead. Only the whole word counts ("janet" is text); a bracketed token is always a word."""
    spans = [(w.start, w.end) for w in pieces[1::2]]
    for c in concepts:
        if not c.is_multires or c.token.startswith("<"):
            continue
        for m in re.finditer(rf"(?<!\w){re.escape(c.token)}(?!\w)", prompt, re.IGNORECASE):
            if not any(a <= m.start() < b for a, b in spans):
                raise PromptError(prompt, m.start(), m.end(), f"{m.group(0)!r} is a multiresolution word",
                                  f"Say which resolution: <{c.token}> (the current step's), <{c.token}|t|>, "
                                  f"<{c.token}(t)> or <{c.token}[t]> with t in [0, 1].")


def expand_prompt(prompt, concepts):
    """Write out multi-vector words: "<tok>" -> "<tok> <tok>_1 <tok>_2" (diffusers' maybe_convert_prompt).

    Like diffusers, every occurrence of the trigger is replaced (also inside a longer word, since added
    tokens are split out anywhere), case-sensitively; one-vector words stay as they are. One prompt or a
    list of prompts.
    """
    if isinstance(prompt, (list, tuple)):
        return [expand_prompt(p, concepts) for p in prompt]
    concepts = [concepts] if isinstance(concepts, Concept) else list(concepts)
    expansions = {c.token: " ".join(c.placeholder_tokens) for c in concepts if c.num_vectors > 1}
    if not expansions:
        return prompt
    # Longest first, so that of two triggers where one contains the other the longer one wins.
    pattern = "|".join(re.escape(t) for t in sorted(expansions, key=len, reverse=True))
    return re.sub(pattern, lambda m: expansions[m.group(0)], prompt)


class PromptWords:
    """The learned words of a sampling session, and the conditioning of prompts that use them.

    A plain word's placeholder tokens are added to the tokenizer once, so that its token works in any
    text (as in diffusers and A1111). A multiresolution word never goes through the tokenizer: it is a
    place in the parsed prompt, filled at each step with the vectors of its bucket (multires.py).
    """

    def __init__(self, concepts, tokenizer, text_encoder, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
        concepts = [concepts] if isinstance(concepts, Concept) else list(concepts)
        for c in concepts:
            check_width(c, text_encoder.config.hidden_size)
        self.concepts = names_in_prompts(concepts)  # lower-case prompt name -> Concept
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.num_train_timesteps = num_train_timesteps
        self.plain = [c for c in concepts if not c.is_multires]
        held = getattr(tokenizer, "added", {})  # words added before (by another PromptWords) are reused
        add_words(tokenizer, {c.token: c.num_vectors for c in self.plain
                              if not all(p in held for p in c.placeholder_tokens)})
        ids = [tokenizer.token_to_id(p) for c in self.plain for p in c.placeholder_tokens]
        self.table, self.new_ids = token_table(text_encoder), torch.tensor(ids, dtype=torch.long)
        self.vectors = torch.cat([c.vectors for c in self.plain] or [torch.zeros(0, self.table.shape[1])])

    def embed_fn(self, ids):
        """Token vectors [B, L, D] of ids, the plain words' vectors spliced in (sampling's embed_fn)."""
        return splice(ids, self.table, self.new_ids.to(ids.device), self.vectors.to(ids.device))

    def parse(self, prompt: str) -> list:
        """[text, Word, text, ..., Word, text] with the loaded names (see parse_prompt)."""
        pieces = parse_prompt(prompt, self.concepts)
        refuse_bare_multires_words(prompt, pieces, self.concepts.values())
        return pieces

    @torch.no_grad()
    def tokenize(self, prompt: str) -> multires.TokenizedPrompt:
        """Parse and tokenize once: the text's token vectors (plain words spliced in), the words' vectors."""
        pieces, device = self.parse(prompt), self.table.device
        ids = [self.tokenizer.encode(expand_prompt(text, self.plain))[1:-1] for text in pieces[::2]]
        ids[0] = [self.tokenizer.bos_id] + ids[0]
        ids[-1] = ids[-1] + [self.tokenizer.eos_id]  # the same list as ids[0] in a prompt without words
        text = [self.embed_fn(torch.tensor([i], dtype=torch.long, device=device))[0] for i in ids]
        concepts = [self.concepts[w.name.lower()] for w in pieces[1::2]]
        vectors = [(c.vectors if c.is_multires else c.vectors[None]).to(text[0]) for c in concepts]
        return multires.TokenizedPrompt(text, pieces[1::2], vectors, self.num_train_timesteps)

    def conditioning(self, prompts, timesteps=None, drop: str = "remove", n: int = 1):
        """The conditioning of prompts during sampling: [P * n, L, D], or context_fn(timestep) -> that when
        a word changes with time (multires.conditioning). drop: what a silent word is, "remove" or "zero"."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokenized = {p: self.tokenize(p) for p in dict.fromkeys(prompts)}
        return multires.conditioning(self.text_encoder, tokenized, prompts, timesteps, drop, n)

    def depends_on_time(self, prompt) -> bool:
        """Whether a prompt's conditioning changes during sampling (else one encoding serves every step)."""
        return (self.tokenize(prompt) if isinstance(prompt, str) else prompt).depends_on_time()

