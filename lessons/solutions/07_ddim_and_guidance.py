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

# 1. 10, 50 and 200 DDIM steps from the same x_T: the ideal denoiser lands on the same training images.
landed = {n: nearest(denoise(ideal_eps, DDIM(ddpm, n), x_T, cond, uncond, guidance_scale=1.0))
          for n in (10, 50, 200)}
print("1. training image reached with 10 / 50 / 200 steps:")
for n, images in landed.items():
    print(f"   {n:3d} steps: {images}")
same = sum(a == b for a, b in zip(landed[10], landed[200]))
print(f"   {same} of {B} samples land on the same image with 10 and 200 steps")

# 2. eta = 1 adds fresh noise at every step: two seeds from the same x_T end on different images.
runs = [nearest(denoise(ideal_eps, DDIM(ddpm, 50, eta=1.0), x_T, cond, uncond, guidance_scale=1.0,
                        generator=torch.Generator().manual_seed(s))) for s in (1, 2)]
print(f"2. eta = 1, seeds 1 and 2: {runs[0]} vs {runs[1]}: "
      f"{sum(a != b for a, b in zip(*runs))} of {B} differ")
assert runs[0] != runs[1]

# 3. "red or blue": two allowed colours. Early on, guidance 7.5 pushes the predicted image away from
# the unconditional average towards *both* allowed colours at once; the sample still ends on one
# training image of one of them.
cond2 = allowed("red", "blue")
final = nearest(denoise(ideal_eps, DDIM(ddpm, 50), x_T, cond2, uncond, guidance_scale=7.5))
print("3. red or blue, guidance 7.5: the samples end on", [colours[i] for i in final])
assert all(colours[i] in ("red", "blue") for i in final)
print("solved")
