# %% [markdown]
# # Lesson 04 · The VAE: images in, latents out
#
# Stable Diffusion does not denoise pixels. A *latent diffusion model* (Rombach et al. 2022, arXiv
# 2112.10752) first
# compresses the image with an autoencoder, runs the whole diffusion process on the small latent,
# and decodes only at the end. SD 1.x's autoencoder turns a 512x512x3 image into a 64x64x4 latent:
# 48 times fewer numbers, so every UNet call is that much cheaper.
#
# The autoencoder is a VAE (Kingma & Welling 2014, arXiv 1312.6114) with a very weak KL term: LDM's
# "KL-reg." variant "imposes a slight KL-penalty towards a standard normal on the learned latent,
# similar to a VAE" (LDM Sec. 3.1). The encoder outputs,
# for every latent cell, a mean and a log-variance; a latent is drawn by the reparametrisation
#
# $$z = \mu(x) + \sigma(x)\,\varepsilon, \qquad \varepsilon \sim \mathcal{N}(0, I),$$
#
# and training adds $\mathrm{KL}(\mathcal{N}(\mu, \sigma^2)\,\|\,\mathcal{N}(0, I)) =
# \tfrac12 \sum (\mu^2 + \sigma^2 - 1 - \log \sigma^2)$ with a tiny weight ($10^{-6}$, `kl_weight` in
# the config of LDM's kl-f8 autoencoder, the one SD uses; the paper gives no number), so $\sigma$ is
# small and $z \approx \mu$. (LDM trains it with a perceptual and a patch-based adversarial loss
# besides, Sec. 3.1; lesson 08's toy VAE uses the plain squared error.) The decoder maps $z$ back.
#
# Textual inversion uses the encoder once per training image (the latents $z_0$ it learns to
# denoise) and the decoder only to look at samples.
#
# Steps:
# 1. toy-world images, and a tiny VAE with SD's architecture (random weights): the shapes
# 2. the encoder by hand, with LDM's asymmetric padding -> equal to `VAE.encode`
# 3. why the padding is asymmetric: a one-pixel shift of the sampling grid (picture)
# 4. sampling z, the KL term, and the latent scale 0.18215
# 5. SD 1.x's real VAE, on the meta device: sizes and parameter count
#
# Run: `python lessons/04_vae_latents.py` (a few seconds). The VAE here is untrained: the shapes and
# the arithmetic are the lesson. The trained toy VAE's reconstructions are in lesson 08 (step 3,
# `lessons/results/08_vae_reconstructions.png`), and exercise 1 below trains this one a little.

# %%
import argparse
import sys
from pathlib import Path

parser = argparse.ArgumentParser(
    description="Lesson 04: the VAE, latents, LDM's one-sided padding and the latent scale.",
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
from minti.vae import VAE, VAEConfig, VAEDownsample

torch.manual_seed(0)

# %% [markdown]
# ## Step 1: images and a tiny VAE
#
# The toy world renders 32x32 scenes with exact labels. The tiny VAE is the toy model's: SD's
# classes with widths 32/64/64 (SD: 128/256/512/512). Each stage but the last halves the size, so
# three stages shrink 32x32 to 8x8 (SD's four stages shrink 512 to 64). The encoder ends with
# 2 x 4 channels: the mean and the log-variance of 4 latent channels.

# %%
images, labels = toyworld.render_batch(6, seed=1)  # uint8 [6, 32, 32, 3] and their labels
x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # [6, 3, 32, 32] in [-1, 1]
config = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                   sample_size=32, mid_block_add_attention=False)
vae = VAE(config).eval()
print(f"tiny VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, downsampling by "
      f"{config.downsample_factor}")

enc = vae.encoder
with torch.no_grad():
    h = enc.conv_in(x)
    print(f"{'image':>22}: {tuple(x.shape)}\n{'conv_in':>22}: {tuple(h.shape)}")
    for i, block in enumerate(enc.down_blocks):
        h = block(h)
        print(f"{f'down_blocks.{i}':>22}: {tuple(h.shape)}" + ("  (halved)" if block.downsamplers else ""))
    h = enc.conv_out(F.silu(enc.conv_norm_out(enc.mid_block(h))))
    print(f"{'mid, norm, conv_out':>22}: {tuple(h.shape)}  = mean and log-variance, 4 channels each")

