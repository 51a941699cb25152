"""Prompts with learned words, and the text conditioning they give at each sampling step.

Multiresolution textual inversion (Daras & Dimakis 2022, arXiv:2211.17115) learns one embedding per
slice of diffusion time, emb_0 ... emb_{T-1}; the prompt says which one a word uses at each step, with
t_fixed a number in [0, 1] (`0`, `0.5`, `.8`, `1`). The paper's code takes bucket indices k instead: its
<S|k|> and <S[k]> are <S|k/T|> and <S[k/T]> here, and its <S(k)>, which silences bucket k too, <S((k+1)/T)>.

    <name|t|>  fixed:  emb(t_fixed) at every step
    <name(t)>  semi:   emb(t) while t >= t_fixed; below it the word gives no conditioning
    <name[t]>  fully:  emb(t) while t >= t_fixed; emb(t_fixed) below it
    <name>     fully over the whole range: <name[0]>

`name` is a concept's token without brackets ("<cat>" or "cat" -> <cat>), ignoring case; a plain word
is a word with T = 1. A step's time is t = timestep / 1000 (1 = pure noise) and emb(t) is bucket
bucket_index(t, T) = floor(timestep * T / 1000), the one training used for that timestep. The text
encoder runs once per distinct conditioning (at most T per word), not once per step as the paper's code.
"""
import difflib
import re
from dataclasses import dataclass

import torch

from .concepts import Concept, ConceptError, check_width, expand_prompt, placeholder_table
from .textual_inversion import add_words, bucket_index, splice
from .sampling import encode_prompts

NUM_TRAIN_TIMESTEPS = 1000  # SD 1.x's DDPM: timesteps 0 .. 999
# A word's name: anything up to the first space, bracket, bar, comma, semicolon, quote or backslash.
NAME = re.compile(r"[^\s<>|()\[\]\\,;\"]+")
NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")  # 0, 0.5, .8, 1, 1.0, 1. (signs only to say "out of range")
MODES = {"|": ("|", "fixed"), "(": (")", "semi"), "[": ("]", "fully")}  # opener -> (closer, mode)
DROPS = ("remove", "zero")


class PromptError(ValueError):
    """A prompt minti cannot read; the message quotes it and points at the place with a caret line."""

    def __init__(self, prompt: str, start: int, end: int, problem: str, hint: str = ""):
        self.prompt, self.position = prompt, start
        shown = re.sub(r"\s", " ", prompt)  # one line, and the caret stays under the right character
        caret = " " * start + "^" * max(1, end - start)
        super().__init__(f"{problem}:\n  {shown}\n  {caret}" + (f"\n{hint}" if hint else ""))


# ------------------------------------------------------------------------------------------ parsing

@dataclass(frozen=True)
class Word:
    """One learned word of a prompt: `<name|t|>` is Word("name", "fixed", t, ...)."""

    name: str  # as written in the prompt
    mode: str  # "fixed", "semi" or "fully"
    t_fixed: float  # in [0, 1]; 0 for a bare <name>
    start: int  # where the word stands in the prompt, for error messages
    end: int


def prompt_name(token: str) -> str:
    """How a prompt calls a concept: the token without its angle brackets ("<cat>" and "cat" -> "cat")."""
    return token[1:-1] if len(token) > 2 and token.startswith("<") and token.endswith(">") else token


def _unknown(prompt, start, end, name, known):
    close = difflib.get_close_matches(name.lower(), known, n=1)
    hint = f"Did you mean <{close[0]}>? " if close else ""
    loaded = ", ".join(f"<{k}>" for k in sorted(known)) or "none"
    raise PromptError(prompt, start, end, f"<{name}> is not a loaded concept (a typo?)",
                      f"{hint}Loaded concepts: {loaded}. For a literal '<' in the text, write '\\<'.")


