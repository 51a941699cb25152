# %% [markdown]
# # Lesson 08 · The toy world: a trained model, a judge, and how to count
#
# Lessons 01-07 built every part of SD 1.x with random weights. From lesson 09 on we need a model
# that *draws*, and a way to tell whether a drawing shows what we asked for. Real SD 1.x is a 4 GB
# download and a GPU job; so minti ships a **toy world**:
#
# - a *renderer* (`minti/toy/world.py`): one object on a plain background, five attributes (shape,
#   colour, background, pattern, size), 32x32 pixels, with exact labels and captions;
# - a *toy model* (`minti/toy/model.py`, weights in `weights/toy/`): SD 1.x's own classes (lessons
#   01-07) in a tiny configuration, trained by minti on that world, saved as a diffusers folder
#   (the appendix lesson) and loaded with `minti.load("toy")`;
# - an *oracle* (`minti/toy/oracle.py`): a small classifier that reads an image back into its five
#   attributes. It replaces the CLIP similarity the textual inversion paper judged with;
# - a way to *count*: a share of samples (e.g. 17 of 24 show an orange striped star) with a 95%
#   interval, the measures *reconstruction* and *editability*, and their two reference points.
#
# Steps:
# 1. the world: renders, labels, captions, and the five images of the concept lessons 09-15 learn
# 2. how the toy model was trained: its three stages, their settings and wall time
# 3. the VAE: the five training images through encoder and decoder (keeping lesson 04's promise)
# 4. the oracle: how often it reads fresh renders right, and renders after the VAE (measured now)
# 5. the toy model draws: prompt following at guidance 1, 4 and 7.5
# 6. counting: reconstruction, editability, "prompt only", "image only", the Wilson interval derived
# 7. guidance counted: 512 captions per scale, compared caption by caption (a sign test), and why
#    the lessons sample at guidance 4
#
# Run: `python lessons/08_toy_world.py` (`MINTI_FAST=1`: fewer samples, the same checks; `--full`
# measures guidance on 512 captions again and rewrites `lessons/results/08_guidance.csv`, whose
# numbers step 5 states). Needs the toy model in `weights/toy/` (committed).

# %%
import argparse
import csv
import math
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

parser = argparse.ArgumentParser(description="Lesson 08: the toy world, the oracle, and how to count.")
parser.add_argument("--full", action="store_true",
                    help="measure prompt following at guidance 1, 4 and 7.5 on 512 captions each and "
                         "rewrite lessons/results/08_guidance.csv (a few minutes)")
args, _ = parser.parse_known_args()  # parse_known_args: a notebook kernel passes its own arguments

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # script or notebook
sys.path.insert(0, str(HERE.parent))  # so that `import minti` finds the repository's minti/
OUT, RESULTS = HERE / "out", HERE / "results"
OUT.mkdir(exist_ok=True)

import minti
from minti.toy import world
from minti.toy.model import ToyTrainConfig
from minti.toy.oracle import Oracle
from minti.toy.evaluate import Share, evaluate_prompt_following, wilson_interval

FAST = os.environ.get("MINTI_FAST") == "1"
N_ORACLE = 256 if FAST else 1024  # fresh renders for the oracle's accuracy
N_PROMPTS = 32 if FAST else 128  # captions per guidance scale in step 5
torch.manual_seed(0)
start_time = time.time()

# %% [markdown]
# ## Step 1: the world
#
# A scene is five labels and a small position jitter. The renderer draws it from signed distance
# functions, so every pixel's ink is known exactly. Captions name some of the attributes ("a photo
# of a striped orange star on a black background", "a red shape"); about 10% are empty, which is
# what teaches the model its *unconditional* prediction (lesson 07's guidance needs one).

# %%
images, labels = world.render_batch(8, seed=1)
scenes = world.scenes_from_labels(labels)
for scene in scenes[:4]:
    print(f"  {scene.size:5s} {scene.pattern:8s} {scene.colour:6s} {scene.shape:8s} on {scene.background}")
rng = np.random.default_rng(0)
for text in world.captions(labels, rng)[:3]:
    print(f"  caption: {text!r}")
print({attribute: len(values) for attribute, values in world.ATTRIBUTES.items()},
      f"-> {np.prod([len(v) for v in world.ATTRIBUTES.values()])} combinations")

NAME = world.DEFAULT_CONCEPT
TRUTH = world.CONCEPTS[NAME]
FOLDER = HERE.parent / "weights" / "toy" / "concepts" / NAME
concept_images = np.stack([np.asarray(plt.imread(p)[..., :3] * 255, np.uint8)
                           for p in sorted(FOLDER.glob("*.png"))])
