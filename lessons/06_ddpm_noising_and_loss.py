# %% [markdown]
# # Lesson 06 · DDPM: adding noise, and the loss that learns to remove it
#
# A diffusion model learns to undo a fixed process that slowly drowns data in Gaussian noise
# (Ho, Jain & Abbeel 2020, "DDPM", arXiv 2006.11239). One step of the *forward process* (DDPM eq. 2)
# is
#
# $$q(x_t \mid x_{t-1}) = \mathcal{N}\big(\sqrt{1-\beta_t}\; x_{t-1},\; \beta_t I\big),$$
#
# and because Gaussians compose, any step can be reached from $x_0$ in one jump (DDPM eq. 4), with
# $\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s \le t} \alpha_s$:
#
# $$q(x_t \mid x_0) = \mathcal{N}\big(\sqrt{\bar\alpha_t}\; x_0,\; (1-\bar\alpha_t) I\big)
#   \quad\Longleftrightarrow\quad x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1-\bar\alpha_t}\;\varepsilon.$$
#
# SD 1.x uses $T = 1000$ steps, counted $t = 0 \dots 999$ in code (the paper counts $1 \dots T$), and
# a "scaled-linear" schedule: $\sqrt{\beta_t}$ linear from $\sqrt{0.00085}$ to $\sqrt{0.012}$. DDPM
# itself used $\beta_t$ linear from $10^{-4}$ to $0.02$ (Sec. 4; exercise 2 compares them). The
# network is trained to predict the noise (DDPM eq. 14, "$L_\text{simple}$"); in latent diffusion on
# latents $z = \mathcal{E}(x)$ with text $c_\theta(y)$, which is the loss that textual inversion
# minimises over the one new word vector $v$ (Gal et al. 2022, arXiv 2208.01618, eq. 2):
#
# $$v_* = \arg\min_v\; \mathbb{E}_{z, y, \varepsilon, t}\,
#   \big\| \varepsilon - \varepsilon_\theta\big(z_t, t, c_\theta(y)\big) \big\|_2^2 .$$
#
# Steps:
# 1. the schedule by hand -> equal to `minti.schedulers.DDPM`
# 2. eq. 4 by hand -> equal to `DDPM.add_noise`; a toy image at ten noise levels (picture)
# 3. eq. 2, a thousand small steps, lands where eq. 4 says (a statistical check)
# 4. the loss, in five lines, and what its two extremes are
#
# Run: `python lessons/06_ddpm_noising_and_loss.py` (a few seconds).

# %%
import argparse
import sys
from pathlib import Path

parser = argparse.ArgumentParser(
    description="Lesson 06: DDPM's forward process (eq. 2 and 4) and the noise-prediction loss.",
    epilog="No options: the lesson has one mode (MINTI_FAST=1 changes nothing here); it needs no "
           "weights and no download. Pictures go to lessons/out/.")
parser.parse_known_args()  # known only: a notebook kernel passes arguments of its own

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # script or notebook
sys.path.insert(0, str(HERE.parent))  # so that `import minti` finds the repository's minti/
OUT = HERE / "out"
OUT.mkdir(exist_ok=True)

from minti.toy import world as toyworld
from minti.schedulers import DDPM
from minti.unet import UNet, UNetConfig

torch.manual_seed(0)

# %% [markdown]
# ## Step 1: the schedule

# %%
T = 1000
betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T) ** 2  # "scaled linear" (float32, as SD's scheduler)
alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # alpha-bar_t
ddpm = DDPM()  # SD 1.x's defaults: 1000 steps, 0.00085 .. 0.012
print(f"beta: {betas[0]:.5f} at t=0 .. {betas[-1]:.5f} at t=999")
print("alpha-bar at t = 0, 250, 500, 750, 999:",
      [round(alphas_cumprod[t].item(), 4) for t in (0, 250, 500, 750, 999)])
assert torch.equal(alphas_cumprod, ddpm.alphas_cumprod)
# At t=999 the signal's share sqrt(alpha-bar) is still 0.068: SD's x_T is not pure noise (Lin et al.
# 2023, arXiv 2305.08891, discuss what that costs); sampling starts from pure noise anyway.

