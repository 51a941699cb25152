"""Solutions to lesson 08's exercises (run: python lessons/solutions/08_toy_world.py)."""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import minti
from minti.toy import world
from minti.toy.evaluate import wilson_interval
from minti.toy.oracle import Oracle, down_up

oracle = Oracle.load()
images, labels = world.render_batch(512, seed=2024)
x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1

# 1. A harsher round trip: average-pool by 4 (an 8x8 grid of colours) and upsample back.
harsh = oracle.accuracy(down_up(x, 4).clamp(-1, 1), labels)
worst = min((a for a in harsh if a != "all"), key=harsh.get)
print("1. after down_up(x, 4):\n  ", "  ".join(f"{a} {100 * v:.1f}%" for a, v in harsh.items()))
print(f"   misread most: {worst} (thin stripes and outlines do not survive an 8x8 grid)")
assert worst in ("pattern", "shape")

# 2. The smallest n at which 70% and 80% have non-overlapping 95% Wilson intervals.
n = next(n for n in range(10, 2000) if wilson_interval(round(0.7 * n), n)[1] < wilson_interval(round(0.8 * n), n)[0])
print(f"2. 70% and 80% are told apart from n = {n} samples each (the lessons use 64: +-11 points)")
# By the normal approximation the two half-widths, 1.96 sqrt(p (1 - p) / n), must add up to 0.1:
by_formula = 1.959964 ** 2 * (math.sqrt(0.7 * 0.3) + math.sqrt(0.8 * 0.2)) ** 2 / 0.1 ** 2
print(f"   (the normal approximation's n: {by_formula:.0f})")
assert 100 < n < 400 and abs(n - by_formula) < 0.1 * by_formula, (n, by_formula)

# 3. Noise on the latent of a concept image, in units of the latent's own std.
sd = minti.load("toy")
star = torch.from_numpy(world.render(world.CONCEPTS["striped_orange_star"].scene("black")))
xs = star.permute(2, 0, 1)[None].float() / 127.5 - 1
with torch.no_grad():
    z = sd.vae.encode(xs)[0]
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 0.3, 1.0, 1.5):
        noisy = z + scale * z.std() * torch.randn((32,) + z.shape[1:], generator=g)
        read = oracle.predict(sd.vae.decode(noisy).clamp(-1, 1))
        right = {a: (read[a] == world.ATTRIBUTES[a].index(v)).float().mean().item()
                 for a, v in (("shape", "star"), ("colour", "orange"), ("pattern", "striped"))}
        print(f"3. noise {scale:.1f} std: " + "  ".join(f"{a} {100 * v:.0f}%" for a, v in right.items()))
print(f"   first to go: {min(right, key=right.get)}; the shape, spread over many latent cells, lasts longest")
assert right["shape"] == max(right.values()) and min(right.values()) < 1, right
print("solved")
