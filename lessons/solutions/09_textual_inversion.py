"""Solutions to lesson 09's exercises (run: python lessons/solutions/09_textual_inversion.py)."""
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import minti
from minti.io.concepts import Concept
from minti import learn
from minti.toy import world
from minti.toy.evaluate import Share, concept_sampler, read_attributes
from minti.toy.oracle import Oracle

FAST = os.environ.get("MINTI_FAST") == "1"
STEPS, N = (60, 16) if FAST else (100, 32)
sd, oracle = minti.load("toy"), Oracle.load()


def reconstruction(name, init, steps=STEPS):
    """Learn a word for a toy concept and count how many of N "a photo of a <s*>" samples show it whole."""
    truth = world.CONCEPTS[name]
    word, _ = learn(sd, str(ROOT / "weights" / "toy" / "concepts" / name), "<s*>", init, steps=steps, lr=5e-2)
    concept = Concept("<s*>", word.vectors.detach()[0])
    images = concept_sampler(sd, concept, steps=25, cfg=4.0)(["a photo of a <s*>"] * N, 0)
    read = read_attributes(oracle, images)
    return Share.of(np.logical_and.reduce([read[a] == getattr(truth, a) for a in ("shape", "colour", "pattern")]))


# 1. From "shape", the captions' word for "no particular shape": the word must find the star itself.
from_shape = reconstruction("striped_orange_star", "shape")
print(f"1. init 'shape', {STEPS} steps: the striped orange star in {from_shape} of {N} samples")

# 2. AdamW by hand, one step, against torch.optim.AdamW.
g = torch.Generator().manual_seed(0)
v0, grad = torch.randn(64, generator=g), torch.randn(64, generator=g)
lr, b1, b2, eps, wd = 0.05, 0.9, 0.999, 1e-8, 0.01
v = v0.clone().requires_grad_()
opt = torch.optim.AdamW([v], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
v.grad = grad.clone()
opt.step()
m_hat, s_hat = (1 - b1) * grad / (1 - b1), (1 - b2) * grad ** 2 / (1 - b2)
by_hand = v0 * (1 - lr * wd) - lr * m_hat / (s_hat.sqrt() + eps)  # torch applies the decay first
error = (by_hand - v.detach()).abs().max().item()
print(f"2. AdamW by hand vs torch: max |difference| {error:.1e} (bit-identical: {error == 0};\n"
      "   torch orders the same operations differently, so the last bit may differ)")
assert error < 1e-6

# 3. A held-out concept: no caption ever named "outlined yellow circle" whole.
held_out = reconstruction("outlined_yellow_circle", "circle")
print(f"3. outlined yellow circle (held out), init 'circle': {held_out} of {N} samples")
print("   (the default concept, lesson 09: about 70%; a held-out one is usually harder)")
print("solved")
