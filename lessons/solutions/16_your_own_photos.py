"""Solutions to lesson 16's exercises (run: python lessons/solutions/16_your_own_photos.py).

1. Five images all on black: does the learned word keep the black when asked for green? Against the
   shipped images (white, gray, black), sample by sample from the same noise.
2. Two vectors instead of one, the shipped images: does the edit suffer?
3. The AUTOMATIC1111 file written by hand with torch.save, read back by load_concepts; its keys are the
   ones minti's save_a1111 writes.
Every word is learned on the toy templates (the toy model cannot read the paper's 81 object prompts).
"""
import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
argparse.ArgumentParser(description="Lesson 16's exercises, solved (MINTI_FAST=1: 80 steps, 16 samples)."
                        ).parse_known_args()

import minti  # noqa: E402
from minti import learn  # noqa: E402
from minti.io.concepts import Concept, load_concepts, save_a1111  # noqa: E402
from minti.toy import TEMPLATES, world  # noqa: E402
from minti.toy.evaluate import Share, concept_sampler, read_attributes  # noqa: E402
from minti.toy.oracle import Oracle  # noqa: E402

FAST = os.environ.get("MINTI_FAST") == "1"
STEPS, N = (80, 16) if FAST else (200, 32)
torch.set_num_threads(1)
sd, oracle = minti.load("toy"), Oracle.load()
truth = world.CONCEPTS["striped_orange_star"]
SHIPPED = str(ROOT / "weights" / "toy" / "concepts" / "striped_orange_star")
rng = np.random.default_rng(0)


def not_green(folder, vectors=1):
    """Learn a word from a folder (lesson 16's toy settings); for each of N samples of "a photo of a S on a
    green background" (seed 0: the same noise for every word), whether its background is not green."""
    word, _ = learn(sd, folder, "<s*>", "star", num_vectors=vectors, steps=STEPS, lr=5e-2, templates=TEMPLATES)
    assert word.vectors.shape[-2] == vectors, word.vectors.shape
    images = concept_sampler(sd, Concept("<s*>", word.vectors.detach()[0]), steps=25, cfg=4.0)(
        ["a photo of a <s*> on a green background"] * N, 0)
    return read_attributes(oracle, images)["background"] != "green"


def compare(a, b, name_a, name_b):
    """Sample by sample (same noise): where only a fails, where only b fails; lesson 08's sign test."""
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n = only_a + only_b
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n) if n else 1.0
    verdict = (f"{name_a if only_a > only_b else name_b} fails more" if p < 0.05 else "the data cannot decide")
    return f"only {name_a} not green: {only_a}, only {name_b}: {only_b}; sign test p = {p:.2g}: {verdict}"


# 1. Five images, all on black: the one thing they share besides the star is the background.
with tempfile.TemporaryDirectory() as folder:
    limit = world.max_offset("large")
    renders = [world.render(truth.scene("black", x=float(x), y=float(y)))
               for x, y in rng.uniform(-limit, limit, (5, 2))]
    for i, image in enumerate(renders):
        Image.fromarray(image).save(f"{folder}/{i:02d}.png")
    read = read_attributes(oracle, np.stack(renders))
    assert (read["background"] == "black").all() and (read["shape"] == truth.shape).all(), read
    all_black = not_green(folder)
varied = not_green(SHIPPED)
print(f"1. 'on a green background' not green: images all on black {Share.of(all_black)};\n"
      f"   shipped images (white, gray, black) {Share.of(varied)}\n   {compare(all_black, varied, 'black', 'shipped')}")

# 2. Two vectors, the shipped images.
two = not_green(SHIPPED, vectors=2)
print(f"2. two vectors: not green in {Share.of(two)}\n   {compare(two, varied, 'two vectors', 'one vector')}")

# 3. The AUTOMATIC1111 file by hand: a pickle of this dict, read back by load_concepts.
vectors = torch.randn(1, 64)
with tempfile.TemporaryDirectory() as folder:
    path, library = Path(folder) / "by-hand.pt", Path(folder) / "library.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "by-hand",
                "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    back = load_concepts(path)[0]
    save_a1111(library, Concept("by-hand", vectors))
    keys = [set(torch.load(p, weights_only=True)) for p in (path, library)]
print(f"3. read back: token {back.token!r}, vectors {tuple(back.vectors.shape)}, equal: "
      f"{torch.equal(back.vectors.reshape(1, 64), vectors)}; keys as save_a1111's: {keys[0] == keys[1]}")
assert torch.equal(back.vectors.reshape(1, 64), vectors)
assert keys[0] == keys[1], keys
print("solved")
