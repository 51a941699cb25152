"""Solutions to lesson 07's exercises (run: python lessons/solutions/07_ddim_and_guidance.py)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from minti.sampling import denoise
from minti.schedulers import DDIM, DDPM
from minti.toy import world

# Lesson 07's ideal denoiser of 96 toy images: the best possible noise prediction for that data.
ddpm = DDPM()
alphas_cumprod = ddpm.alphas_cumprod
images, labels = world.render_batch(96, seed=0)
data = torch.from_numpy(images).permute(0, 3, 1, 2).float().flatten(1) / 127.5 - 1
colours = [world.COLOURS[c] for c in labels["colour"]]


def ideal_eps(x, t, context):
    a = alphas_cumprod[int(t)]
    flat = x.flatten(1)
    weights = (-torch.cdist(flat, a.sqrt() * data) ** 2 / (2 * (1 - a)) + context[:, 0, :]).softmax(-1)
    return ((flat - a.sqrt() * (weights @ data)) / (1 - a).sqrt()).reshape(x.shape)


def allowed(*names):
    return torch.where(torch.tensor([c in names for c in colours]), 0.0, -torch.inf).expand(B, 1, -1)


def nearest(x):
    return ((x.flatten(1)[:, None] - data[None]) ** 2).mean(-1).argmin(1).tolist()


B = 6
x_T = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
cond, uncond = allowed("red"), torch.zeros(B, 1, len(data))

# 1. 10, 50 and 200 DDIM steps from the same x_T: the ideal denoiser lands on training images, all red
# (the prompt), and mostly the same ones whatever the number of steps.
landed = {n: nearest(denoise(ideal_eps, DDIM(ddpm, n), x_T, cond, uncond, guidance_scale=1.0))
          for n in (10, 50, 200)}
print("1. training image reached with 10 / 50 / 200 steps:")
for n, images in landed.items():
    print(f"   {n:3d} steps: {images}")
same = sum(a == b for a, b in zip(landed[10], landed[200]))
print(f"   {same} of {B} samples land on the same image with 10 and 200 steps")
assert all(colours[i] == "red" for images in landed.values() for i in images), "every sample is red"
assert same > B // 2, "most samples land on the same image"

# 2. eta = 0 has no fresh noise: the same x_T gives the same image every time, whatever the seed.
# eta = 1 adds fresh noise at every step: two seeds from the same x_T end on different images.
deterministic = [denoise(ideal_eps, DDIM(ddpm, 50), x_T, cond, uncond, guidance_scale=1.0,
                         generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
runs = [nearest(denoise(ideal_eps, DDIM(ddpm, 50, eta=1.0), x_T, cond, uncond, guidance_scale=1.0,
                        generator=torch.Generator().manual_seed(s))) for s in (1, 2)]
print(f"2. eta = 0, seeds 1 and 2: identical samples: {torch.equal(*deterministic)}")
print(f"   eta = 1, seeds 1 and 2: {runs[0]} vs {runs[1]}: "
      f"{sum(a != b for a, b in zip(*runs))} of {B} differ")
assert torch.equal(*deterministic), "eta = 0 uses no noise: the seed must not matter"
assert runs[0] != runs[1], "eta = 1: fresh noise, other images"

# 3. "red or blue": two allowed colours. Early on, guidance 7.5 pushes the predicted image away from
# the unconditional average towards both allowed colours at once, out of the image range [-1, 1]
# (at guidance 1 the prediction is an average of images, so it stays inside); the sample still ends
# on one training image of one of the two colours.
cond2 = allowed("red", "blue")
x = x_T
first = {}
for scale in (1.0, 7.5):  # the predicted image after the first step's guidance, eq. 12's "predicted x0"
    t = int(DDIM(ddpm, 50).timesteps[0])
    e_u, e_c = ideal_eps(x, t, uncond), ideal_eps(x, t, cond2)
    e = e_u + scale * (e_c - e_u)
    a = alphas_cumprod[t]
    first[scale] = ((x - (1 - a).sqrt() * e) / a.sqrt()).abs().gt(1).float().mean().item()
final = nearest(denoise(ideal_eps, DDIM(ddpm, 50), x_T, cond2, uncond, guidance_scale=7.5))
print(f"3. red or blue: first predicted image {first[1.0]:.0%} outside [-1, 1] at guidance 1, "
      f"{first[7.5]:.0%} at 7.5;\n   guidance 7.5's samples end on", [colours[i] for i in final])
assert first[1.0] == 0 and first[7.5] > 0.1, "guidance overshoots the range early on"
assert all(colours[i] in ("red", "blue") for i in final)
print("solved")
