"""Textual inversion (Gal et al., "An Image is Worth One Word", 2022): learn one new word, nothing else.

The whole model stays frozen. The new word S* owns n fresh vectors, the only trainable tensor, spliced
into the token embeddings wherever S*'s placeholder tokens stand and fed to the text encoder through
`inputs_embeds`; the frozen table is read, never written. Training minimises the paper's eq. 2,
|| eps - eps_theta(z_t, t, c_theta(y)) ||^2, over the concept's images, random timesteps, random noise
and neutral prompts ("a photo of a S*"). Multiresolution textual inversion (Daras & Dimakis 2022)
is the same with T sets of vectors, one per slice of diffusion time. train.py runs the loop.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .timesteps import UniformTimesteps, make_timestep_sampler, per_sample_grad_norms, training_reading  # noqa: F401


class NonFiniteLoss(FloatingPointError):
    """The loss (or the gradient) became NaN or Inf; the vectors were not updated."""


# ----------------------------------------------------------------------------------------------
# The splice: the word's vectors stand in the token embeddings where its placeholders stand

def placeholder_tokens(token, n):
    """The tokenizer entries of an n-vector word: `<tok>`, `<tok>_1`, `<tok>_2`, ... (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def add_words(tokenizer, words):
    """Register new words {token: number of vectors} in a tokenizer; returns {token: placeholder ids}.

    The ids lie past the end of the frozen table: only splice() knows what they stand for. Nothing is
    added unless every placeholder is new.
    """
    names = [name for token, n in words.items() for name in placeholder_tokens(token, n)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"Two words would register the same placeholder(s) {repeated}; rename one.")
    for name in names:
        try:
            existing = tokenizer.token_to_id(name)
        except (KeyError, ValueError):
            continue
        raise ValueError(f"{name!r} is already in the tokenizer (id {existing}): choose another trigger word, "
                         f"or start again from a fresh tokenizer if this word was added before (e.g. when "
                         f"continuing a run).")
    ids = iter(tokenizer.add_tokens(names))
    return {token: [next(ids) for _ in range(n)] for token, n in words.items()}


def splice(ids, token_embedding_weight, new_token_ids, vectors):
    """Token vectors for ids [B, L]: frozen-table rows, and the concept's vectors at placeholder ids.

    new_token_ids [K]: the placeholder ids; vectors [K, D] (row k stands wherever new_token_ids[k]
    does) or [B, K, D] (each sample its own, e.g. the time bucket of its timestep). Placeholder ids
    are never looked up in the table (they may lie past its end) and the table is not modified, so it
    can stay frozen; gradients flow to `vectors`. Returns [B, L, D] in the table's dtype.
    """
    table = token_embedding_weight
    vocab, width = table.shape
    new_ids = torch.as_tensor(new_token_ids, dtype=torch.long, device=ids.device).reshape(-1)
    if len(set(new_ids.tolist())) != new_ids.numel():
        raise ValueError(f"new_token_ids has repeated ids: {new_ids.tolist()}.")
    if vectors.shape[-2:] != (new_ids.numel(), width) or vectors.dim() not in (2, 3):
        raise ValueError(
            f"vectors must be [K, {width}] or [B, K, {width}] with K={new_ids.numel()} placeholder ids, "
            f"got {tuple(vectors.shape)}."
        )
    if vectors.dim() == 3 and vectors.shape[0] != ids.shape[0]:
        raise ValueError(
            f"per-sample vectors {tuple(vectors.shape)} do not match the batch of ids {tuple(ids.shape)}."
        )
    hits = ids.unsqueeze(-1) == new_ids  # (B, L, K): which placeholder stands where
    is_new = hits.any(-1)
    unknown = ((ids < 0) | (ids >= vocab)) & ~is_new
    if unknown.any():
        raise ValueError(
            f"token ids {sorted(set(ids[unknown].tolist()))[:8]} have no row in the table (size {vocab}) "
            "and are not placeholders of a concept: pass every concept's ids (add_words returns them)."
        )
    from_table = F.embedding(torch.where(is_new, 0, ids), table)  # (B, L, D); 0 is any valid row
    if new_ids.numel() == 0:
        return from_table
    slot = hits.long().argmax(-1)  # (B, L): index k of the placeholder (0 where there is none)
    if vectors.dim() == 2:
        spliced = vectors[slot]
    else:
        spliced = torch.gather(vectors, 1, slot.unsqueeze(-1).expand(-1, -1, width))
    return torch.where(is_new.unsqueeze(-1), spliced.to(from_table.dtype), from_table)


# ----------------------------------------------------------------------------------------------
# The learned word

class LearnedWord(nn.Module):
    """The vectors of a new word, [T, n, D] float32, and the placeholder ids they stand for.

    T = 1 is plain textual inversion. T > 1 is multiresolution textual inversion: a sample noised at
    timestep t uses set floor(t * T / num_train_timesteps), so each sample of a batch has its own word.
    The vectors stay float32 whatever the model's precision (an fp16 parameter is what makes fp16
    training "die" or crash in the gradient scaler); they are cast where they meet the frozen table.
    """

    def __init__(self, vectors, token_ids, num_train_timesteps=1000):
        super().__init__()
        vectors = vectors if vectors.dim() == 3 else vectors[None]  # [n, D] -> [1, n, D]
        if vectors.shape[1] != len(token_ids):
            raise ValueError(f"{vectors.shape[1]} vectors but {len(token_ids)} placeholder tokens.")
        self.vectors = nn.Parameter(vectors.detach().to(torch.float32).clone())
        self.register_buffer("token_ids", torch.as_tensor(token_ids, dtype=torch.long), persistent=False)
        self.num_train_timesteps = num_train_timesteps

    @property
    def resolutions(self):
        return self.vectors.shape[0]

    def bucket(self, t):
        """The set of vectors each timestep uses: floor(t * T / 1000), in integers (no rounding error)."""
        return torch.as_tensor(t, device=self.vectors.device) * self.resolutions // self.num_train_timesteps

    def forward(self, ids, table, t):
        """Token vectors [B, L, D] for ids [B, L]: rows of the frozen table, sample i's own vectors at
        the placeholders (the set of its timestep t[i])."""
        per_sample = self.vectors[self.bucket(t)]  # [B, n, D]
        return splice(ids, table, self.token_ids, per_sample)


# Added to t*T before the floor so that t = timestep/1000 lands in the bucket that training used for
# that integer timestep (290/1000*100 is 28.999999999999996 in floating point, not 29).
BUCKET_EPS = 1e-9


def bucket_index(t, resolutions):
    """The time bucket of diffusion time t in [0, 1] among T buckets: floor(t*T), capped at T-1 (the
    same set LearnedWord.bucket gives timestep 1000 t)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"A resolution t must lie in [0, 1], got {t}.")
    return min(int(t * resolutions + BUCKET_EPS), resolutions - 1)


# ----------------------------------------------------------------------------------------------
# Initialisation from a coarse descriptor ("cat", "sculpture"), as in the paper

def word_pieces(tokenizer, word):
    """The token ids BPE cuts one word into (no start/end tokens)."""
    return tokenizer.encode(word)[1:-1]


def check_new_word(tokenizer, token):
    """Refuse a placeholder that is already a word: it would shadow that word in every prompt."""
    pieces = word_pieces(tokenizer, token)
    if len(pieces) == 1 and pieces[0] not in tokenizer.added.values():
        raise ValueError(f"--token {token!r} is already a word of the vocabulary (token "
                         f"{tokenizer.id_to_token[pieces[0]]!r}); a new concept needs a new word, e.g. "
                         f"'<{token.strip('<>')}-concept>'. Use the existing word as --init instead.")


def init_vectors(tokenizer, table, init, num_vectors):
    """Starting vectors [num_vectors, D] from the init words, and a sentence saying what was done.

    Each word of `init` is cut by BPE into pieces (one row of the table each). With as many pieces as
    vectors, piece k starts vector k; else with as many words (> 1) as vectors, word k (its pieces averaged)
    starts vector k; else every vector starts at the average of all pieces. A word BPE spells letter
    by letter is unknown to the vocabulary and refused: the average of its letters means nothing.
    """
    words = str(init or "").replace(",", " ").split()
    if not words:
        raise ValueError("--init is empty: give a coarse descriptor of the concept, e.g. --init cat "
                         "(one word per vector, or one word for all of them).")
    vocab = table.shape[0]
    per_word = []
    for word in words:
        pieces = word_pieces(tokenizer, word)
        names = [tokenizer.id_to_token.get(i, "?") for i in pieces]
        if not pieces or any(i >= vocab for i in pieces):
            raise ValueError(f"--init word {word!r} has no row in the model's token table (it is empty after "
                             f"cleaning, or a placeholder of another concept); use an ordinary word.")
        if len(pieces) > 1 and all(len(n.replace("</w>", "")) == 1 for n in names):
            raise ValueError(f"--init word {word!r} is unknown to this vocabulary: BPE spells it letter by "
                             f"letter ({' '.join(names)}). Use a word the model knows (e.g. 'cat', 'toy').")
        per_word.append((word, pieces, names))

    rows = table.detach().to(torch.float32)
    pieces = [p for _, ps, _ in per_word for p in ps]
    described = ", ".join(f"{w!r} = {' + '.join(n)}" if len(n) > 1 else f"{w!r}" for w, _, n in per_word)
    if len(pieces) == num_vectors:
        vectors = rows[pieces]
        how = "one token per vector" if num_vectors > 1 else "copied"
    elif len(per_word) == num_vectors > 1:
        vectors = torch.stack([rows[ps].mean(0) for _, ps, _ in per_word])
        how = "one word per vector, each word's tokens averaged"
    else:
        vectors = rows[pieces].mean(0, keepdim=True).expand(num_vectors, -1)
        how = (f"the average of its {len(pieces)} tokens" if len(pieces) > 1 else "its one token") + \
              (f", copied to all {num_vectors} vectors" if num_vectors > 1 else "")
    message = f"init: {described} ({len(pieces)} token(s)) -> {num_vectors} vector(s): {how}"
    return vectors.clone(), message


# ----------------------------------------------------------------------------------------------
# The loss and one optimisation step

def diffusion_loss(text_encoder, unet, scheduler, word, ids, latents, t, noise, per_sample=False):
    """Gal et al. eq. 2 for one batch: mean over the batch of || eps - eps_theta(z_t, t, c_theta(y)) ||^2.

    ids [B, L] prompts with the placeholders; latents [B, C, h, w] clean z_0 (already times the latent
    scale); t [B] timesteps; noise [B, C, h, w] the eps to predict. Returns (loss, context), context
    [B, L, D] being the text encoder's output c_theta(y) that the UNet cross-attends to. per_sample:
    the loss of each sample [B] (their mean is the loss).
    """
    table = text_encoder.text_model.embeddings.token_embedding.weight  # frozen, only read
    context = text_encoder(ids, inputs_embeds=word(ids, table, t))
    z_t = scheduler.add_noise(latents, noise, t)
    eps = unet(z_t, t, context)
    if per_sample:
        return F.mse_loss(eps.float(), noise.float(), reduction="none").flatten(1).mean(1), context
    return F.mse_loss(eps.float(), noise.float()), context  # the loss in fp32 whatever the weights


def train_step(text_encoder, unet, scheduler, word, optimizer, batches, timestep_sampler=None, scaler=None):
    """One optimisation step of the vectors over micro-batches [(ids, latents, t, noise), ...].

    The gradient is the mean over the micro-batches (gradient accumulation). If the timestep sampler
    wants them, it gets g[i] = || d loss_i / d c_i || for every sample, read off the gradient that this
    backward pass computes anyway (a hook on the context; see timesteps.per_sample_grad_norms).
    scaler: a torch.amp.GradScaler (fp16 weights), else None. Raises NonFiniteLoss, leaving the vectors
    untouched, if the loss or the gradient is NaN/Inf. Returns the loss (a float).
    """
    optimizer.zero_grad(set_to_none=True)
    wants_norms = timestep_sampler is not None and getattr(timestep_sampler, "wants_grad_norms", False)
    losses, norms = [], []
    for ids, latents, t, noise in batches:
        sample_mse, context = diffusion_loss(text_encoder, unet, scheduler, word, ids, latents, t, noise, True)
        loss = sample_mse.mean()
        context_grads = []
        if wants_norms:
            context.register_hook(context_grads.append)
        scaled = loss / len(batches)
        if scaler is not None:
            scaled = scaler.scale(scaled)  # fp16: lift small gradients above fp16's smallest normal
        scaled.backward()
        losses.append(loss.detach())
        if wants_norms:  # the context's gradient carries the same factors as the loss: divide them out
            factor = (scaler.get_scale() if scaler is not None else 1.0) / len(batches)
            reading = getattr(timestep_sampler, "reading", "mse")
            norms.append((t, training_reading(reading, context_grads[0], sample_mse, latents[0].numel(), factor)))
    loss = torch.stack(losses).mean().item()
    if scaler is not None:
        scaler.unscale_(optimizer)  # the true gradient from here on (and inf/NaN noted for step)
    grad_ok = scaler is not None or bool(torch.isfinite(word.vectors.grad).all())  # the scaler checks its own
    if not (math.isfinite(loss) and grad_ok):
        what = "gradient" if math.isfinite(loss) else "loss"
        raise NonFiniteLoss(f"the {what} is not finite (loss {loss})")
    if scaler is not None:
        scaler.step(optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    for t, g in norms:
        if torch.isfinite(g).all():  # an overflowed fp16 step teaches the sampler nothing
            timestep_sampler.update(t.cpu(), g.cpu())
    return loss


# ----------------------------------------------------------------------------------------------
# The whole method in one function (lessons and experiments; train.py adds files, logs, resume)

def learn(sd, images, token="<concept>", init="object", *, vectors=1, multires=1, steps=500, batch=16,
          lr=5e-2, weight_decay=1e-2, flip=0.5, timesteps="uniform", templates=None, resolution=None,
          seed=0, callback=None):
    """Textual inversion of the images in a folder, on a frozen model `sd` (minti.load); returns the
    LearnedWord (its .vectors [T, n, D]) and the list of losses.

    Every setting as train.py's flag of the same name, and the same draws from one generator seeded
    with `seed`, so learn() and `python train.py` with equal settings give the same vectors (a test
    checks it). sd's own tokenizer is left alone: the new word goes into a copy of it.
    callback(step, word, loss) runs after each step (e.g. to evaluate the word every k steps).
    """
    import copy

    from .data import TEMPLATES, load_concept_data
    from .sampling import default_size

    for module in (sd.text_encoder, sd.unet, sd.vae):
        module.eval().requires_grad_(False)
    tokenizer = copy.deepcopy(sd.tokenizer)
    check_new_word(tokenizer, token)
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight
    start, _ = init_vectors(tokenizer, table, init, vectors)
    ids = add_words(tokenizer, {token: vectors})[token]
    word = LearnedWord(start[None].repeat(multires, 1, 1), ids, sd.scheduler.num_train_timesteps).to(table.device)
    length = sd.text_encoder.config.max_position_embeddings
    data, _ = load_concept_data(images, resolution or default_size(sd)[0], token,
                                " ".join(placeholder_tokens(token, vectors)), templates or TEMPLATES["toy"],
                                lambda prompts: tokenizer(prompts, length=length), sd.vae, sd.latent_scale,
                                flip_p=flip, device=table.device)
    sampler = make_timestep_sampler(timesteps, sd.scheduler.num_train_timesteps)
    optimizer = torch.optim.AdamW([word.vectors], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(1, steps + 1):
        ids_, z0 = data.batch(batch, generator)
        t = sampler.sample(batch, generator)
        noise = torch.randn(z0.shape, generator=generator)
        batch_ = [tuple(x.to(table.device) for x in (ids_, z0, t, noise))]
        losses.append(train_step(sd.text_encoder, sd.unet, sd.scheduler, word, optimizer, batch_, sampler))
        if callback is not None:
            callback(step, word, losses[-1])
    return word, losses
