"""Train the toy model: a tiny Stable Diffusion 1.x (same classes, tiny configuration) on the toy world.

Real SD 1.x weights are a multi-GB download; this script makes a few-MB model with minti's own
tokenizer, text encoder, UNet, VAE and DDPM schedule, in the order LDM trained its parts:
  1. tokenizer: a byte-level BPE in CLIP's file format, learned on the toy captions;
  2. VAE: images -> latents (reconstruction loss + a tiny KL, as LDM's kl-f8 autoencoder);
  3. text encoder + UNet together, with the DDPM noise-prediction loss (LDM trained its text
     encoder jointly); ~10% empty captions teach the unconditional prediction for guidance.
The result is written as an ordinary diffusers-format folder (weights/toy/), which `minti.load("toy")`
and diffusers' StableDiffusionPipeline both read. Run `python -m minti.toy.model`; every stage
saves a checkpoint as it goes, and an interrupted run resumes where it stopped.
"""
import argparse
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import world as toyworld
from .bpe import train_bpe
from ..clip import CLIPTextConfig, CLIPTextModel
from ..schedulers import DDPM
from ..io.tokenizer_files import read_tokenizer_folder, write_tokenizer_folder
from ..unet import UNet, UNetConfig
from ..vae import VAE, VAEConfig
from ..io.files import atomic_write
from ..io.weights import COMPONENTS, TOY_FOLDER, StableDiffusion, save_diffusers_folder
from .oracle import to_model_input


@dataclass
class ToyTrainConfig:
    seed: int = 0
    bpe_vocab_size: int = 600  # 512 byte tokens + merges + 2 special: enough for the ~40 caption words
    # VAE: 32x32 images -> 8x8x4 latents (downsample 4). A prototype reached reconstruction MSE
    # 0.015 with these widths in 800 steps of batch 64.
    vae_steps: int = 1000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6  # LDM's kl-f8 autoencoder: keep the latent near-deterministic
    # Diffusion: the prototype had all attributes right 96% of the time after 3.8k steps of 64.
    dataset_size: int = 60_000  # scenes rendered and encoded once; captions are drawn fresh each step
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_min_lr: float = 1e-4  # cosine decay floor
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the shipped weights are an exponential moving average
    checkpoint_every: int = 100


def toy_configs(vocab_size, bos_id, eos_id):
    """The toy model's architecture: SD 1.x's classes with tiny widths."""
    vae = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                    sample_size=toyworld.IMAGE_SIZE, mid_block_add_attention=False)
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos_id,
                          eos_token_id=eos_id)
    unet = UNetConfig(block_out_channels=(64, 128, 128), layers_per_block=1, attention_head_dim=4,
                      cross_attention_dim=64, norm_num_groups=32,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                      sample_size=toyworld.IMAGE_SIZE // 4)
    return vae, text, unet


def lr_at(step, total, base, floor, warmup):
    """Linear warm-up, then cosine decay from base to floor."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Checkpoints: everything a stage needs to continue exactly (weights, optimizer, step, RNG).

def save_checkpoint(path, **state):
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path):
    return torch.load(path, weights_only=True, map_location="cpu") if os.path.exists(path) else None


def resume(path, **parts):
    """A stage's checkpoint, if there is one, restored: each part's state (its modules and optimizer) and
    torch's RNG. Returns (the step it reached, the checkpoint), or (0, None)."""
    state = load_checkpoint(path)
    if state is None:
        return 0, None
    for name, part in parts.items():
        part.load_state_dict(state[name])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), state


def log(msg):
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Stage 1: the tokenizer.

def train_tokenizer(cfg, work):
    folder = os.path.join(work, "tokenizer")
    if os.path.exists(os.path.join(folder, "vocab.json")):
        return read_tokenizer_folder(folder)
    corpus = toyworld.caption_corpus(20_000, seed=cfg.seed)
    tok = train_bpe([c for c in corpus if c], cfg.bpe_vocab_size)
    write_tokenizer_folder(tok, folder)
    log(f"tokenizer: {len(tok)} tokens")
    return tok


# ----------------------------------------------------------------------------------------------
# Stage 2: the VAE.

