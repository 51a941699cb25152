"""Textual inversion (Gal et al., "An Image is Worth One Word", 2022): learn one new word, nothing else.

The whole model stays frozen. The new word S* owns n fresh vectors, the only trainable tensor, spliced
into the token embeddings wherever S*'s placeholder tokens stand and fed to the text encoder through
`inputs_embeds`; the frozen table is read, never written. Training minimises the paper's eq. 2,
|| eps - eps_theta(z_t, t, c_theta(y)) ||^2, over the concept's images, random timesteps, random noise
and neutral prompts ("a photo of a S*"). Multiresolution textual inversion (Daras & Dimakis 2022)
is the same with T sets of vectors, one per slice of diffusion time. In reading order: the splice,
the learned word, its start from a descriptor word, the loss, one step, THE training loop
(`train_loop`, which train.py and minti.learn run).
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import average_over_ranks, gather_over_ranks, my_slice
from .schedulers import NUM_TRAIN_TIMESTEPS
from .timesteps import make_timestep_sampler, training_reading


class NonFiniteLoss(FloatingPointError):
    """The loss (or the gradient) became NaN or Inf; the vectors were not updated. From train_loop, with
    .step (the step that failed) and .good_step (the step of the last vectors that gave a finite loss)."""


# ----------------------------------------------------------------------------------------------
# The splice: the word's vectors stand in the token embeddings where its placeholders stand

def token_table(text_encoder):
    """The frozen token embedding table [vocabulary, D]: the splice reads it, nothing writes it."""
    return text_encoder.text_model.embeddings.token_embedding.weight


def placeholder_tokens(token, n):
    """The tokenizer entries of an n-vector word: `<tok>`, `<tok>_1`, `<tok>_2`, ... (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def word_pieces(tokenizer, word):
    """The token ids BPE cuts one word into (no start/end tokens)."""
    return tokenizer.encode(word)[1:-1]


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
        if (existing := tokenizer.vocab.get(name, tokenizer.added.get(name))) is not None:
            raise ValueError(f"{name!r} is already in the tokenizer (id {existing}): choose another trigger word, "
                             f"or start from a fresh tokenizer if this word was added before (a continued run).")
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
    (vocab, width), K = table.shape, len(new_token_ids)
    new_ids = torch.as_tensor(new_token_ids, dtype=torch.long, device=ids.device).reshape(-1)
    per_sample = vectors.dim() == 3
    if vectors.dim() not in (2, 3) or vectors.shape[-2:] != (K, width) or (per_sample and len(vectors) != len(ids)):
        raise ValueError(f"vectors must be [K, {width}] or [B, K, {width}] (B = {len(ids)} prompts) for K={K} "
                         f"placeholder ids, got {tuple(vectors.shape)}.")
    # The checks that read values run only where the ids are on the CPU: on an accelerator they would make
    # the host wait for the device at every step (a LearnedWord checks its ids once, at birth).
    if ids.device.type == "cpu":
        assert len(set(new_ids.tolist())) == K, f"new_token_ids has repeated ids: {new_ids.tolist()}"
        unknown = ((ids < 0) | (ids >= vocab)) & ~(ids.unsqueeze(-1) == new_ids).any(-1)
        if unknown.any():
            raise ValueError(f"token ids {sorted(set(ids[unknown].tolist()))[:8]} have no row in the table "
                             f"(size {vocab}) and are not placeholders of a word: pass every word's ids "
                             f"(add_words returns them).")
    hits = ids.unsqueeze(-1) == new_ids  # (B, L, K): which placeholder stands where
    is_new = hits.any(-1)
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

def time_bucket(timestep, num_buckets, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """The set of vectors (time bucket) that a timestep uses among num_buckets: floor(timestep * T / 1000), in
    integers so that training and sampling agree exactly; timestep 1000 (a prompt's t = 1) is in the last.
    An int or a tensor of timesteps."""
    bucket = timestep * num_buckets // num_train_timesteps
    return bucket.clamp(max=num_buckets - 1) if torch.is_tensor(bucket) else min(bucket, num_buckets - 1)


class LearnedWord(nn.Module):
    """The vectors of a new word, [T, n, D] float32, and the placeholder ids they stand for.

    T = 1 is plain textual inversion. T > 1 is multiresolution textual inversion: a sample noised at
    timestep t uses set time_bucket(t), so each sample of a batch has its own word. The vectors stay
    float32 whatever the model's precision (an fp16 parameter is what makes fp16 training "die" or crash
    in the gradient scaler); they are cast where they meet the frozen table.

    Two optional constraints: `pull` > 0 adds pull x the mean distance of the vectors from `start` (their
    first values unless given) to the loss (CrossInit's regulariser, 1e-5 in its code); `norm` (a number, or
    [T, n, 1]) fixes each vector's norm so that only its direction learns (DTI): the gradient is projected
    on the sphere's tangent and the vectors are put back on the sphere after every step (constrain_).
    """

    def __init__(self, vectors, token_ids, num_train_timesteps=NUM_TRAIN_TIMESTEPS, *, pull=0.0, start=None,
                 norm=None):
        super().__init__()
        vectors = vectors if vectors.dim() == 3 else vectors[None]  # [n, D] -> [1, n, D]
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        assert vectors.shape[1] == len(ids), f"{vectors.shape[1]} vectors but {len(ids)} placeholder tokens"
        assert len(set(ids.tolist())) == len(ids), f"repeated placeholder ids: {ids.tolist()}"
        self.vectors = nn.Parameter(vectors.detach().to(torch.float32).clone())
        self.register_buffer("token_ids", ids, persistent=False)
        self.num_train_timesteps = num_train_timesteps
        self.pull, self.norm = pull, norm
        start = self.vectors.detach() if start is None else torch.as_tensor(start, dtype=torch.float32)
        self.register_buffer("start", start.expand_as(self.vectors).clone(), persistent=False)
        if norm is not None:
            self.vectors.register_hook(self.tangent)
            self.constrain_()

    def tangent(self, grad):
        """A fixed-norm word's gradient without its radial part: only the direction can move."""
        u = F.normalize(self.vectors.detach(), dim=-1)
        return grad - (grad * u).sum(-1, keepdim=True) * u

    @torch.no_grad()
    def constrain_(self):
        """After a step: a fixed-norm word's vectors back at their norm (nothing for a free word)."""
        if self.norm is not None:
            self.vectors.copy_(F.normalize(self.vectors, dim=-1) * self.norm)

    def penalty(self):
        """What the word adds to the loss: pull x the mean distance of its vectors from the start."""
        return self.pull * (self.vectors - self.start).norm(dim=-1).mean()

    @property
    def num_buckets(self):
        return self.vectors.shape[0]

    def bucket(self, t):
        """The set of vectors each timestep t uses (time_bucket)."""
        return time_bucket(torch.as_tensor(t, device=self.vectors.device), self.num_buckets, self.num_train_timesteps)

    def forward(self, ids, table, t):
        """Token vectors [B, L, D] for ids [B, L]: rows of the frozen table, sample i's own vectors at
        the placeholders (the set of its timestep t[i])."""
        per_sample = self.vectors[self.bucket(t)]  # [B, n, D]
        return splice(ids, table, self.token_ids, per_sample)

    def context(self, text_encoder, ids, t):
        """The conditioning c(y) [B, L, D] of prompts ids [B, L] at timesteps t [B]: what the UNet attends to.
        Every kind of word has this method (P+ and NeTI words return one context per UNet layer)."""
        return text_encoder(ids, inputs_embeds=self(ids, token_table(text_encoder), t))


def sampling_conditioning(word, text_encoder, ids, n=1):
    """The conditioning of prompts ids [P, L] with a learned word, for sampling, each row repeated n times:
    a context (P+: a list of contexts) when the word does not change with time (one time bucket), else a
    function timestep -> that context, each distinct timestep encoded once."""
    def at(timestep):
        t = torch.full((ids.shape[0],), int(timestep), dtype=torch.long, device=ids.device)
        with torch.no_grad():
            context = word.context(text_encoder, ids, t)
        return [c.repeat_interleave(n, 0) for c in context] if isinstance(context, list) else \
            context.repeat_interleave(n, 0)

    if getattr(word, "num_buckets", None) == 1:  # NeTI words always depend on time
        return at(0)
    cached = functools.cache(at)  # each distinct timestep encoded once
    return lambda timestep: cached(int(torch.as_tensor(timestep).reshape(-1)[0]))


def check_new_word(tokenizer, token):
    """Refuse a placeholder that is already a word: it would shadow that word in every prompt."""
    pieces = word_pieces(tokenizer, token)
    if len(pieces) == 1 and pieces[0] not in tokenizer.added.values():
        raise ValueError(f"{token!r} is already a word of the vocabulary (token {tokenizer.id_to_token[pieces[0]]!r}); "
                         f"a new concept needs a new word, e.g. '<{token.strip('<>')}-concept>' (the existing word "
                         f"can be the init word).")


def new_word(tokenizer, token, vectors, num_train_timesteps=NUM_TRAIN_TIMESTEPS, **constraints):
    """A LearnedWord for `token` starting at vectors [T, n, D] (or [n, D]), its n placeholders registered
    in `tokenizer` (which changes: pass a copy to keep the model's own); constraints: LearnedWord's."""
    check_new_word(tokenizer, token)
    ids = add_words(tokenizer, {token: vectors.shape[-2]})[token]
    return LearnedWord(vectors, ids, num_train_timesteps, **constraints)


def typical_norm(table):
    """The mean L2 norm of the vocabulary's rows (DTI's target norm for a fixed-norm word)."""
    norms = table.detach().float().norm(dim=-1)
    return norms[norms > 0].mean().item()


def word_embed_fn(tokenizer, text_encoder, words):
    """Register finished words {token: vectors [n, D]} in `tokenizer` (changed: pass a copy) and return
    embed_fn(ids) -> token vectors [B, L, D] with their vectors at the placeholders: what sampling takes."""
    ids = add_words(tokenizer, {token: v.shape[0] for token, v in words.items()})
    table = token_table(text_encoder)
    new_ids = torch.tensor([i for token in words for i in ids[token]], dtype=torch.long)
    vectors = torch.cat([v.detach() for v in words.values()] or [table.new_zeros(0, table.shape[1])])
    return lambda tokens: splice(tokens, table, new_ids.to(tokens.device), vectors.to(tokens.device))


# ----------------------------------------------------------------------------------------------
# Initialisation from a coarse descriptor ("cat", "sculpture"), as in the paper

def init_vectors(tokenizer, table, init, num_vectors, text_encoder=None):
    """Starting vectors [num_vectors, D] from the init words, and a sentence saying what was done.

    Each word of `init` is cut by BPE into pieces (one row of the table each). With as many pieces as
    vectors, piece k starts vector k; else with as many words (> 1) as vectors, word k (its pieces averaged)
    starts vector k; else every vector starts at the average of all pieces. A word BPE cuts mostly into
    single letters is unknown to the vocabulary and refused: the average of its letters means nothing.
    With a text_encoder, a piece's vector is the encoder's OUTPUT at its place in "<start> words <end>"
    (CrossInit, Pang et al. 2024: the last hidden state, after the final LayerNorm) instead of its table row.
    """
    words = str(init or "").replace(",", " ").split()
    pieces = [word_pieces(tokenizer, word) for word in words]  # each word's token ids
    names = [[tokenizer.id_to_token.get(i, "?") for i in ps] for ps in pieces]  # and tokens
    if not words:
        raise ValueError("The init words are empty: give a coarse descriptor of the concept, e.g. 'cat' (one "
                         "word per vector, or one word for all of them).")
    for word, ps, ns in zip(words, pieces, names):
        if not ps or any(i >= len(table) for i in ps):
            raise ValueError(f"init word {word!r} has no row in the model's token table (it is empty after "
                             f"cleaning, or a placeholder of another concept); use an ordinary word.")
        shown = [n.replace("</w>", "") for n in ns[:12]]
        if len(ps) > 1 and 2 * sum(len(n.replace("</w>", "")) == 1 for n in ns) > len(ps):  # 'qxjzvar'
            raise ValueError(f"init word {word!r} is unknown to this vocabulary: BPE cuts it into {' + '.join(shown)}, "
                             f"mostly single letters. Use a word the model knows (e.g. 'cat', 'toy').")

    every = [p for ps in pieces for p in ps]  # the pieces of all the words
    rows = table.detach().to(torch.float32)
    if text_encoder is not None:  # CrossInit: the rows are the pieces' outputs, in order
        with torch.no_grad():
            ids = torch.tensor([[tokenizer.bos_id, *every, tokenizer.eos_id]], device=table.device)
            rows = text_encoder(ids)[0, 1:-1].float()  # (pieces, D)
        position = iter(range(len(every)))
        pieces = [[next(position) for _ in ps] for ps in pieces]
        every = list(range(len(every)))
    described = ", ".join(f"{w!r} = {' + '.join(n)}" if len(n) > 1 else f"{w!r}" for w, n in zip(words, names))
    if len(every) == num_vectors:
        vectors = rows[every]
        how = "one token per vector" if num_vectors > 1 else "copied"
    elif len(words) == num_vectors > 1:
        vectors = torch.stack([rows[ps].mean(0) for ps in pieces])
        how = "one word per vector, each word's tokens averaged"
    else:
        vectors = rows[every].mean(0, keepdim=True).expand(num_vectors, -1)
        how = (f"the average of its {len(every)} tokens" if len(every) > 1 else "its one token") + \
              (f", copied to all {num_vectors} vectors" if num_vectors > 1 else "")
    message = f"init: {described} ({len(every)} token(s)) -> {num_vectors} vector(s): {how}"
    return vectors.clone(), message


# ----------------------------------------------------------------------------------------------
# The loss and one optimisation step

def diffusion_loss(text_encoder, unet, scheduler, word, ids, latents, t, noise, per_sample=False):
    """Gal et al. eq. 2 for one batch: mean over the batch of || eps - eps_theta(z_t, t, c_theta(y)) ||^2.

    ids [B, L] prompts with the placeholders; latents [B, C, h, w] clean z_0 (already times the latent
    scale); t [B] timesteps; noise [B, C, h, w] the eps to predict. Returns (loss, context), context
    [B, L, D] being the text encoder's output c_theta(y) that the UNet cross-attends to; per_sample=True
    adds each sample's own mean squared error [B], detached (what the error-norm reading divides by).
    """
    context = word.context(text_encoder, ids, t)  # P+ and NeTI words (spacetime.py): one per UNet layer
    z_t = scheduler.add_noise(latents, noise, t)
    eps = unet(z_t, t, context)
    loss = F.mse_loss(eps.float(), noise.float())  # the loss in fp32 whatever the weights
    if per_sample:
        return loss, context, (eps.detach().float() - noise.float()).pow(2).flatten(1).mean(1)
    return loss, context


# What the timestep sampler learns from (timesteps.py; Wang & Kalogeiton 2024, eq. 4): for every sample,
# g[i] = || d loss_i / d c_i ||, read off the context's gradient that the step's backward computes anyway.

def read_grad_norms(context, t, timestep_sampler, factor, readings, sample_mse, n):
    """Before backward: append (t, g) to `readings` when the gradient reaches the context, g under the
    sampler's reading ("mse" or "error-norm", see timesteps.training_reading; sample_mse [B] and n, the
    elements of one sample's eps, are what the error-norm reading needs). factor: what the loss was
    multiplied by before backward (1 / micro-batches, times the fp16 loss scale)."""
    if not wants_grad_norms(timestep_sampler):
        return
    if not torch.is_tensor(context):
        raise ValueError("the adaptive timestep sampler reads the gradient of one context; a per-layer word "
                         "(P+, NeTI) has one per layer: train it on uniform timesteps (or a fixed interval).")
    reading = getattr(timestep_sampler, "reading", "mse")

    def read(grad):  # [B, L, D]: d (loss x factor) / d context
        readings.append((t, training_reading(reading, grad, sample_mse, n, loss_scale=factor)))
    context.register_hook(read)


def wants_grad_norms(timestep_sampler):
    return timestep_sampler is not None and getattr(timestep_sampler, "wants_grad_norms", False)


def train_step(text_encoder, unet, scheduler, word, optimizer, batches, timestep_sampler=None, scaler=None):
    """One optimisation step of the vectors over micro-batches [(ids, latents, t, noise), ...]; returns
    the loss (a float). The gradient is the mean over the micro-batches (gradient accumulation), and over
    the ranks under torchrun (each passes its slice); the timestep sampler gets its readings. scaler: a
    torch.amp.GradScaler (fp16 weights), else None. Raises NonFiniteLoss, leaving the vectors untouched,
    if the loss or the gradient is NaN/Inf. The host waits for the device once, to read the loss (and the
    sampler's readings) at the end; the fp16 scaler's step adds one unless AdamW is fused (CUDA).
    """
    optimizer.zero_grad(set_to_none=True)
    losses, readings = [], []
    # The loss scale as a number only when the sampler reads gradients (get_scale waits for the device).
    loss_scale = scaler.get_scale() if scaler is not None and wants_grad_norms(timestep_sampler) else 1.0
    for ids, latents, t, noise in batches:
        loss, context, sample_mse = diffusion_loss(text_encoder, unet, scheduler, word, ids, latents, t, noise,
                                                   per_sample=True)
        scaled = loss / len(batches)
        if isinstance(word, LearnedWord) and word.pull:
            scaled = scaled + word.penalty() / len(batches)  # CrossInit's pull toward the start
        if scaler is not None:
            scaled = scaler.scale(scaled)  # fp16: lift small gradients above fp16's smallest normal
        read_grad_norms(context, t, timestep_sampler, loss_scale / len(batches), readings, sample_mse,
                        latents[0].numel())
        scaled.backward()
        losses.append(loss.detach())
    loss = average_over_ranks(torch.stack(losses).mean())
    for p in word.parameters():  # torchrun: the whole batch's gradient on every rank
        if p.grad is not None:
            average_over_ranks(p.grad)
    readings = [(gather_over_ranks(t), gather_over_ranks(g)) for t, g in readings]
    if scaler is not None:
        scaler.unscale_(optimizer)  # the true gradient from here on (and inf/NaN noted for step)
        grad_ok = torch.ones((), device=loss.device)  # the scaler checks its own
    else:
        grad_ok = torch.stack([torch.isfinite(p.grad).all() for p in word.parameters() if p.grad is not None]).all()
    # One trip to the host: the loss, whether the gradient is finite, the sampler's readings ((t, g) per sample).
    t_g = [torch.stack([t.float(), g.float()], -1).flatten() for t, g in readings]  # timesteps < 2^24: exact
    host = torch.cat([torch.stack([loss.float(), grad_ok.float()])] + t_g).cpu()
    loss, grad_ok = host[0].item(), bool(host[1])
    t_g = host[2:].reshape(-1, 2).split([len(t) for t, _ in readings])  # micro-batches may differ in size
    if not (math.isfinite(loss) and grad_ok):
        what = "gradient" if math.isfinite(loss) else "loss"
        raise NonFiniteLoss(f"the {what} is not finite (loss {loss})")
    if scaler is not None:
        scaler.step(optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    if isinstance(word, LearnedWord):
        word.constrain_()  # a fixed-norm word back on its sphere
    for reading in t_g:  # the sampler learns from the readings (not from an overflowed fp16 step's)
        if torch.isfinite(reading[:, 1]).all():
            timestep_sampler.update(reading[:, 0].long(), reading[:, 1])
    return loss


# ----------------------------------------------------------------------------------------------
# THE training loop, which minti.learn() and train.py run; train.py's log, snapshots, previews, resume,
# Ctrl-C and NaN stop hang off it (on_step, the generator's state, and the two exceptions it lets through).

def freeze(sd):
    """Every weight of the model frozen: eval mode, no gradient ever computed or stored for it."""
    for module in (sd.text_encoder, sd.unet, sd.vae):
        module.eval().requires_grad_(False)


def adamw(word, lr, weight_decay=1e-2):
    """AdamW on the word's parameters alone (its vectors; NeTI: its mapper); betas and eps are torch's
    defaults, which the paper's code used. Fused on CUDA: one kernel, and with an fp16 GradScaler its step
    skips itself on the device, without the host waiting to read whether the gradient overflowed."""
    params = list(word.parameters())
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                             fused=params[0].is_cuda or None)


def lr_factor(step, warmup, total, schedule="constant"):
    """Multiplier of the learning rate at a step (0-based): linear warm-up, then constant or cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def draw_batches(data, timestep_sampler, batch, grad_accum, generator, device):
    """One step's micro-batches [(ids, z_0, t, noise), ...]: every draw from `generator`, in this order."""
    batches = []
    for _ in range(grad_accum):
        ids, z0 = data.batch(batch, generator)
        t = timestep_sampler.sample(batch, generator)
        noise = torch.randn(z0.shape, generator=generator)
        batches.append(tuple(x.to(device) for x in (ids, z0, t, noise)))
    return batches


class AutoStop:
    """Stop when the loss on one fixed batch has flattened (DVAR, Voronov et al. 2023, arXiv 2302.04841).

    The training loss is too noisy to say when a word is done (each step draws new images, noise and
    timesteps). DVAR evaluates the word after every step (here: every `every` steps) on ONE batch drawn once,
    and stops once the variance of the last `window` of those losses is below `threshold` x the variance of
    all of them. Its settings for SD 1.5 TI: window 310, threshold 0.15, every step."""

    def __init__(self, batches, window=310, threshold=0.15, every=1):
        self.batches, self.window, self.threshold, self.every, self.losses = batches, window, threshold, every, []

    @classmethod
    def drawn(cls, data, seed, batch, num_train_timesteps, device, **settings):
        """The fixed batch from its own generator (seeded by the run's seed): training's draws stay as they are."""
        uniform = make_timestep_sampler("uniform", num_train_timesteps)
        return cls(draw_batches(data, uniform, batch, 1, torch.Generator().manual_seed(seed), device), **settings)

    @torch.no_grad()
    def update(self, sd, word, step):
        """After `step`: evaluate the word on the fixed batch (in eval mode: NeTI's dropout off) every `every`
        steps; True when the run should stop."""
        if step % self.every:
            return False
        was_training = word.training
        word.eval()
        loss = torch.stack([diffusion_loss(sd.text_encoder, sd.unet, sd.scheduler, word, *b)[0] for b in self.batches])
        word.train(was_training)
        self.losses.append(loss.mean().item())
        return self.ratio() < self.threshold

    def ratio(self):
        """var(last window) / var(all): 1 until a window of losses exists."""
        if len(self.losses) < self.window:
            return 1.0
        losses = torch.tensor(self.losses, dtype=torch.float64)
        return (losses[-self.window:].var(unbiased=False) / losses.var(unbiased=False).clamp_min(1e-300)).item()

    def state_dict(self):  # what a checkpoint keeps: the history (the fixed batch is drawn again)
        return {"losses": list(self.losses)}

    def load_state_dict(self, state):
        self.losses = list(state["losses"])


def train_loop(sd, word, data, optimizer, timestep_sampler, generator, *, steps, lr, start=0, batch=16,
               grad_accum=1, warmup=0, schedule="constant", scaler=None, on_step=None, stop=None):
    """Steps start+1 .. steps of textual inversion on the frozen model `sd`; returns their losses.

    data: a data.ConceptData; timestep_sampler: timesteps.py's; generator: the CPU torch.Generator that
    every draw comes from, so that restoring its state, the optimizer's and the timestep sampler's
    continues a run exactly. lr at each step: lr x lr_factor(step, warmup, steps, schedule).
    on_step(step, loss, lr) runs after each step; with an AutoStop `stop`, first the word is evaluated on its
    fixed batch, and the loop ends after the step where it fires (stop.step). Ctrl-C (KeyboardInterrupt) puts the generator back
    where the unfinished step began, so that a resumed run redoes it with the same draws. A NaN/Inf
    loss puts the word back to the last vectors that gave a finite loss and raises NonFiniteLoss, its
    .step the step that failed and .good_step the step those vectors are from (None: no step did).
    """
    losses, good = [], None  # good: (step, the vectors then), the last vectors to give a finite loss
    for step in range(start, steps):
        step_lr = lr * lr_factor(step, warmup, steps, schedule)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        at_start = generator.get_state()
        before = {k: v.detach().clone() for k, v in word.state_dict().items()}  # the vectors (NeTI: mapper)
        try:
            batches = my_slice(draw_batches(data, timestep_sampler, batch, grad_accum, generator,
                                            word.token_ids.device))
            loss = train_step(sd.text_encoder, sd.unet, sd.scheduler, word, optimizer, batches,
                              timestep_sampler, scaler)
        except KeyboardInterrupt:
            generator.set_state(at_start)
            raise
        except NonFiniteLoss as error:
            error.step, error.good_step = step + 1, None if good is None else good[0]
            if good is not None:
                word.load_state_dict(good[1])
            raise
        good = (step, before)
        losses.append(loss)
        fired = stop is not None and stop.update(sd, word, step + 1)
        if on_step is not None:
            on_step(step + 1, loss, step_lr)
        if fired:
            stop.step = step + 1
            break
    return losses
