"""What the method's files refuse, and the messages that say why and what to do next.

The files of the method (tokenizer.py, clip.py, unet.py, vae.py, schedulers.py, sampling.py,
textual_inversion.py, timesteps.py, multires.py) check their input in one line, a call to this file, so
that they read as the method; the checks and the users' messages live here, in their reading order. A
check returns nothing, or its input in the one form the method uses. Those files import this one, so
the few names a check needs from them are imported inside it.
"""
import math

import torch

# ----------------------------------------------------------------------------------------------
# tokenizer.py


def check_vocabulary(vocab, merges, cleanup):
    """Tokenizer(vocab, merges, cleanup): a known cleanup, and a CLIP byte-level BPE vocabulary whose
    merges stay inside it."""
    from .tokenizer import BOS, CLEANUPS, EOS, base_tokens

    if cleanup not in CLEANUPS:
        raise ValueError(f"cleanup must be one of {CLEANUPS}, got {cleanup!r}")
    missing = [t for t in base_tokens() + [BOS, EOS] if t not in vocab]
    if missing:
        raise ValueError(f"not a CLIP byte-level BPE vocabulary: {len(missing)} base tokens are missing, "
                         f"e.g. {missing[:3]} (each byte needs a token, with and without '</w>', "
                         f"and {BOS} / {EOS} must be there)")
    for a, b in merges:
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise ValueError(f"merge {a!r} {b!r} uses or makes a token that is not in the vocabulary")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("vocabulary ids must be 0 .. len(vocab) - 1, each used once")


def placeholder_texts(tokenizer, tokens) -> dict:
    """Tokenizer.add_tokens: {placeholder: the cleaned text it is matched as}, every one checked before
    any is added: not empty, not a vocabulary token, not matching the same text as another."""
    matched = {}
    for token in tokens:
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"a placeholder must be a non-empty string that is not only whitespace, "
                             f"got {token!r}")
        text = tokenizer._clean(token)
        if not text:
            raise ValueError(f"placeholder {token!r} is empty once the text is cleaned ({tokenizer.cleanup})")
        for form in dict.fromkeys([token, text]):
            if form in tokenizer.vocab:
                raise ValueError(f"placeholder {token!r} already exists in the vocabulary as {form!r} "
                                 f"(id {tokenizer.vocab[form]}): choose a word that is not a token, e.g. "
                                 f"'<{token.strip('<>')}>'")
        if token in tokenizer.added or text in tokenizer._added_text or text in matched.values():
            raise ValueError(f"placeholder {token!r} was already added (it is matched as {text!r}): "
                             f"choose another word, or reuse the one added")
        matched[token] = text
    return matched


def check_texts(texts, length):
    """Tokenizer.__call__: a list of str, and room for BOS and EOS."""
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a str or a list of str")
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2 (room for BOS and EOS), got {length!r}")


def check_ids(tokenizer, ids):
    """Tokenizer.decode: one sequence of int ids, each in the vocabulary or an added placeholder."""
    for i in ids:
        if not isinstance(i, int):
            raise TypeError(f"decode takes one sequence of int ids, got an item {i!r}; for a batch "
                            f"[B, L] use [tok.decode(row) for row in ids]")
        if i not in tokenizer.id_to_token:
            raise ValueError(f"id {i!r} is not in this vocabulary (0 .. {len(tokenizer) - 1})")


# ----------------------------------------------------------------------------------------------
# clip.py


def check_token_ids(ids, vocab):
    """CLIPTextModel.embed_tokens: every id has a row in the table."""
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}) but range over [{ids.min().item()}, "
                         f"{ids.max().item()}]: a token added to the tokenizer has no row in this table; "
                         "pass its vector through inputs_embeds.")


def check_text_encoder_inputs(config, ids, inputs_embeds):
    """CLIPTextModel.forward: say which input has the wrong shape, and what to do about it."""
    if inputs_embeds is None:
        if ids is None:
            raise ValueError("Pass token ids [B, L] or inputs_embeds [B, L, D] (or both).")
        if ids.dim() != 2:
            raise ValueError(f"token ids must be [batch, length], got shape {tuple(ids.shape)}.")
    else:
        shape, width = tuple(inputs_embeds.shape), config.hidden_size
        if len(shape) != 3 or shape[-1] != width:
            raise ValueError(f"inputs_embeds must be [batch, length, {width}], got shape {shape}.")
        if ids is not None and tuple(ids.shape) != shape[:2]:
            raise ValueError(f"ids {tuple(ids.shape)} and inputs_embeds {shape} disagree on [batch, "
                             "length]; inputs_embeds replaces the lookup of ids: their shapes must match.")
    length = (ids if inputs_embeds is None else inputs_embeds).shape[1]
    limit = config.max_position_embeddings
    if length > limit:
        raise ValueError(f"The sequence has {length} tokens but the encoder has {limit} positions; "
                         f"truncate the prompt (the tokenizer's tok(texts, length={limit}) does it).")


