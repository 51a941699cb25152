"""Solutions to lesson 10's exercises (run: python lessons/solutions/10_reconstruction_editability.py)."""
import collections
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import minti
from minti.io.concepts import Concept
from minti import learn
from minti.toy.evaluate import concept_sampler, read_attributes
from minti.toy.oracle import Oracle

FAST = os.environ.get("MINTI_FAST") == "1"
FOLDER = str(ROOT / "weights" / "toy" / "concepts" / "striped_orange_star")
sd = minti.load("toy")
table = sd.text_encoder.text_model.embeddings.token_embedding.weight
star = table[sd.tokenizer.encode("star")[1]].detach()

# 1. The L2 regulariser toward "star" as a proximal step after each AdamW step.
STEPS1 = 25 if FAST else 100
for lam in ((0.0, 2.0) if FAST else (0.0, 0.5, 2.0)):
    def pull_back(step, word, loss, lam=lam, lr=5e-2):
        with torch.no_grad():
            word.vectors.copy_(star + (word.vectors - star) / (1 + 2 * lr * lam))
    word, _ = learn(sd, FOLDER, "<s*>", "star", steps=STEPS1, lr=5e-2, callback=pull_back)
    print(f"1. lambda {lam}: |v - v_star| after {STEPS1} steps = {(word.vectors[0, 0] - star).norm():.2f}")

# 2. lr 0.005 for 3x the steps: the distance grows about linearly (Adam moves each coordinate ~lr per step).
STEPS2 = 60 if FAST else 600
drift = {}
learn(sd, FOLDER, "<s*>", "star", steps=STEPS2, lr=5e-3,
      callback=lambda step, word, loss: drift.__setitem__(step, (word.vectors[0, 0] - star).norm().item()))
marks = [STEPS2 // 3, 2 * STEPS2 // 3, STEPS2]
print("2. lr 0.005: |v - v_star| at steps", {s: round(drift[s], 2) for s in marks}, "(lr 0.05 in 200: 11.2)")
assert drift[marks[0]] < drift[marks[1]] < drift[marks[2]]

# 3. The 4-vector word at lr 0.05: what do "on a green background" samples show?
STEPS3, N = (60, 16) if FAST else (200, 32)
word, _ = learn(sd, FOLDER, "<s*>", "star", num_vectors=4, steps=STEPS3, lr=5e-2)
concept = Concept("<s*>", word.vectors.detach()[0])
images = concept_sampler(sd, concept, steps=25, cfg=4.0)(["a photo of a <s*> on a green background"] * N, 0)
backgrounds = collections.Counter(str(b) for b in read_attributes(Oracle.load(), images)["background"])
kept = sum(n for b, n in backgrounds.items() if b in ("white", "gray", "black"))
print(f"3. 4 vectors, {STEPS3} steps, 'on a green background': backgrounds read {dict(backgrounds)};")
print(f"   {kept} of {N} kept a training image's background (more of them the longer it learns)")
print("solved")
