"""Text-to-image sampling: prompts -> text conditioning -> guided denoising -> VAE decode -> images.

The loop of Stable Diffusion 1.x (Rombach et al. 2022) with classifier-free guidance (Ho & Salimans
2022, arXiv:2207.12598), done as diffusers' StableDiffusionPipeline does it (one batched UNet call on
[unconditional, conditional], initial noise from a seeded CPU generator, the same uint8 conversion),
so a seed gives the same picture in both. The conditioning may be a callable of the timestep: that
is where multiresolution textual inversion plugs in (multires.py); a fixed tensor is concatenated once.
"""
import copy

import numpy as np
import torch
from tqdm.auto import tqdm

from .schedulers import DDIM
from .vae import images_per_call


def default_size(sd):
    """The model's training resolution in pixels: the UNet's sample_size times the VAE factor."""
    side = (sd.unet.config.sample_size or 64) * sd.vae.config.downsample_factor  # 64 x 8 = 512 for SD 1.x
    return side, side


def latent_size(sd, width, height):
    """(latent height, latent width) for an image size; sizes must be multiples of the VAE factor."""
    f = sd.vae.config.downsample_factor  # 8 for SD 1.x: three 2x downsamplings
    if width % f or height % f or width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive multiples of {f} (the VAE downsamples by {f}); "
                         f"got {width}x{height}. Try {max(f, round(width / f) * f)}x"
                         f"{max(f, round(height / f) * f)}.")
    return height // f, width // f


def encode_prompts(tokenizer, text_encoder, prompts, embed_fn=None):
    """prompts (list of str) -> the text conditioning [B, L, D] that the UNet cross-attends to.

    embed_fn(ids [B, L]) -> token vectors [B, L, D], when given, replaces the table lookup: the seam
    through which learned words (textual inversion) splice their vectors into the prompt.
    """
    device = next(text_encoder.parameters()).device
    ids = tokenizer(list(prompts), length=text_encoder.config.max_position_embeddings).to(device)
    return text_encoder(ids, inputs_embeds=None if embed_fn is None else embed_fn(ids))


def make_scheduler(ddpm, name="ddim", num_steps=50, eta=0.0):
    """DDIM or DDPM sampling on the model's noise schedule: `.timesteps` and `.step(eps, t, x, generator)`."""
    if name == "ddim":
        return DDIM(ddpm, num_steps, eta=eta)
    if name == "ddpm":
        if eta != 0.0:
            raise ValueError(f"eta={eta} is a DDIM setting; DDPM sampling adds its own noise: leave eta 0.")
        scheduler = copy.copy(ddpm)  # set_timesteps replaces .timesteps; the model's own stays as loaded
        scheduler.set_timesteps(num_steps)
        return scheduler
    raise ValueError(f"Unknown scheduler {name!r}: use 'ddim' or 'ddpm'.")


