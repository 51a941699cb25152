# %% [markdown]
# # Lesson 07 · DDIM sampling and classifier-free guidance
#
# Sampling runs lesson 06's process backwards: start from pure noise $x_T$ and repeatedly ask the
# network for the noise in the current $x_t$. DDIM (Song, Meng & Ermon 2020, arXiv 2010.02502) does it
# in 50 steps instead of 1000 (its abstract: samples "10x to 50x faster in terms of wall-clock time
# compared to DDPMs"). Its update (DDIM eq. 12) first estimates the clean image, then re-noises it to
# the next, lower noise level. DDIM writes $\alpha_t$ for what DDPM and lesson 06 call $\bar\alpha_t$;
# here it is $\bar\alpha$ throughout, and the braces carry eq. 12's own labels:
#
# $$x_{t'} = \sqrt{\bar\alpha_{t'}}\;\underbrace{\frac{x_t - \sqrt{1-\bar\alpha_t}\;\varepsilon_\theta(x_t)}
#   {\sqrt{\bar\alpha_t}}}_{\text{"predicted } x_0\text{"}}
#   \;+\; \underbrace{\sqrt{1-\bar\alpha_{t'} - \sigma_t^2}\;\varepsilon_\theta(x_t)}_{\text{"direction
#   pointing to } x_t\text{"}}
#   \;+\; \underbrace{\sigma_t\, z}_{\text{"random noise"}},
# \qquad \sigma_t = \eta \sqrt{\tfrac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}}
#   \sqrt{1-\tfrac{\bar\alpha_t}{\bar\alpha_{t'}}}
#   \;\;\text{(eq. 16)}$$
#
# With $\eta = 0$ (SD's default) there is no fresh noise: the same $x_T$ always gives the same image.
# Which 50 of the 1000 timesteps to visit is a choice (the paper's Sec. 4.2 calls it a sub-sequence
# $\tau$). SD 1.x's scheduler config picks $t = 981, 961, \dots, 1$ (diffusers calls it "leading"
# spacing, with offset 1), and its last step lands on $\bar\alpha_0$ rather than on a clean image
# ($\bar\alpha = 1$): `set_alpha_to_one: false` in SD's config. Both are SD's conventions, not the paper's.
#
# **Classifier-free guidance** (Ho & Salimans 2022, arXiv 2207.12598) runs the network twice per
# step, with the prompt and with the empty prompt, and extrapolates from the unconditional towards
# the conditional prediction by a scale $s$ (SD's default 7.5; $s = 1$ is plain conditional sampling):
#
# $$\tilde\varepsilon = \varepsilon_\theta(x_t, \varnothing)
#   + s\,\big(\varepsilon_\theta(x_t, c) - \varepsilon_\theta(x_t, \varnothing)\big).$$
#
# The paper writes it as $(1 + w)\,\varepsilon_\theta(x_t, c) - w\,\varepsilon_\theta(x_t)$ (its eq. 6):
# the same formula with $w = s - 1$, so SD's 7.5 is the paper's $w = 6.5$. Its abstract states the
# purpose: to "combine the resulting conditional and unconditional score estimates to attain a
# trade-off between sample quality and diversity".
#
# A random network would sample noise, so this lesson uses a denoiser we can write down exactly:
# the **ideal denoiser** of a small set of toy images (the best possible $\varepsilon$-prediction if
# the data were exactly those images). Its "prompt" says which images are allowed.
#
# Steps:
# 1. SD's timesteps, and one DDIM step by hand -> equal to `minti.schedulers.DDIM` (eta 0 and 1)
# 2. the ideal denoiser of 96 toy images, conditioned on a colour
# 3. a sampling loop with guidance, by hand -> equal to `minti.sampling.denoise`
# 4. what guidance does to the predicted image, step by step (pictures)
#
# Run: `python lessons/07_ddim_and_guidance.py` (a few seconds).

# %%
import argparse
import sys
from pathlib import Path

parser = argparse.ArgumentParser(
    description="Lesson 07: DDIM sampling (eq. 12) and classifier-free guidance, on an exact denoiser.",
    epilog="No options: the lesson has one mode (MINTI_FAST=1 changes nothing here); it needs no "
           "weights and no download. Pictures go to lessons/out/.")
parser.parse_known_args()  # known only: a notebook kernel passes arguments of its own

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # script or notebook
sys.path.insert(0, str(HERE.parent))  # so that `import minti` finds the repository's minti/
OUT = HERE / "out"
OUT.mkdir(exist_ok=True)

from minti.toy import world as toyworld
from minti.sampling import denoise
from minti.schedulers import DDIM, DDPM

torch.manual_seed(0)
ddpm = DDPM()  # SD 1.x's schedule (lesson 06)
alphas_cumprod = ddpm.alphas_cumprod

# %% [markdown]
# ## Step 1: timesteps, and one step by hand

# %%
num_steps = 50
ratio = 1000 // num_steps  # 20
timesteps = torch.arange(num_steps - 1, -1, -1) * ratio + 1  # "leading" spacing + steps_offset 1
sampler = DDIM(ddpm, num_steps)
print("timesteps:", timesteps[:4].tolist(), "...", timesteps[-3:].tolist())
assert torch.equal(timesteps, sampler.timesteps)


