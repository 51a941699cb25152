# %% [markdown]
# # Lesson 05 · The UNet: the network that predicts the noise
#
# The denoiser $\varepsilon_\theta(z_t, t, c)$ takes a noisy latent $z_t$ [B, 4, h, w], the timestep
# $t$ and the text $c$ [B, 77, 768], and predicts the noise in $z_t$: an output of the latent's shape.
# SD 1.x's is LDM's UNet (Rombach et al. 2022, arXiv 2112.10752; after Ho et al. 2020, arXiv
# 2006.11239, and Dhariwal & Nichol 2021, arXiv 2105.05233).
# It is built from three pieces:
#
# - a **timestep embedding**: $t$ as sines and cosines of many frequencies (the Transformer's
#   positional encoding, Vaswani et al. 2017, Sec. 3.5), $\mathrm{emb}(t) = [\cos(t\,\omega_i), \sin(t\,\omega_i)]$ with
#   $\omega_i = 10000^{-i/160}$, then a small MLP to 1280 numbers;
# - **ResNet blocks**: two 3x3 convolutions with a residual, the time embedding added in between as
#   one bias per channel: this is how every block knows how noisy its input is;
# - **spatial transformers**: the feature map's pixels become tokens that attend to each other and
#   to the text (lesson 03): the only place where the text enters.
#
# They are stacked in a U: down through four resolutions (64, 32, 16, 8 for a 512-pixel image) and
# back up, and every intermediate result of the way down is kept on a stack and concatenated to the
# input of a block on the way up (the *skip connections*).
#
# Steps:
# 1. the timestep embedding by hand -> equal to `minti.unet.timestep_embedding` (picture)
# 2. a ResNet block by hand -> equal to `minti.unet.ResnetBlock2D`
# 3. the spatial transformer, where the text enters, by hand -> equal to `minti.unet.SpatialTransformer`
# 4. the U and its skip stack, traced through SD 1.5's architecture on the meta device
# 5. a tiny UNet, really run: several timesteps per batch, an odd latent size
#
# Run: `python lessons/05_unet.py` (about ten seconds).

# %%
import argparse
import math
import sys
from pathlib import Path

parser = argparse.ArgumentParser(
    description="Lesson 05: the SD 1.x UNet: timestep embedding, ResNet block, spatial transformer, U.",
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

from minti.unet import ResnetBlock2D, SpatialTransformer, UNet, UNetConfig, timestep_embedding

torch.manual_seed(0)

# %% [markdown]
# ## Step 1: the timestep embedding
#
# Half the features are cosines, half sines, at frequencies falling geometrically from 1 to 1/10000
# per timestep: the first features turn over every few timesteps, the last ones barely move over all
# 1000. Together they give every $t$ a distinct, smooth code (and fractional $t$ work too).


# %%
def embed_time(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)  # 10000^(-i/half): 1 ... ~1/10000
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)  # cos first: SD's order (flip_sin_to_cos)


t = torch.arange(1000)
ours, theirs = embed_time(t, 320), timestep_embedding(t, 320)
time_error = (ours - theirs).abs().max().item()
print(f"timestep embedding [1000, 320]: by hand vs minti, max |difference| = {time_error:.1e}")
assert time_error < 1e-6

# %% [markdown]
# ## Step 2: a ResNet block
#
# GroupNorm, SiLU, 3x3 conv; add the (projected) time embedding to every pixel of each channel;
# GroupNorm, SiLU, 3x3 conv; add the input back (through a 1x1 conv if the width changes).


# %%
def resnet_by_hand(block, x, temb):
    h = block.conv1(F.silu(block.norm1(x)))
    h = h + block.time_emb_proj(F.silu(temb))[:, :, None, None]  # one number per channel, broadcast over h, w
    h = block.conv2(F.silu(block.norm2(h)))
    skip = x if block.conv_shortcut is None else block.conv_shortcut(x)
    return skip + h


block = ResnetBlock2D(c_in=32, c_out=64, temb_dim=128, groups=8)
x, temb = torch.randn(2, 32, 6, 10), torch.randn(2, 128)
with torch.no_grad():
    resnet_error = (resnet_by_hand(block, x, temb) - block(x, temb)).abs().max().item()
print(f"ResNet block [2, 32, 6, 10] -> [2, 64, 6, 10]: by hand vs minti, "
      f"max |difference| = {resnet_error:.1e}")