def initial_latents(n, channels, height, width, seed, device="cpu", dtype=torch.float32):
    """x_T ~ N(0, I) [n, channels, height, width], drawn as diffusers draws it for a seed: on a CPU
    generator (the same noise on every device), directly in `dtype`, then moved. Returns (latents,
    generator): schedulers that add noise at each step (DDPM, DDIM with eta > 0) keep drawing from it."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn([n, channels, height, width], generator=generator, dtype=dtype).to(device)
    return latents, generator


def denoise(unet, scheduler, latents, cond, uncond=None, guidance_scale=7.5, generator=None, progress=False):
    """Run the scheduler's steps from x_T = latents to x_0 under classifier-free guidance.

    cond, uncond: text conditioning [B, L, D], or a callable t -> [B, L, D] (t: the timestep, a 0-d
    LongTensor) when the conditioning changes with the timestep; either may be (or return) a list of
    per-layer contexts, one per UNet cross-attention layer (spacetime.py). uncond is needed unless
    guidance_scale is 1 (then eps = eps_cond and the unconditional half is skipped). Other scales,
    < 1 included, use the guidance formula as written (diffusers ignores guidance for scales <= 1).
    """
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("guidance_scale != 1 needs unconditional conditioning (uncond); pass it, or "
                         "use guidance_scale=1.")
    guided = guidance_scale != 1.0

    def context_at(t):  # [uncond, cond] for one UNet call, as diffusers; cond alone without guidance
        c = cond(t) if callable(cond) else cond
        if not guided:
            return c
        u = uncond(t) if callable(uncond) else uncond
        if torch.is_tensor(c) and torch.is_tensor(u):
            return torch.cat([u, c])
        # Per-layer conditioning (P+, NeTI: a list, one context per UNet layer): join the halves per layer.
        layers = len(c) if not torch.is_tensor(c) else len(u)
        return [torch.cat([x if torch.is_tensor(x) else x[i] for x in (u, c)]) for i in range(layers)]

    fixed = None if callable(cond) or callable(uncond) else context_at(None)  # built once for prompts
    x = latents * scheduler.init_noise_sigma
    on_device = torch.as_tensor(scheduler.timesteps).to(x.device)  # for the UNet, copied once
    for t, t_unet in zip(tqdm(scheduler.timesteps, disable=not progress, desc="sampling"), on_device):
        context = fixed if fixed is not None else context_at(t)
        if guided:
            eps_uncond, eps_cond = unet(torch.cat([x, x]), t_unet, context).chunk(2)
            # Classifier-free guidance, Ho & Salimans eq. 6 written with scale s = 1 + w.
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        else:
            eps = unet(x, t_unet, context)
        x = scheduler.step(eps, t, x, generator)
    return x


def decode(vae, latents, latent_scale):
    """Latents (in the UNet's scaled space) -> images [B, 3, H, W] in [-1, 1] (not clamped), decoded a few
    at a time (one at 512 px: vae.images_per_call)."""
    f = vae.config.downsample_factor
    n = images_per_call(latents.shape[-2] * f, latents.shape[-1] * f)
    # 0.18215 for SD 1.x: latents were scaled to unit variance
    return torch.cat([vae.decode(part / latent_scale) for part in latents.split(n)])


def to_uint8(images):
    """Images [B, 3, H, W] in [-1, 1] -> uint8 numpy [B, H, W, 3], rounded as diffusers rounds them."""
    images = (images * 0.5 + 0.5).clamp(0, 1)  # in the images' own dtype, as diffusers
    images = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return (images * 255).round().astype(np.uint8)


@torch.no_grad()
def text_to_image(sd, prompts, negative="", num_steps=50, stepper="ddim", eta=0.0, guidance_scale=7.5,
                  seed=0, n=1, width=None, height=None, embed_fn=None, cond=None, uncond=None, progress=False,
                  output="np"):
    """n images per prompt from a loaded model `sd` (minti.load), ordered prompt by prompt as in diffusers.

    prompts: a str or a list; negative: one str for all prompts, or one per prompt. width, height: pixels,
    multiples of 8 (default: the model's training resolution). embed_fn: see encode_prompts. cond / uncond:
    conditioning to use instead of encoding the prompts / negatives, [len(prompts) * n, L, D] (prompt by
    prompt, n rows each) or a function of the timestep giving it (multires.py); the prompts still set the
    batch size. stepper: "ddim" or "ddpm", the method that steps along the noise schedule (make_scheduler).
    output: "np" (uint8 [B, H, W, 3]), "pil" (PIL images) or "pt" (float [B, 3, H, W] in [-1, 1]).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    assert output in ("np", "pil", "pt"), f"output must be 'np', 'pil' or 'pt', got {output!r}."
    if len(negatives) != len(prompts):
        raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts: give one "
                         "negative prompt for all, or one per prompt.")
    if n < 1:
        raise ValueError(f"n (images per prompt) must be >= 1, got {n}.")
    h, w = latent_size(sd, width or default_size(sd)[0], height or default_size(sd)[1])

    def encode(texts):  # [P, L, D] -> [P * n, L, D]: each prompt's row repeated for its n images
        return encode_prompts(sd.tokenizer, sd.text_encoder, texts, embed_fn).repeat_interleave(n, dim=0)

    cond = encode(prompts) if cond is None else cond
    if uncond is None and guidance_scale != 1.0:
        uncond = encode(negatives)
    scheduler = make_scheduler(sd.scheduler, stepper, num_steps, eta)  # its name -> DDIM or DDPM
    latents, generator = initial_latents(len(prompts) * n, sd.unet.config.in_channels, h, w, seed,
                                         device=sd.unet.device, dtype=sd.unet.dtype)
    latents = denoise(sd.unet, scheduler, latents, cond, uncond, guidance_scale, generator, progress)
    images = decode(sd.vae, latents.to(next(sd.vae.parameters()).dtype), sd.latent_scale)
    if output == "pt":
        return images
    if output == "np":
        return to_uint8(images)
    from PIL import Image  # only needed for PIL output
    return [Image.fromarray(image) for image in to_uint8(images)]
