"""Solutions to lesson 10's exercises (run: python lessons/solutions/10_reconstruction_editability.py).

Exercise 3's answer can be checked on your own samples: `check_background(images)` (uint8 [N, 32, 32, 3]).
"""
import collections
import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import minti
from minti import learn
from minti.io.concepts import Concept
from minti.toy import TEMPLATES as TOY_TEMPLATES, world
from minti.toy.evaluate import PREFIXES, Edit, concept_sampler, cycle, read_attributes
from minti.toy.oracle import Oracle

FAST = os.environ.get("MINTI_FAST") == "1"
NAME = "striped_orange_star"
FOLDER = str(ROOT / "weights" / "toy" / "concepts" / NAME)
GRID = dict(steps=200, batch=16, seed=0, templates=TOY_TEMPLATES)  # lesson 10's grid settings
sd, oracle = minti.load("toy"), Oracle.load()
table = sd.text_encoder.text_model.embeddings.token_embedding.weight
star = table[sd.tokenizer.encode("star")[1]].detach()
with open(ROOT / "lessons" / "results" / "10_tradeoff.csv", newline="") as f:
    committed = {r["word"]: r for r in csv.DictReader(f)}

def largest_ratio(k, b1=0.9, b2=0.999):
    """Lesson 09's Cauchy-Schwarz bound on |m_hat| / sqrt(s_hat) at AdamW's step k, for any gradients."""
    w = np.array([(1 - b1) * b1 ** (k - i) for i in range(1, k + 1)])
    u = np.array([(1 - b2) * b2 ** (k - i) for i in range(1, k + 1)])
    return float(np.sqrt((w * w / u).sum()) * np.sqrt(1 - b2 ** k) / (1 - b1 ** k))


# 1. The L2 regulariser toward "star" as a proximal step after each AdamW step.
STEPS1 = 25 if FAST else 40
distance = {}
for lam in ((0.0, 2.0) if FAST else (0.0, 0.5, 2.0)):
    def pull_back(step, word, loss, lam=lam, lr=5e-2):
        with torch.no_grad():
            word.vectors.copy_(star + (word.vectors - star) / (1 + 2 * lr * lam))
    word, _ = learn(sd, FOLDER, "<s*>", "star", steps=STEPS1, lr=5e-2, batch=16, seed=0, templates=TOY_TEMPLATES,
                    callback=pull_back)
    distance[lam] = (word.vectors[0, 0] - star).norm().item()
    print(f"1. lambda {lam}: |v - v_star| after {STEPS1} steps = {distance[lam]:.2f}")
lams = sorted(distance)
assert all(distance[a] > distance[b] for a, b in zip(lams, lams[1:])), distance  # a stronger pull, a shorter word
# Why it must: an AdamW step moves the word by at most s = lr * sqrt(64) * B (B: lesson 09's bound on
# |m_hat| / sqrt(s_hat) in these steps) plus the decay, and the pull then divides the distance by
# 1 + c, c = 2 lr lambda. So d <= (d + s) / (1 + c) at every step: d never passes s / c.
B = max(largest_ratio(k) for k in range(1, STEPS1 + 1))
s = 5e-2 * 8 * B + 5e-2 * 1e-2 * 30  # + the decay, lr * 0.01 * |v| with |v| < 30
print(f"   the bound s / c at lambda 2: {s / (2 * 5e-2 * 2.0):.2f} (B = {B:.2f})")
assert distance[2.0] <= s / (2 * 5e-2 * 2.0), distance

# 2. lr 0.005 for 300 steps: the distance grows about linearly (Adam moves each coordinate ~lr per step).
STEPS2 = 60 if FAST else 300
drift = {}
learn(sd, FOLDER, "<s*>", "star", steps=STEPS2, lr=5e-3, batch=16, seed=0, templates=TOY_TEMPLATES,
      callback=lambda step, word, loss: drift.__setitem__(step, (word.vectors[0, 0] - star).norm().item()))
marks = [STEPS2 // 3, 2 * STEPS2 // 3, STEPS2]
fast_word = float(committed["S* lr=0.05 x1"]["drift"])  # lr 0.05, 200 steps, from the committed grid
print(f"2. lr 0.005: |v - v_star| at steps {', '.join(f'{s}: {drift[s]:.2f}' for s in marks)} "
      f"(lr 0.05 after 200: {fast_word:.2f})")
assert drift[marks[0]] < drift[marks[1]] < drift[marks[2]], drift  # it grows steadily
assert drift[STEPS2] < fast_word, (drift[STEPS2], fast_word)  # 1.5x the steps at lr/10 travels less far
if not FAST:  # the first 200 steps are the grid's lr 0.005 word: the same distance
    grid_slow = float(committed["S* lr=0.005 x1"]["drift"])
    print(f"   at step 200: {drift[200]:.4f}, the grid's lr 0.005 word: {grid_slow:.4f}")
    assert abs(drift[200] - grid_slow) < 1e-2


# 3. The 4-vector word at lr 0.05, the grid's settings: what do "on a green background" samples show?
def check_background(images, truth=world.CONCEPTS[NAME]):
    """The oracle's backgrounds of "on a green background" samples: asserts that the edit fails in some
    samples and that most failures draw a background of the training images. Returns the counts."""
    counts = collections.Counter(str(b) for b in read_attributes(oracle, images)["background"])
    failed = len(images) - counts["green"]
    kept = sum(counts[b] for b in truth.image_backgrounds)
    assert failed > 0, counts  # the 4-vector word does not always take the edit
    assert kept >= 0.75 * failed, counts  # and where it does not, a training background comes back
    return counts, failed, kept


word, _ = learn(sd, FOLDER, "<s*>", "star", num_vectors=4, lr=5e-2, **GRID)
concept = Concept("<s*>", word.vectors.detach()[0])
green = Edit("background", "green")
prompts = cycle([green.prompt(p, "<s*>") for p in PREFIXES], 64)  # as evaluate_concept asks, 64 samples
images = concept_sampler(sd, concept, steps=25, cfg=4.0)(prompts, 0)
counts, failed, kept = check_background(images)
print(f"3. 4 vectors, lr 0.05, {GRID['steps']} steps, 'on a green background':\n"
      f"   backgrounds read {dict(counts)}; {failed} of 64 not green,\n   {kept} of them a training "
      f"image's background ({'/'.join(world.CONCEPTS[NAME].image_backgrounds)}):\n   the word learned its "
      "images' backgrounds")
print("solved")