rendered = np.stack([world.render(s) for s in world.concept_scenes(NAME)])
same = np.array_equal(concept_images, rendered)
print(f"{NAME}: {len(concept_images)} images in {FOLDER.relative_to(HERE.parent)},\n  large, on "
      f"{'/'.join(TRUTH.image_backgrounds)}; equal to the renderer's: {same}")

# %% [markdown]
# Those five images are what lessons 09-15 turn into a word: like a user's 3-5 photos of one object.
# They are all large and on neutral backgrounds; blue and green backgrounds and the small size never
# appear in them, so that "the word on a blue background" can test whether the word still *edits*.
#
# ## Step 2: how the toy model was trained
#
# `python -m minti.toy.model` trains the parts in the order LDM trained SD's:
# 1. the tokenizer: BPE merges learned on the captions (lesson 01's `train_bpe`);
# 2. the VAE on fresh renders: reconstruction MSE plus a tiny KL term (lesson 04's loss);
# 3. 60,000 scenes rendered and encoded once into latents; the latent scale measured on them as
#    1 / std (how SD's 0.18215 was found, lesson 04);
# 4. the text encoder and the UNet *together* on the DDPM loss (lesson 06), a fresh caption per
#    scene at every step, and an exponential moving average of the weights kept and shipped.
#
# Its settings (`ToyTrainConfig`) and the wall time the repository's README records for a retrain
# from scratch on one CPU thread: VAE 13 min, 60k latents 2 min, UNet + text encoder (4,000 steps of
# 64) 44 min, 59 min in all. The oracle was trained separately (`python -m minti.toy.oracle`, 1,500
# steps of 64 fresh renders, about 5 minutes on an idle machine).

# %%
config = ToyTrainConfig()
settings = [f"{f.name}={getattr(config, f.name)}" for f in fields(config) if f.name != "checkpoint_every"]
for i in range(0, len(settings), 6):
    print("  " + ", ".join(settings[i:i + 6]))
sd = minti.load("toy")
counts = {name: sum(p.numel() for p in getattr(sd, name).parameters())
          for name in ("text_encoder", "unet", "vae")}
print("parameters:", ", ".join(f"{k} {v:,}" for k, v in counts.items()), "(SD 1.5: 123M, 860M, 84M)")
print(f"latent scale {sd.latent_scale:.4f} (SD 1.x: 0.18215)")
print(f"vocabulary {len(sd.tokenizer.vocab)} tokens, "
      f"width {sd.text_encoder.config.hidden_size} (SD: 49,408 and 768); latents 4x8x8 for 32x32 images")

# %% [markdown]
# ## Step 3: the VAE's reconstructions
#
# Lesson 04 showed the VAE's shapes with random weights. Here is the trained one: each of the five
# concept images through `vae.encode` (the mean of its Gaussian) and `vae.decode`. The decoder sees
# only 8x8x4 numbers per image, 48 times fewer than the 32x32x3 pixels; what it loses is what no
# word learned later can bring back (the stripes are the finest detail the world has).

# %%
x = torch.from_numpy(concept_images).permute(0, 3, 1, 2).float() / 127.5 - 1  # [5, 3, 32, 32]
with torch.no_grad():
    mean, logvar = sd.vae.encode(x)  # [5, 4, 8, 8] each
    recon = sd.vae.decode(mean).clamp(-1, 1)
mse = ((recon - x) ** 2).mean(dim=(1, 2, 3))
print("latents", tuple(mean.shape), "; MSE per image (on [-1, 1]):",
      [round(v, 4) for v in mse.tolist()])