# %% [markdown]
# ## Step 2: one jump to any noise level (eq. 4)
#
# The noise is passed in, never drawn inside: training and tests can then feed the same noise to two
# implementations. And `t` holds one timestep per image.


# %%
def add_noise(x0, noise, t):
    a = alphas_cumprod[t].reshape(-1, 1, 1, 1)  # one alpha-bar per image, broadcast over C, H, W
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


images, _ = toyworld.render_batch(4, seed=3)
x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # [4, 3, 32, 32] in [-1, 1]
noise = torch.randn_like(x0)
t = torch.tensor([0, 100, 500, 999])  # a different timestep for each image
noise_error = (add_noise(x0, noise, t) - ddpm.add_noise(x0, noise, t)).abs().max().item()
print(f"eq. 4 by hand vs DDPM.add_noise (t = {t.tolist()}): max |difference| = {noise_error:.1e}")

# %% [markdown]
# The picture shows one toy image, the striped orange star, in pixels to be visible (SD noises its
# 64x64x4 latents, whose scaled values have about the same spread as pixels in [-1, 1]). The stripes
# drown first; the star's outline and colour survive much longer.

# %%
star = toyworld.render(toyworld.CONCEPTS["striped_orange_star"].scene("blue"))  # uint8 [32, 32, 3]
star = torch.from_numpy(star).permute(2, 0, 1).float() / 127.5 - 1
steps = [0, 50, 100, 200, 300, 400, 500, 650, 800, 999]
one = star[None].expand(len(steps), -1, -1, -1)
noisy = add_noise(one, torch.randn(1, 3, 32, 32).expand_as(one), torch.tensor(steps))
fig = plt.figure(figsize=(13, 5))
ax = fig.add_subplot(2, 1, 1)
ax.plot(alphas_cumprod, label=r"$\bar\alpha_t$")
ax.plot(alphas_cumprod.sqrt(), label=r"$\sqrt{\bar\alpha_t}$  (signal)")
ax.plot((1 - alphas_cumprod).sqrt(), label=r"$\sqrt{1-\bar\alpha_t}$  (noise)")
ax.set_xlabel("t")
ax.set_title("SD 1.x's scaled-linear schedule")
ax.legend()
for i, (step, img) in enumerate(zip(steps, noisy)):
    sub = fig.add_subplot(2, len(steps), len(steps) + i + 1)
    sub.imshow(((img.permute(1, 2, 0) + 1) / 2).clamp(0, 1))
    sub.set_title(f"t={step}", fontsize=9)
    sub.axis("off")
fig.tight_layout()
fig.savefig(OUT / "06_noising.png", dpi=100)
print("-> lessons/out/06_noising.png")

# %% [markdown]
# ## Step 3: a thousand small steps land where one jump does
#
# Run eq. 2 step by step on 16 copies of the star, each with its own noise, and look at the result
# at a few timesteps. If eq. 4 is right, $r = (x_t - \sqrt{\bar\alpha_t}\,x_0) / \sqrt{1-\bar\alpha_t}$
# is standard normal: mean 0, variance 1, up to sampling error ($1/\sqrt{n}$ for the mean,
# $\sqrt{2/n}$ for the variance, with $n$ values).

# %%
generator = torch.Generator().manual_seed(0)
start = star.flatten()  # 3072 values
x = start.expand(16, -1).clone()  # 16 chains
stats = {}
for s in range(T):
    x = (1 - betas[s]).sqrt() * x + betas[s].sqrt() * torch.randn(x.shape, generator=generator)
    if s in (10, 100, 500, 999):
        a = alphas_cumprod[s]
        r = (x - a.sqrt() * start) / (1 - a).sqrt()
        stats[s] = (r.mean().item(), r.var().item())
n = x.numel()
for s, (mean, var) in stats.items():
    print(f"t={s:4d}: r has mean {mean:+.4f} and variance {var:.4f}  (sampling error ~{n ** -0.5:.4f}, "
          f"~{(2 / n) ** 0.5:.4f})")
chain_ok = all(abs(m) < 5 * n ** -0.5 and abs(v - 1) < 5 * (2 / n) ** 0.5 for m, v in stats.values())

