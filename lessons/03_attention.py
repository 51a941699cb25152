# %% [markdown]
# # Lesson 03 · Attention and cross-attention: how the words reach the pixels
#
# Attention (Vaswani et al. 2017, arXiv 1706.03762, eq. 1) lets every query look at every key and take a weighted
# average of the values:
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d}}\right) V$$
#
# Each row of the softmax is a set of weights that sum to 1: how much query $i$ takes from each
# key. *Multi-head* attention splits the width into several heads that do this independently, then
# joins them and projects.
#
# In the SD UNet the queries are always **pixels** of the feature map (each of the $h \times w$
# positions is one token). In *self-attention* the keys and values are the pixels too. In
# *cross-attention* they come from the **text**: in the latent diffusion paper (Rombach et al. 2022,
# arXiv 2112.10752, Sec. 3.3) the text is "mapped to the intermediate layers of the UNet via a
# cross-attention layer" with
#
# $$Q = W_Q^{(i)}\, \varphi_i(z_t), \qquad K = W_K^{(i)}\, \tau_\theta(y), \qquad
#   V = W_V^{(i)}\, \tau_\theta(y)$$
#
# with $\varphi_i(z_t)$ the features of the UNet's layer $i$ and $\tau_\theta(y)$ the 77 text vectors
# of lesson 02. (The paper writes one head; SD's layers split the width into heads, as above.)
# $W_K$ and $W_V$ are the only weights that ever read the text, so they are also the only door
# through which a textual-inversion vector reaches the image.
#
# Steps:
# 1. attention in ten lines, by hand
# 2. a picture: a toy image's pixels attend to colour words (hand-set weights, so the weights mean something)
# 3. where attention sits in SD 1.5, and what it costs
# 4. check: our attention equals `minti.unet.Attention`, self and cross
#
# Run: `python lessons/03_attention.py` (a few seconds).

# %%
import argparse
import math
import sys
from pathlib import Path

parser = argparse.ArgumentParser(
    description="Lesson 03: attention and cross-attention, by hand and in minti's module.",
    epilog="No options: the lesson has one mode (MINTI_FAST=1 changes nothing here); it needs no "
           "weights and no download. Pictures go to lessons/out/.")
parser.parse_known_args()  # known only: a notebook kernel passes arguments of its own

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # script or notebook
sys.path.insert(0, str(HERE.parent))  # so that `import minti` finds the repository's minti/
OUT = HERE / "out"
OUT.mkdir(exist_ok=True)

from minti.toy import world as toyworld
from minti.unet import Attention, UNet

torch.manual_seed(0)

# %% [markdown]
# ## Step 1: attention by hand
#
# `x` is [B, N, C]: B images of N pixels with C channels. `context` is [B, L, D]: for
# self-attention it is `x` itself, for cross-attention the L text vectors of width D. The weights
# (as in `minti.unet.Attention`, named as in diffusers): `to_q` [C, C], `to_k` and `to_v`
# [C, D] (no biases), `to_out` [C, C] plus a bias.


