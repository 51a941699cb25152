"""Lesson 13, exercise 2: eq. 5 without the adaptation: draw t in proportion to a measured curve.

Write a timestep sampler (an object with sample(batch_size, generator)) that draws t with probability
proportional to a committed g curve (lessons/results/13_g.csv: the error-norm reading on the learned
set, linearly interpolated between the measured t), check its draws with a chi-square test, and train
with it: learn() takes a sampler object. Compare with uniform's committed reconstruction at that step.
Run: python lessons/solutions/13_2_proportional_sampler.py
"""
import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import minti  # noqa: E402
from minti.io.concepts import Concept  # noqa: E402
from minti import learn  # noqa: E402
from minti.toy import world  # noqa: E402
from minti.toy import TEMPLATES as TOY_TEMPLATES  # noqa: E402
from minti.toy.evaluate import (CONCEPTS_FOLDER, PREFIXES, Share, concept_sampler, prompt,  # noqa: E402
                                read_attributes, score_concept)
from minti.toy.oracle import Oracle  # noqa: E402

FAST = os.environ.get("MINTI_FAST") == "1"
torch.set_num_threads(1)
NAME, STEPS = world.DEFAULT_CONCEPT, 25 if FAST else 100


class CurveTimesteps:
    """t ~ p(t) = g(t) / sum g, g interpolated from a measured curve: the paper's eq. 5, fixed."""

    wants_grad_norms = False

    def __init__(self, ts, g, num_train_timesteps=1000):
        self.p = torch.tensor(np.interp(np.arange(num_train_timesteps), ts, g), dtype=torch.float64)
        self.p /= self.p.sum()

    def sample(self, batch_size, generator=None):
        return torch.multinomial(self.p, batch_size, replacement=True, generator=generator)

    def update(self, t, g):
        pass


with open(ROOT / "lessons" / "results" / "13_g.csv") as f:
    rows = [r for r in csv.DictReader(f) if r["set"] == "learned" and r["reading"] == "error-norm"]
ts = sorted({int(r["t"]) for r in rows})
g = [np.mean([float(r["g_mean"]) for r in rows if int(r["t"]) == t]) for t in ts]
sampler = CurveTimesteps(ts, g)
draws = sampler.sample(20000, torch.Generator().manual_seed(0))
counts = np.bincount(draws.numpy() // 100, minlength=10)
expected = sampler.p.reshape(10, 100).sum(1).numpy() * len(draws)
chi2 = (((counts - expected) ** 2) / expected).sum()
print("share of draws per 100 timesteps:", " ".join(f"{c / len(draws):.3f}" for c in counts))
print(f"chi-square over 10 bins: {chi2:.1f} (9 degrees of freedom; 1e-4 level: 33.7)")
assert chi2 < 33.7, "the draws do not follow the curve"
flat = np.full(10, len(draws) / 10)
chi2_flat = (((counts - flat) ** 2) / flat).sum()
print(f"against a flat curve: chi-square {chi2_flat:.1f}: the draws are {'not ' if chi2_flat > 33.7 else ''}uniform")
assert chi2_flat > 33.7, "the curve should not be flat enough to give uniform draws"

sd, oracle = minti.load("toy"), Oracle.load()
truth = world.CONCEPTS[NAME]
word, _ = learn(sd, os.path.join(CONCEPTS_FOLDER, NAME), "<c>", init=truth.init_word,
               templates=TOY_TEMPLATES, steps=STEPS, batch=16,
                lr=5e-2, timesteps=sampler, seed=0)
sample = concept_sampler(sd, Concept("<c>", word.vectors[0].detach()), steps=25, cfg=4.0)
read = read_attributes(oracle, sample([prompt(PREFIXES[i % 4], "<c>") for i in range(64)], 0))
mine = Share.of(score_concept(read, truth)["intact"])
with open(ROOT / "lessons" / "results" / "13_convergence.csv") as f:
    uniform = next(int(r["hits"]) for r in csv.DictReader(f) if (r["concept"], r["seed"], r["spec"], r["step"],
                   r["measure"]) == (NAME, "0", "uniform", str(STEPS), "reconstruction"))
print(f"after {STEPS} steps: reconstruction {mine} in proportion to g, uniform (committed) {uniform}/64")
# The error-norm curve is nearly flat (lesson 13, step 2), so training with it should land where uniform
# does: this run's 95% interval must overlap the committed uniform run's.
lo, hi = mine.interval
ulo, uhi = Share(uniform, 64).interval
assert lo <= uhi and ulo <= hi, f"in proportion to g: {mine}; uniform: {uniform}/64"
print("solved: the sampler draws in proportion to the curve, and trains about as uniform does")
