"""Space-time words: a learned word whose vector depends on the UNet layer (P+) and on time (NeTI).

Textual inversion gives the word one vector; multiresolution TI (textual_inversion.LearnedWord, T > 1)
one per slice of diffusion time. P+ / Extended Textual Inversion (Voynov, Chu, Cohen-Or, Aberman 2023)
gives it one per cross-attention layer of the UNet (16 in SD 1.x, unet.cross_attention_layers): each
layer's prompt goes through the text encoder on its own, so layer l cross-attends to c(y; v_l). NeTI
(Alaluf, Richardson, Metzer, Cohen-Or 2023) replaces the table of vectors by a small network,
v = M(t, l), through a Fourier-feature encoding of (timestep, layer), adds a "textual bypass" (a
second output of M added to the text encoder's output at the word), and trains M with nested dropout
so that a truncated hidden vector still gives a usable, more editable word. Both words expose
`context(text_encoder, ids, t)` -> one context [B, L, D] per layer, which the UNet takes as a list;
training runs textual_inversion.train_loop unchanged.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .schedulers import NUM_TRAIN_TIMESTEPS
from .textual_inversion import LearnedWord, add_words, check_new_word, splice, token_table
from .unet import cross_attention_layers


def per_layer_encode(text_encoder, ids, vectors, token_ids):
    """The contexts of prompts `ids` [B, L] whose word has vectors [B, layers, n, D] (each sample and
    layer its own): a list of `layers` tensors [B, L, D]. One text-encoder call on layers x B rows
    (layer-major: row l*B + i is sample i at layer l), not one per layer."""
    B, layers = vectors.shape[:2]
    rows = vectors.transpose(0, 1).flatten(0, 1)  # (layers*B, n, D)
    ids_all = ids.repeat(layers, 1)  # (layers*B, L)
    out = text_encoder(ids_all, inputs_embeds=splice(ids_all, token_table(text_encoder), token_ids, rows))
    return list(out.unflatten(0, (layers, B)))


# ----------------------------------------------------------------------------------------------
# P+: a vector (or n vectors) per cross-attention layer, and optionally per time bucket

class PerLayerWord(nn.Module):
    """The vectors of a P+ word, [T, layers, n, D] float32: layer l of the UNet cross-attends to the
    prompt with vectors [k, l]; T > 1 adds multiresolution's time buckets (k = floor(t T / 1000),
    textual_inversion.LearnedWord.bucket), T = 1 is P+ as published. layer_names: the UNet's
    cross-attention layers in forward order (unet.cross_attention_layers), kept for the file."""

    def __init__(self, vectors, token_ids, layer_names, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
        super().__init__()
        vectors = vectors if vectors.dim() == 4 else vectors[None]  # [layers, n, D] -> [1, layers, n, D]
        if vectors.shape[1] != len(layer_names) or vectors.shape[2] != len(token_ids):
            raise ValueError(f"vectors {tuple(vectors.shape)} must be [T, layers={len(layer_names)}, "
                             f"n={len(token_ids)}, D]")
        self.vectors = nn.Parameter(vectors.detach().to(torch.float32).clone())
        self.register_buffer("token_ids", torch.as_tensor(token_ids, dtype=torch.long), persistent=False)
        self.layer_names = list(layer_names)
        self.num_train_timesteps = num_train_timesteps

    # The time buckets exactly as a plain word's (the vectors' first axis is T here too)
    num_buckets, bucket = LearnedWord.num_buckets, LearnedWord.bucket

    def context(self, text_encoder, ids, t):
        """Per-layer contexts (a list of [B, L, D], forward order) of prompts ids [B, L] at timesteps t [B]."""
        return per_layer_encode(text_encoder, ids, self.vectors[self.bucket(t)], self.token_ids)


# ----------------------------------------------------------------------------------------------
# NeTI: a network from (timestep, layer) to the word's vector

NETI_SIGMA_T, NETI_SIGMA_L = 0.03, 2.0  # NeTI's pe_sigmas: slow in time (t in 0..999), fast across layers
NETI_FREQUENCIES = 1024  # random frequencies: sin and cos of each -> a 2048-wide encoding (NeTI's num_w)
NETI_TIME_ANCHORS = 10  # anchors 0, 100, ..., 900 (NeTI's num_pe_time_anchors)
NETI_HIDDEN = 128  # the MLP's width (NeTI: 160 -> 128 -> 128 -> 2 x 768 for SD 1.x)
BYPASS_ALPHA = 0.2  # the bypass is scaled to the norm of the word's output, times 0.2 (NeTI's code)
NESTED_DROPOUT_P = 0.5  # share of training calls that truncate the hidden vector at a random width


class FourierFeatures(nn.Module):
    """(t, l) -> unit vector [2F]: cos and sin of w (t, l), w [F, 2] drawn once from N(0, diag(sigma^2)).
    Random Fourier features (Tancik et al. 2020), with a bandwidth per axis; frozen (a buffer)."""

    def __init__(self, frequencies=NETI_FREQUENCIES, sigma_t=NETI_SIGMA_T, sigma_l=NETI_SIGMA_L, seed=0):
        super().__init__()
        w = torch.randn(frequencies, 2, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("w", w * torch.tensor([sigma_t, sigma_l]))

    def forward(self, t, layer):
        x = torch.stack([torch.as_tensor(t).float(), torch.as_tensor(layer).float()], -1).to(self.w)  # (B, 2)
        phase = x @ self.w.T  # (B, F)
        return F.normalize(torch.cat([torch.sin(phase), torch.cos(phase)], -1), dim=-1)


class NeTIMapper(nn.Module):
    """M(t, l) -> (word vector [B, D], bypass [B, D] or None), with nested dropout on the hidden width.

    The first linear layer starts at the encodings of an anchor grid (time anchors x layers), so that
    its outputs are similarities to the anchors; then two Linear-LayerNorm-LeakyReLU layers of width
    `hidden`, then one linear output (2D wide with the bypass). The word's half is rescaled to
    `norm`, the norm of a real word (NeTI: of the super-category's token)."""

    def __init__(self, layers, width, norm, hidden=NETI_HIDDEN, anchors=NETI_TIME_ANCHORS, bypass=True,
                 frequencies=NETI_FREQUENCIES, num_train_timesteps=NUM_TRAIN_TIMESTEPS, seed=0):
        super().__init__()
        self.encode = FourierFeatures(frequencies, seed=seed)
        grid = [(t, l) for t in range(0, num_train_timesteps, num_train_timesteps // anchors) for l in range(layers)]
        first = nn.Linear(2 * frequencies, len(grid))
        with torch.no_grad():
            first.weight.copy_(self.encode(*torch.tensor(grid).T))  # row j: the encoding of anchor j
        self.net = nn.Sequential(first, nn.Linear(len(grid), hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                                 nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU())
        self.output = nn.Linear(hidden, width * (2 if bypass else 1))
        self.bypass, self.width, self.norm = bypass, width, float(norm)

    @property
    def hidden(self):
        return self.output.in_features

    def forward(self, t, layer, keep=None):
        """t, layer: [B]; keep: [B] how many hidden dimensions each row keeps (None: all)."""
        h = self.net(self.encode(t, layer))  # (B, hidden)
        if keep is not None:  # nested dropout / truncation: zero dimensions keep[i] onwards
            h = h * (torch.arange(self.hidden, device=h.device) < keep.to(h.device)[:, None])
        out = self.output(h)
        # The word's half alone is rescaled (the paper's text); NeTI's code rescales word and bypass together,
        # so its word comes out shorter than the target norm. The bypass's norm is set where it is added.
        word = F.normalize(out[:, :self.width], dim=-1) * self.norm
        return word, (out[:, self.width:] if self.bypass else None)


class NeTIWord(nn.Module):
    """A one-token word whose vector is NeTIMapper(t, l), plus the bypass added at the word's place in
    the text encoder's last hidden state (before its final LayerNorm, as NeTI does), rescaled to that
    state's norm times BYPASS_ALPHA. In training, with probability dropout_p a step truncates each
    sample's hidden vector at a random width (nested dropout, one coin per call as NeTI); `truncation`
    (None = keep all) is what sampling uses."""

    def __init__(self, mapper, token_ids, layer_names, num_train_timesteps=NUM_TRAIN_TIMESTEPS, dropout_p=NESTED_DROPOUT_P,
                 seed=0):
        super().__init__()
        if len(token_ids) != 1:
            raise ValueError(f"a NeTI word is one token, got {len(token_ids)} placeholder ids")
        self.mapper = mapper
        self.register_buffer("token_ids", torch.as_tensor(token_ids, dtype=torch.long), persistent=False)
        self.layer_names = list(layer_names)
        self.num_train_timesteps, self.dropout_p = num_train_timesteps, dropout_p
        self.generator = torch.Generator().manual_seed(seed)  # the nested-dropout draws
        self.truncation = None

    def keep(self, rows):
        """How many hidden dimensions each of `rows` mapper calls keeps now (None: all)."""
        if self.training and self.dropout_p > 0:
            if torch.rand((), generator=self.generator) < self.dropout_p:
                return torch.randint(0, self.mapper.hidden, (rows,), generator=self.generator)
            return None
        return None if self.truncation is None else torch.full((rows,), int(self.truncation))

    def context(self, text_encoder, ids, t):
        """Per-layer contexts (list of [B, L, D]) of ids [B, L] at timesteps t [B]: one encoder call."""
        B, layers = ids.shape[0], len(self.layer_names)
        t = torch.as_tensor(t, device=ids.device).reshape(-1).expand(B)
        tt, ll = t.repeat(layers), torch.arange(layers, device=ids.device).repeat_interleave(B)  # layer-major
        word, bypass = self.mapper(tt, ll, self.keep(len(tt)))  # (layers*B, D)
        ids_all = ids.repeat(layers, 1)
        tm = text_encoder.text_model
        embeds = splice(ids_all, token_table(text_encoder), self.token_ids, word[:, None])
        h = tm.encoder(tm.embeddings(embeds.to(tm.final_layer_norm.weight.dtype)))  # (layers*B, L, D)
        if bypass is not None:
            at = (ids_all == self.token_ids[0]).unsqueeze(-1)  # where the word stands
            scale = h.norm(dim=-1, keepdim=True) / bypass.norm(dim=-1, keepdim=True)[:, None]
            h = torch.where(at, h + (BYPASS_ALPHA * bypass[:, None] * scale).to(h.dtype), h)  # in the model's dtype
        return list(tm.final_layer_norm(h).unflatten(0, (layers, B)))


# ----------------------------------------------------------------------------------------------
# Sampling (textual_inversion.sampling_conditioning serves every kind of word)

def mix_layers(first, second, take_second):
    """Style mixing: the per-layer contexts of `first`, with layer l from `second` where take_second[l]."""
    return [b if s else a for a, b, s in zip(first, second, take_second)]


def layer_average(vectors):
    """A P+ word [T, layers, n, D] (or [layers, n, D]) as one ordinary word [n, D]: the mean over layers
    (and time buckets), for tools that condition every layer on one prompt."""
    v = vectors if vectors.dim() == 4 else vectors[None]
    return v.mean(dim=(0, 1))


def new_spacetime_word(kind, sd, tokenizer, token, start, num_buckets=1, bypass=True, seed=0):
    """A P+ ("per-layer") or NeTI ("neti") word for `token` on the model sd, its placeholders registered
    in `tokenizer`; start [n, D]: the init word's vectors (P+: copied to every layer and time bucket;
    NeTI: its norm is the mapper's output norm)."""
    layers, steps = cross_attention_layers(sd.unet), sd.scheduler.num_train_timesteps
    check_new_word(tokenizer, token)
    if kind == "per-layer":
        ids = add_words(tokenizer, {token: start.shape[0]})[token]
        return PerLayerWord(start[None, None].repeat(num_buckets, len(layers), 1, 1), ids, layers, steps)
    if kind == "neti":
        if start.shape[0] != 1 or num_buckets != 1:
            raise ValueError("a NeTI word is one vector and already depends on time: vectors=1, multires=1.")
        ids = add_words(tokenizer, {token: 1})[token]
        mapper = NeTIMapper(len(layers), start.shape[-1], start[0].norm().item(), bypass=bypass,
                            num_train_timesteps=steps, seed=seed)
        return NeTIWord(mapper, ids, layers, steps, seed=seed)
    raise ValueError(f"kind must be 'ti', 'per-layer' or 'neti', got {kind!r}")