# %% [markdown]
# ## Step 2: the encoder by hand
#
# The ResNet blocks are minti's; the downsampling we write ourselves. LDM halves the size with a
# stride-2 3x3 convolution **after padding one pixel on the right and bottom only** (not one on
# every side). Then `quant_conv`, a 1x1 convolution kept from LDM's VQ models, and the split into
# mean and log-variance (clamped to [-30, 20] so that its exponential stays finite).


# %%
def downsample(x, conv):
    return F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2)  # pad: left, right, top, bottom


def encode_by_hand(vae, x):
    enc = vae.encoder
    h = enc.conv_in(x)
    for block in enc.down_blocks:
        for resnet in block.resnets:
            h = resnet(h)
        if block.downsamplers:  # every stage but the last
            h = downsample(h, block.downsamplers[0].conv)
    h = enc.conv_out(F.silu(enc.conv_norm_out(enc.mid_block(h))))
    mean, logvar = vae.quant_conv(h).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


with torch.no_grad():
    mean, logvar = vae.encode(x)
    my_mean, my_logvar = encode_by_hand(vae, x)
    recon = vae.decode(mean)
encode_error = max((my_mean - mean).abs().max().item(), (my_logvar - logvar).abs().max().item())
print(f"mean {tuple(mean.shape)}, decoded {tuple(recon.shape)}; by hand vs VAE.encode: "
      f"max |difference| = {encode_error:.1e}")
assert encode_error < 1e-5 and recon.shape == x.shape

# %% [markdown]
# ## Step 3: why pad on one side only?
#
# Both paddings give the same output size, but not the same pixels. With LDM's padding, output pixel
# $i$ sees input pixels $2i, 2i+1, 2i+2$; with one pixel of padding on each side it sees
# $2i-1, 2i, 2i+1$: the sampling grid moves by one input pixel. Weights trained on one grid are
# wrong on the other. The picture makes it extreme: a convolution that copies its centre tap, run on
# one-pixel stripes in the odd columns. LDM's grid lands on every stripe, the symmetric one on none.

# %%
conv = torch.nn.Conv2d(1, 1, 3, stride=2)
with torch.no_grad():
    conv.weight.zero_()
    conv.weight[0, 0, 1, 1] = 1.0  # output = the input pixel under the kernel's centre
    conv.bias.zero_()
stripes = torch.zeros(1, 1, 16, 16)
stripes[..., 1::2] = 1.0  # odd columns
with torch.no_grad():
    ldm = VAEDownsample(1)
    ldm.conv = conv
    ldm_out = ldm(stripes)  # minti's module
    symmetric_out = F.conv2d(stripes, conv.weight, conv.bias, stride=2, padding=1)
print(f"centre tap on odd-column stripes: LDM padding keeps {ldm_out.mean():.0%} of the ink, "
      f"symmetric padding {symmetric_out.mean():.0%}")
assert torch.equal(downsample(stripes, conv), ldm_out) and not torch.equal(ldm_out, symmetric_out)

fig, axes = plt.subplots(1, 3, figsize=(8, 3))
for ax, img, title in zip(axes, [stripes, ldm_out, symmetric_out],
                          ["input 16x16: odd columns", "LDM pad (right, bottom): 8x8",
                           "pad 1 all round: 8x8"]):
    ax.imshow(img[0, 0], cmap="Greys", vmin=0, vmax=1)  # ink (1) is black
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
fig.savefig(OUT / "04_padding.png", dpi=100)
print("-> lessons/out/04_padding.png")

# %% [markdown]
# ## Step 4: sampling, the KL term, and the latent scale
#
# The diffusion model (lessons 06-07) assumes data of roughly unit variance: it mixes it with unit
# Gaussian noise. SD's VAE latents have a standard deviation of about 5.5, so LDM multiplies them by
# `scale_factor` = 0.18215 (= 1 / 5.49), one over the standard deviation it measured on its training
# images, and divides by it again before decoding. The scale belongs to the *model*, not to the VAE class:
# minti's `VAE` does not apply it; the caller does, with `sd.latent_scale`. A new VAE needs its own
# scale; here is how one would measure it (on our untrained VAE, so the number itself is arbitrary).

