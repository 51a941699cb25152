"""Solutions to lesson 12's exercises (run: python lessons/solutions/12_multiresolution.py)."""
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import minti
from minti.io.concepts import load_concepts
from minti.data import load_image
from minti.io.prompt_syntax import PromptWords
from minti.sampling import text_to_image
from minti.textual_inversion import LearnedWord, splice, train_step
from minti.toy import world
from minti.toy.evaluate import Share, read_attributes
from minti.toy.oracle import Oracle

FAST = os.environ.get("MINTI_FAST") == "1"
N, T, LR, WD = (16 if FAST else 32), 10, 5e-2, 1e-2
sd, oracle = minti.load("toy"), Oracle.load()
truth = world.CONCEPTS["striped_orange_star"]
table = sd.text_encoder.text_model.embeddings.token_embedding.weight

# 1. All six samples in bucket 4: only bucket 4 gets a gradient; AdamW's decay shrinks the rest by 1 - lr*wd.
tokenizer = copy.deepcopy(sd.tokenizer)
slot = tokenizer.add_tokens(["<s>"])[0]
folder = ROOT / "weights" / "toy" / "concepts" / "striped_orange_star"
pixels = torch.stack([load_image(str(p), 32) for p in sorted(folder.glob("*.png"))][:3] * 2)
with torch.no_grad():
    z0 = sd.vae.encode(pixels)[0] * sd.latent_scale
taus = torch.tensor([400, 420, 450, 470, 490, 499])
start = table[tokenizer.encode("star")[1]].detach()[None, None].repeat(T, 1, 1)
word = LearnedWord(start, [slot])
opt = torch.optim.AdamW([word.vectors], lr=LR, weight_decay=WD)
batch = (tokenizer(["a photo of a <s>"] * 6, length=77), z0, taus, torch.randn(z0.shape))
train_step(sd.text_encoder, sd.unet, sd.scheduler, word, opt, [batch])
has_grad = [k for k in range(T) if word.vectors.grad[k].abs().sum() > 0]
ratio = (word.vectors.detach()[0].norm() / start[0].norm()).item()
print(f"1. buckets with a gradient: {has_grad}; bucket 0 shrank by {ratio:.6f} (1 - lr*wd = {1 - LR * WD})")
assert has_grad == [4], f"only bucket 4 should get a gradient: {has_grad}"
assert abs(ratio - (1 - LR * WD)) < 1e-6, f"an empty bucket shrinks by exactly 1 - lr * wd: {ratio}"

# 2. A linear interpolation between bucket centres (the exercise's idea, not the paper's), against the buckets.
concept = load_concepts(ROOT / "lessons" / "results" / "12_multires_word.safetensors")[0]
v = concept.vectors[:, 0]  # [T, D]
new_id = tokenizer.add_tokens(["<mr>"])[0]
ids = tokenizer(["a photo of a <mr>"], length=77)
empty = sd.text_encoder(tokenizer([""], length=77)).detach().expand(N, -1, -1)


def vector_at(t, interpolate):
    if not interpolate:
        return v[min(int(t * T), T - 1)]
    x = min(max(t * T - 0.5, 0.0), T - 1.0)  # position between the centres (k + 0.5) / T
    k = min(int(x), T - 2)
    return (1 - (x - k)) * v[k] + (x - k) * v[k + 1]


def intact(cond, prompt="a photo of a <mr>"):
    images = text_to_image(sd, [prompt], cond=cond, uncond=empty, num_steps=25, guidance_scale=4.0, seed=0, n=N)
    read = read_attributes(oracle, images)
    return Share.of(np.logical_and.reduce([read[a] == getattr(truth, a) for a in ("shape", "colour", "pattern")]))


# At a bucket's centre the interpolation is the bucket itself; halfway between two centres, their mean.
assert all(torch.allclose(vector_at((k + 0.5) / T, True), v[k]) for k in range(T))
assert torch.allclose(vector_at(0.3, True), (v[2] + v[3]) / 2, atol=1e-6)
shares = {}
for interpolate in (False, True):
    @torch.no_grad()
    def cond(timestep, interpolate=interpolate):
        vec = vector_at(int(timestep) / 1000, interpolate)
        return sd.text_encoder(ids, inputs_embeds=splice(ids, table, [new_id], vec[None])).expand(N, -1, -1)
    shares[interpolate] = intact(cond)
    print(f"2. <S> with {'interpolated' if interpolate else 'bucket'} vectors: intact {shares[interpolate]}")
committed = Share(51, 64)  # lesson 12's bare <S>, 64 samples: 80%
lo, hi = shares[False].interval
assert lo <= committed.interval[1] and committed.interval[0] <= hi, "the bucket version disagrees with the lesson"

# 3. <S(0.7)>: the word cut out or a zero vector below 0.7.
words = PromptWords(concept, copy.deepcopy(sd.tokenizer), sd.text_encoder)
prompt = "a photo of a <star-mr(0.7)>"
semi = {}
for drop in ("remove", "zero"):
    semi[drop] = intact(words.conditioning([prompt], n=N, drop=drop), prompt)
    print(f"3. {prompt}, drop={drop!r}: intact {semi[drop]}")
print("   (committed, 64 samples: 6% with remove)")
# Silent for 70% of the steps, the word loses the concept however "nothing" is spelled: both readings
# lie wholly below the bare <S>'s interval.
assert all(s.interval[1] < committed.interval[0] for s in semi.values()), semi
print("solved")
