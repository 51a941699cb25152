"""minti: Textual Inversion on Stable Diffusion 1.x, from scratch, in plain PyTorch.

Every model that a learned word flows through is written here (tokenizer.py, clip.py, unet.py,
vae.py, schedulers.py); io/weights.py loads the public SD 1.x weights into them. The two calls a user
needs: `minti.load("toy")` and `minti.learn(sd, images)`. Then read the lessons in `lessons/`.
"""


def load(source="toy", device="cpu", dtype=None, **kwargs):
    """Load a Stable Diffusion 1.x model: "toy", a diffusers folder, or one checkpoint file.

    See `minti.io.weights.load` for the arguments and the object it returns.
    """
    from .io.weights import load as _load  # imported here (as below) so that `import minti` stays light

    return _load(source, device=device, dtype=dtype, **kwargs)


def learn(sd, images, token="<concept>", init="object", *, num_vectors=1, num_buckets=1, steps=1000, batch=16,
          grad_accum=1, lr=5e-3, lr_warmup=0, lr_schedule="constant", weight_decay=1e-2, flip=0.5,
          timesteps="uniform", templates=None, image_size=None, seed=0, callback=None, kind="ti", bypass=True,
          start="input", pull=1e-5, norm="free", stop="none", stop_window=310, stop_threshold=0.15,
          stop_every=1):
    """Textual inversion of the images in a folder on the model `sd` (minti.load); returns the word (a
    textual_inversion.LearnedWord, its .vectors [T, n, D]) and the losses. The settings are train.py's
    flags with their defaults (num_vectors: --vectors, num_buckets: --multires, image_size: --resolution);
    the loop and the draws are the same, so equal settings give the same vectors. templates: with "{}" for
    the word (default data.OBJECT_TEMPLATES, the paper's). The word goes into a copy of sd's tokenizer.
    callback(step, word, loss) runs after each step (e.g. to evaluate the word every k steps). kind: "ti",
    "per-layer" (P+: spacetime.PerLayerWord, [T, layers, n, D]) or "neti" (spacetime.NeTIWord, one token;
    `bypass` adds its textual bypass; num_vectors and num_buckets must be 1). The levers for fewer steps
    (plain and multiresolution words): start "output" (CrossInit: start at the text encoder's output for
    the init words, pulled back toward it with weight `pull`), norm "fixed" (DTI: each vector keeps a typical
    token's norm, only its direction learns) or "init" (the init vectors' norms), and stop "auto" (DVAR: the
    run ends when the loss on a fixed batch has flattened, textual_inversion.AutoStop, or a subclass of it
    given as `stop`; `steps` stays the ceiling, and the AutoStop is the word's .stop).
    """
    import copy

    import torch

    from . import textual_inversion as ti
    from .data import OBJECT_TEMPLATES, load_concept_data
    from .sampling import default_size
    from .spacetime import new_spacetime_word
    from .timesteps import make_timestep_sampler

    ti.freeze(sd)
    tokenizer, table = copy.deepcopy(sd.tokenizer), ti.token_table(sd.text_encoder)
    vectors, _ = ti.init_vectors(tokenizer, table, init, num_vectors, sd.text_encoder if start == "output" else None)
    if kind == "ti":
        sizes = {"free": None, "fixed": ti.typical_norm(table), "init": vectors.norm(dim=-1, keepdim=True)}
        word = ti.new_word(tokenizer, token, vectors[None].repeat(num_buckets, 1, 1), sd.scheduler.num_train_timesteps,
                           pull=pull if start == "output" else 0.0, norm=sizes[norm])
    else:
        torch.manual_seed(seed)  # a NeTI mapper's Linear layers start from the global generator
        word = new_spacetime_word(kind, sd, tokenizer, token, vectors, num_buckets, bypass, seed)
    word = word.to(table.device)
    length = sd.text_encoder.config.max_position_embeddings
    data, _ = load_concept_data(images, image_size or default_size(sd)[0], token,
                                " ".join(ti.placeholder_tokens(token, num_vectors)), templates or OBJECT_TEMPLATES,
                                lambda prompts: tokenizer(prompts, length=length), sd.vae, sd.latent_scale,
                                flip_p=flip, device=table.device)
    timestep_sampler = make_timestep_sampler(timesteps, sd.scheduler.num_train_timesteps)
    optimizer = ti.adamw(word, lr, weight_decay)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    on_step = None if callback is None else (lambda step, loss, lr: callback(step, word, loss))
    kind_of_stop = stop if isinstance(stop, type) else ti.AutoStop
    word.stop = None if stop in (None, "none") else kind_of_stop.drawn(data, seed, batch, sd.scheduler.num_train_timesteps,
                                                             table.device, window=stop_window,
                                                             threshold=stop_threshold, every=stop_every)
    losses = ti.train_loop(sd, word, data, optimizer, timestep_sampler, generator, steps=steps, lr=lr,
                           batch=batch, grad_accum=grad_accum, warmup=lr_warmup, schedule=lr_schedule, on_step=on_step,
                           stop=word.stop)
    return word, losses
