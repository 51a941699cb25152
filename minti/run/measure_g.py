"""g(t) measured, the paper's Fig. 1: python -m minti.run.measure_g.

The readings themselves are defined in timesteps.py (g_readings); here they are averaged over a grid of
timesteps (measure_g), read for an interval and a single timestep to train on (suggest), and run from
the command line, which writes a CSV and a plot of each reading and prints what it suggests for
train.py --timesteps. The curves are measured on one of three sets:
  init      the concept's images with the neutral templates, the init word where S* will stand;
  learned   the same images and templates with a learned word (--concept FILE): "post-optimised";
  captions  images with their own captions (a .txt beside each image), as the model was trained;
            for the toy world, write fresh captioned renders first: python -m minti.toy.world DIR N.
"""
import argparse
import copy
import os

import torch

from ..data import TEMPLATES, find_images, load_image, read_caption
from ..io.concepts import load_concepts
from ..io.files import write_csv
from ..io.prompt_syntax import expand_prompt
from ..io.weights import load
from ..sampling import default_size
from ..textual_inversion import word_embed_fn
from ..timesteps import NUM_TRAIN_TIMESTEPS, READINGS, g_readings


def measure_g(unet, scheduler, latents, contexts, timesteps=range(0, 1000, 20), repeats=4, generator=None,
              batch_size=16, projections=4):
    """The paper's Fig. 1 under every reading: {reading: (t [K], mean [K], std [K])} over N * repeats.

    latents [N, C, h, w] clean (times latent_scale); contexts [N, L, D], image n's conditioning. Noise per
    image, per t, per repeat from `generator`; a mean's standard error is std / sqrt(N * repeats)."""
    ts = torch.as_tensor(list(timesteps), dtype=torch.long)
    T = scheduler.num_train_timesteps
    if len(contexts) != len(latents) or len(latents) == 0 or repeats < 1 or not ts.numel():
        raise ValueError(f"need one context per latent (got {len(contexts)}, {len(latents)}), repeats >= 1, "
                         f"t given.")
    if ts.min() < 0 or ts.max() >= T:
        raise ValueError(f"timesteps must lie within 0..{T - 1}, got {ts.min()}..{ts.max()}.")
    t_all = ts.repeat_interleave(repeats)
    # The projections from their own generator, so that the noise does not depend on batch_size.
    projection_seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    projection_generator = torch.Generator().manual_seed(projection_seed)
    per = {}  # reading -> list over images of [K * repeats]
    for x0, c in zip(latents, contexts):
        for start in range(0, len(t_all), batch_size):
            t = t_all[start:start + batch_size]
            noise = torch.stack([torch.randn(x0.shape, generator=generator) for _ in t])
            x, context = x0.expand(len(t), *x0.shape), c.expand(len(t), *c.shape)
            g = g_readings(unet, scheduler, x, context, t, noise, projections, projection_generator)
            for k, v in g.items():
                per.setdefault(k, []).append(v.detach().cpu().double())
    result = {}
    for k, chunks in per.items():
        g = torch.cat(chunks).reshape(len(latents), len(ts), repeats).permute(1, 0, 2).reshape(len(ts), -1)
        result[k] = (ts, g.mean(1), g.std(1) if g.shape[1] > 1 else torch.zeros(len(ts), dtype=g.dtype))
    return result


def suggest(t, g, width=100, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """What a curve suggests: ((start, stop), peak): the window [start, start + width) of highest mean g
    (starts at measured t, windows inside 0..T-1) and the single measured t of highest g."""
    t, g = torch.as_tensor(t).reshape(-1), torch.as_tensor(g, dtype=torch.float64).reshape(-1)
    if len(t) != len(g) or len(t) == 0 or not 1 <= width <= num_train_timesteps:
        raise ValueError(f"t and g must be non-empty, of equal length ({len(t)}, {len(g)}), width in 1..T.")
    windows = [(g[(t >= s) & (t < s + width)].mean().item(), s)
               for s in sorted(set(t.tolist()) | {num_train_timesteps - width})
               if s + width <= num_train_timesteps and ((t >= s) & (t < s + width)).any()]
    best = max(windows)[1]
    return (int(best), int(best) + width), int(t[g.argmax()])


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m minti.run.measure_g", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--model", default="toy", help="'toy', a diffusers folder or an SD 1.x checkpoint file")
    add("--set", default="init", choices=("init", "learned", "captions"),
        help="what g is measured on (see above)")
    add("--images", default=None, help="folder of images (required except --set captions --model toy)")
    add("--out", required=True, help="folder for g.csv and g.png")
    add("--token", default="object", help="--set init: the init word put in the templates")
    add("--concept", default=None, help="--set learned: the learned word's embedding file")
    add("--templates", default="object", choices=sorted(TEMPLATES),
        help="neutral templates, image n takes n mod len")
    add("--reading", default="all", choices=("all",) + READINGS, help="which g to measure")
    add("--projections", default="4", help="random projections per sample for the Jacobian, or 'exact'")
    add("--step", type=int, default=20, help="measure every STEP-th timestep")
    add("--repeats", type=int, default=4, help="noise draws per image and timestep")
    add("--width", type=int, default=100, help="width of the suggested interval")
    add("--batch-size", type=int, default=16, help="samples per forward/backward pass")
    add("--seed", type=int, default=0, help="seed of the noise draws")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", default=None, help="fp16 / bf16 / fp32 text encoder and UNet (the VAE stays fp32; fp16 "
        "gradients get a loss scale); None: fp32")
    return p.parse_args(argv)


