"""Solutions to lesson 06's exercises (run: python lessons/solutions/06_ddpm_noising_and_loss.py)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import minti
from minti.schedulers import DDPM
from minti.toy import world

# 1. The signal-to-noise ratio abar/(1-abar) of SD's schedule crosses 1 where abar = 0.5.
ddpm = DDPM()
snr = ddpm.alphas_cumprod / (1 - ddpm.alphas_cumprod)
cross = int((snr < 1).nonzero()[0])
print(f"1. SNR falls from {snr[0]:.0f} (t = 0) to {snr[-1]:.4f} (t = 999) and crosses 1 at t = {cross}: above")
print("   it the noise outweighs the image; a guess: coarse layout and colour are decided up there")
print("   (lesson 13 measures what the toy model decides at which t)")
abar = ddpm.alphas_cumprod
assert abar[cross] < 0.5 <= abar[cross - 1], "SNR = 1 exactly where alpha-bar passes 1/2"
assert (snr[1:] < snr[:-1]).all(), "the SNR falls at every step, so it crosses 1 once"

# 2. DDPM's own linear schedule (0.0001 .. 0.02) destroys the image sooner: abar reaches 1% far earlier.
linear = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
gone = {name: int((a < 0.01).nonzero()[0]) for name, a in (("scaled-linear (SD)", ddpm.alphas_cumprod),
                                                            ("linear (DDPM)", linear))}
print("2. abar falls below 1% (the star practically gone) at:\n  ", gone)
assert gone["linear (DDPM)"] < gone["scaled-linear (SD)"]

# 3. The gradient wrt the text context at a few fixed t, on the trained toy model (lesson 08).
sd = minti.load("toy")
image = world.render(world.CONCEPTS["striped_orange_star"].scene("black"))
x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
with torch.no_grad():
    z0 = sd.vae.encode(x)[0] * sd.latent_scale
    context = sd.text_encoder(sd.tokenizer(["a photo of a striped orange star"], length=77))
noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
norms = {}
for t in (50, 250, 500, 750, 950):
    c = context.clone().requires_grad_()
    tt = torch.tensor([t])
    loss = (sd.unet(ddpm.add_noise(z0, noise, tt), tt, c) - noise).pow(2).mean()
    loss.backward()
    norms[t] = c.grad.norm().item()
print("3. |d loss / d context| at t:\n  ", {t: f"{g:.1e}" for t, g in norms.items()})
spread = max(norms.values()) / min(norms.values())
print(f"   it varies {spread:.0f}-fold over t (more than an order of magnitude): lesson 13 samples t")
print("   where it is large")
assert spread > 10, "an order of magnitude, as said"
print("solved")