def ddim_step(eps, t, x, eta=0.0, z=None):
    a_t = alphas_cumprod[t]
    a_next = alphas_cumprod[t - ratio] if t - ratio >= 0 else alphas_cumprod[0]  # after t=1: alpha-bar_0
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # predicted x_0
    sigma = eta * ((1 - a_next) / (1 - a_t) * (1 - a_t / a_next)).sqrt()  # eq. 16
    x_next = a_next.sqrt() * x0 + (1 - a_next - sigma ** 2).sqrt() * eps  # eq. 12
    return x_next if eta == 0 else x_next + sigma * z


x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
step_errors = []
for t in [981, 501, 1]:
    step_errors.append((ddim_step(eps, t, x) - sampler.step(eps, t, x)).abs().max().item())
    # eta = 1: the same fresh noise on both sides, from two identically seeded generators
    noisy = DDIM(ddpm, num_steps, eta=1.0).step(eps, t, x, generator=torch.Generator().manual_seed(t))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
    step_errors.append((ddim_step(eps, t, x, eta=1.0, z=z) - noisy).abs().max().item())
print(f"one DDIM step by hand vs DDIM.step (t = 981, 501, 1; eta 0 and 1): "
      f"max |difference| = {max(step_errors):.1e}")

# %% [markdown]
# ## Step 2: an ideal denoiser
#
# Suppose the data were exactly $N$ images $x^{(1)} \dots x^{(N)}$. Given $x_t$, eq. 4 says how likely
# each one is to have produced it, $p(i \mid x_t) \propto \exp\!\big(-\|x_t - \sqrt{\bar\alpha_t}\,x^{(i)}\|^2
# / 2(1-\bar\alpha_t)\big)$; the best guess of $x_0$ is the weighted average of the images, and the
# best noise prediction follows from eq. 4. The conditioning is a log-weight per image: 0 for
# images the "prompt" allows, $-\infty$ for the others; the empty prompt allows all of them. It has
# the UNet's signature `(x, t, context)`, so minti's sampling loop can call it.

# %%
images, labels = toyworld.render_batch(96, seed=0)
data = torch.from_numpy(images).permute(0, 3, 1, 2).float().flatten(1) / 127.5 - 1  # [96, 3072]


def ideal_eps(x, t, context):
    a = alphas_cumprod[int(t)]  # one timestep for the whole batch, as in sampling
    flat = x.flatten(1)  # [B, 3072]
    distances = torch.cdist(flat, a.sqrt() * data) ** 2  # [B, N]: |x_t - sqrt(a) x_i|^2
    weights = (-distances / (2 * (1 - a)) + context[:, 0, :]).softmax(dim=-1)  # p(image i | x_t, prompt)
    x0 = weights @ data  # E[x_0 | x_t]
    return ((flat - a.sqrt() * x0) / (1 - a).sqrt()).reshape(x.shape)


colours = [toyworld.COLOURS[c] for c in labels["colour"]]
red = torch.tensor([c == "red" for c in colours])
B = 6
cond = torch.where(red, 0.0, -torch.inf).expand(B, 1, -1)  # "a red ..." : only the red images
uncond = torch.zeros(B, 1, len(data))  # "": every image
print(f"{len(data)} images, {int(red.sum())} of them red")

# %% [markdown]
# ## Step 3: the sampling loop, with guidance
#
# Per step: one call on the batch doubled, [unconditional, conditional] (as SD's pipelines do, and
# `minti.sampling.denoise`), the guidance formula, one DDIM step.


