"""Solutions to lesson 04's exercises (run: python lessons/solutions/04_vae_latents.py)."""
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import minti
from minti.toy import world
from minti.vae import VAE, VAEConfig

FAST = os.environ.get("MINTI_FAST") == "1"
STEPS = 60 if FAST else 150
torch.manual_seed(0)
config = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=32,
                   mid_block_add_attention=False)  # the toy model's VAE (lesson 04's tiny one)
vae = VAE(config)
opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)


def as_input(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


test_images, test_labels = world.render_batch(96, seed=99)
x_test = as_input(test_images)


def mse_by_pattern(model):
    with torch.no_grad():
        err = ((model.decode(model.encode(x_test)[0]) - x_test) ** 2).mean(dim=(1, 2, 3))
    return {p: err[test_labels["pattern"] == i].mean().item() for i, p in enumerate(world.PATTERNS)}


# 1. The training loop of minti/toy/model.py's train_vae, shortened.
before = mse_by_pattern(vae)
for step in range(STEPS):
    x = as_input(world.render_batch(16, np.random.default_rng((0, step)))[0])
    mean, logvar = vae.encode(x)
    z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    loss = F.mse_loss(vae.decode(z), x) + 1e-6 * kl
    opt.zero_grad()
    loss.backward()
    opt.step()
after = mse_by_pattern(vae)
print(f"1. MSE by pattern before: " + ", ".join(f"{p} {v:.3f}" for p, v in before.items()))
print(f"   after {STEPS} steps:   " + ", ".join(f"{p} {v:.3f}" for p, v in after.items()))
print(f"   still hardest after {STEPS} steps: {max(after, key=after.get)} (the shipped VAE, below, finds "
      "the striped\n   ones hardest: the finest detail of the world is the last it learns)")
assert all(after[p] < before[p] for p in after)

# 2. The latent scale, 1 / std of sampled latents, on three batches.
with torch.no_grad():
    scales = []
    for seed in (1, 2, 3):
        mean, logvar = vae.encode(as_input(world.render_batch(128, seed=seed)[0]))
        scales.append(1 / (mean + (0.5 * logvar).exp() * torch.randn_like(mean)).std().item())
print("2. latent scale on three batches:", [round(s, 3) for s in scales], "(stable to a few %)")
assert max(scales) / min(scales) < 1.1

# 3. The shipped toy VAE, trained 1000 steps of 64.
shipped = mse_by_pattern(minti.load("toy").vae.eval())
print("3. the shipped toy VAE:      " + ", ".join(f"{p} {v:.4f}" for p, v in shipped.items()))
assert all(shipped[p] < after[p] for p in shipped)
print("solved")