# %% [markdown]
# ## Step 4: the loss
#
# Draw a timestep per image and a noise, jump to $x_t$ with eq. 4, ask the network for the noise, and
# take the mean squared error. Here with a tiny UNet (random weights) on 8x8x4 "latents" and random
# "text" of width 64: the numbers mean nothing yet, the code is the whole training objective.


# %%
def diffusion_loss(unet, z0, context, generator):
    t = torch.randint(0, T, (z0.shape[0],), generator=generator)  # one timestep per image
    noise = torch.randn(z0.shape, generator=generator)
    z_t = add_noise(z0, noise, t)
    return F.mse_loss(unet(z_t, t, context), noise)


unet = UNet(UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                       cross_attention_dim=64, norm_num_groups=16,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
z0, context = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 64, requires_grad=True)
loss = diffusion_loss(unet, z0, context, generator)
loss.backward()
print(f"loss of the untrained UNet: {loss.item():.3f}; the gradient reaches the text: "
      f"|d loss / d context| = {context.grad.norm():.2e}")
# Textual inversion keeps the UNet and the text encoder frozen and follows this gradient, through
# the text encoder (lesson 02), to the one vector v*.

# %% [markdown]
# Two extremes bound the loss. Predicting 0 costs $\mathbb{E}\|\varepsilon\|^2 / d = 1$ per number.
# A cheat that knows $x_0$ can solve eq. 4 for the noise exactly,
# $\varepsilon = (x_t - \sqrt{\bar\alpha_t}\,x_0)/\sqrt{1-\bar\alpha_t}$, and pays 0: a trained
# network sits in between, and the closer it gets, the better it "knows" $x_0$ from $x_t$.
# Conversely, a predicted noise gives a predicted $x_0$ (DDPM eq. 15), which lesson 07's sampler uses.

# %%
z0 = torch.randn(64, 4, 8, 8)  # 64 "latents", so that the averages below are precise to a few percent
noise = torch.randn(64, 4, 8, 8)
t = torch.randint(0, T, (64,), generator=generator)
z_t = add_noise(z0, noise, t)
a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
cheat = (z_t - a.sqrt() * z0) / (1 - a).sqrt()
zero_loss = F.mse_loss(torch.zeros_like(noise), noise).item()
cheat_loss = F.mse_loss(cheat, noise).item()
x0_from_eps = (z_t - (1 - a).sqrt() * noise) / a.sqrt()  # DDPM eq. 15 with the true noise
print(f"predict zero: loss {zero_loss:.3f} (expected 1 up to sampling error); "
      f"the cheat that knows x0: loss {cheat_loss:.1e}; "
      f"\n  x0 recovered from the true noise to {(x0_from_eps - z0).abs().max():.1e}")

# %% [markdown]
# ## Check

# %%
assert noise_error < 1e-6 and chain_ok and cheat_loss < 1e-8
assert (x0_from_eps - z0).abs().max() < 1e-3  # near t=999, dividing by sqrt(alpha-bar) ~ 0.07 amplifies
# float32 rounding
print("check passed: the hand-written schedule equals DDPM.alphas_cumprod exactly, eq. 4 equals "
      f"\n  DDPM.add_noise ({noise_error:.1e}), and 1000 steps of eq. 2 match eq. 4 within 5 standard errors")

# %% [markdown]
# ## Exercises
#
# 1. Plot the signal-to-noise ratio $\bar\alpha_t / (1-\bar\alpha_t)$ on a log scale. Where does it
#    cross 1? Which part of the picture would you expect the model to decide at that $t$?
# 2. Replace the schedule with a plain linear one (0.0001 .. 0.02, DDPM's own) and redraw the
#    picture: at which $t$ does the star disappear now?
# 3. `diffusion_loss` draws $t$ uniformly. Lesson 13 draws it where the gradient wrt the text is
#    large: compute `context.grad.norm()` for a few fixed $t$ and see how it varies (with random
#    weights, the pattern means little; after lesson 08, try it on the trained toy model).
#
# Solutions: `python lessons/solutions/06_ddpm_noising_and_loss.py` prints "solved" when its asserts
# hold; run the same asserts on your own answers: (1) where the SNR crosses 1, alpha-bar passes 1/2;
# (2) alpha-bar falls below 1% earlier with the linear schedule; (3) on the trained toy model the
# gradient's norm varies more than 10-fold over t.