# %%
def sample(x, scale, keep=None):
    for t in timesteps.tolist():
        eps_uncond, eps_cond = ideal_eps(torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
        eps = eps_uncond + scale * (eps_cond - eps_uncond)
        if keep is not None:  # record the predicted x_0 for the picture
            a = alphas_cumprod[t]
            keep.append((x - (1 - a).sqrt() * eps) / a.sqrt())
        x = ddim_step(eps, t, x)
    return x


x_T = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
results, trajectories, nearest = {}, {}, {}
for scale in [0.0, 1.0, 7.5]:
    trajectories[scale] = []
    results[scale] = sample(x_T, scale, trajectories[scale])
    nearest[scale] = ((results[scale].flatten(1)[:, None] - data[None]) ** 2).mean(-1).argmin(1)
    print(f"guidance {scale}: the samples are copies of training images of colours\n  "
          f"{[colours[i] for i in nearest[scale]]}")
same = (nearest[1.0] == nearest[7.5]).sum().item()
print(f"guidance 7.5 lands on the same training image as guidance 1 for {same} of {B} samples")
minti_result = denoise(ideal_eps, DDIM(ddpm, num_steps), x_T, cond, uncond, guidance_scale=7.5)
loop_error = (minti_result - results[7.5]).abs().max().item()
print(f"our loop vs minti.sampling.denoise (guidance 7.5): max |difference| = {loop_error:.1e}")

# %% [markdown]
# With scale 0 (unconditional) the samples are images of any colour; with scale 1 every sample is a
# red object. An exact model can only reproduce its training images (a network generalises because
# it cannot fit this function exactly); each sample is a training image plus a trace of noise, since
# the last step stops at $\bar\alpha_0 = 0.99915$, not at 1.
#
# Guidance 7.5 changes little in the end: its samples are red too, most of them the very same
# images as with scale 1 (both printed above and asserted below). The ideal conditional model needs
# no help. What guidance changes is the way there (the picture follows the first sample whose
# unconditional version is not red). The predicted image is linear in $\varepsilon$, so guidance
# extrapolates it too: $\hat x_0 = \hat x_0^{\varnothing} + s\,(\hat x_0^{c} - \hat x_0^{\varnothing})$.
# Early on, $\hat x_0$ is a blurry average of every plausible image, and an average of images stays
# inside their range $[-1, 1]$; at $s = 7.5$ it overshoots far past the average of the red ones, out
# of that range, into colours no image has (the share of values outside it is printed below). With a
# learned model, which is never exactly right, that push towards "more like the prompt" is what
# makes SD follow prompts; at large scales the pictures get over-saturated (Saharia et al. 2022,
# arXiv 2205.11487, Sec. 2.3). The ideal denoiser of 96 images settles early: at step 10 (t = 781)
# every sample's predicted image is already nearest to the training image it ends on (asserted
# below); the remaining steps only remove noise.

# %%
def nearest_image(x):
    return ((x.flatten(1)[:, None] - data[None]) ** 2).mean(-1).argmin(1)


outside = {s: (trajectories[s][0].abs() > 1).float().mean().item() for s in (1.0, 7.5)}  # first step
settled = all(torch.equal(nearest_image(trajectories[s][10]), nearest[s]) for s in trajectories)
print(f"first step's predicted image: {outside[1.0]:.0%} of its values outside [-1, 1] at guidance 1, "
      f"{outside[7.5]:.0%} at 7.5;\n  at step 10 (t = {timesteps[10].item()}) every sample is already "
      f"nearest to its final training image: {settled}")
k = next(i for i in range(B) if not red[nearest[0.0][i]])  # a sample that guidance changes
shown = [0, 5, 10, 20, 30, 40, 49]
fig, axes = plt.subplots(3, len(shown) + 1, figsize=(12, 5.6))
for row, scale in enumerate(trajectories):
    for col, i in enumerate(shown):
        ax = axes[row, col]
        ax.imshow(((trajectories[scale][i][k].permute(1, 2, 0) + 1) / 2).clamp(0, 1))
        ax.set_title(f"t={timesteps[i].item()}", fontsize=8)
    axes[row, -1].imshow(((results[scale][k].permute(1, 2, 0) + 1) / 2).clamp(0, 1))
    axes[row, -1].set_title("sample", fontsize=8)
    axes[row, 0].set_ylabel(f"guidance {scale}")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("predicted x0 during DDIM sampling (same x_T), prompt 'red'; values clipped to the image range")
fig.tight_layout()
fig.savefig(OUT / "07_guidance.png", dpi=100)

fig, axes = plt.subplots(2, B, figsize=(1.6 * B, 3.6))
for row, scale in enumerate([0.0, 1.0]):
    for col in range(B):
        axes[row, col].imshow(((results[scale][col].permute(1, 2, 0) + 1) / 2).clamp(0, 1))
        axes[row, col].set_xticks([])
        axes[row, col].set_yticks([])
    axes[row, 0].set_ylabel("unconditional" if scale == 0 else "'red', s=1")
fig.tight_layout()
fig.savefig(OUT / "07_samples.png", dpi=100)
print("-> lessons/out/07_guidance.png and lessons/out/07_samples.png")

# %% [markdown]
# ## Check

# %%
assert max(step_errors) < 1e-5 and loop_error < 1e-4
assert red[nearest[1.0]].all() and red[nearest[7.5]].all()  # conditional sampling only gives red images
assert same > B // 2 and settled  # "most of them the very same images"; "settles early"
assert outside[1.0] == 0 and outside[7.5] > 0.1  # an average stays in range; guidance leaves it
print(f"check passed: the hand-written DDIM step (eq. 12) equals DDIM.step ({max(step_errors):.1e}), SD's "
      f"\n  timesteps are 981..1, and the guided loop equals minti.sampling.denoise ({loop_error:.1e})")

# %% [markdown]
# ## Exercises
#
# 1. Sample with 10 steps and with 200 steps (change `num_steps`). Does the ideal denoiser land on
#    the same training images?
# 2. Set eta = 1 (DDPM-like noise at every step). Do different seeds now give the same image twice?
# 3. Make the prompt "red or blue" (two allowed colours). What does guidance 7.5 do to the early
#    predicted images now?
#
# Solutions: `python lessons/solutions/07_ddim_and_guidance.py` prints "solved" when its asserts
# hold; run the same asserts on your own answers: (1) every sample is red, and most land on the
# same image with 10 and 200 steps; (2) at eta 0 two seeds give identical samples, at eta 1 they
# differ; (3) the first predicted image leaves [-1, 1] at guidance 7.5 and stays inside at 1.