# %%
with torch.no_grad():
    z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)  # the reparametrisation trick
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    scale = 1 / z.std()
print(f"z {tuple(z.shape)}: std {z.std():.3f}; KL to N(0, I) = {kl:.1f} nats per image")
print(f"this VAE's latent scale would be 1/std = {scale:.3f} (SD 1.x's: 0.18215); "
      f"scaled latents have std {(scale * z).std():.3f}")
# The UNet sees scale * z; sampling ends with vae.decode(latents / scale) (minti.sampling.decode).

with torch.no_grad():
    average = F.avg_pool2d(x, config.downsample_factor)  # the colour of each 4x4 patch: 8x8x3
fig, axes = plt.subplots(3, 6, figsize=(9, 5))
for i in range(6):
    axes[0, i].imshow(images[i])
    axes[1, i].imshow(((average[i].permute(1, 2, 0) + 1) / 2).clamp(0, 1))
    m = mean[i]  # [4, 8, 8]: the 4 channels tiled 2x2
    axes[2, i].imshow(torch.cat([torch.cat([m[0], m[1]], 1), torch.cat([m[2], m[3]], 1)], 0), cmap="coolwarm")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
row_names = ["image\n32x32x3", "one colour\nper 4x4 patch\n8x8x3",
             "untrained VAE\nmean latent\n8x8x4 (2x2 tiles)"]
for ax, name in zip(axes[:, 0], row_names):
    ax.set_ylabel(name, fontsize=9)
fig.tight_layout()
fig.savefig(OUT / "04_latents.png", dpi=100)
print("-> lessons/out/04_latents.png")

# %% [markdown]
# The middle row shows how coarse the latent grid is: one cell per 4x4 pixels (8x8 in SD). A
# trained VAE's 4 channels per cell hold much more than one average colour (lesson 08 shows the
# toy VAE's reconstructions of the concept images), but small details are where VAE reconstructions
# fail first: the toy world's concept images show large objects for that reason (see
# minti/toy/world.py).
#
# ## Step 5: SD 1.x's VAE

# %%
with torch.device("meta"):
    sd_vae = VAE()  # defaults: SD 1.x
    sd_mean, _ = sd_vae.encode(torch.empty(1, 3, 512, 512))
params = sum(p.numel() for p in sd_vae.parameters())
print(f"SD 1.x VAE: {params:,} parameters; a 512x512x3 image -> latent {tuple(sd_mean.shape[1:])}: "
      f"{512 * 512 * 3 // sd_mean[0].numel()}x fewer numbers")
assert params == 83_653_863 and tuple(sd_mean.shape) == (1, 4, 64, 64)  # diffusers' AutoencoderKL for SD 1.x

# %% [markdown]
# ## Check

# %%
print(f"check passed: the hand-written encoder equals minti's VAE.encode ({encode_error:.1e}); LDM's "
      "\n  one-sided padding = minti's VAEDownsample, unlike symmetric padding; SD 1.x's VAE has "
      "\n  83,653,863 parameters and makes 64x64x4 latents from 512x512 images")

# %% [markdown]
# ## Exercises
#
# 1. Train the tiny VAE for 150 steps of 16 fresh renders (minti/toy/model.py's `train_vae` is a 30-line
#    loop to copy: reconstruction MSE + 1e-6 x KL, AdamW at 1e-3). How far does the MSE fall? Which
#    images does it still get wrong: striped, outlined or plain ones?
# 2. Measure your trained VAE's latent scale, 1 / std of its sampled latents, on three batches.
#    Does it change much between batches? (The toy model's is 0.77, SD's 0.18215.)
# 3. Compare with the shipped toy VAE (`minti.load("toy").vae`, trained 1000 steps of 64): its MSE
#    on the same images.
#
# Solutions: `python lessons/solutions/04_vae_latents.py` prints "solved" when its asserts hold; run
# the same asserts on your own answers: (1) every pattern's MSE falls; (2) the three scales are
# within 10% of each other; (3) the shipped VAE's MSE is below yours for every pattern.