def measurement_set(sd, args, image_size):
    """(pixels [N, 3, H, W] in [-1, 1], prompts [N], the tokenizer and its embed_fn for the prompts)."""
    tokenizer, embed_fn = sd.tokenizer, None
    if args.images is None:
        raise SystemExit(f"error: --set {args.set} needs --images FOLDER.")
    paths = find_images(args.images)
    pixels = torch.stack([load_image(p, image_size) for p in paths])
    if args.set == "captions":
        captions = [read_caption(p, "") for p in paths]
        if any(c is None for c in captions):
            raise SystemExit("error: --set captions needs a .txt caption beside every image.")
        return pixels, [c[0] for c in captions], tokenizer, embed_fn
    word = args.token
    if args.set == "learned":
        if not args.concept:
            raise SystemExit("error: --set learned needs --concept FILE (the learned word).")
        (concept,) = load_concepts(args.concept)
        tokenizer = copy.deepcopy(sd.tokenizer)
        embed_fn = word_embed_fn(tokenizer, sd.text_encoder, {concept.token: concept.vectors})
        word = expand_prompt([concept.token], concept)[0]
    templates = TEMPLATES[args.templates]
    prompts = [templates[n % len(templates)].format(word) for n in range(len(paths))]
    return pixels, prompts, tokenizer, embed_fn


def plot(path, curves, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for reading, (t, mean, _) in curves.items():  # each divided by its peak: the readings' units differ
        ax.plot(t.numpy(), (mean / mean.max()).numpy(), ".-", label=f"{reading} (peak {mean.max():.3g})")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("g(t) / max g")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    sd = load(args.model, device=args.device, dtype={"text_encoder": args.dtype, "unet": args.dtype})
    image_size = default_size(sd)[0]
    pixels, prompts, tokenizer, embed_fn = measurement_set(sd, args, image_size)
    device = sd.unet.device
    with torch.no_grad():
        latents = torch.cat([sd.vae.encode(x[None].to(device))[0].float() for x in pixels])
        latents = latents * sd.latent_scale  # the posterior mean: its spread is tiny next to the noise
        ids = tokenizer(prompts, length=sd.text_encoder.config.max_position_embeddings).to(device)
        contexts = sd.text_encoder(ids, inputs_embeds=embed_fn(ids)) if embed_fn else sd.text_encoder(ids)
    projections = "exact" if args.projections == "exact" else int(args.projections)
    if args.reading not in ("all", "jacobian"):
        projections = 0
    print(f"{sd.source}: --set {args.set}, {len(prompts)} images at {image_size} px (e.g. {prompts[0]!r}), "
          f"{args.repeats} noise draws per image and timestep")
    T = sd.scheduler.num_train_timesteps
    curves = measure_g(sd.unet, sd.scheduler, latents, contexts.float(), range(0, T, args.step), args.repeats,
                       torch.Generator().manual_seed(args.seed), args.batch_size, projections)
    curves = {k: v for k, v in curves.items() if args.reading in ("all", k)}
    os.makedirs(args.out, exist_ok=True)
    n = len(prompts) * args.repeats
    write_csv(os.path.join(args.out, "g.csv"), ["reading", "t", "g_mean", "g_std", "n"],
              [[k, t, m, s, n] for k, (ts, mean, std) in curves.items()
               for t, m, s in zip(ts.tolist(), mean.tolist(), std.tolist())])
    plot(os.path.join(args.out, "g.png"), curves, f"{sd.source}, --set {args.set}: {n} samples per timestep")
    print(f"wrote {args.out}/g.csv and g.png")
    for reading, (t, mean, _) in curves.items():
        (a, b), peak = suggest(t, mean, args.width, T)
        print(f"{reading:>10s}: highest-g interval --timesteps {a}-{b}, highest single t --timesteps {peak}")


if __name__ == "__main__":
    main()