recon_uint8 = ((recon + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()

fig, axes = plt.subplots(3, 5, figsize=(7.5, 4.8))
rows = [("training image", concept_images), ("VAE round trip", recon_uint8),
        ("|difference| x4", np.clip(4 * np.abs(concept_images.astype(int) - recon_uint8), 0, 255))]
for r, (label, row) in enumerate(rows):
    for c in range(5):
        axes[r, c].imshow(row[c].astype(np.uint8))
        axes[r, c].set_xticks([])
        axes[r, c].set_yticks([])
    axes[r, 0].set_ylabel(label, fontsize=8)
fig.suptitle(f"the toy VAE on the five images of {NAME} (32x32 -> 4x8x8 -> 32x32)", fontsize=9)
fig.tight_layout()
for folder in (OUT, RESULTS) if args.full else (OUT,):  # the committed picture only with --full
    fig.savefig(folder / "08_vae_reconstructions.png", dpi=100)
    print(f"-> {(folder / '08_vae_reconstructions.png').relative_to(HERE.parent)}")

# %% [markdown]
# ## Step 4: the oracle, and how far to trust it
#
# The oracle is a small convolutional network with one head per attribute (`Oracle.predict` ->
# {attribute: index}). It was trained on renders degraded the way generated images are (blur, noise,
# small shifts, colour jitter, VAE-like round trips), so that it reads *samples*, not only renders.
# A judge must be right far more often than the differences it judges: we measure it now on fresh
# renders the oracle never saw (a seed its training did not use), clean and after the VAE.

# %%
oracle = Oracle.load()
fresh, fresh_labels = world.render_batch(N_ORACLE, seed=2024)
clean = oracle.accuracy(fresh, fresh_labels)
xf = torch.from_numpy(fresh).permute(0, 3, 1, 2).float() / 127.5 - 1
with torch.no_grad():
    round_trip = torch.cat([sd.vae.decode(sd.vae.encode(chunk)[0]) for chunk in xf.split(256)]).clamp(-1, 1)
after_vae = oracle.accuracy(round_trip, fresh_labels)
print(f"the oracle on {N_ORACLE} fresh renders, share read right (clean | after the VAE):")
for attributes in (list(clean)[:3], list(clean)[3:]):
    print("  " + "   ".join(f"{a} {100 * clean[a]:.1f} | {100 * after_vae[a]:.1f}%" for a in attributes))
print("the README's figures (2,000 renders): 100% of every attribute clean; pattern 99.6% after the VAE")

# %% [markdown]
# ## Step 5: the toy model draws
#
# `evaluate_prompt_following` samples one image per caption (captions of seen combinations that
# name shape, colour and background) with lesson 07's DDIM and classifier-free guidance, and asks
# the oracle whether the three named attributes came out right. SD 1.x is usually sampled at
# guidance 7.5. Does the toy model, trained on a tiny and exact world, want as much? We measure 1
# (no guidance: the conditional prediction alone), 4 and 7.5, with 25 DDIM steps.

# %%
SCALES, N_FULL = (1.0, 4.0, 7.5), 512  # --full: 512 captions per scale, one sample each
GUIDANCE_CSV = RESULTS / "08_guidance.csv"
ASKED = ("shape", "colour", "background")


def follows(scale, n):
    """n captions, one sample each at guidance `scale`: True where the oracle reads the asked shape,
    colour and background (evaluate_prompt_following's "shape+colour+background", caption by caption)."""
    report = evaluate_prompt_following(sd, n_prompts=n, steps=25, cfg=scale, oracle=oracle)
    right = np.array([all(c["read"][a] == c["asked"][a] for a in ASKED) for c in report.prompts["model"]])
    assert Share.of(right) == report["model"]["shape+colour+background"]
    return right, report.prompts["model"]


if args.full:  # the measurement that step 7 reads, written atomically
    rows = []
    for scale in SCALES:
        right, captions = follows(scale, N_FULL)
        rows += [{"cfg": scale, "caption_index": i, "caption": c["caption"], "right": int(r), "ddim_steps": 25,
                  "seed": 0} for i, (r, c) in enumerate(zip(right, captions))]
    with open(GUIDANCE_CSV.with_suffix(".tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(GUIDANCE_CSV.with_suffix(".tmp"), GUIDANCE_CSV)
    print(f"-> {GUIDANCE_CSV.relative_to(HERE.parent)}: {len(rows)} rows")

following = {}
for scale in SCALES:
    t0 = time.time()
    following[scale] = Share.of(follows(scale, N_PROMPTS)[0])
    print(f"  guidance {scale:3.1f}: shape, colour and background right in {following[scale]} "
          f"of {N_PROMPTS} ({time.time() - t0:.0f} s)")

# %% [markdown]
# The brackets are 95% intervals: with 128 captions (32 in the fast mode) a share is known only to
# within several points, and step 6 derives how far. Step 7 comes back to these scales with 512
# captions each and asks which differences the counts can carry.
#
# ## Step 6: how to count
#
# The textual inversion paper judges a learned word $S_*$ on two axes (Gal et al. 2022, arXiv
# 2208.01618, section 5, "Quantitative analysis", and its Fig. 10), both measured with CLIP:
# *reconstruction*, the CLIP similarity between samples of "A photo of $S_*$" and the concept's
# training images, and *editability*, the CLIP similarity between samples of prompts such as "a
# photo of $S_*$ on the moon" and the text of those prompts with $S_*$ left out. minti keeps the two
# axes and replaces CLIP by the oracle, which turns each into a share of samples. These are
# minti's definitions, not the paper's:
# - **reconstruction**: "a photo of a $S_*$" shows the concept; here: the oracle reads the right
#   shape AND colour AND pattern (background and size are free);
# - **editability**: "a photo of a $S_*$ on a blue background" (or green, or "a small $S_*$") shows
#   the change asked for AND the concept intact. (The paper's text similarity, with $S_*$ left out
#   of the text, does not ask for the concept; lesson 10 also counts the asked change alone.)
#
# Each is set beside two reference points, also minti's. **Prompt only**: the same prompts with
# the coarse word instead of $S_*$ ("a photo of a star"), what a user gets without learning
# anything. **Image only**: the training images themselves, the ceiling of reconstruction (they
# cannot be edited).
#
# Each measure is a share $\hat p = k/n$ of samples. How sure is it? With $n$ independent samples
# the count is binomial, and $\hat p$ is roughly normal with standard deviation
# $\sqrt{p(1-p)/n}$. The usual interval $\hat p \pm z\sqrt{\hat p(1-\hat p)/n}$ (z = 1.96 for 95%)
# puts the *estimate* in the standard deviation, and fails where we need it most: at 0/n or n/n it
# has width zero. Wilson (1927) keeps the *unknown* p: the interval is every p for which the
# observation is not surprising, $|\hat p - p| \le z \sqrt{p(1-p)/n}$. Squaring gives a quadratic
# in p, $(1 + z^2/n)\,p^2 - (2\hat p + z^2/n)\,p + \hat p^2 \le 0$, whose two roots are
#
# $$p_\pm = \frac{\hat p + \frac{z^2}{2n} \pm z\sqrt{\frac{\hat p(1-\hat p)}{n} + \frac{z^2}{4n^2}}}
#   {1 + z^2/n}.$$

# %%
def wilson_by_hand(k, n, z=1.959964):
    """The roots of (1 + z^2/n) p^2 - (2 p_hat + z^2/n) p + p_hat^2 = 0."""
    p = k / n
    a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


def wald(k, n, z=1.959964):
    p = k / n
    half = z * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


for k, n in ((0, 16), (16, 16), (17, 24), (47, 64)):
    (lo, hi), (wlo, whi) = wilson_by_hand(k, n), wald(k, n)
    print(f"  {k:2d}/{n}: Wilson by hand [{lo:.3f}, {hi:.3f}], library {Share(k, n)}, "
          f"normal approx. [{wlo:.3f}, {whi:.3f}]")
hand_error = max(abs(a - b) for k in range(25) for a, b in zip(wilson_by_hand(k, 24), wilson_interval(k, 24)))

# %% [markdown]
# Does a "95% interval" cover the truth 95% of the time? Draw many counts from a known share and
# count how often each interval contains it. Near the edges (p = 0.95, n = 24, where a good word's
# reconstruction lives) the normal approximation misses far more often than 5%; Wilson stays close.

# %%
draws = np.random.default_rng(0).binomial(24, 0.95, size=20000)
cover = {name: np.mean([lo <= 0.95 <= hi for lo, hi in map(lambda k: f(int(k), 24), draws)])
         for name, f in (("Wilson", wilson_interval), ("normal", wald))}
print(f"coverage of p = 0.95 with n = 24 over 20,000 draws: Wilson {100 * cover['Wilson']:.1f}%, "
      f"normal approximation {100 * cover['normal']:.1f}%")

# %% [markdown]
# ## Step 7: guidance, counted
#
# Step 5's 128 captions per scale give intervals several points wide. The committed measurement
# (`lessons/results/08_guidance.csv`, written by `--full`) has 512 captions per scale, one sample
# each, caption by caption. The three scales saw the *same* captions from the *same* starting
# noise, so their outcomes are **paired**. To compare two scales, the captions that both got right
# (or both wrong) say nothing about which is better; only the discordant ones do. If the two scales
# were equally good, each discordant caption would be a fair coin's toss, and the split would be
# binomial with p = 1/2: the **sign test** asks how often a split at least this uneven happens by
# chance (two-sided). This uses the pairing; two separate Wilson intervals ignore it, and are
# wider than they need to be for a difference.

# %%
with open(GUIDANCE_CSV, newline="") as f:
    guidance_rows = list(csv.DictReader(f))
captions_at = {s: [r["caption"] for r in guidance_rows if float(r["cfg"]) == s] for s in SCALES}
right_at = {s: np.array([r["right"] == "1" for r in guidance_rows if float(r["cfg"]) == s]) for s in SCALES}
same_captions = all(captions_at[s] == captions_at[SCALES[0]] for s in SCALES)
committed = {s: Share.of(right) for s, right in right_at.items()}
print(f"{GUIDANCE_CSV.name}: shape, colour and background right (the same {committed[1.0].n} captions at "
      f"each scale: {same_captions})")
for s, share in committed.items():
    print(f"  guidance {s:3.1f}: {share} ({share.hits} of {share.n})")


def sign_test(a, b):
    """Paired outcomes a, b (bool per caption): right at a only, at b only, two-sided exact p of the split."""
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    return only_a, only_b, (min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0)


paired = {(a, b): sign_test(right_at[a], right_at[b]) for a, b in ((4.0, 1.0), (4.0, 7.5), (7.5, 1.0))}
for (a, b), (only_a, only_b, p) in paired.items():
    apart = committed[a].interval[0] > committed[b].interval[1] or \
        committed[b].interval[0] > committed[a].interval[1]
    print(f"  {a} against {b}: right only at {a} {only_a:2d}, only at {b} {only_b:2d}; sign test p = {p:.1g}; "
          f"intervals {'apart' if apart else 'overlap'}")
live_agrees = all(following[s].interval[0] <= committed[s].interval[1] and
                  committed[s].interval[0] <= following[s].interval[1] for s in SCALES)
print(f"step 5's {N_PROMPTS} captions agree with these (intervals overlap at every scale): {live_agrees}")

# %% [markdown]
# What the committed counts say (printed above; the check asserts each statement):
# - **guidance helps**: guidance 4 gets shape, colour and background right more often than
#   guidance 1 (the conditional model alone), and so does 7.5. The Wilson intervals are apart, and
#   the paired count is lopsided: of the captions that only one of the two scales got right, nearly
#   all went to the guided one (sign test p < 0.001);
# - **7.5 does worse than 4 on this model**: the intervals are apart and every discordant caption
#   went to guidance 4 (p < 0.001). One reading, not tested here: the toy world is tiny and exact,
#   the conditional prediction is already sharp, and a larger scale pushes the sample past it
#   (lesson 07's picture of guidance at 7.5);
# - step 5's smaller live count agrees with the committed one (their intervals overlap at every
#   scale).
#
# So the lessons sample the toy model at **guidance 4** and **25 DDIM steps** (half the cost of 50);
# on real SD 1.x the usual 7.5 and 50 steps stay `sample.py`'s defaults. All of this is one model,
# one seed of noise and these captions: it chooses a setting for the lessons, it says nothing about
# guidance on SD 1.x.

# %% [markdown]
# ## Check

# %%
assert np.array_equal(concept_images, rendered)  # the shipped images are the renderer's
assert mse.max() < 0.02, mse  # the VAE keeps these images (a prototype reached 0.015)
assert min(clean.values()) >= 0.99, clean  # a judge far better than the differences it judges
assert after_vae["all"] >= 0.97, after_vae
assert same_captions and all(share.n == N_FULL for share in committed.values()), committed
for (better, worse), (only_better, only_worse, p) in paired.items():  # 4 > 1, 4 > 7.5, 7.5 > 1
    assert committed[better].interval[0] > committed[worse].interval[1], (better, worse, committed)
    assert only_better > only_worse and p < 1e-3, (better, worse, only_better, only_worse, p)
assert live_agrees, (following, committed)
assert hand_error < 1e-12, hand_error
assert cover["Wilson"] > 0.92 and cover["normal"] < cover["Wilson"], cover
print(f"check passed: the oracle reads {100 * clean['all']:.1f}% of fresh renders whole and "
      f"{100 * after_vae['all']:.1f}% after the VAE;\n  the VAE keeps the five images "
      f"(MSE <= {mse.max():.4f});\n  guidance 4 follows {100 * committed[4.0].value:.1f}% of {N_FULL} "
      f"captions (1: {100 * committed[1.0].value:.1f}%, 7.5: {100 * committed[7.5].value:.1f}%), paired "
      f"differences p < 0.001;\n  Wilson by hand = wilson_interval, covering "
      f"{100 * cover['Wilson']:.1f}% ({time.time() - start_time:.0f} s)")

# %% [markdown]
# ## Exercises
#
# 1. Which attribute does the oracle misread most after a *harsher* round trip: average-pool the
#    fresh renders by 4 and upsample back (`minti.toy.oracle.down_up(x, 4)`), then measure.
# 2. How many samples does it take to tell 70% from 80% apart, i.e. for their 95% Wilson intervals
#    not to overlap? Find the smallest n with `wilson_interval`.
# 3. Encode a concept image, add a little noise to the latent (std 0.1, 0.3, 1.0 in units of the
#    latent's own std) and decode: which attribute goes first?
