"""Solutions to lesson 09's exercises (run: python lessons/solutions/09_textual_inversion.py).

Exercise 2's answer can be checked for your own step function: `check_coupled(my_step)` (see below).
"""
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import minti
from minti import learn
from minti.data import load_image
from minti.io.concepts import Concept
from minti.toy import TEMPLATES as TOY_TEMPLATES, world
from minti.toy.evaluate import Share, concept_sampler, ImageSampler, read_attributes
from minti.toy.oracle import Oracle

FAST = os.environ.get("MINTI_FAST") == "1"
STEPS = 60 if FAST else 100  # learn() steps for exercises 1 and 3
N, LR = 64, 5e-2  # samples per condition (sampling is cheap next to learning); lesson 09's lr
sd, oracle = minti.load("toy"), Oracle.load()


def whole(images, truth):
    """Share of images that the oracle reads as the concept: shape AND colour AND pattern right."""
    read = read_attributes(oracle, images)
    return Share.of(np.logical_and.reduce([read[a] == getattr(truth, a) for a in ("shape", "colour", "pattern")]))


def reconstruction(name, init, steps=STEPS):
    """Learn a word for a toy concept (lesson 09's settings, the toy templates) and count how many of N
    "a photo of a <s*>" samples show it whole, beside "a photo of a <init>" (the word at step 0)."""
    truth = world.CONCEPTS[name]
    word, _ = learn(sd, str(ROOT / "weights" / "toy" / "concepts" / name), "<s*>", init, steps=steps, lr=LR,
                    batch=16, seed=0, templates=TOY_TEMPLATES)
    concept = Concept("<s*>", word.vectors.detach()[0])
    learned = concept_sampler(sd, concept, steps=25, cfg=4.0)(["a photo of a <s*>"] * N, 0)
    start = ImageSampler(sd, steps=25, cfg=4.0)([f"a photo of a {init}"] * N, 0)
    return whole(learned, truth), whole(start, truth)


# 1. From "shape", the captions' word for "no particular shape": the word must find the star itself.
from_shape, shape_only = reconstruction("striped_orange_star", "shape")
print(f"1. init 'shape', {STEPS} steps: the striped orange star in {from_shape} of {N} samples;\n"
      f"   'a photo of a shape' (the word at step 0): {shape_only}")
assert from_shape.interval[0] > shape_only.interval[1], (from_shape, shape_only)  # it found the star


# 2. Adam with an L2 penalty (coupled weight decay): the decay goes into the gradient, through m and s.
def coupled_step(v, g, state, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    (b1, b2), state["k"] = betas, state["k"] + 1
    g = g + weight_decay * v  # coupled: the penalty's gradient joins the loss's
    state["m"] = b1 * state["m"] + (1 - b1) * g
    state["s"] = b2 * state["s"] + (1 - b2) * g * g
    m_hat, s_hat = state["m"] / (1 - b1 ** state["k"]), state["s"] / (1 - b2 ** state["k"])
    v.sub_(lr * m_hat / (s_hat.sqrt() + eps))


def check_coupled(step_fn, v0, g, steps=3):
    """Your step_fn(v, g, state) (state: {"m", "s", "k"}) against torch.optim.Adam(weight_decay=0.01),
    `steps` steps with the same gradient g from v0: returns the max |difference| (asserted < 1e-6)."""
    mine, theirs = v0.clone(), v0.clone().requires_grad_()
    adam = torch.optim.Adam([theirs], lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    state = {"m": torch.zeros_like(v0), "s": torch.zeros_like(v0), "k": 0}
    for _ in range(steps):
        theirs.grad = g.clone()
        adam.step()
        step_fn(mine, g, state)
    error = (mine - theirs.detach()).abs().max().item()
    assert error < 1e-6, f"your step differs from torch.optim.Adam by {error:.1e}"
    return error


# Lesson 09's step-2 gradient: the five images, "a photo of a <s*>", the word at "star".
tokenizer = copy.deepcopy(sd.tokenizer)
placeholder = tokenizer.add_tokens(["<s*>"])[0]
table = sd.text_encoder.text_model.embeddings.token_embedding.weight.detach()
v0 = table[tokenizer.encode("star")[1]].clone()
paths = sorted((ROOT / "weights" / "toy" / "concepts" / "striped_orange_star").glob("*.png"))
pixels = torch.stack([load_image(str(p), 32) for p in paths])
gen = torch.Generator().manual_seed(0)
ids = tokenizer(["a photo of a <s*>"] * len(paths), length=77)
t = torch.randint(0, 1000, (len(paths),), generator=gen)
with torch.no_grad():
    mean, logvar = sd.vae.encode(pixels)
    z0 = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)) * sd.latent_scale
noise = torch.randn(z0.shape, generator=gen)
v = v0.clone().requires_grad_()
is_new = ids == placeholder
context = sd.text_encoder(ids, inputs_embeds=torch.where(is_new[..., None], v, table[ids.masked_fill(is_new, 0)]))
F.mse_loss(sd.unet(sd.scheduler.add_noise(z0, noise, t), t, context), noise).backward()
g = v.grad

error = check_coupled(coupled_step, v0, g)
coupled, state = v0.clone(), {"m": torch.zeros(64), "s": torch.zeros(64), "k": 0}
coupled_step(coupled, g, state)
adamw = v0 * (1 - LR * 1e-2) - LR * torch.sign(g)  # AdamW's first step (lesson 09: m_hat/sqrt(s_hat) = sign(g))
toward_zero = ((coupled - v0).sign() == -v0.sign()).float().mean().item()
follows_gradient = ((adamw - v0 * (1 - LR * 1e-2)).sign() == -g.sign()).float().mean().item()
print(f"2. coupled step by hand = torch.optim.Adam(weight_decay=0.01) within {error:.1e};\n"
      f"   |gradient| median {g.abs().median():.1e} against |0.01 v| median {(1e-2 * v0).abs().median():.1e}:\n"
      f"   the coupled step moves {100 * toward_zero:.0f}% of the coordinates toward 0 (|v| {v0.norm():.2f} -> "
      f"{coupled.norm():.2f}),\n   AdamW's follows -sign(gradient) in {100 * follows_gradient:.0f}% "
      "(its decay is 0.0005 v, apart from the step)")
shrunk = v0 - LR * v0.sign()  # every coordinate moved lr toward 0: the gradient plays no part
assert toward_zero > 0.9 and abs(coupled.norm() - shrunk.norm()) < 0.02, (coupled.norm(), shrunk.norm())
assert follows_gradient == 1.0

# 3. A held-out concept: no caption ever named "outlined yellow circle" whole.
held_out, circle_only = reconstruction("outlined_yellow_circle", "circle")
star_word, _ = reconstruction("striped_orange_star", "star")
apart = held_out.interval[1] < star_word.interval[0]
print(f"3. outlined yellow circle (held out), init 'circle', {STEPS} steps: {held_out};\n"
      f"   'a photo of a circle': {circle_only};\n   the default concept, same settings: {star_word}\n"
      f"   harder? {'yes: the intervals are apart' if apart else 'the intervals overlap: this n cannot decide'}")
assert held_out.interval[0] > circle_only.interval[1], (held_out, circle_only)  # learned, though held out
# "Harder" is a comparison of two shares: only intervals apart answer it (at 60 steps and 64 samples
# they overlapped; lessons/results/24_levers.csv, 2 vectors, has the circle as the slowest concept).
print("solved")
