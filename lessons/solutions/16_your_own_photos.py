"""Solutions to lesson 16's exercises (run: python lessons/solutions/16_your_own_photos.py)."""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import minti
from minti.io.concepts import Concept, load_concepts
from minti import learn
from minti.toy import world
from minti.toy.evaluate import Share, concept_sampler, read_attributes
from minti.toy.oracle import Oracle

FAST = os.environ.get("MINTI_FAST") == "1"
STEPS, N = (80, 16) if FAST else (200, 32)
sd, oracle = minti.load("toy"), Oracle.load()
truth = world.CONCEPTS["striped_orange_star"]
rng = np.random.default_rng(0)


def kept_background(folder, vectors=1):
    """Learn a word from a folder; the share of "... on a green background" samples that are not green."""
    word, _ = learn(sd, folder, "<s*>", "star", num_vectors=vectors, steps=STEPS, lr=5e-2)
    images = concept_sampler(sd, Concept("<s*>", word.vectors.detach()[0]), steps=25, cfg=4.0)(
        ["a photo of a <s*> on a green background"] * N, 0)
    return Share.of(read_attributes(oracle, images)["background"] != "green")


# 1. Five images, all on black: the one thing they share besides the star is the background.
with tempfile.TemporaryDirectory() as folder:
    limit = world.max_offset("large")
    for i in range(5):
        x, y = rng.uniform(-limit, limit, 2)
        Image.fromarray(world.render(truth.scene("black", x=float(x), y=float(y)))).save(f"{folder}/{i:02d}.png")
    all_black = kept_background(folder)
varied = kept_background(str(ROOT / "weights" / "toy" / "concepts" / "striped_orange_star"))
print(f"1. 'on a green background' not green: images all on black {all_black};\n   on white/gray/black {varied}")

# 2. Two vectors, the usual images.
print(f"2. two vectors: not green in {kept_background(str(ROOT / 'weights/toy/concepts/striped_orange_star'), 2)}")

# 3. The AUTOMATIC1111 file by hand: a pickle of this dict, read back by load_concepts.
vectors = torch.randn(1, 64)
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "by-hand.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "by-hand",
                "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    back = load_concepts(path)[0]
print(f"3. read back: token {back.token!r}, vectors {tuple(back.vectors.shape)}, equal: "
      f"{torch.equal(back.vectors.reshape(1, 64), vectors)}")
assert torch.equal(back.vectors.reshape(1, 64), vectors)
print("solved")
