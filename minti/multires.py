"""Multiresolution textual inversion at sampling time: which of its embeddings a word uses at each step.

Daras & Dimakis 2022 (arXiv:2211.17115) learn one embedding per slice of diffusion time, emb_0 ...
emb_{T-1}: training at timestep tau uses bucket floor(tau * T / 1000) (LearnedWord.bucket). While
sampling, t = timestep / 1000 (1 = pure noise), and a prompt says what each word uses, with t_f in [0, 1]:

    <S|t_f|>  fixed:  emb(t_f) at every step
    <S(t_f)>  semi:   emb(t) while t >= t_f; below t_f the word is silent
    <S[t_f]>  fully:  emb(max(t, t_f))
    <S>       fully from 0: each step the embedding that trained on it

A silent word is cut out of the prompt (drop="remove") or kept as zero vectors (drop="zero", as the
paper's public code does). The paper's code takes bucket indices k: its <S|k|> and <S[k]> are <S|k/T|> and
<S[k/T]> here, and its <S(k)>, which silences bucket k too, <S((k+1)/T)>. A prompt is parsed and
tokenized once; at each step each word becomes its bucket's vectors (or silence) between the token
vectors of the text, and the text encoder runs once per distinct conditioning. prompt_syntax.py reads
the syntax and says what is wrong with a prompt.
"""
from dataclasses import dataclass

import torch

from .checks import check_drop, check_images_per_prompt, one_timestep
from .io.concepts import Concept, check_width
from .io.prompt_syntax import Word, expand_prompt, names_in_prompts, parse_prompt, refuse_bare_multires_words
from .textual_inversion import add_words, bucket_index, splice

NUM_TRAIN_TIMESTEPS = 1000  # SD 1.x's DDPM: timesteps 0 .. 999
DROPS = ("remove", "zero")


