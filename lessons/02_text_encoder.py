# %% [markdown]
# # Lesson 02 · The text encoder: from ids to the 77 vectors the UNet reads
#
# SD 1.x conditions its UNet on the output of CLIP's text transformer (Radford et al. 2021, arXiv
# 2103.00020; the text tower of the ViT-L/14 model). With ids $y_1 \dots y_L$ ($L = 77$), token
# table $E$ and position table $P$:
#
# $$h^{(0)}_i = E[y_i] + P[i]$$
# $$h \leftarrow h + \mathrm{Attn}_{\text{causal}}(\mathrm{LN}_1(h)), \qquad
#   h \leftarrow h + W_2\, \mathrm{QuickGELU}(W_1\, \mathrm{LN}_2(h))  \qquad \text{(12 times)}$$
# $$c = \mathrm{LN}_{\text{final}}(h) \in \mathbb{R}^{77 \times 768}$$
#
# Three details matter. The attention is **causal**: position $i$ only sees positions $\le i$, as in
# GPT, because CLIP was trained that way (Sec. 2.4: "Masked self-attention was used in the text
# encoder"). The activation is **QuickGELU**, $x\,\sigma(1.702\,x)$: the paper does not name it, but
# OpenAI's released code and weights use it. And SD takes **all 77** final-normed vectors, padding
# included. That is not what CLIP itself uses: in the paper, "the activations of the highest layer of
# the transformer at the [EOS] token are treated as the feature representation of the text" (Sec.
# 2.4), one vector, which is then projected; SD skips the projection and keeps every position.
#
# Textual inversion never changes these weights. It changes the *input*: the vector $E[y_i]$ at the
# placeholder's position is replaced by a learned $v_*$ (Gal et al. 2022). minti's
# encoder takes those input vectors directly, `text_encoder(ids, inputs_embeds=...)`: the door that
# textual inversion comes through.
#
# Steps:
# 1. a tiny CLIP text encoder with random weights, and the real ViT-L/14's size
# 2. the forward pass by hand -> equal to `minti.clip.CLIPTextModel`
# 3. causality, seen: change one word and watch which positions change (picture)
# 4. `inputs_embeds`: splice a trainable vector in where the placeholder stands; only it gets a gradient
#
# Run: `python lessons/02_text_encoder.py` (a few seconds).

# %%
import argparse
import math
import sys
from pathlib import Path

