"""Which timesteps textual inversion trains on: uniform, a fixed interval or timestep, or adaptive.

Wang & Kalogeiton, "Conditional Gradient-based Textual Inversion" (ECCV workshop 2024): the loss
sends the conditioning c a strong gradient at some timesteps and almost none at others, so training
where g(t) = E || d loss / d c || is high converges faster. No public code exists; this is ours.
The training loop asks a sampler for each batch's timesteps (`sample`) and, for `adaptive`, reports
the per-sample gradient norms it computed anyway (`update`). `measure_gradient_norms` draws the
paper's Fig. 1 curve; `python -m minti.timesteps --help` runs it on a model and a folder of images.
"""
import argparse
import math
import os
import re

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000  # SD 1.x's DDPM: t = 0 .. 999


# ----------------------------------------------------------------------------------------------
# Samplers. Each has sample(batch_size, generator) -> LongTensor[B] on the CPU, wants_grad_norms,
# update(t, g), describe(), state_dict(), load_state_dict(). Randomness comes only from `generator`
# (a CPU torch.Generator, or None for torch's global one), so a resumed run that restores the
# generator's state and the sampler's state draws exactly what the uninterrupted run would have.

class _Sampler:
    """What the three stateless samplers share: no use for gradients, a state that is just the spec."""

    wants_grad_norms = False

    def update(self, t, g):
        pass  # only the adaptive sampler learns from the gradients

    def state_dict(self):
        return {"spec": self.spec, "num_train_timesteps": self.num_train_timesteps}

    def load_state_dict(self, state):
        mine, theirs = (self.spec, self.num_train_timesteps), (state["spec"], state["num_train_timesteps"])
        if mine != theirs:
            raise ValueError(f"This checkpoint was trained with --timesteps {theirs[0]!r} over {theirs[1]} "
                             f"timesteps, but this run uses {mine[0]!r} over {mine[1]}. Resume with the same "
                             f"--timesteps, or start a new run.")


class UniformTimesteps(_Sampler):
    """t ~ Uniform{0, ..., T-1}: the LDM loss as Ho et al. and every textual inversion code train it."""

    def __init__(self, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
        self.num_train_timesteps = num_train_timesteps
        self.spec = "uniform"

    def sample(self, batch_size, generator=None):
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator)

    def describe(self):
        return f"uniform: t in 0..{self.num_train_timesteps - 1}"