def sampling_time(timestep, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> float:
    """A sampling step's diffusion time t in [0, 1): timestep / num_train_timesteps (0 = no noise)."""
    return int(timestep) / num_train_timesteps


def resolve(word: Word, t: float, resolutions: int | None) -> int | None:
    """The bucket `word` uses at sampling time t among `resolutions` buckets (None: a plain word, one
    bucket), or None when it is silent: the paper's three definitions."""
    if word.mode == "fixed":
        active = word.t_fixed
    elif word.mode == "fully":
        active = max(t, word.t_fixed)
    else:  # semi
        active = t if t >= word.t_fixed else None
    return None if active is None else bucket_index(active, resolutions or 1)


@dataclass
class TokenizedPrompt:
    """A prompt tokenized once: the token vectors of its text, and its learned words in between."""

    text: list  # len(words) + 1 tensors [length, D], from the start token to the end token
    words: list  # Word
    vectors: list  # each word's [T, n, D] (T = 1 for a plain word)

    def buckets(self, t: float) -> tuple:
        """Each word's bucket at sampling time t, or None where it is silent."""
        return tuple(resolve(w, t, len(v)) for w, v in zip(self.words, self.vectors))


class PromptWords:
    """The learned words of a sampling session, and the conditioning of prompts that use them.

    A plain word's placeholder tokens are added to the tokenizer once, so that its token works in any
    text (as in diffusers and A1111). A multiresolution word never goes through the tokenizer: it is a
    place in the parsed prompt, filled at each step with the vectors of its bucket.
    """

    def __init__(self, concepts, tokenizer, text_encoder, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
        concepts = [concepts] if isinstance(concepts, Concept) else list(concepts)
        for c in concepts:
            check_width(c, text_encoder.config.hidden_size)
        self.concepts = names_in_prompts(concepts)  # lower-case prompt name -> Concept
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.num_train_timesteps = num_train_timesteps
        self.table = text_encoder.text_model.embeddings.token_embedding.weight  # frozen, only read
        self.plain = [c for c in concepts if not c.is_multires]
        held = getattr(tokenizer, "added", {})  # words added before (by another PromptWords) are reused
        add_words(tokenizer, {c.token: c.num_vectors for c in self.plain
                              if not all(p in held for p in c.placeholder_tokens)})
        ids = [tokenizer.token_to_id(p) for c in self.plain for p in c.placeholder_tokens]
        self.new_ids = torch.tensor(ids, dtype=torch.long)
        self.vectors = torch.cat([c.vectors for c in self.plain] or [torch.zeros(0, self.table.shape[1])])

    def embed_fn(self, ids):
        """Token vectors [B, L, D] of ids, the plain words' vectors spliced in (sampling's embed_fn)."""
        return splice(ids, self.table, self.new_ids.to(ids.device), self.vectors.to(ids.device))

    def parse(self, prompt: str) -> list:
        """[text, Word, text, ..., Word, text] with the loaded names (see prompt_syntax.parse_prompt)."""
        pieces = parse_prompt(prompt, self.concepts)
        refuse_bare_multires_words(prompt, pieces, self.concepts.values())
        return pieces

    @torch.no_grad()
    def tokenize(self, prompt: str) -> TokenizedPrompt:
        """Parse and tokenize once: the text's token vectors (plain words spliced in), the words' vectors."""
        pieces = self.parse(prompt)
        ids = [self.tokenizer.encode(expand_prompt(text, self.plain))[1:-1] for text in pieces[::2]]
        ids[0] = [self.tokenizer.bos_id] + ids[0]
        ids[-1] = ids[-1] + [self.tokenizer.eos_id]  # the same list as ids[0] in a prompt without words
        text = [self.embed_fn(torch.tensor([i], dtype=torch.long, device=self.table.device))[0] for i in ids]
        concepts = [self.concepts[w.name.lower()] for w in pieces[1::2]]
        vectors = [(c.vectors if c.is_multires else c.vectors[None]).to(self.table) for c in concepts]
        return TokenizedPrompt(text, pieces[1::2], vectors)

    def token_vectors(self, prompt: TokenizedPrompt, buckets: tuple, drop: str) -> torch.Tensor:
        """The prompt's token vectors [L, D] at one step: between the text's, each word's vectors of its
        bucket, or where it is silent zeros (drop="zero") or nothing (drop="remove": the tokens after it
        move up). Then cut, keeping the end token last, or padded with end tokens, as SD 1.x's tokenizer."""
        rows = [prompt.text[0]]
        for vectors, k, text in zip(prompt.vectors, buckets, prompt.text[1:]):
            if k is not None or drop == "zero":
                rows.append(vectors[k] if k is not None else torch.zeros_like(vectors[0]))
            rows.append(text)
        rows, length = torch.cat(rows), self.text_encoder.config.max_position_embeddings
        end = prompt.text[-1][-1:]  # the end token's vector
        if len(rows) > length:
            rows = torch.cat([rows[:length - 1], end])
        return torch.cat([rows, end.expand(length - len(rows), -1)])

    def conditioning(self, prompts, timesteps=None, drop: str = "remove", n: int = 1):
        """The conditioning of prompts during sampling: [P * n, L, D], prompt by prompt, n rows each.

        A tensor when nothing depends on time, else context_fn(timestep) -> [P * n, L, D]. Each prompt
        is encoded once per distinct tuple of buckets: with `timesteps` (the scheduler's) all of them
        now, in one call, else on first use. drop: what a silent word is, "remove" or "zero".
        """
        check_drop(drop)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_images_per_prompt(n)
        tokenized = {p: self.tokenize(p) for p in dict.fromkeys(prompts)}
        encoded = {}  # (prompt, buckets) -> [L, D]

        def keys(timestep):  # an int, a 0-d tensor or a [B] tensor of one timestep
            t = sampling_time(one_timestep(timestep, self.num_train_timesteps), self.num_train_timesteps)
            return [(p, tokenized[p].buckets(t)) for p in prompts]

        @torch.no_grad()
        def encode(wanted):  # those not encoded yet, in one text-encoder call
            missing = [key for key in dict.fromkeys(wanted) if key not in encoded]
            if missing:
                rows = torch.stack([self.token_vectors(tokenized[p], b, drop) for p, b in missing])
                encoded.update(zip(missing, self.text_encoder(None, inputs_embeds=rows)))

        def context_fn(timestep):
            wanted = keys(timestep)
            encode(wanted)
            return torch.stack([encoded[key] for key in wanted]).repeat_interleave(n, dim=0)

        if not any(self.depends_on_time(p) for p in tokenized.values()):
            return context_fn(0)
        if timesteps is not None:
            encode([key for s in torch.as_tensor(timesteps).reshape(-1).tolist() for key in keys(s)])
        return context_fn

    def depends_on_time(self, prompt) -> bool:
        """Whether a prompt's conditioning changes during sampling (else one encoding serves every step)."""
        prompt = self.tokenize(prompt) if isinstance(prompt, str) else prompt
        steps = range(self.num_train_timesteps)
        return len({prompt.buckets(sampling_time(s, self.num_train_timesteps)) for s in steps}) > 1


def build_conditioning(prompt, concepts, tokenizer, text_encoder, timesteps=None, drop: str = "remove",
                       n: int = 1, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """PromptWords(...).conditioning(prompt, ...) in one call. Keep a PromptWords to build several
    (prompts and negative prompts)."""
    words = PromptWords(concepts, tokenizer, text_encoder, num_train_timesteps)
    return words.conditioning(prompt, timesteps=timesteps, drop=drop, n=n)