def train_vae(cfg, vae_config, work):
    path = os.path.join(work, "vae.pt")
    torch.manual_seed(cfg.seed)
    vae = VAE(vae_config)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step, _ = resume(path, model=vae, opt=opt)
    if step >= cfg.vae_steps:
        return vae
    log(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, from step {step}")
    vae.train()
    t0, recent = time.time(), []
    while step < cfg.vae_steps:
        images, _ = toyworld.render_batch(cfg.vae_batch, np.random.default_rng((cfg.seed, 1, step)))
        x = to_model_input(images, vae_config.sample_size)
        mean, logvar = vae.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        recon = vae.decode(z)
        rec_loss = F.mse_loss(recon, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = rec_loss + cfg.kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.vae_lr / 10, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        recent.append(rec_loss.item())
        if step % 50 == 0:
            log(f"VAE step {step}/{cfg.vae_steps}  recon MSE {np.mean(recent):.4f}  "
                f"{50 * cfg.vae_batch / (time.time() - t0):.0f} img/s")
            t0, recent = time.time(), []
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            save_checkpoint(path, model=vae.state_dict(), opt=opt.state_dict(), step=step,
                            torch_rng=torch.get_rng_state())
    return vae


@torch.no_grad()
def encode_dataset(cfg, vae, work):
    """Render the training scenes once and keep their latent Gaussians (mean, std) and labels."""
    path = os.path.join(work, "latents.pt")
    state = load_checkpoint(path)
    if state is not None:
        return state
    vae.eval()
    rng = np.random.default_rng((cfg.seed, 2))
    labels = toyworld.random_labels(cfg.dataset_size, rng)
    means, stds = [], []
    for i in range(0, cfg.dataset_size, 500):
        part = {k: v[i:i + 500] for k, v in labels.items()}
        mean, logvar = vae.encode(to_model_input(toyworld.render_labels(part), toyworld.IMAGE_SIZE))
        means.append(mean)
        stds.append((0.5 * logvar).exp())
    mean, std = torch.cat(means), torch.cat(stds)
    # LDM's scale_factor: 1 / std of the latents, so that the diffusion sees unit variance
    # (SD 1.x's 0.18215 was measured the same way on its autoencoder).
    scale = 1.0 / (mean + std * torch.randn_like(mean)).std().item()
    state = dict(mean=mean, std=std, scale=torch.tensor(scale),
                 **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in labels.items()})
    save_checkpoint(path, **state)
    log(f"encoded {cfg.dataset_size} scenes; latent scale {scale:.4f}")
    return state


# ----------------------------------------------------------------------------------------------
# Stage 3: text encoder + UNet, the DDPM loss ||eps - eps_theta(z_t, t, c(y))||^2.

def train_diffusion(cfg, tok, text_config, unet_config, data, work):
    path = os.path.join(work, "diffusion.pt")
    torch.manual_seed(cfg.seed)
    text_encoder, unet = CLIPTextModel(text_config), UNet(unet_config)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ddpm = DDPM()
    step, state = resume(path, text_encoder=text_encoder, unet=unet, opt=opt)
    ema = ema if state is None else list(state["ema"])
    n_params = sum(p.numel() for p in params) / 1e6
    log(f"text encoder + UNet: {n_params:.2f}M parameters, from step {step}/{cfg.unet_steps}")
    scale = float(data["scale"])
    scene_labels = {k: data[k].numpy() for k in list(toyworld.ATTRIBUTES) + ["x", "y"]}
    text_encoder.train()
    unet.train()
    t0, recent = time.time(), []
    while step < cfg.unet_steps:
        rng = np.random.default_rng((cfg.seed, 3, step))  # a step's batch depends on the step alone
        idx = rng.integers(cfg.dataset_size, size=cfg.unet_batch)
        scenes = toyworld.scenes_from_labels({k: v[idx] for k, v in scene_labels.items()})
        texts = [toyworld.caption(s, rng) for s in scenes]
        ids = tok(texts, length=text_config.max_position_embeddings)
        idx_t = torch.from_numpy(idx)
        z0 = (data["mean"][idx_t] + data["std"][idx_t] * torch.randn_like(data["mean"][idx_t])) * scale
        noise = torch.randn_like(z0)
        t = torch.randint(0, ddpm.num_train_timesteps, (cfg.unet_batch,))
        eps = unet(ddpm.add_noise(z0, noise, t), t, text_encoder(ids))
        loss = F.mse_loss(eps, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.unet_steps, cfg.unet_lr, cfg.unet_min_lr, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # short runs: warm the average up
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        step += 1
        recent.append(loss.item())
        if step % 50 == 0:
            log(f"diffusion step {step}/{cfg.unet_steps}  loss {np.mean(recent):.4f}  "
                f"{50 * cfg.unet_batch / (time.time() - t0):.0f} img/s")
            t0, recent = time.time(), []
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            save_checkpoint(path, text_encoder=text_encoder.state_dict(), unet=unet.state_dict(),
                            opt=opt.state_dict(), ema=ema, step=step, torch_rng=torch.get_rng_state())
    with torch.no_grad():  # ship the moving average
        for e, p in zip(ema, params):
            p.copy_(e)
    return text_encoder, unet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(TOY_FOLDER),
                        help="where the diffusers-format folder is written")
    parser.add_argument("--work", default="runs/toy_model", help="checkpoints of every stage (resumable)")
    parser.add_argument("--vae-steps", type=int, default=ToyTrainConfig.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=ToyTrainConfig.unet_steps)
    parser.add_argument("--dataset-size", type=int, default=ToyTrainConfig.dataset_size)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ToyTrainConfig(vae_steps=args.vae_steps, unet_steps=args.unet_steps, dataset_size=args.dataset_size)
    os.makedirs(args.work, exist_ok=True)
    start = time.time()

    tok = train_tokenizer(cfg, args.work)
    vae_config, text_config, unet_config = toy_configs(len(tok), tok.bos_id, tok.eos_id)
    vae = train_vae(cfg, vae_config, args.work)
    data = encode_dataset(cfg, vae, args.work)
    vae_config.scaling_factor = float(data["scale"])
    text_encoder, unet = train_diffusion(cfg, tok, text_config, unet_config, data, args.work)

    sd = StableDiffusion(tokenizer=tok, text_encoder=text_encoder.eval(), unet=unet.eval(), vae=vae.eval(),
                         scheduler=DDPM(), latent_scale=vae_config.scaling_factor,
                         source="toy (minti.toy.model)")
    install_model(sd, os.path.abspath(args.out))
    log(f"wrote {os.path.abspath(args.out)} in {(time.time() - start) / 60:.1f} min")


def install_model(sd, out):
    """Write the model's diffusers files into `out`, keeping what else lives there (oracle/, concepts/).

    The whole model is first written to a staging folder; then each part replaces its old copy."""
    staging = out.rstrip("/") + ".staging"
    save_diffusers_folder(sd, staging)
    os.makedirs(out, exist_ok=True)
    for name in ["model_index.json", "scheduler", "tokenizer", *COMPONENTS]:
        target = os.path.join(out, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    shutil.rmtree(staging)


if __name__ == "__main__":
    main()