# ----------------------------------------------------------------------------------------------
# unet.py


def check_unet_config(c):
    """UNetConfig: one down and one up block type per width; widths split evenly into groups and heads."""
    widths, down, up = c.block_out_channels, c.down_block_types, c.up_block_types
    if not widths or not len(down) == len(up) == len(widths):
        raise ValueError(f"UNetConfig: need one down and one up block type per block_out_channels entry; "
                         f"got {len(widths)} widths, {len(down)} down and {len(up)} up types")
    if any(w % c.norm_num_groups or w % c.attention_head_dim for w in widths):
        raise ValueError(f"UNetConfig: widths {widths} must be divisible by norm_num_groups "
                         f"({c.norm_num_groups}) and by the head count ({c.attention_head_dim}, "
                         f"called attention_head_dim)")


def check_unet_inputs(unet, x, t, context) -> torch.Tensor:
    """UNet.forward: say which input has the wrong shape, and what it should be; returns t as a [B] tensor."""
    from .unet import cross_attention_layers

    c, B = unet.config, x.shape[0]
    if x.ndim != 4 or x.shape[1] != c.in_channels:
        raise ValueError(f"UNet: x must be [B, {c.in_channels}, h, w] latents, got shape {tuple(x.shape)}")
    contexts = [context] if torch.is_tensor(context) else list(context)
    if not torch.is_tensor(context) and len(contexts) != (layers := len(cross_attention_layers(unet))):
        raise ValueError(f"UNet: a per-layer context needs one tensor per cross-attention layer ({layers}: "
                         f"cross_attention_layers(unet)), got {len(contexts)}")
    for context in contexts:
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != c.cross_attention_dim:
            raise ValueError(f"UNet: context must be [B={B}, L, {c.cross_attention_dim}] text features, got "
                             f"shape {tuple(context.shape)} (a text encoder of another width, or another "
                             "batch size?)")
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0 or tuple(t.shape) == (1,):
        t = t.reshape(1).expand(B)  # one timestep for the whole batch
    if tuple(t.shape) != (B,):
        raise ValueError(f"UNet: t has shape {tuple(t.shape)}; give an int, a 0-d tensor or one timestep "
                         f"per sample, shape ({B},)")
    return t


# ----------------------------------------------------------------------------------------------
# vae.py


def check_vae_config(config):
    """VAEConfig: GroupNorm splits every width evenly."""
    if any(c % config.norm_num_groups for c in config.block_out_channels):
        raise ValueError(f"block_out_channels {config.block_out_channels} must all be multiples of "
                         f"norm_num_groups={config.norm_num_groups} (GroupNorm splits channels evenly)")


def check_vae_images(config, x):
    """VAE.encode: images [B, in_channels, H, W], H and W multiples of the downsampling factor."""
    f = config.downsample_factor
    if x.ndim != 4 or x.shape[1] != config.in_channels or x.shape[2] % f or x.shape[3] % f:
        raise ValueError(f"VAE.encode expects images [B, {config.in_channels}, H, W] with H and W "
                         f"multiples of {f}; got {tuple(x.shape)}. Resize or crop the images first.")


def check_vae_latents(config, z):
    """VAE.decode: latents [B, latent_channels, h, w]."""
    if z.ndim != 4 or z.shape[1] != config.latent_channels:
        raise ValueError(f"VAE.decode expects latents [B, {config.latent_channels}, h, w]; got "
                         f"{tuple(z.shape)}. Pass latents (e.g. from encode), not images.")


# ----------------------------------------------------------------------------------------------
# schedulers.py


def check_num_steps(num_train_timesteps, num_steps, steps_offset):
    """DDPM.set_timesteps, DDIM: between 1 and T steps, the first of them a trained timestep."""
    from .schedulers import leading_timesteps

    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be between 1 and {num_train_timesteps}, got {num_steps}.")
    first = int(leading_timesteps(num_train_timesteps, num_steps, steps_offset)[0])
    if first >= num_train_timesteps:
        raise ValueError(
            f"{num_steps} steps with SD 1.x's spacing (leading, steps_offset {steps_offset}) would start at "
            f"timestep {first}, but the model was trained on timesteps 0..{num_train_timesteps - 1} "
            f"(diffusers fails here too). Use at most {num_train_timesteps - 1} steps."
        )


