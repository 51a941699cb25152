"""Solutions to lesson 03's exercises (run: python lessons/solutions/03_attention.py)."""
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from minti.toy import world

# Lesson 03's step 2: pixels' colours as queries, colour words' colours as keys and values.
rgb = world.render(world.Scene("star", "orange", "blue", "plain", "large"))
pixels = (torch.from_numpy(rgb).float() / 127.5 - 1).reshape(-1, 3)  # [1024, 3]
orange = torch.from_numpy(np.abs(rgb.astype(int) - world.PALETTE["orange"]).sum(-1) < 30).flatten()


def maps_for(words, sharpness):
    keys = torch.stack([torch.tensor(world.PALETTE[w]) / 127.5 - 1 if w in world.PALETTE else torch.zeros(3)
                        for w in words])
    weights = (sharpness * pixels @ keys.T / math.sqrt(3)).softmax(-1)  # [1024, words]
    return weights, weights @ keys  # attention maps, repainted pixels


# 1. Sharpness: 1 spreads attention over all words (a dull average), 20 makes it nearly one-hot.
words = ["a", "orange", "star", "on", "blue"]
for s in (1, 4, 20):
    w, out = maps_for(words, s)
    print(f"1. sharpness {s:2d}: orange pixels give 'orange' {w[orange, 1].mean():.2f}; output error "
          f"{(out - pixels).abs().mean():.2f}")
low, high = maps_for(words, 1)[0][orange, 1].mean(), maps_for(words, 20)[0][orange, 1].mean()
assert low < 0.5 < high

# 2. "white": its key (0.88, 0.88, 0.88) is close to no pixel's colour direction more than orange's or
# blue's own words, so few pixels give it much attention: it competes and loses everywhere.
w, _ = maps_for(words + ["white"], 4)
share = (w[:, -1] > w[:, :-1].max(-1).values).float().mean()
print(f"2. 'white' wins the attention of {100 * share:.0f}% of the pixels (mean weight {w[:, -1].mean():.2f})")

# 3. Q comes from the pixels, K and V from the text: when only the text changes, only K and V change.
# Over the 50 sampling steps the text is fixed, so K = W_K c and V = W_V c of every cross-attention
# layer can be computed once per prompt and reused; Q changes with the latent at every step.
print("3. text changes K and V only; a sampler can cache each layer's K and V for all 50 steps")
print("solved")
