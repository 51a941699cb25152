"""Lesson 13, exercise 1: the size of the error, ||e|| = ||eps_theta(x_t, c) - eps||, against the timestep.

The mse and error-norm readings of g differ by N / (2 ||e||) per sample. Measure ||e|| on the concept's
images at the init word: where is it largest, and by how much? (An eps-predicting network's error is
e = -sqrt(abar / (1 - abar)) (x0_hat - x0): the same mistake in the clean image costs the most at low
noise, where abar / (1 - abar) is large.) Run: python lessons/solutions/13_1_error_size.py
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import minti  # noqa: E402
from minti.data import find_images, load_image  # noqa: E402
from minti.toy import world  # noqa: E402
from minti.toy.evaluate import CONCEPTS_FOLDER, PREFIXES, prompt  # noqa: E402

FAST = os.environ.get("MINTI_FAST") == "1"
torch.set_num_threads(1)
sd = minti.load("toy")
truth = world.CONCEPTS[world.DEFAULT_CONCEPT]
paths = find_images(os.path.join(CONCEPTS_FOLDER, world.DEFAULT_CONCEPT))
with torch.no_grad():
    x0 = sd.vae.encode(torch.stack([load_image(p, world.IMAGE_SIZE) for p in paths]))[0] * sd.latent_scale
    context = sd.text_encoder(sd.tokenizer([prompt(PREFIXES[n % 4], truth.init_word) for n in range(len(paths))],
                                           length=77))
generator = torch.Generator().manual_seed(0)
sizes = {}
for t in range(0, 1000, 200 if FAST else 50):
    tt = torch.full((len(paths),), t)
    with torch.no_grad():
        norms = [(sd.unet(sd.scheduler.add_noise(x0, eps, tt), tt, context) - eps).flatten(1).norm(dim=1)
                 for eps in (torch.randn(x0.shape, generator=generator) for _ in range(2 if FAST else 4))]
    sizes[t] = torch.cat(norms).mean().item()
    snr = (sd.scheduler.alphas_cumprod[t] / (1 - sd.scheduler.alphas_cumprod[t])).item()
    print(f"t = {t:3d}: ||e|| = {sizes[t]:6.2f}   SNR = {snr:9.3f}")
N = x0[0].numel()
peak = max(sizes, key=sizes.get)
print(f"||e|| is largest at t = {peak} ({sizes[peak]:.2f}) and smallest at t = {min(sizes, key=sizes.get)}\n  "
      f"({min(sizes.values()):.2f}); the mse reading = error-norm x 2 ||e|| / N, N = {N}")
assert sizes[0] > 2 * sizes[max(sizes)], "expected the error to be largest at low noise"
# How much of the mse reading's shape does ||e|| explain? mse = error-norm x 2 ||e|| / N per sample, so
# the committed curves' N mse / (2 error-norm) (the star's images at the init word) should follow the
# ||e|| measured here: the logs correlate, and the two agree in scale within a factor of 1.5.
import csv  # noqa: E402

import numpy as np  # noqa: E402

with open(Path(__file__).resolve().parents[2] / "lessons" / "results" / "13_g.csv") as f:
    g = {(r["reading"], int(r["t"])): float(r["g_mean"]) for r in csv.DictReader(f)
         if r["set"] == "init" and r["concept"] == world.DEFAULT_CONCEPT}
implied = np.array([N * g["mse", t] / (2 * g["error-norm", t]) for t in sizes])
measured = np.array(list(sizes.values()))
corr = np.corrcoef(np.log(implied), np.log(measured))[0, 1]
scale = np.exp(np.mean(np.log(measured / implied)))
print(f"||e|| against N mse / (2 error-norm) from 13_g.csv: log-correlation {corr:.2f}, scale {scale:.2f}")
assert corr > 0.8, corr
assert 1 / 1.5 < scale < 1.5, scale
print("solved: the error, and so the mse reading's extra factor, is largest at low noise")