def check_ddim(ddpm, num_steps, eta):
    """DDIM(ddpm, num_steps, eta): eta >= 0, and num_steps as check_num_steps."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {eta}.")
    check_num_steps(ddpm.num_train_timesteps, num_steps, ddpm.steps_offset)


# ----------------------------------------------------------------------------------------------
# sampling.py


def check_guidance(guidance_scale, uncond):
    """denoise: guidance needs the unconditional half."""
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("guidance_scale != 1 needs unconditional conditioning (uncond); pass it, or "
                         "use guidance_scale=1.")


def check_text_to_image(output, prompts, negatives, n):
    """text_to_image: a known output, one negative prompt per prompt, at least one image each."""
    if output not in ("np", "pil", "pt"):
        raise ValueError(f"output must be 'np', 'pil' or 'pt', got {output!r}.")
    if len(negatives) != len(prompts):
        raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts: give one "
                         "negative prompt for all, or one per prompt.")
    check_images_per_prompt(n)


def check_images_per_prompt(n):
    """text_to_image, PromptWords.conditioning: at least one image per prompt."""
    if n < 1:
        raise ValueError(f"n (images per prompt) must be >= 1, got {n}.")


# ----------------------------------------------------------------------------------------------
# textual_inversion.py


def check_new_word(tokenizer, token):
    """Refuse a placeholder that is already a word: it would shadow that word in every prompt."""
    from .textual_inversion import word_pieces

    pieces = word_pieces(tokenizer, token)
    if len(pieces) == 1 and pieces[0] not in tokenizer.added.values():
        raise ValueError(f"--token {token!r} is already a word of the vocabulary (token "
                         f"{tokenizer.id_to_token[pieces[0]]!r}); a new concept needs a new word, e.g. "
                         f"'<{token.strip('<>')}-concept>'. Use the existing word as --init instead.")


def check_new_words(tokenizer, names):
    """add_words: every placeholder name new, to the other words and to the tokenizer."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"Two words would register the same placeholder(s) {repeated}; rename one.")
    for name in names:
        try:
            existing = tokenizer.token_to_id(name)
        except (KeyError, ValueError):
            continue
        raise ValueError(f"{name!r} is already in the tokenizer (id {existing}): choose another trigger "
                         f"word, or start again from a fresh tokenizer if this word was added before (e.g. "
                         f"when continuing a run).")


def check_splice(ids, table, new_ids, vectors):
    """splice: vectors [K, D] or [B, K, D] for K distinct placeholder ids, and every other id a row of the
    table. The checks that read values run where the ids are on the CPU: on an accelerator, reading them
    would make the host wait for the device at every step. (A LearnedWord checks its own ids once, at birth.)
    """
    vocab, width = table.shape
    on_host = ids.device.type == "cpu"
    if on_host and len(set(new_ids.tolist())) != new_ids.numel():
        raise ValueError(f"new_token_ids has repeated ids: {new_ids.tolist()}.")
    if vectors.shape[-2:] != (new_ids.numel(), width) or vectors.dim() not in (2, 3):
        raise ValueError(f"vectors must be [K, {width}] or [B, K, {width}] with K={new_ids.numel()} "
                         f"placeholder ids, got {tuple(vectors.shape)}.")
    if vectors.dim() == 3 and vectors.shape[0] != ids.shape[0]:
        raise ValueError(f"per-sample vectors {tuple(vectors.shape)} do not match the batch of ids "
                         f"{tuple(ids.shape)}.")
    if on_host:
        unknown = ((ids < 0) | (ids >= vocab)) & ~(ids.unsqueeze(-1) == new_ids).any(-1)
        if unknown.any():
            raise ValueError(f"token ids {sorted(set(ids[unknown].tolist()))[:8]} have no row in the table "
                             f"(size {vocab}) and are not placeholders of a concept: pass every concept's "
                             f"ids (add_words returns them).")


def check_learned_word(vectors, token_ids):
    """LearnedWord: one vector per placeholder [T, n, D], n distinct ids."""
    if vectors.shape[1] != len(token_ids):
        raise ValueError(f"{vectors.shape[1]} vectors but {len(token_ids)} placeholder tokens.")
    if len(set(torch.as_tensor(token_ids).tolist())) != len(token_ids):
        raise ValueError(f"repeated placeholder ids: {torch.as_tensor(token_ids).tolist()}.")


def check_init_words(words, pieces, names, vocab):
    """init_vectors: at least one word, each an ordinary word of the vocabulary (pieces: the ids BPE cuts
    each into, names: their tokens), not one it spells letter by letter."""
    if not words:
        raise ValueError("--init is empty: give a coarse descriptor of the concept, e.g. --init cat "
                         "(one word per vector, or one word for all of them).")
    for word, ps, ns in zip(words, pieces, names):
        if not ps or any(i >= vocab for i in ps):
            raise ValueError(f"--init word {word!r} has no row in the model's token table (it is empty after "
                             f"cleaning, or a placeholder of another concept); use an ordinary word.")
        if len(ps) > 1 and all(len(n.replace("</w>", "")) == 1 for n in ns):
            raise ValueError(f"--init word {word!r} is unknown to this vocabulary: BPE spells it letter by "
                             f"letter ({' '.join(ns)}). Use a word the model knows (e.g. 'cat', 'toy').")


