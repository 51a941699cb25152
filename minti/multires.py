"""Multiresolution textual inversion at sampling time: which of its embeddings a word uses at each step.

Daras & Dimakis 2022 (arXiv:2211.17115) learn one embedding per slice of diffusion time, emb_0 ...
emb_{T-1}: training at timestep tau uses bucket floor(tau * T / 1000) (textual_inversion.time_bucket).
While sampling, a prompt says what each word uses at timestep tau, with a time t_f in [0, 1] (1 = pure
noise) that names the timestep tau_f = round(1000 t_f), converted once:

    <S|t_f|>  fixed:  emb(tau_f) at every step
    <S(t_f)>  semi:   emb(tau) while tau >= tau_f; below tau_f the word is silent
    <S[t_f]>  fully:  emb(max(tau, tau_f))
    <S>       fully from 0: each step the embedding that trained on it

A silent word is cut out of the prompt (drop="remove") or kept as zero vectors (drop="zero", as the
paper's public code does). The paper's code takes bucket indices k: its <S|k|> and <S[k]> are <S|k/T|> and
<S[k/T]> here, and its <S(k)>, which silences bucket k too, <S((k+1)/T)>. io/prompt_syntax.py reads the
syntax (PromptWords); the text encoder runs once per distinct conditioning.
"""
from dataclasses import dataclass

import torch

from .schedulers import NUM_TRAIN_TIMESTEPS
from .textual_inversion import time_bucket

DROPS = ("remove", "zero")


def timestep_of(time: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> int:
    """The timestep a prompt's time t in [0, 1] names: round(t * 1000) (t = 1: 1000, beyond the last step)."""
    if not 0.0 <= time <= 1.0:
        raise ValueError(f"A time t must lie in [0, 1], got {time}.")
    return round(time * num_train_timesteps)


def resolve(word, timestep: int, num_buckets: int | None, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """The bucket a prompt's word (its .mode and .t_fixed) uses at a sampling timestep among num_buckets
    (None: a plain word, one bucket), or None when it is silent: the paper's three definitions."""
    fixed = timestep_of(word.t_fixed, num_train_timesteps)
    if word.mode == "fixed":
        active = fixed
    elif word.mode == "fully":
        active = max(timestep, fixed)
    else:  # semi
        active = timestep if timestep >= fixed else None
    return None if active is None else time_bucket(active, num_buckets or 1, num_train_timesteps)


@dataclass
class TokenizedPrompt:
    """A prompt tokenized once: the token vectors of its text, and its learned words in between."""

    text_vectors: list  # len(words) + 1 tensors [length, D], from the start token to the end token
    words: list  # the prompt's words (io/prompt_syntax.Word: .mode, .t_fixed)
    vectors: list  # each word's [T, n, D] (T = 1 for a plain word)
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def buckets(self, timestep: int) -> tuple:
        """Each word's bucket at a sampling timestep, or None where it is silent."""
        return tuple(resolve(w, timestep, len(v), self.num_train_timesteps) for w, v in zip(self.words, self.vectors))

    def depends_on_time(self) -> bool:
        """Whether the conditioning changes during sampling (else one encoding serves every step)."""
        return len({self.buckets(s) for s in range(self.num_train_timesteps)}) > 1

    def token_vectors(self, buckets: tuple, drop: str, length: int) -> torch.Tensor:
        """The prompt's token vectors [length, D] at one step: between the text's, each word's vectors of its
        bucket, or where it is silent zeros (drop="zero") or nothing (drop="remove": the tokens after it move
        up). Then cut, keeping the end token last, or padded with end tokens, as SD 1.x's tokenizer."""
        rows = [self.text_vectors[0]]
        for vectors, k, text in zip(self.vectors, buckets, self.text_vectors[1:]):
            if k is not None or drop == "zero":
                rows.append(vectors[k] if k is not None else torch.zeros_like(vectors[0]))
            rows.append(text)
        rows, end = torch.cat(rows), self.text_vectors[-1][-1:]  # the end token's vector
        if len(rows) > length:
            rows = torch.cat([rows[:length - 1], end])
        return torch.cat([rows, end.expand(length - len(rows), -1)])


def conditioning(text_encoder, tokenized: dict, prompts: list, timesteps=None, drop: str = "remove", n: int = 1):
    """The conditioning of prompts during sampling: [P * n, L, D], prompt by prompt, n rows each.

    tokenized: {prompt: TokenizedPrompt}. A tensor when nothing depends on time, else
    context_fn(timestep) -> [P * n, L, D]. Each prompt is encoded once per distinct tuple of buckets: with
    `timesteps` (the scheduler's) all of them now, in one call, else on first use.
    """
    if drop not in DROPS:
        raise ValueError(f"drop must be one of {DROPS} (what a <name(t)> word is below t), got {drop!r}.")
    if n < 1:
        raise ValueError(f"n (images per prompt) must be >= 1, got {n}.")
    length, encoded = text_encoder.config.max_position_embeddings, {}  # (prompt, buckets) -> [L, D]

    def keys(timestep):  # an int, a 0-d tensor or a [B] tensor of one timestep (one sampling step)
        values = timestep.reshape(-1).unique().tolist() if torch.is_tensor(timestep) else [int(timestep)]
        if len(values) != 1:
            raise ValueError(f"The conditioning is built per sampling step, one timestep at a time; got {values}.")
        if not 0 <= values[0] < (last := tokenized[prompts[0]].num_train_timesteps):
            raise ValueError(f"A sampling timestep must lie in [0, {last}), got {values[0]}.")
        return [(p, tokenized[p].buckets(int(values[0]))) for p in prompts]

    @torch.no_grad()
    def encode(wanted):  # those not encoded yet, in one text-encoder call
        missing = [key for key in dict.fromkeys(wanted) if key not in encoded]
        if missing:
            rows = torch.stack([tokenized[p].token_vectors(b, drop, length) for p, b in missing])
            encoded.update(zip(missing, text_encoder(None, inputs_embeds=rows)))

    def context_fn(timestep):
        wanted = keys(timestep)
        encode(wanted)
        return torch.stack([encoded[key] for key in wanted]).repeat_interleave(n, dim=0)

    if not any(tokenized[p].depends_on_time() for p in prompts):
        return context_fn(0)
    if timesteps is not None:
        encode([key for s in torch.as_tensor(timesteps).reshape(-1).tolist() for key in keys(s)])
    return context_fn