def _parse_time(prompt: str, start: int, name: str, i: int) -> Word:
    """The word `<name` + `|t|>`, `(t)>` or `[t]>` whose opener stands at prompt[i]."""
    opener = prompt[i]
    closer, mode = MODES[opener]
    example = f"<{name}{opener}0.5{closer}>"
    j = i + 1
    while j < len(prompt) and prompt[j] == " ":
        j += 1
    number = NUMBER.match(prompt, j)
    if number is None:
        if prompt.startswith(closer, j):
            raise PromptError(prompt, i, j + 1, f"No resolution between {opener!r} and {closer!r}",
                              f"Write a number t in [0, 1], e.g. {example}.")
        raise PromptError(prompt, j, j + 1, f"Expected a resolution t in [0, 1] after {opener!r}",
                          f"e.g. {example}.")
    t = float(number.group(0))
    if not 0.0 <= t <= 1.0:
        hint = "t is the diffusion time: 0 = the last, least noisy step, 1 = pure noise."
        if t.is_integer() and t > 1:  # the paper's code takes bucket indices 0..9
            k = int(t)
            same = (k + 1) / 10 if mode == "semi" else k / 10  # its (k) silences bucket k as well
            hint += (f" The paper's code takes bucket indices: with its 10 buckets, its "
                     f"<{name}{opener}{k}{closer}> is <{name}{opener}{same:g}{closer}> here.")
        raise PromptError(prompt, number.start(), number.end(),
                          f"Resolution {number.group(0)} is not in [0, 1]", hint)
    j = number.end()
    while j < len(prompt) and prompt[j] == " ":
        j += 1
    if not prompt.startswith(closer, j):
        if j < len(prompt) and prompt[j] in "0123456789.,+-":
            raise PromptError(prompt, number.start(), j + 1, "A word takes one resolution t, found more",
                              f"e.g. {example}.")
        raise PromptError(prompt, j, j + 1, f"Expected {closer!r} to close {opener!r}", f"e.g. {example}.")
    if not prompt.startswith(">", j + 1):
        raise PromptError(prompt, j + 1, j + 2, f"Expected '>' to close <{name}", f"e.g. {example}.")
    return Word(name, mode, t, start, j + 2)


def parse_prompt(prompt: str, names) -> list:
    """Split a prompt into ordinary text and learned words: [str, Word, str, ..., Word, str].

    names: the names of the loaded concepts (see prompt_name), matched ignoring case as the tokenizer
    matches placeholders. A '<' starts a word only when a name follows it and then '>', '|', '(' or
    '['; otherwise it is text ("x < y", "I <3 you"). `<name>` with an unknown name is an error, not
    text: it is most likely a typo (or another tool's syntax, e.g. A1111's <lora:...>); `\\<` writes a
    literal '<'. A known name that is not closed ("a <cat on", "<cat(0.5)") is an error too.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"A prompt is a str, got {type(prompt).__name__}.")
    known = {n.lower() for n in names}
    pieces, text, i = [], [], 0
    while i < len(prompt):
        if prompt.startswith("\\<", i):
            text.append("<")
            i += 2
            continue
        if prompt[i] != "<":
            text.append(prompt[i])
            i += 1
            continue
        found = NAME.match(prompt, i + 1)
        name = found.group(0) if found else ""
        j = i + 1 + len(name)
        after = prompt[j:j + 1]
        if after in MODES:
            if not name:
                raise PromptError(prompt, i, j + 1, "A learned word needs a name before its resolution",
                                  "e.g. <cat(0.5)>.")
            word = _parse_time(prompt, i, name, j)
        elif after == ">" and name:
            word = Word(name, "fully", 0.0, i, j + 1)
        elif name.lower() in known:
            raise PromptError(prompt, i, j, f"<{name} is not closed",
                              f"Write <{name}>, <{name}|t|>, <{name}(t)> or <{name}[t]> with t in [0, 1].")
        else:  # a plain '<'
            text.append("<")
            i += 1
            continue
        if name.lower() not in known:
            _unknown(prompt, word.start, word.end, name, known)
        pieces += ["".join(text), word]
        text, i = [], word.end
    return pieces + ["".join(text)]


# ------------------------------------------------------------------------------------------- time

def sampling_time(timestep, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> float:
    """A sampling step's diffusion time t in [0, 1): timestep / num_train_timesteps (0 = no noise)."""
    return int(timestep) / num_train_timesteps


def active_time(word: Word, t: float) -> float | None:
    """The time whose embedding `word` uses at sampling time t, or None when it is silent.

    The three definitions of the paper. A plain (one-resolution) word is a word with T = 1: its one
    embedding whatever the time, and `(t)` still silences it below t_fixed.
    """
    if word.mode == "fixed":
        return word.t_fixed
    if t >= word.t_fixed:
        return t
    return word.t_fixed if word.mode == "fully" else None


def resolve(word: Word, t: float, resolutions: int | None) -> int | None:
    """The bucket `word` uses at sampling time t among `resolutions` (None or 1: a plain word), or None."""
    active = active_time(word, t)
    return None if active is None else bucket_index(active, resolutions or 1)


def _timestep(t) -> int:
    """One step's timestep from an int, a 0-d tensor or a [B] tensor of equal values."""
    if torch.is_tensor(t):
        values = t.reshape(-1).unique().tolist()
        if len(values) != 1:
            raise ValueError(f"The conditioning is built per sampling step, for one timestep at a time; "
                             f"got {values}.")
        return int(values[0])
    return int(t)