# %%
def attention(x, context, to_q, to_k, to_v, to_out, out_bias, heads):
    B, N, C = x.shape
    q, k, v = x @ to_q.T, context @ to_k.T, context @ to_v.T  # (B, N, C), (B, L, C), (B, L, C)
    q, k, v = (a.reshape(B, -1, heads, C // heads).transpose(1, 2) for a in (q, k, v))  # (B, heads, ., d)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(C // heads)).softmax(dim=-1)  # (B, heads, N, L)
    out = (weights @ v).transpose(1, 2).reshape(B, N, C)  # heads side by side again
    return out @ to_out.T + out_bias, weights


# %% [markdown]
# ## Step 2: pixels attending to words
#
# With random weights an attention map means nothing, so here the weights are set by hand, one head
# of width 3: each pixel's query is its RGB colour (times a sharpness of 4), each word's key is the
# colour it names, and a word that names no colour ("a", "star", "on") gets a zero key. A pixel then
# attends most to the word whose colour is most like its own. The values are the words' colours
# again, so the output repaints each pixel with the words it listened to.

# %%
scene = toyworld.Scene("star", "orange", "blue", "plain", "large")
rgb = toyworld.render(scene)  # uint8 [32, 32, 3]
image = torch.from_numpy(rgb).float() / 127.5 - 1  # in [-1, 1], as the models see images
pixels = image.reshape(1, -1, 3)  # [1, 1024, 3]: one token per pixel
words = ["a", "orange", "star", "on", "blue"]
colour = {w: torch.tensor(toyworld.PALETTE[w]) / 127.5 - 1 for w in words if w in toyworld.PALETTE}
text = torch.stack([colour.get(w, torch.zeros(3)) for w in words])[None]  # [1, 5, 3]: "text vectors"

to_q, to_k, to_v = 4 * torch.eye(3), torch.eye(3), torch.eye(3)  # sharpness 4 on the queries
to_out, out_bias = torch.eye(3), torch.zeros(3)
repainted, weights = attention(pixels, text, to_q, to_k, to_v, to_out, out_bias, heads=1)
maps = weights[0, 0].T.reshape(len(words), 32, 32)  # [words, 32, 32]
inside = torch.from_numpy(np.abs(rgb.astype(int) - toyworld.PALETTE["orange"]).sum(-1) < 30)  # orange pixels
print(f"orange pixels give 'orange' {maps[1][inside].mean():.2f} of their attention; "
      f"blue pixels give 'blue' {maps[4][~inside].mean():.2f}")
print("each pixel's weights sum to 1:", torch.allclose(weights.sum(-1), torch.ones(1)))

fig, axes = plt.subplots(1, len(words) + 2, figsize=(2.2 * (len(words) + 2), 2.6))
axes[0].imshow((image + 1) / 2)
axes[0].set_title("pixels (queries)")
for ax, word, m in zip(axes[1:], words, maps):
    ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"'{word}'")
axes[-1].imshow(((repainted[0].reshape(32, 32, 3) + 1) / 2).clamp(0, 1))
axes[-1].set_title("output")
for ax in axes:
    ax.axis("off")
fig.suptitle("cross-attention weights: how much each pixel takes from each word (0 dark, 1 bright)", y=1.0)
fig.tight_layout()
fig.savefig(OUT / "03_cross_attention.png", dpi=100)
print("-> lessons/out/03_cross_attention.png")

# %% [markdown]
# Every pixel spends its whole budget of 1 somewhere: the words with zero keys get a share of every
# pixel's attention, and their zero values make the output a little duller than the input. Pixels
# on the star's edge, half orange and half blue, are the least decided, and the colourless words get
# most of their attention there. That is the softmax at work: attention can only *distribute*, never
# ignore everything. (In SD, a short prompt is followed by 60-odd padding tokens, and they too are
# part of what every pixel distributes its attention over.)
#
# The same weights in minti's module: the names are diffusers', `to_q`, `to_k`, `to_v`, `to_out.0`.

# %%
module = Attention(dim=3, heads=1, context_dim=3)
module.load_state_dict({"to_q.weight": to_q, "to_k.weight": to_k, "to_v.weight": to_v,
                        "to_out.0.weight": to_out, "to_out.0.bias": out_bias})
with torch.no_grad():
    demo_error = (module(pixels, text) - repainted).abs().max().item()
print(f"the demo through minti.unet.Attention: max |difference| = {demo_error:.1e}")

# %% [markdown]
# ## Step 3: attention in SD 1.5
#
# Every spatial transformer of the UNet (lesson 05) holds one `BasicTransformerBlock`: self-attention
# over the pixels (`attn1`), cross-attention to the text (`attn2`), then a feed-forward layer. Count
# them in SD 1.5's architecture (built on the `meta` device: shapes only, no memory), and see what
# attention costs at the finest level, 64x64 latent pixels.

# %%
with torch.device("meta"):
    sd15 = UNet()  # the defaults are SD 1.x's
cross = [name for name, m in sd15.named_modules() if name.endswith("attn2")]
print(f"SD 1.5's UNet has {len(cross)} cross-attention layers, e.g.\n  {cross[0]}")
print(f"  its to_k reads the text: {tuple(sd15.get_submodule(cross[0]).to_k.weight.shape)} "
      f"= [channels, 768 text width]")
n = 64 * 64
print(f"at 64x64: self-attention scores {n} x {n} = {n * n / 1e6:.1f}M per head; "
      f"\n  cross-attention {n} x 77 = {n * 77 / 1e6:.2f}M per head")

# %% [markdown]
# ## Step 4: check against `minti.unet.Attention`
#
# Random weights, four heads, a batch of two, pixels of width 32 and text of width 16 (so a wrong
# transpose or head split cannot hide behind square matrices).

# %%
B, N, L, C, D, heads = 2, 12, 7, 32, 16, 4
x, context = torch.randn(B, N, C), torch.randn(B, L, D)
errors = {}
for kind, ctx, ctx_dim in [("self", x, None), ("cross", context, D)]:
    module = Attention(C, heads, ctx_dim)
    with torch.no_grad():
        theirs = module(x, None if kind == "self" else context)
        ours, _ = attention(x, ctx, module.to_q.weight, module.to_k.weight, module.to_v.weight,
                            module.to_out[0].weight, module.to_out[0].bias, heads)
    errors[kind] = (ours - theirs).abs().max().item()
    print(f"{kind}-attention: max |ours - minti| = {errors[kind]:.1e}")
# and the core, against PyTorch's fused kernel (what minti calls)
q, k, v = torch.randn(3, B, heads, N, 8).unbind(0)
ref = F.scaled_dot_product_attention(q, k, v)
core = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1) @ v
errors["sdpa"] = (core - ref).abs().max().item()
assert max(errors.values()) < 1e-5 and demo_error < 1e-6

# %% [markdown]
# ## Check

# %%
print(f"check passed: hand-written attention equals minti.unet.Attention (self {errors['self']:.1e}, "
      f"\n  cross {errors['cross']:.1e}) and F.scaled_dot_product_attention ({errors['sdpa']:.1e})")

# %% [markdown]
# ## Exercises
#
# 1. Change the sharpness 4 in step 2 to 1 and to 20. What happens to the maps and to the output?
#    (This is what the $1/\sqrt{d}$ factor controls.)
# 2. Add the word "white" to the prompt. Which pixels attend to it, and why so few?
# 3. In cross-attention, which of $Q$, $K$, $V$ change when only the text changes? Which cached
#    quantities could a sampler reuse across its 50 steps?
#
# Solutions: `python lessons/solutions/03_attention.py` prints "solved" when its asserts hold; run
# the same asserts on your own answers: (1) orange pixels give "orange" under half their attention at
# sharpness 1 and over half at 20; (2) "white" wins under 5% of the pixels; (3) attention with K and
# V computed once equals `Attention(x, text)` for every new x, while another text changes it.
