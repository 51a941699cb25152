"""Solutions to lesson 05's exercises (run: python lessons/solutions/05_unet.py)."""
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from minti.unet import UNet, UNetConfig, timestep_embedding

# 1. t = 500 and t = 501 differ in the fast (high-frequency) features: cos/sin(t * 10000^(-i/half))
# changes by about 10000^(-i/half) per unit of t, so the first features (i small) differ by up to 1
# and the last ones hardly at all.
e = timestep_embedding(torch.tensor([500, 501]), 320)
diff = (e[0] - e[1]).abs()
half = 160
print(f"1. |e(500) - e(501)|: first 10 features {diff[:10].mean():.2f}, last 10 {diff[half - 10:half].mean():.5f}")
assert diff[:10].mean() > 100 * diff[half - 10:half].mean()

# 2. SD 1.5's parameters by kind, on the meta device.
with torch.device("meta"):
    unet = UNet()
kinds = Counter()
for name, p in unet.named_parameters():
    kind = ("ResNet blocks" if ".resnets." in name else "spatial transformers" if ".attentions." in name
            else "the rest (time embedding, conv in/out, down/upsamplers)")
    kinds[kind] += p.numel()
total = sum(kinds.values())
for kind, n in kinds.most_common():
    print(f"2. {kind:58s} {n / 1e6:6.1f}M ({100 * n / total:.0f}%)")
assert total == 859_520_964  # every parameter counted once, in one kind
resnets, transformers = kinds["ResNet blocks"], kinds["spatial transformers"]
assert resnets > total / 2 > transformers > total - resnets - transformers, "most in the ResNets"

# 3. A 5x7 latent: 7 -> 4 -> 2 going down (the convolutions round up), so plain doubling on the way up
# gives 2 -> 4 -> 8, and 8 columns cannot be concatenated with the skip's 7. The UNet passes the
# skip's size to each upsampler (`size=`); without it the concatenation fails.
config = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
                    cross_attention_dim=16, norm_num_groups=8,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
tiny = UNet(config)
x, ctx = torch.randn(1, 4, 5, 7), torch.randn(1, 3, 16)
print("3. with size=:", tuple(tiny(x, torch.tensor([10]), ctx).shape))
up = tiny.up_blocks[0].upsamplers[0]
original = up.forward
up.forward = lambda h, size=None: original(h, (2 * h.shape[-2], 2 * h.shape[-1]))  # ignores the size
try:
    tiny(x, torch.tensor([10]), ctx)
    failed = False
except RuntimeError as err:
    failed = True
    print("   without it:", str(err).split("\n")[0][:80])
assert failed
print("solved")