# ------------------------------------------------------------------------------- words -> context

def _register(tokenizer, words: list[Concept]) -> dict[str, list[int]]:
    """add_words for the words the tokenizer does not hold yet; reuse the ids of those it does.

    Placeholder ids only mark where a word stands (its vectors come from our table), so a second
    PromptWords on the same tokenizer can reuse them: the tokens are added once per tokenizer.
    """
    added = getattr(tokenizer, "added", {})
    ids, new = {}, []
    for w in words:
        if all(name in added for name in w.placeholder_tokens):
            ids[w.token] = [added[name] for name in w.placeholder_tokens]
        else:
            new.append(w)
    if new:
        ids.update(add_words(tokenizer, {c.token: c.num_vectors for c in new}))
    return ids


class PromptWords:
    """The learned words of a sampling session, and the conditioning of prompts that use them.

    Each concept becomes ordinary one-resolution words that the tokenizer holds once: a multires
    concept "<cat>" one per bucket ("<cat@0>" ... "<cat@9>", each `<tok> <tok>_1 ...` for n vectors),
    a plain concept itself (so its bare token in the text works as always), and each a "<cat@zero>"
    of zero vectors for drop="zero". At a step, each word of the prompt is written as the word it
    resolves to, or cut out; the text then goes through expand_prompt / the tokenizer / splice.
    """

    def __init__(self, concepts, tokenizer, text_encoder, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
        concepts = [concepts] if isinstance(concepts, Concept) else list(concepts)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.num_train_timesteps = num_train_timesteps
        self.concepts = {}  # lower-case prompt name -> Concept
        for c in concepts:
            check_width(c, text_encoder.config.hidden_size)
            name = prompt_name(c.token)
            other = self.concepts.get(name.lower())
            if other is not None:
                raise ConceptError(
                    f"Two concepts are called <{prompt_name(other.token)}> in prompts ({other.token!r} and "
                    f"{c.token!r}; names ignore case): rename one (load_concepts(path, token=...)).")
            if c.is_multires and not NAME.fullmatch(name):
                raise ConceptError(f"The multiresolution word {c.token!r} cannot be written in a prompt "
                                   "(spaces, brackets, '|', ',' or ';' in its name): rename it with token=.")
            self.concepts[name.lower()] = c
        # (token, bucket or "zero") -> the ordinary word standing for it
        self.variants = {}
        for c in concepts:
            name = prompt_name(c.token)
            if c.is_multires:
                for k in range(c.resolutions):
                    self.variants[c.token, k] = Concept(f"<{name}@{k}>", c.vectors[k])
            else:
                self.variants[c.token, 0] = c
            self.variants[c.token, "zero"] = Concept(f"<{name}@zero>", torch.zeros(c.num_vectors, c.width))
        words = list(self.variants.values())
        self.table = text_encoder.text_model.embeddings.token_embedding.weight
        if words:
            new_ids, vectors = placeholder_table(words, _register(tokenizer, words))
        else:  # no concepts: prompts are plain text
            new_ids, vectors = torch.zeros(0, dtype=torch.long), torch.zeros(0, self.table.shape[1])
        self.new_ids, self.vectors = new_ids.to(self.table.device), vectors.to(self.table.device)

    def embed_fn(self, ids):
        """Token vectors [B, L, D] of ids, every placeholder's vectors spliced in: sampling's embed_fn."""
        return splice(ids, self.table, self.new_ids.to(ids.device), self.vectors.to(ids.device))

    def parse(self, prompt: str) -> list:
        """parse_prompt with the loaded names; also refuses a multires word written without brackets."""
        pieces = parse_prompt(prompt, self.concepts)
        spans = [(w.start, w.end) for w in pieces if isinstance(w, Word)]
        for c in self.concepts.values():
            if not c.is_multires or c.token.startswith("<"):
                continue  # a bracketed token is always parsed as a word
            for m in re.finditer(rf"(?<!\w){re.escape(c.token)}(?!\w)", prompt, re.IGNORECASE):
                if not any(a <= m.start() < b for a, b in spans):
                    raise PromptError(
                        prompt, m.start(), m.end(), f"{m.group(0)!r} is a multiresolution word",
                        f"Say which resolution: <{c.token}> (the current step's), <{c.token}|t|>, "
                        f"<{c.token}(t)> or <{c.token}[t]> with t in [0, 1].")
        return pieces

    def depends_on_time(self, prompt: str) -> bool:
        """Whether the prompt's conditioning changes during sampling (else one encoding serves every step)."""
        pieces = self.parse(prompt)
        times = [sampling_time(s, self.num_train_timesteps) for s in range(self.num_train_timesteps)]
        return len({self._states(pieces, t, "remove") for t in times}) > 1

    def _states(self, pieces: list, t: float, drop: str) -> tuple:
        """What each word is written as at time t: a placeholder word, or " " where it is cut out."""
        out = []
        for word in pieces[1::2]:
            concept = self.concepts[word.name.lower()]
            k = resolve(word, t, concept.resolutions)
            if k is None:
                # A space, not "": the neighbours stay apart, as they are around a placeholder.
                out.append(" " if drop == "remove" else self.variants[concept.token, "zero"].token)
            else:
                out.append(self.variants[concept.token, k].token)
        return tuple(out)

    def _text(self, pieces: list, states: tuple) -> str:
        text = "".join(p for pair in zip(pieces[::2], states + ("",)) for p in pair)
        return expand_prompt(text, list(self.variants.values()))

    def render(self, prompt: str, t: float, drop: str = "remove") -> str:
        """The text a prompt is encoded as at sampling time t, e.g. "a photo of <cat@7> <cat@7>_1"."""
        pieces = self.parse(prompt)
        return self._text(pieces, self._states(pieces, t, _check_drop(drop)))

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """One text-encoder call on rendered texts -> [len(texts), L, D]."""
        return encode_prompts(self.tokenizer, self.text_encoder, texts, self.embed_fn)

    def conditioning(self, prompts, timesteps=None, drop: str = "remove", n: int = 1):
        """The conditioning of prompts during sampling: [P * n, L, D], prompt by prompt, n rows each.

        Returns a tensor when no word depends on time (one encoding, plain prompts cost nothing more),
        else context_fn(timestep) -> [P * n, L, D]. Steps that resolve to the same words share one
        encoding: with `timesteps` (the sampler's) all of them are encoded now in one call; other
        timesteps are encoded on first use, and kept. drop: "remove" cuts a silent word out of the
        prompt; "zero" keeps it as zero vectors, as the paper's public code does.
        """
        drop = _check_drop(drop)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if n < 1:
            raise ValueError(f"n (images per prompt) must be >= 1, got {n}.")
        parsed = [self.parse(p) for p in prompts]
        texts = {}  # (prompt index, states) -> rendered text
        encoded = {}  # rendered text -> [L, D]; identical texts (of any prompts) are encoded once

        def texts_at(timestep) -> tuple:
            t = sampling_time(timestep, self.num_train_timesteps)
            keys = [(i, self._states(pieces, t, drop)) for i, pieces in enumerate(parsed)]
            for key in keys:
                if key not in texts:
                    texts[key] = self._text(parsed[key[0]], key[1])
            return tuple(texts[key] for key in keys)

        def encode_missing(rows):
            missing = list(dict.fromkeys(text for row in rows for text in row if text not in encoded))
            if missing:
                encoded.update(zip(missing, self.encode(missing)))

        def stack(row):
            return torch.stack([encoded[text] for text in row]).repeat_interleave(n, dim=0)

        every = {texts_at(timestep) for timestep in range(self.num_train_timesteps)}
        if len(every) == 1:  # nothing depends on time
            encode_missing(every)
            return stack(every.pop())
        if timesteps is not None:
            steps = torch.as_tensor(timesteps).reshape(-1)
            encode_missing({texts_at(self._check_timestep(s)) for s in steps})

        def context_fn(timestep):
            row = texts_at(self._check_timestep(_timestep(timestep)))
            encode_missing([row])
            return stack(row)

        return context_fn

    def _check_timestep(self, timestep) -> int:
        timestep = int(timestep)
        if not 0 <= timestep < self.num_train_timesteps:
            raise ValueError(
                f"A sampling timestep must lie in [0, {self.num_train_timesteps}), got {timestep}.")
        return timestep


def _check_drop(drop: str) -> str:
    if drop not in DROPS:
        raise ValueError(f"drop must be one of {DROPS} (what a <name(t)> word is below t), got {drop!r}.")
    return drop


def build_conditioning(prompt, concepts, tokenizer, text_encoder, timesteps=None, drop: str = "remove",
                       n: int = 1, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """The conditioning of one prompt or a list of prompts with learned words, for minti.sampling.

    A tensor [P * n, L, D] when nothing depends on time, else context_fn(timestep) -> [P * n, L, D].
    The concepts' placeholders are added to the tokenizer once (a second call reuses them). See
    PromptWords.conditioning; keep a PromptWords to build several (prompts, negative prompts).
    """
    words = PromptWords(concepts, tokenizer, text_encoder, num_train_timesteps)
    return words.conditioning(prompt, timesteps=timesteps, drop=drop, n=n)