parser = argparse.ArgumentParser(
    description="Lesson 02: CLIP's text transformer by hand, and the door textual inversion uses.",
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
from minti.clip import CLIPTextConfig, CLIPTextModel, quick_gelu
from minti.textual_inversion import splice
from minti.toy.bpe import train_bpe

torch.manual_seed(0)

# %% [markdown]
# ## Step 1: a tiny encoder, and the real one's size
#
# The tokenizer is lesson 01's: BPE trained on the toy captions. The encoder has CLIP's architecture
# with tiny widths (the toy model's: 64 wide, 2 layers, 4 heads) and random weights; every shape and
# every operation is the real one's. The real ViT-L/14 is built on PyTorch's `meta` device, which
# records shapes without allocating memory, to count its parameters.

# %%
tok = train_bpe([c for c in toyworld.caption_corpus(2000, seed=0) if c], vocab_size=2000)
config = CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
model = CLIPTextModel(config).eval()
print(f"tiny encoder: {sum(p.numel() for p in model.parameters()):,} parameters")
with torch.device("meta"):
    vit_l = CLIPTextModel(CLIPTextConfig())  # the defaults are SD 1.x's ViT-L/14
print(f"SD 1.x's encoder (ViT-L/14 text tower): {sum(p.numel() for p in vit_l.parameters()):,} parameters, "
      f"{vit_l.config.num_hidden_layers} layers of width {vit_l.config.hidden_size}")

ids = tok(["a photo of a striped orange star", "a small red heart on a blue background"])  # [2, 77]
print("ids:", tuple(ids.shape), "->", tuple(model(ids).shape))

# %% [markdown]
# ## Step 2: the forward pass by hand
#
# Each block is pre-LayerNorm: normalise, attend (or MLP), add back. Attention splits the width into
# heads, scores every pair of positions with $q \cdot k / \sqrt{d_{head}}$, and adds $-\infty$ above
# the diagonal so that the softmax gives zero weight to later positions.


# %%
def encode_by_hand(model, ids):
    tm = model.text_model
    B, L = ids.shape
    h = tm.embeddings.token_embedding.weight[ids] + tm.embeddings.position_embedding.weight[:L]
    mask = torch.full((L, L), -math.inf).triu(1)  # -inf where the key comes after the query
    for layer in tm.encoder.layers:
        a = layer.self_attn
        x = layer.layer_norm1(h)
        q, k, v = (proj(x).view(B, L, a.num_heads, -1).transpose(1, 2)  # (B, heads, L, D / heads)
                   for proj in (a.q_proj, a.k_proj, a.v_proj))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask  # (B, heads, L, L)
        weights = scores.softmax(dim=-1)
        h = h + a.out_proj((weights @ v).transpose(1, 2).reshape(B, L, -1))
        h = h + layer.mlp.fc2(quick_gelu(layer.mlp.fc1(layer.layer_norm2(h))))
    return tm.final_layer_norm(h)


with torch.no_grad():
    ours, theirs = encode_by_hand(model, ids), model(ids)
error = (ours - theirs).abs().max().item()
print(f"by hand vs CLIPTextModel: max |difference| = {error:.1e}")
assert error < 1e-5

# %% [markdown]
# ## Step 3: causality, seen
#
# Change one word ("striped" -> "plain", position 5) and compare the 77 outputs. Positions before
# it cannot see it, so they do not change at all; the word itself and everything after it do,
# **including every padding position**: the end tokens that fill the row up to 77 come after the
# prompt and so carry a summary of it. That is one reason SD's choice of padding token matters.

# %%
a = tok(["a photo of a striped orange star"])
b = tok(["a photo of a plain orange star"])
changed = (a != b).nonzero()[:, 1].tolist()
print("positions whose id differs:", changed)
with torch.no_grad():
    change = (model(a) - model(b)).abs().amax(dim=-1)[0]  # [77]: largest change at each position
print("largest change before it:", change[:changed[0]].max().item(), "; at and after it: min",
      f"{change[changed[0]:].min().item():.2e}")
assert change[:changed[0]].max() == 0 and change[changed[0]:].min() > 0

fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
L = 12
axes[0].imshow(torch.full((L, L), 1.0).tril(), cmap="Greys")
axes[0].set_xticks(range(0, L, 2))
axes[0].set_yticks(range(0, L, 2))
axes[0].set_title(f"causal mask (first {L} positions)\nrow i may look at the dark columns")
axes[0].set_xlabel("key position")
axes[0].set_ylabel("query position")
axes[1].bar(range(77), change.numpy())
axes[1].set_yscale("log")  # positions before the word changed by exactly 0: they have no bar
axes[1].axvline(changed[0], color="red", linestyle="--", label="the changed word")
axes[1].set_title("|output change| per position (log scale)")
axes[1].set_xlabel(f"position (the padding starts at {len(tok.encode('a photo of a striped orange star'))})")
axes[1].legend()
x = torch.linspace(-4, 3, 200)
axes[2].plot(x, quick_gelu(x), label="QuickGELU  x·σ(1.702x)")
axes[2].plot(x, F.gelu(x), "--", label="GELU (exact)")
axes[2].plot(x, 10 * (quick_gelu(x) - F.gelu(x)), ":", label="difference x 10")
axes[2].set_title("CLIP's activation")
axes[2].legend()
fig.tight_layout()
fig.savefig(OUT / "02_text_encoder.png", dpi=100)
print("-> lessons/out/02_text_encoder.png")

# %% [markdown]
# ## Step 4: the door, `inputs_embeds`
#
# As in lesson 01, add `<my-star>` as a placeholder. Its id is past the end of the token table, so
# the table cannot be looked up there. Instead we build the input vectors ourselves: look up every
# other token, and put a trainable vector $v_*$ where the placeholder stands. The paper initialises
# $v_*$ with the embedding of a coarse descriptor of the concept; here, "star". The table itself
# stays frozen: only $v_*$ is a parameter, so only $v_*$ gets a gradient. (`minti.textual_inversion.splice`
# does this splice for any number of words and vectors.) To see that "frozen" holds, hand one AdamW
# step *every* tensor, v\* and all the encoder's weights, with weight decay, and compare the values
# before and after: what moves is decided by which tensors got a gradient, not by the list given to
# the optimizer. (Had the table kept `requires_grad`, its rows would move here, and this check fails.)

# %%
placeholder = tok.add_tokens(["<my-star>"])[0]
table = model.text_model.embeddings.token_embedding.weight
table.requires_grad_(False)
for p in model.parameters():
    p.requires_grad_(False)  # the whole encoder is frozen in textual inversion
v_star = table[tok.token_to_id("star</w>")].clone().requires_grad_()  # init word: "star"

ids = tok(["a photo of a striped <my-star>"])
is_new = ids == placeholder
embeds = table[ids.masked_fill(is_new, 0)]  # any valid id where the placeholder is; replaced next
embeds = torch.where(is_new[..., None], v_star, embeds)
assert torch.equal(embeds, splice(ids, table, [placeholder], v_star[None]))  # minti's splice
out = model(ids, inputs_embeds=embeds)

# At initialisation the new word *is* "star": same input vectors, same output.
with torch.no_grad():
    same_as_star = torch.equal(out, model(tok(["a photo of a striped star"])))
print("with v* = embedding('star'), the output equals the prompt with 'star':", same_as_star)

target = torch.randn_like(out)
(out - target).pow(2).mean().backward()  # any loss will do here; lesson 06 has the real one
print(f"gradient reaches v*: |grad| = {v_star.grad.norm():.2e}")

v_before = v_star.detach().clone()
weights_before = {name: w.detach().clone() for name, w in model.named_parameters()}  # table included
optimizer = torch.optim.AdamW([v_star, *model.parameters()], lr=1e-3, weight_decay=0.01)
optimizer.step()
v_moved = (v_star - v_before).abs().max().item()
changed = [name for name, w in model.named_parameters() if not torch.equal(w, weights_before[name])]
print(f"after one AdamW step: v* moved by up to {v_moved:.1e}; encoder tensors changed: "
      f"{len(changed)} of {len(weights_before)}")
assert same_as_star and v_moved > 0 and not changed, changed

# and the plain lookup is just the first half of this: ids -> table rows -> the same encoder
with torch.no_grad():
    plain = tok(["a photo of a striped star"])
    assert torch.equal(model(plain), model(None, inputs_embeds=table[plain]))

# %% [markdown]
# ## Check

# %%
print(f"check passed: the hand-written forward equals minti's CLIPTextModel (max error {error:.1e}); "
      "\n  earlier positions ignore later tokens; the splice equals minti.textual_inversion.splice, and with "
      "\n  v* = 'star' gives the prompt with 'star'; an optimizer step moves v* and leaves every "
      "\n  encoder tensor, the token table included, bit-identical")

# %% [markdown]
# ## Exercises
#
# 1. Remove the mask in `encode_by_hand`. Which positions of step 3's comparison now change?
# 2. Replace `quick_gelu` with `F.gelu` in `encode_by_hand`: how large is the difference? (With real
#    weights it changes the pictures visibly.)
# 3. Put `<my-star>` at two places in one prompt. Does `v_star.grad` add up the two positions'
#    gradients? Check with a small experiment.
#
# Solutions: `python lessons/solutions/02_text_encoder.py` prints "solved" when its asserts hold; run
# the same asserts on your own answers: (1) the first changed position is 5 with the mask and 0
# without it; (2) the difference is above 0 and below 1; (3) `v_star.grad` equals the sum of the
# two positions' gradients (`torch.allclose`).