# %% [markdown]
# ## Step 3: the spatial transformer
#
# GroupNorm and a 1x1 conv, then each of the $h \times w$ pixels becomes a token of C channels; one
# transformer block: self-attention (pixels attend to pixels), **cross-attention** (pixels attend to
# the 77 text vectors: the only place where the text enters the UNet), and a feed-forward layer with
# a GELU-gated linear unit (GEGLU, Shazeer 2020, arXiv 2002.05202), each pre-LayerNorm with a
# residual; the tokens are folded back into a map, a 1x1 conv, and the input is added back. The
# output has the input's shape: the block *edits* the feature map. The attention is lesson 03's, with
# the module's own weights.


# %%
def attend(attn, x, context):  # lesson 03's softmax(Q K^T / sqrt(d)) V, heads side by side
    B, N, C = x.shape
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    q, k, v = (a.reshape(B, -1, attn.heads, C // attn.heads).transpose(1, 2) for a in (q, k, v))
    weights = (q @ k.transpose(-2, -1) / math.sqrt(C // attn.heads)).softmax(dim=-1)
    return attn.to_out[0]((weights @ v).transpose(1, 2).reshape(B, N, C))


def spatial_transformer_by_hand(st, h, text):
    B, C, H, W = h.shape
    x = st.proj_in(st.norm(h)).permute(0, 2, 3, 1).reshape(B, H * W, C)  # one token per pixel
    block = st.transformer_blocks[0]
    x = x + attend(block.attn1, block.norm1(x), block.norm1(x))  # self-attention
    x = x + attend(block.attn2, block.norm2(x), text)  # cross-attention: the text comes in here
    values, gate = block.ff.net[0].proj(block.norm3(x)).chunk(2, dim=-1)  # GEGLU: values, then gate
    x = x + block.ff.net[2](values * F.gelu(gate))
    x = x.reshape(B, H, W, C).permute(0, 3, 1, 2)  # tokens folded back into a map
    return h + st.proj_out(x)  # the block edits its input


transformer = SpatialTransformer(channels=64, heads=4, context_dim=48, groups=8)
h, text = torch.randn(2, 64, 6, 10), torch.randn(2, 77, 48)
with torch.no_grad():
    out = transformer(h, text)
    st_error = (spatial_transformer_by_hand(transformer, h, text) - out).abs().max().item()
    edit = (out - h).abs().max().item()  # how much the block changed its input
    text_effect = (transformer(h, torch.randn(2, 77, 48)) - out).abs().max().item()
print(f"spatial transformer: map {tuple(h.shape)} = {6 * 10} tokens of 64 channels, attending to text "
      f"\n  {tuple(text.shape)} -> {tuple(out.shape)}; by hand vs minti, max |difference| = "
      f"{st_error:.1e}\n  (the block changes its input by up to {edit:.2f}; another text changes "
      f"the output by up to {text_effect:.2f})")
assert st_error < 1e-5 and edit > 0.1 and text_effect > 0.01  # a match on an identity would prove nothing

# %% [markdown]
# ## Step 4: the U and its skip stack
#
# SD 1.5's architecture, built on PyTorch's `meta` device: every shape is computed, no memory is
# used, no number is real. Hooks on each stage record what comes out: on the way down, each stage
# pushes its layers' outputs on the skip stack; on the way up, each ResNet block pops one and
# concatenates it to its input along channels. (This is the table written out at the top of
# minti/unet.py's UNet.)

# %%
with torch.device("meta"):
    sd15 = UNet()  # the defaults are SD 1.x's configuration
params = sum(p.numel() for p in sd15.parameters())
print(f"SD 1.5's UNet: {params:,} parameters")

rows, pushed = [], []


def record(name):
    def hook(module, inputs, output):
        if isinstance(output, tuple):  # a down block returns (h, its skips)
            output, skips = output
            pushed.extend((name, s.shape[1]) for s in skips)
            rows.append((name, tuple(output.shape[1:]), " ".join(str(s.shape[1]) for s in skips)))
        else:
            if name == "conv_in":  # conv_in's output is the first skip
                pushed.append((name, output.shape[1]))
            rows.append((name, tuple(output.shape[1:]), str(output.shape[1]) if name == "conv_in" else ""))
    return hook


for name in ["conv_in", "mid_block", "conv_out"] + [f"down_blocks.{i}" for i in range(4)] + \
        [f"up_blocks.{i}" for i in range(4)]:
    sd15.get_submodule(name).register_forward_hook(record(name))
popped = []
for i, up in enumerate(sd15.up_blocks):  # what each up block's ResNets take in: h + a popped skip
    up.register_forward_pre_hook(lambda m, args, i=i: popped.append([s.shape[1] for s in args[1]]))

with torch.device("meta"):
    eps = sd15(torch.empty(1, 4, 64, 64), torch.tensor([500]), torch.empty(1, 77, 768))
print(f"{'stage':>14}  {'output [C, h, w]':<18} skips pushed (channels)")
for name, shape, skips in rows:
    print(f"{name:>14}  {str(shape):<18} {skips}")
print("skips popped by up_blocks.0..3:\n ", popped)
assert [w for _, w in pushed][::-1] == [w for block in popped for w in block]  # last in, first out
assert params == 859_520_964 and tuple(eps.shape) == (1, 4, 64, 64)  # diffusers' SD 1.5 UNet

# %% [markdown]
# ## Step 5: a tiny UNet, really run
#
# The same class with the toy model's tiny configuration (three levels, 64/128/128 channels). A batch
# carries **one timestep per sample**: training draws a different $t$ for each image. Latent sides
# need not be powers of two: a 5x7 latent goes down as 5x7 -> 3x4 -> 2x2 and the upsamplers are told
# the size of the skip they meet, so it comes back as 5x7.

# %%
tiny = UNet(UNetConfig(block_out_channels=(64, 128, 128), layers_per_block=1, attention_head_dim=4,
                       cross_attention_dim=64,
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))).eval()
print(f"tiny UNet: {sum(p.numel() for p in tiny.parameters()):,} parameters")
shapes = []
for latent in [(2, 4, 8, 8), (2, 4, 5, 7)]:
    with torch.no_grad():
        eps = tiny(torch.randn(latent), torch.tensor([10, 900]), torch.randn(2, 77, 64))
    print(f"  latent {latent}, t = [10, 900] -> eps {tuple(eps.shape)}")
    shapes.append(tuple(eps.shape) == latent)
assert all(shapes)

# %% [markdown]
# The picture: the embedding of all 1000 timesteps, and the U drawn as the side of each stage's
# output (a down stage ends by halving it, an up stage by doubling it; the numbers are channels).

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
axes[0].imshow(ours.T, aspect="auto", cmap="RdBu", interpolation="nearest")
axes[0].set_xlabel("timestep t")
axes[0].set_ylabel("feature (cos 0-159, sin 160-319)")
axes[0].set_title("timestep embedding, 320 features")
names = [r[0] for r in rows]
order = ["conv_in"] + [f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + \
        [f"up_blocks.{i}" for i in range(4)] + ["conv_out"]
sides = [dict((r[0], r[1]) for r in rows)[n] for n in order]
axes[1].plot(range(len(order)), [s[1] for s in sides], marker="o")
for i, (name, (c, side, _)) in enumerate(zip(order, sides)):
    axes[1].annotate(f"{c}", (i, side), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
axes[1].set_xticks(range(len(order)))
axes[1].set_xticklabels([n.replace("_blocks.", "") for n in order], rotation=45, fontsize=8)
axes[1].set_ylabel("side of the stage's output")
axes[1].set_ylim(0, 75)
axes[1].set_title("SD 1.5's U for a 64x64 latent (numbers: channels)")
fig.tight_layout()
fig.savefig(OUT / "05_unet.png", dpi=100)
print("-> lessons/out/05_unet.png")

# %% [markdown]
# ## Check

# %%
assert resnet_error < 1e-5
print(f"check passed: hand-written timestep embedding ({time_error:.1e}), ResNet block "
      f"\n  ({resnet_error:.1e}) and spatial transformer ({st_error:.1e}) equal minti's; SD 1.5's UNet "
      f"\n  has 859,520,964 parameters,"
      "\n  its skips pop in "
      "reverse push order, and eps has the latent's shape")

# %% [markdown]
# ## Exercises
#
# 1. Which features of the timestep embedding distinguish t = 500 from t = 501? Plot
#    `embed_time(torch.tensor([500, 501]), 320)` and their difference.
# 2. Count the parameters of SD 1.5's UNet by kind (ResNet blocks, spatial transformers, the rest).
#    Where do most of the 860M live?
# 3. Why can the upsamplers not simply double the size for a 5x7 latent? Set `size=None` in
#    `UNet.forward` (a local copy) and see where it fails.
#
# Solutions: `python lessons/solutions/05_unet.py` prints "solved" when its asserts hold; run the
# same asserts on your own answers: (1) the first 10 features differ over 100 times more than the
# last 10; (2) the kinds add up to 859,520,964 and the ResNet blocks hold more than half; (3) the
# forward pass without `size=` raises an error.