def check_one_context(context):
    """read_grad_norms: the adaptive sampler reads the gradient of one context tensor."""
    if not torch.is_tensor(context):
        raise ValueError("the adaptive timestep sampler reads the gradient of one context; a per-layer word "
                         "(P+, NeTI) has one per layer: use --timesteps uniform (or a fixed interval).")


# ----------------------------------------------------------------------------------------------
# timesteps.py


def check_interval(start, stop, num_train_timesteps):
    """FixedSetTimesteps: t = start .. stop-1, a non-empty range of trained timesteps."""
    if not 0 <= start < stop <= num_train_timesteps:
        raise ValueError(f"The timesteps {start}-{stop} are empty or out of range: A-B means t = A .. B-1, "
                         f"with 0 <= A < B <= {num_train_timesteps}. Example: 350-450.")


def check_adaptive_options(num_train_timesteps, bin_width, decay, uniform_share, reading):
    """AdaptiveTimesteps: whole bins, an EMA decay and a share in range, a reading training can make."""
    if not (isinstance(bin_width, int) and 1 <= bin_width <= num_train_timesteps):
        raise ValueError(f"bin_width must be an integer in 1..{num_train_timesteps}, got {bin_width!r}.")
    if not (0.0 <= decay < 1.0 and 0.0 <= uniform_share <= 1.0):
        raise ValueError(f"decay must be in [0, 1) and uniform_share in [0, 1], got {decay}, {uniform_share}.")
    if reading not in ("mse", "error-norm"):
        raise ValueError(f"The adaptive sampler reads g as 'mse' or 'error-norm', not {reading!r}: the "
                         f"Jacobian reading needs extra backward passes that training does not make.")


def check_reading(ti, gi, num_train_timesteps):
    """AdaptiveTimesteps.update: one sample's timestep in range, its gradient norm finite and >= 0."""
    if not 0 <= ti < num_train_timesteps:
        raise ValueError(f"Timestep {ti} is outside 0..{num_train_timesteps - 1}.")
    elif not (math.isfinite(gi) and gi >= 0):
        raise ValueError(f"Gradient norm {gi} at t={ti} is not finite and >= 0: training diverged "
                         f"(NaN / inf); lower the learning rate or use fp32.")


def check_resumed_interval(state, spec, num_train_timesteps):
    """FixedSetTimesteps.load_state_dict: the checkpoint's sampler is this run's."""
    if (state["spec"], state["num_train_timesteps"]) != (spec, num_train_timesteps):
        raise ValueError(f"This checkpoint was trained with --timesteps {state['spec']!r}, this run uses "
                         f"{spec!r}. Resume with the same --timesteps, or start a new run.")


def check_resumed_adaptive(state, spec, options):
    """AdaptiveTimesteps.load_state_dict: the checkpoint's sampler is this run's, options and all (one
    saved before the error-norm reading existed read g as "mse")."""
    theirs = {k: state.get(k, "mse" if k == "reading" else None) for k in options}
    if state.get("spec") != spec or theirs != options:
        raise ValueError(f"This checkpoint's timestep sampler ({state.get('spec')!r}, {theirs}) differs from "
                         f"this run's ({spec!r}, {options}). Resume with the same --timesteps "
                         f"and adaptive options, or start a new run.")


def check_context_grad(context_grad, loss_reduction):
    """per_sample_grad_norms: a [B, L, D] gradient of a batch's mean or sum."""
    if context_grad.dim() != 3:
        raise ValueError(f"context_grad must be [batch, tokens, width], got {tuple(context_grad.shape)}.")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")


# ----------------------------------------------------------------------------------------------
# multires.py


def check_drop(drop):
    """PromptWords.conditioning: what a silent word becomes."""
    from .multires import DROPS

    if drop not in DROPS:
        raise ValueError(f"drop must be one of {DROPS} (what a <name(t)> word is below t), got {drop!r}.")


def one_timestep(t, num_train_timesteps) -> int:
    """One sampling step's timestep, in 0 .. T-1, from an int, a 0-d tensor or a [B] tensor of equal values."""
    values = t.reshape(-1).unique().tolist() if torch.is_tensor(t) else [int(t)]
    if len(values) != 1:
        raise ValueError(f"The conditioning is built per sampling step, one timestep at a time; got {values}.")
    timestep = int(values[0])
    if not 0 <= timestep < num_train_timesteps:
        raise ValueError(f"A sampling timestep must lie in [0, {num_train_timesteps}), got {timestep}.")
    return timestep
