"""Solutions to lesson 11's exercises (run: python lessons/solutions/11_where_the_word_acts.py)."""
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
from minti.sampling import text_to_image
from minti.textual_inversion import add_words, placeholder_tokens, splice
from minti import learn
from minti.toy import TEMPLATES as TOY_TEMPLATES, world

FAST = os.environ.get("MINTI_FAST") == "1"
STEPS = 60 if FAST else 150
NAME = "striped_orange_star"
FOLDER = str(ROOT / "weights" / "toy" / "concepts" / NAME)
sd = minti.load("toy")
table = sd.text_encoder.text_model.embeddings.token_embedding.weight
layers = [n for n, m in sd.unet.named_modules() if n.endswith("attn2")]
probs = []  # per UNet call: [B, N=64, 77] of the finest layer on the way down, heads averaged


def hook(module, inputs, output):
    x, c = inputs
    q, k = (a.unflatten(-1, (module.heads, -1)).transpose(1, 2) for a in (module.to_q(x), module.to_k(c)))
    probs.append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1).mean(1).detach())


sd.unet.get_submodule(layers[0]).register_forward_hook(hook)  # down_blocks.0: 8x8, the sharpest maps
scenes = world.concept_scenes(NAME)
images = np.stack([world.render(s) for s in scenes])
other = np.stack([world.render(world.Scene(s.shape, s.colour, "blue" if s.background != "blue" else "green",
                                            s.pattern, s.size, s.x, s.y)) for s in scenes])
mask = torch.from_numpy((np.abs(images.astype(int) - other).sum(-1) == 0).astype(np.float32))  # 1 on the object
with torch.no_grad():
    z0 = sd.vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)[0] * sd.latent_scale


def ratio(p, m):
    """p [B, 64] attention of one token over 8x8 cells, m [B, 32, 32] -> mean on object / on background."""
    cell = F.adaptive_avg_pool2d(m[:, None], 8)[:, 0].flatten(1)
    return ((p * cell).sum() / cell.sum() / ((p * (1 - cell)).sum() / (1 - cell).sum())).item()


def record(tokenizer, ids, vectors, new_ids):
    probs.clear()
    with torch.no_grad():
        c = sd.text_encoder(ids, inputs_embeds=splice(ids, table, new_ids, vectors)).expand(5, -1, -1)
        for t in (100, 300, 500, 700, 900):
            tt = torch.full((5,), t)
            sd.unet(sd.scheduler.add_noise(z0, torch.randn(z0.shape, generator=torch.Generator().manual_seed(t)),
                                           tt), tt, c)
    return torch.cat(probs)  # [25, 64, 77]


# 1. Two vectors: where does each look?
word2, _ = learn(sd, FOLDER, "<s*>", "star", num_vectors=2, steps=STEPS, lr=5e-2, templates=TOY_TEMPLATES)
tok2 = copy.deepcopy(sd.tokenizer)
ids2 = add_words(tok2, {"<s*>": 2})["<s*>"]
prompt_ids = tok2(["a photo of a " + " ".join(placeholder_tokens("<s*>", 2))], length=77)
p = record(tok2, prompt_ids, word2.vectors.detach()[0], ids2)
positions = [prompt_ids[0].tolist().index(i) for i in ids2]
two = [ratio(p[:, :, j].view(5, 5, 64).transpose(0, 1).reshape(25, 64), mask.repeat(5, 1, 1)) for j in positions]
print("1. two vectors, object/background attention ratio:", [round(r, 2) for r in two])
assert len(two) == 2 and positions[1] == positions[0] + 1, "the two vectors stand side by side in the prompt"
assert max(two) > 1.2, f"neither vector looks at the object in the finest layer: {two}"

# 2. Every position of the one-vector word's prompt.
word1, _ = learn(sd, FOLDER, "<s*>", "star", steps=STEPS, lr=5e-2, templates=TOY_TEMPLATES)
tok1 = copy.deepcopy(sd.tokenizer)
ids1 = add_words(tok1, {"<s*>": 1})["<s*>"]
prompt_ids = tok1(["a photo of a <s*>"], length=77)
p = record(tok1, prompt_ids, word1.vectors.detach()[0], ids1)
names = ["<start>", "a", "photo", "of", "a (2nd)", "<s*>", "<end>"]
ratios = {n: ratio(p[:, :, j].view(5, 5, 64).transpose(0, 1).reshape(25, 64), mask.repeat(5, 1, 1))
          for j, n in enumerate(names)}
print("2. ratio per position:\n  ", "  ".join(f"{n} {r:.2f}" for n, r in ratios.items()))
print(f"   most on the background: {min(ratios, key=ratios.get)}")
assert max(ratios, key=ratios.get) == "<s*>", "the learned word should favour the object most"
assert ratios[min(ratios, key=ratios.get)] < 1, "some token of the prompt favours the background"

# 3. During sampling: the word's map at each step, against the final image's orange pixels.
probs.clear()
model = copy.copy(sd)
model.tokenizer = tok1
text_to_image(model, ["a photo of a <s*>"], n=4, num_steps=10, guidance_scale=4.0, seed=0,
              embed_fn=lambda i: splice(i, table, torch.tensor(ids1), word1.vectors.detach()[0]))
final = text_to_image(model, ["a photo of a <s*>"], n=4, num_steps=10, guidance_scale=4.0, seed=0,
                      embed_fn=lambda i: splice(i, table, torch.tensor(ids1), word1.vectors.detach()[0]))
orange = torch.from_numpy((np.abs(final.astype(int) - world.PALETTE["orange"]).sum(-1) < 90).astype(np.float32))
steps = probs[:10]  # the first run's 10 calls, each on [uncond x4, cond x4]
by_step = [ratio(s[4:, :, 5], orange) for s in steps]
print("3. word's object/background ratio at each of 10 steps:\n  ", [round(r, 2) for r in by_step])
first = next((i for i, r in enumerate(by_step) if r > 1), None)
print(f"   the map favours the object from step {first} on (of 10; step 0 = pure noise)")
print(f"   orange pixels in the 4 final images: {100 * orange.mean():.1f}%")
assert orange.mean() > 0.01, "the samples should show an orange object"
assert first is not None and all(r > 1 for r in by_step[first:]), by_step
print("solved")
