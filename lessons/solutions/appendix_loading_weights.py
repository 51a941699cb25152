"""Solutions to the appendix's exercises (run: python lessons/solutions/appendix_loading_weights.py)."""
import contextlib
import io
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
from minti.io.weights import WeightsError, ema_key, ldm_key, save_ldm

# 1. The decoder's blocks: diffusers counts them from the bottleneck up (up_blocks.0 is the deepest),
# LDM counts decoder.up.N by resolution, N = 0 being the full-resolution one, as in its encoder. So
# diffusers' up_blocks.i is LDM's up.(3 - i): the same list read the other way round.
with torch.device("meta"):
    vae = VAE()
config = to_diffusers_config(vae.config)
keys = [k for k in vae.state_dict() if "up_blocks" in k and k.endswith("conv1.weight")]
for k in keys[::3]:
    print(f"1. {k:42s} -> {ldm_key('vae', k, config)}")
decoder = [k for k in vae.state_dict() if k.startswith("decoder.up_blocks.")]
flipped = [k for k in decoder
           if not ldm_key("vae", k, config).startswith(f"first_stage_model.decoder.up.{3 - int(k.split('.')[2])}.")]
print(f"   all {len(decoder)} decoder up-block keys: up_blocks.i -> up.(3 - i); exceptions: {len(flipped)}")
assert decoder and not flipped, flipped[:3]
assert all(ldm_key("vae", k, config).startswith("first_stage_model.encoder.down.{}.".format(k.split(".")[2]))
           for k in vae.state_dict() if k.startswith("encoder.down_blocks.")), "the encoder is not flipped"

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
# under the ordinary model.diffusion_model.* names (so load(..., ema=False) reads them). Checked on a
# file that holds both copies, the EMA one shifted by 1: ema=False reads the plain copy, ema=True
# the EMA one, and ema=True on a file without an EMA copy is refused.
print("3.", ema_key("model.diffusion_model.input_blocks.1.1.proj_in.weight"))
toy = minti.load("toy")
with tempfile.TemporaryDirectory() as folder:
    plain_file, both_file = Path(folder) / "plain.safetensors", Path(folder) / "both.safetensors"
    save_ldm(toy, plain_file)
    tensors = load_file(str(plain_file))
    ema = {ema_key(k): v + 1 for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    save_file({**tensors, **ema}, str(both_file), metadata={"format": "pt"})
    config_folder = str(Path(__file__).resolve().parents[2] / "weights" / "toy")
    with contextlib.redirect_stdout(io.StringIO()):  # minti.load says which copy it read; long lines
        unets = {flag: minti.load(str(both_file), config=config_folder, ema=flag).unet for flag in (False, True)}
    try:
        minti.load(str(plain_file), config=config_folder, ema=True)
        refused = False
    except WeightsError:
        refused = True
shift = {flag: max((p - q).abs().max().item() for p, q in zip(unets[flag].state_dict().values(),
                                                                toy.unet.state_dict().values()))
         for flag in (False, True)}
print(f"   a file with both copies: ema=False is {shift[False]:.0f} from the toy UNet, ema=True "
      f"{shift[True]:.0f}\n   (the EMA copy was shifted by 1); ema=True without a copy refused: {refused}")
print("   SD 1.5's -emaonly files: the EMA weights, stored under the plain names (no model_ema.*)")
assert shift[False] == 0 and abs(shift[True] - 1) < 1e-6, "ema= picks the copy"
assert refused, "asking for an EMA copy that is not there must fail"
print("solved")
