"""Solutions to lesson 03's exercises (run: python lessons/solutions/03_attention.py)."""
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from minti.toy import world
from minti.unet import Attention

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
print(f"2. 'white' wins the attention of {int(share * len(w))} of {len(w)} pixels "
      f"(mean weight {w[:, -1].mean():.2f})")
assert share < 0.05 and w[:, -1].mean() < w[:, 1:5:3].mean(-1).min(), "white loses to orange and blue"

# 3. Q comes from the pixels, K and V from the text: when only the text changes, only K and V change.
# Over the 50 sampling steps the text is fixed, so K = W_K c and V = W_V c of every cross-attention
# layer can be computed once per prompt and reused; Q changes with the latent at every step.
# Checked on minti's module: attention with K and V computed once equals the module's own output for
# three different "latents", and a different text does change the output (so the cache matters).
torch.manual_seed(0)
module, heads = Attention(dim=32, heads=4, context_dim=16), 4
text, other_text = torch.randn(1, 7, 16), torch.randn(1, 7, 16)
with torch.no_grad():
    k, v = (proj(text).unflatten(-1, (heads, -1)).transpose(1, 2) for proj in (module.to_k, module.to_v))

    def cached(x):  # one sampling step's cross-attention, with this prompt's K and V from the cache
        q = module.to_q(x).unflatten(-1, (heads, -1)).transpose(1, 2)
        return module.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    latents = [torch.randn(1, 12, 32) for _ in range(3)]
    cache_error = max((cached(x) - module(x, text)).abs().max().item() for x in latents)
    text_effect = (module(latents[0], other_text) - module(latents[0], text)).abs().max().item()
print(f"3. K, V cached once vs recomputed, 3 latents: max |difference| {cache_error:.1e};\n"
      f"   another text changes the output by up to {text_effect:.2f}")
assert cache_error < 1e-6, "a cached K, V must give exactly the module's output"
assert text_effect > 1e-2, "the text must matter, else the cache check proves nothing"
print("solved")