class IntervalTimesteps(_Sampler):
    """t ~ Uniform{start, ..., stop-1}: the paper's "high-grad interval" (or any other, e.g. 900-1000).

    Half-open like Python's range, so that "900-1000" is the last 100 timesteps of a 1000-step model
    and adjacent intervals ("0-100", "100-200") do not overlap.
    """

    def __init__(self, start, stop, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
        if not 0 <= start < stop <= num_train_timesteps:
            what = "empty" if stop <= start else "out of range"
            raise ValueError(f"The timestep interval {start}-{stop} is {what}: A-B means t = A .. B-1, so it "
                             f"needs 0 <= A < B <= {num_train_timesteps} (the model's timesteps are "
                             f"0..{num_train_timesteps - 1}). Example: 350-450.")
        self.start, self.stop, self.num_train_timesteps = start, stop, num_train_timesteps
        self.spec = f"{start}-{stop}"

    def sample(self, batch_size, generator=None):
        return torch.randint(self.start, self.stop, (batch_size,), generator=generator)

    def describe(self):
        return f"interval {self.spec}: t in {self.start}..{self.stop - 1}"


class FixedTimestep(_Sampler):
    """Always the same t: the paper's "single high-grad timestep" experiment."""

    def __init__(self, t, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
        if not 0 <= t < num_train_timesteps:
            raise ValueError(f"Timestep {t} is out of range: the model's timesteps are "
                             f"0..{num_train_timesteps - 1}.")
        self.t, self.num_train_timesteps = t, num_train_timesteps
        self.spec = str(t)

    def sample(self, batch_size, generator=None):
        return torch.full((batch_size,), self.t, dtype=torch.long)

    def describe(self):
        return f"fixed: t = {self.t}"


class AdaptiveTimesteps:
    """Sample t with probability proportional to a running estimate of g(t), plus a uniform share.

    The paper's adaptive variant: keep g(t) = E || d loss_i / d c_i || per bin of timesteps, learned
    from the per-sample gradient norms that training computes anyway, and spend the steps where the
    word is taught the most. p(t) = (1 - uniform_share) * g(t) / sum_t' g(t') + uniform_share / T,
    with g(t) constant within a bin; the uniform share keeps every bin visited, so no estimate goes
    stale. Each bin's estimate is an exponential moving average of the norms of the samples that fell
    in it, starting at its first sample; a bin never visited counts as the mean of the visited ones.
    """

    wants_grad_norms = True

    def __init__(self, num_train_timesteps=NUM_TRAIN_TIMESTEPS, bin_width=50, decay=0.9, uniform_share=0.1):
        # Defaults: 20 bins of 50 timesteps, fine enough for the curves of the paper's Fig. 1. The paper
        # gives no decay: 0.9 remembers about the last 10 samples of a bin (the embedding, and so g,
        # drifts as it trains). 10% uniform: every bin keeps at least 0.1 / 20 = 0.5% of the draws.
        if not (isinstance(bin_width, int) and 1 <= bin_width <= num_train_timesteps):
            raise ValueError(f"bin_width must be an integer in 1..{num_train_timesteps}, got {bin_width!r}.")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1) (0: keep only the latest norm), got {decay!r}.")
        if not 0.0 <= uniform_share <= 1.0:
            raise ValueError(f"uniform_share must be in [0, 1] (1: plain uniform sampling), "
                             f"got {uniform_share!r}.")
        self.num_train_timesteps, self.bin_width = num_train_timesteps, bin_width
        self.decay, self.uniform_share = float(decay), float(uniform_share)
        self.spec = "adaptive"
        self.num_bins = math.ceil(num_train_timesteps / bin_width)  # the last bin may be narrower
        self.estimate = torch.zeros(self.num_bins, dtype=torch.float64)  # EMA of g per bin
        self.count = torch.zeros(self.num_bins, dtype=torch.long)  # samples seen per bin

    def bin_estimates(self):
        """g per bin [num_bins]: the running estimates, unvisited bins at the mean of the visited."""
        visited = self.count > 0
        if not visited.any():
            return torch.ones(self.num_bins, dtype=torch.float64)
        return torch.where(visited, self.estimate, self.estimate[visited].mean())

    def probabilities(self):
        """p(t) for t = 0 .. T-1 [T], float64, summing to 1."""
        T = self.num_train_timesteps
        g = self.bin_estimates()[torch.arange(T) // self.bin_width]
        uniform = torch.full((T,), 1.0 / T, dtype=torch.float64)
        proportional = g / g.sum() if g.sum() > 0 else uniform  # all zero: nothing to prefer
        return (1.0 - self.uniform_share) * proportional + self.uniform_share * uniform

    def sample(self, batch_size, generator=None):
        return torch.multinomial(self.probabilities(), batch_size, replacement=True, generator=generator)

    def update(self, t, g):
        """Fold in g[i] = || d loss_i / d c_i || of sample i, trained at t[i] (see per_sample_grad_norms)."""
        t, g = torch.as_tensor(t).reshape(-1).tolist(), torch.as_tensor(g).reshape(-1).tolist()
        if len(t) != len(g):
            raise ValueError(f"update(t, g) needs one norm per timestep; got {len(t)} timesteps and "
                             f"{len(g)} norms.")
        for ti, gi in zip(t, g):
            if not 0 <= ti < self.num_train_timesteps:
                raise ValueError(f"Timestep {ti} is outside 0..{self.num_train_timesteps - 1}.")
            if not (math.isfinite(gi) and gi >= 0):
                raise ValueError(f"Gradient norm {gi} at t={ti} is not a finite non-negative number: the "
                                 f"training step diverged (NaN / inf); lower the learning rate or use fp32.")
            b = ti // self.bin_width
            first = self.count[b] == 0
            self.estimate[b] = gi if first else self.decay * self.estimate[b] + (1.0 - self.decay) * gi
            self.count[b] += 1

    def describe(self):
        return (f"adaptive: {self.num_bins} bins of {self.bin_width} timesteps, EMA decay {self.decay:g}, "
                f"{100 * self.uniform_share:g}% uniform")

    def _options(self):
        return {"num_train_timesteps": self.num_train_timesteps, "bin_width": self.bin_width,
                "decay": self.decay, "uniform_share": self.uniform_share}

    def state_dict(self):
        return {"spec": self.spec, **self._options(),
                "estimate": self.estimate.clone(), "count": self.count.clone()}

    def load_state_dict(self, state):
        theirs = {k: state.get(k) for k in self._options()}
        if state.get("spec") != self.spec or theirs != self._options():
            raise ValueError(f"This checkpoint's timestep sampler ({state.get('spec')!r}, {theirs}) differs "
                             f"from this run's ({self.spec!r}, {self._options()}). Resume with the same "
                             f"--timesteps and adaptive options, or start a new run.")
        self.estimate = state["estimate"].to(torch.float64).clone()
        self.count = state["count"].to(torch.long).clone()


SPEC_HELP = ("'uniform', 'adaptive', an interval 'A-B' (t = A .. B-1, e.g. '350-450') "
             "or a single timestep 'T' (e.g. '400')")


def make_timestep_sampler(spec="uniform", num_train_timesteps=NUM_TRAIN_TIMESTEPS, **options):
    """The sampler for a --timesteps spec: "uniform", "A-B", "T" or "adaptive".

    options (bin_width, decay, uniform_share) go to AdaptiveTimesteps; the other samplers take none.
    A sampler object (anything with .sample) is returned as it is.
    """
    if hasattr(spec, "sample"):
        return spec
    s = str(spec).strip().lower()
    if s == "adaptive":
        return AdaptiveTimesteps(num_train_timesteps, **options)
    if options:
        raise ValueError(f"Options {sorted(options)} only apply to --timesteps adaptive, not {spec!r}.")
    if s == "uniform":
        return UniformTimesteps(num_train_timesteps)
    if m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", s):
        return IntervalTimesteps(int(m[1]), int(m[2]), num_train_timesteps)
    if re.fullmatch(r"\d+", s):
        return FixedTimestep(int(s), num_train_timesteps)
    raise ValueError(f"--timesteps {spec!r} is not a timestep spec: use {SPEC_HELP}.")


# ----------------------------------------------------------------------------------------------
# g: the norm of the loss gradient with respect to the conditioning, one number per sample.
#
# Everywhere here, sample i's loss is loss_i = mean over its latent's elements of
# (eps_theta(x_t, t_i, c_i) - eps)^2, i.e. F.mse_loss on that sample alone, and c_i [L, D] is the
# text encoder's output for its prompt, as fed to the UNet. Training's batch loss F.mse_loss(pred,
# noise) over the whole batch is the mean of the loss_i, so the adaptive estimate (from training)
# and measure_gradient_norms (from scratch) estimate the same g(t).

def per_sample_grad_norms(context_grad, loss_reduction="mean", loss_scale=1.0):
    """g [B] = || d loss_i / d c_i || from the gradient of the whole batch's loss w.r.t. the context.

    context_grad [B, L, D]: what a hook on the context (the [B, L, D] text encoder output fed to the
    UNet, one row per sample) receives in training's one backward pass. Sample i's loss depends on c_i
    alone (GroupNorm and attention never mix samples), so d L / d c_i = (d L / d loss_i) d loss_i / d c_i:
    with L = mean_i loss_i ("mean", F.mse_loss over the batch) that factor is 1/B, so we multiply by B;
    with L = sum_i loss_i ("sum") it is 1. loss_scale: any factor the loop multiplied L by before
    backward (1 / accumulation steps, an fp16 GradScaler's scale), divided out here. In the loop:

        context = text_encoder(inputs_embeds=embeds)                  # [B, L, D]
        context.register_hook(lambda grad: grads.append(grad))
        F.mse_loss(unet(x_t, t, context).float(), noise.float()).backward()
        sampler.update(t, per_sample_grad_norms(grads[0]))
    """
    if context_grad.dim() != 3:
        raise ValueError(f"context_grad must be [batch, tokens, width], "
                         f"got shape {tuple(context_grad.shape)}.")
    factor = {"mean": context_grad.shape[0], "sum": 1}.get(loss_reduction)
    if factor is None:
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
    return context_grad.detach().float().flatten(1).norm(dim=1) * (factor / loss_scale)


FP16_LOSS_SCALE = 2.0 ** 16  # torch.amp.GradScaler's initial scale


def context_grad_norms(unet, scheduler, latents, context, t, noise):
    """g [B] for one batch, computed from scratch: || d/dc_i mse(eps_theta(x_t, t_i, c_i), eps_i) ||.

    latents [B, C, h, w] clean (already times latent_scale), context [B, L, D], t [B], noise [B, C, h, w].
    One backward of sum_i loss_i to a detached copy of the context gives every sample's own gradient.
    """
    c = context.detach().clone().requires_grad_(True)
    x_t = scheduler.add_noise(latents, noise, t)
    pred = unet(x_t, t, c)
    loss_per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").flatten(1).mean(dim=1)
    # fp16: a loss scale, as training's GradScaler, lifts small gradients above fp16's smallest normal;
    # halved until the gradient is finite (it is divided out again below).
    scale = FP16_LOSS_SCALE if pred.dtype == torch.float16 else 1.0
    while True:
        (grad,) = torch.autograd.grad(loss_per_sample.sum() * scale, c, retain_graph=scale > 1.0)
        if scale <= 1.0 or torch.isfinite(grad).all():
            break
        scale /= 2.0
    return per_sample_grad_norms(grad, loss_reduction="sum", loss_scale=scale)


def _device_of(module, fallback):
    p = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return p.device if p is not None else fallback


def _contexts(text_encoder, context, n_images, device):
    """The conditioning as [1 or n_images, L, D]: given as features, or as token ids to encode."""
    context = torch.as_tensor(context)
    if not context.is_floating_point():  # token ids
        ids = context.reshape(1, -1) if context.dim() == 1 else context
        if text_encoder is None:
            raise ValueError("context is token ids, so a text_encoder is needed to encode them.")
        with torch.no_grad():
            context = text_encoder(ids.to(_device_of(text_encoder, device)))
    if context.dim() == 2:
        context = context[None]
    if context.dim() != 3 or context.shape[0] not in (1, n_images):
        raise ValueError(f"context must be one prompt [L, D] / [1, L, D] or one per image [{n_images}, L, D] "
                         f"(or token ids [L] / [1, L] / [{n_images}, L]); got shape {tuple(context.shape)}.")
    return context.detach().to(device)


def measure_gradient_norms(unet, text_encoder, scheduler, latents, context, timesteps=range(0, 1000, 20),
                           repeats=4, generator=None, batch_size=8, progress=None):
    """The paper's Fig. 1: g(t) = E_{x_0, eps} || d loss / d c ||, loss = mse(eps_theta(x_t, t, c), eps).

    latents: clean latents, already multiplied by latent_scale: [N, C, h, w], or a list of [C, h, w]
        (sizes may differ). Each image gets `repeats` fresh noise draws at every timestep.
    context: the conditioning [L, D] / [1, L, D] (one prompt for all) or [N, L, D] (one per image), or
        token ids ([L], [1, L], [N, L]) that text_encoder encodes (it may be None otherwise).
    generator: CPU torch.Generator for the noise, drawn one sample at a time (for each image, for each
        t, for each repeat), so the result does not depend on batch_size.
    Returns t [K], g_mean [K], g_std [K]: the mean and standard deviation over the N * repeats (image,
    noise) pairs of the per-sample norm (the quantity training's hook gives, see per_sample_grad_norms);
    the standard error of g_mean is g_std / sqrt(N * repeats).
    """
    latents = list(latents)
    if not latents:
        raise ValueError("No latents to measure on: give at least one encoded image.")
    T = scheduler.num_train_timesteps
    ts = torch.as_tensor(list(timesteps), dtype=torch.long).reshape(-1)
    if ts.numel() == 0 or ts.min() < 0 or ts.max() >= T:
        raise ValueError(f"timesteps must be a non-empty list within 0..{T - 1}, got {ts.tolist()}.")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    device = _device_of(unet, latents[0].device)
    contexts = _contexts(text_encoder, context, len(latents), device)

    per_image = []  # [N] of [K, repeats]
    t_all = ts.repeat_interleave(repeats)  # t0 x repeats, t1 x repeats, ...
    for n, x0 in enumerate(latents):
        x0 = x0.detach().float().to(device)
        c = contexts[n if len(contexts) > 1 else 0]
        g = []
        for start in range(0, len(t_all), batch_size):
            t = t_all[start:start + batch_size]
            noise = torch.stack([torch.randn(x0.shape, generator=generator) for _ in t]).to(device)
            B = len(t)
            g.append(context_grad_norms(unet, scheduler, x0.expand(B, *x0.shape), c.expand(B, *c.shape),
                                        t.to(device), noise).cpu())
        per_image.append(torch.cat(g).reshape(len(ts), repeats))
        if progress is not None:
            progress(n + 1, len(latents))
    g = torch.cat(per_image, dim=1).double()  # [K, N * repeats]
    g_std = g.std(dim=1) if g.shape[1] > 1 else torch.zeros(len(ts), dtype=g.dtype)
    return ts, g.mean(dim=1), g_std


def suggest_interval(t, g, width=100, num_train_timesteps=NUM_TRAIN_TIMESTEPS):
    """(start, stop): the interval [start, start + width) where the mean of g over the measured t is highest.

    Candidate starts are the measured timesteps (and T - width, so the last window is always tried);
    windows must lie within 0..T-1. The result is a --timesteps spec: f"{start}-{stop}".
    """
    t, g = torch.as_tensor(t).reshape(-1), torch.as_tensor(g, dtype=torch.float64).reshape(-1)
    if len(t) != len(g) or len(t) == 0:
        raise ValueError(f"t and g must be non-empty and of equal length, got {len(t)} and {len(g)}.")
    if not 1 <= width <= num_train_timesteps:
        raise ValueError(f"width must be in 1..{num_train_timesteps}, got {width}.")
    best = None
    for start in sorted(set(t.tolist()) | {num_train_timesteps - width}):
        inside = (t >= start) & (t < start + width)
        if start < 0 or start + width > num_train_timesteps or not inside.any():
            continue
        mean = g[inside].mean().item()
        if best is None or mean > best[0]:
            best = (mean, int(start))
    if best is None:
        raise ValueError(f"No interval of width {width} holds a measured timestep within "
                         f"0..{num_train_timesteps - 1}.")
    return best[1], best[1] + width


# ----------------------------------------------------------------------------------------------
# The measurement command: python -m minti.timesteps --model toy --images DIR --out DIR

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_images(folder, resolution):
    """The images of a folder as [N, 3, resolution, resolution] in [-1, 1]: centre-cropped square, resized."""
    import numpy as np
    from PIL import Image

    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    images = []
    for path in paths:
        im = Image.open(path).convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(images), paths


def write_csv(path, t, g_mean, g_std, n):
    with open(path, "w") as f:
        f.write("t,g_mean,g_std,n\n")
        for row in zip(t.tolist(), g_mean.tolist(), g_std.tolist()):
            f.write(f"{row[0]},{row[1]:.8g},{row[2]:.8g},{n}\n")


def plot(path, t, g_mean, g_std, interval, title):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axvspan(interval[0], interval[1], color="tab:orange", alpha=0.25,
               label=f"highest-g interval {interval[0]}-{interval[1]}")
    ax.fill_between(t.numpy(), (g_mean - g_std).numpy(), (g_mean + g_std).numpy(), alpha=0.2,
                    label="± 1 std")
    ax.plot(t.numpy(), g_mean.numpy(), marker=".", label="g(t) mean")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("|| d loss / d c ||")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minti.timesteps",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Measure g(t), the norm of the loss gradient w.r.t. the text "
                                            "conditioning per timestep (Wang & Kalogeiton 2024, Fig. 1); "
                                            "write a CSV and a plot, and suggest a high-gradient interval "
                                            "for --timesteps.")
    p.add_argument("--model", default="toy", help="'toy', a diffusers folder or an SD 1.x checkpoint file")
    p.add_argument("--images", required=True, help="folder of the concept's images")
    p.add_argument("--out", required=True, help="folder for gradient_norms.csv and gradient_norms.png")
    p.add_argument("--prompt", default="a photo of a {}", help="prompt; {} is replaced by --token")
    p.add_argument("--token", default="object", help="word put in the prompt (e.g. the init word)")
    p.add_argument("--step", type=int, default=20, help="measure every STEP-th timestep")
    p.add_argument("--repeats", type=int, default=4, help="noise draws per image and timestep")
    p.add_argument("--width", type=int, default=100, help="width of the suggested interval")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size fed to the VAE; None: UNet sample_size x VAE downsampling")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward/backward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp16 / bf16 / fp32 text encoder and UNet (the VAE stays "
                   "fp32; fp16 gradients get a loss scale); None: fp32")
    args = p.parse_args(argv)

    import minti  # here, so that importing this module for training stays light

    sd = minti.load(args.model, device=args.device, dtype={"text_encoder": args.dtype, "unet": args.dtype})
    T = sd.scheduler.num_train_timesteps
    resolution = args.resolution or (sd.unet.config.sample_size or 64) * sd.vae.config.downsample_factor
    images, paths = load_images(args.images, resolution)
    with torch.no_grad():
        latents = [sd.vae.encode(x[None].to(args.device))[0][0] * sd.latent_scale  # the VAE in fp32
                   for x in images]  # the posterior mean: its spread is negligible next to the noise
    prompt = args.prompt.format(args.token)
    ids = sd.tokenizer([prompt], length=sd.text_encoder.config.max_position_embeddings)
    print(f"{sd.source}: {len(paths)} images at {resolution} px, prompt {prompt!r}, "
          f"{args.repeats} noise draws per image and timestep")
    generator = torch.Generator().manual_seed(args.seed)
    t, g_mean, g_std = measure_gradient_norms(
        sd.unet, sd.text_encoder, sd.scheduler, latents, ids, timesteps=range(0, T, args.step),
        repeats=args.repeats, generator=generator, batch_size=args.batch_size,
        progress=lambda i, n: print(f"  image {i}/{n} done", flush=True))

    interval = suggest_interval(t, g_mean, args.width, T)
    peak = int(t[g_mean.argmax()])
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "gradient_norms.csv"), t, g_mean, g_std, len(paths) * args.repeats)
    plot(os.path.join(args.out, "gradient_norms.png"), t, g_mean, g_std, interval,
         f"{sd.source} — {prompt!r}, {len(paths)} images x {args.repeats} draws")
    print(f"wrote {args.out}/gradient_norms.csv and gradient_norms.png")
    print(f"highest-g interval of width {args.width}: {interval[0]}-{interval[1]} "
          f"(train with --timesteps {interval[0]}-{interval[1]}); highest single timestep: {peak} "
          f"(--timesteps {peak})")


if __name__ == "__main__":
    main()
