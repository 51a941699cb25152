"""Solutions to the appendix's exercises (run: python lessons/solutions/appendix_loading_weights.py)."""
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import minti

from minti.io.configs import to_diffusers_config
from minti.vae import VAE
from minti.io.weights import ema_key, ldm_key, save_ldm

# 1. The decoder's blocks: diffusers counts them from the bottleneck up (up_blocks.0 is the deepest),
# LDM counts decoder.up.N by resolution, N = 0 being the full-resolution one, as in its encoder. So
# diffusers' up_blocks.i is LDM's up.(3 - i): the same list read the other way round.
with torch.device("meta"):
    vae = VAE()
config = to_diffusers_config(vae.config)
keys = [k for k in vae.state_dict() if "up_blocks" in k and k.endswith("conv1.weight")]
for k in keys[::3]:
    print(f"1. {k:42s} -> {ldm_key('vae', k, config)}")
assert ldm_key("vae", "decoder.up_blocks.0.resnets.0.conv1.weight", config).startswith("first_stage_model.decoder.up.3.")

# 2. A file with one tensor missing: the loader names it, in minti's key and in the file's.
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "toy_ldm.safetensors"
    save_ldm(minti.load("toy"), path)
    tensors = load_file(str(path))
    gone = next(k for k in tensors if "middle_block" in k)
    del tensors[gone]
    save_file(tensors, str(path), metadata={"format": "pt"})
    try:
        minti.load(str(path), config=str(Path(__file__).resolve().parents[2] / "weights" / "toy"))
        message = None
    except Exception as err:  # a load error that lists what is missing
        message = str(err)
print(f"2. deleted {gone};\n   the error says:")
for line in message.splitlines()[:6]:
    print(textwrap.fill(line.strip(), 96, initial_indent="   ", subsequent_indent="     "))
assert message and ("middle_block" in message or "mid_block" in message), message

# 3. EMA keys: LitEma drops the dots. An "-emaonly" file holds only one UNet, the EMA weights, already
# under the ordinary model.diffusion_model.* names (so load(..., ema=False) reads them).
print("3.", ema_key("model.diffusion_model.input_blocks.1.1.proj_in.weight"))
print("   SD 1.5's -emaonly files: the EMA weights, stored under the plain names (no model_ema.*)")
print("solved")
