"""Solutions to lesson 15's exercises (the map of a word).

1. Which time range carries the star's colour most, and which the heart's outline? From the committed
   grid (results/15_knockout.csv): the word replaced by its init word in one range at every layer, the
   range whose paired loss is largest, and whether that loss can be told from 0.
   `check(attribute, concept, answer, distinguishable)` checks a learner's own answer.
2. Two cells that must equal plain sampling: the word silenced everywhere is the empty prompt "", and
   the word replaced by its init word everywhere is "a photo of a star" (the same noise): checked live.

Run: python lessons/solutions/15_map_of_a_word.py (about 30 s of CPU).
"""
import argparse
import copy
import csv
import math
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
argparse.ArgumentParser(description="Solutions to lesson 15's exercises.").parse_known_args()

import minti  # noqa: E402
from minti.io.concepts import load_concepts  # noqa: E402
from minti.sampling import encode_prompts  # noqa: E402
from minti.textual_inversion import new_word  # noqa: E402
from minti.toy.evaluate import PREFIXES, ImageSampler, cycle, prompt, wilson_interval  # noqa: E402
from minti.unet import cross_attention_layers  # noqa: E402

RESULTS = HERE.parent / "results"
STAR, HEART, TOKEN = "striped_orange_star", "outlined_pink_heart", "<c>"
RANGES = ("750-999", "500-749", "250-499", "0-249")
torch.set_num_threads(1)

with open(RESULTS / "15_knockout.csv", newline="") as f:
    grid = {(r["concept"], r["replace"], r["times"], r["layers"]): r for r in csv.DictReader(f)}


def bits(row, attribute):
    return np.array([ch == "1" for ch in row[attribute + "_bits"]])


def paired_loss(base, cell):
    """share(base) - share(cell) on paired samples, Newcombe's (1998) method 10 interval (as the lesson)."""
    n = len(base)
    a, b, c = int((base & cell).sum()), int((base & ~cell).sum()), int((~base & cell).sum())
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson_interval(a + b, n), wilson_interval(a + c, n)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(den) if den else 0.0
    low = p1 - p2 - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = p1 - p2 + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return p1 - p2, low, high


# Exercise 1 ---------------------------------------------------------------------------------------
def losses(attribute, concept):
    base = bits(grid[concept, "none", "all", "all"], attribute)
    return {r: paired_loss(base, bits(grid[concept, "init", r, "all"], attribute)) for r in RANGES}


def check(attribute, concept, answer, distinguishable):
    """A learner's answer: the range whose one-range knock-out loses most (e.g. "500-749"), and whether
    that loss's paired 95% interval lies above 0 (True / False)."""
    found = losses(attribute, concept)
    best = max(found, key=lambda r: found[r][0])
    assert answer == best, f"{answer!r}: its loss is {100 * found[answer][0]:.0f} points; {best!r} loses more"
    d, low, high = found[best]
    assert distinguishable == (low > 0), f"the loss at {best}: {100 * d:.0f} [{100 * low:.0f}, {100 * high:.0f}]"
    return found


for attribute, concept in (("colour", STAR), ("pattern", HEART)):
    found = losses(attribute, concept)
    answer = max(found, key=lambda r: found[r][0])
    check(attribute, concept, answer, found[answer][1] > 0)
    print(f"1. {concept} {attribute}, points lost with one range out:\n   " + ", ".join(
        f"{r} {100 * d:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]" for r, (d, lo, hi) in found.items()))
    print(f"   -> most at {answer}, {'above 0' if found[answer][1] > 0 else 'not told from 0'}; the other "
          "three ranges make up for a missing one")
# The data's answer here: neither loss can be told from 0 (the word's effect is spread over time).
assert all(max(losses(a, c).values(), key=lambda x: x[0])[1] <= 0 for a, c in (("colour", STAR), ("pattern", HEART)))


# Exercise 2 ---------------------------------------------------------------------------------------
sd = minti.load("toy")
layers = len(cross_attention_layers(sd.unet))
tokenizer = copy.deepcopy(sd.tokenizer)
word = new_word(tokenizer, TOKEN, load_concepts(RESULTS / f"15_word_{STAR}.safetensors")[0].vectors)
prompts = cycle([prompt(p, TOKEN) for p in PREFIXES], 8)


class Everywhere(ImageSampler):
    """The word's context replaced at every layer and every step by `other(prompts)`."""

    def __init__(self, other):
        super().__init__(sd, word, TOKEN, tokenizer, steps=25, cfg=4.0)
        self.other = other

    def conditioning(self, prompts):
        other = self.other(prompts)
        return lambda t: [other] * layers


te = sd.text_encoder
silenced = Everywhere(lambda ps: encode_prompts(tokenizer, te, [""]).expand(len(ps), -1, -1))(prompts, 0)
empty = ImageSampler(sd, steps=25, cfg=4.0)([""] * len(prompts), 0)
as_init = Everywhere(lambda ps: encode_prompts(tokenizer, te, [p.replace(TOKEN, "star") for p in ps]))(prompts, 0)
star = ImageSampler(sd, steps=25, cfg=4.0)([p.replace(TOKEN, "star") for p in prompts], 0)
d_empty = int(np.abs(silenced.astype(int) - empty).max())
d_star = int(np.abs(as_init.astype(int) - star).max())
print(f"2. silenced everywhere vs the prompt '': max |difference| {d_empty} (of 255);\n   init everywhere "
      f"vs 'a photo of a star': {d_star}")
assert d_empty <= 1 and d_star <= 1, (d_empty, d_star)  # the same images (1: a rounding step at most)
assert np.abs(silenced.astype(int) - as_init).max() > 32  # and the two definitions of "out" differ
print("solved")
