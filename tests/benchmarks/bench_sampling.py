"""Time minti's sampling loop against diffusers' StableDiffusionPipeline on the same model.

Both run the SD 1.5 architecture (random weights; the tensors are shared, so the model is in memory
once) in one process, on the same prompt, seed, scheduler (DDIM, SD 1.x configuration), guidance and
size, and produce the same picture (checked). Runs alternate between the two libraries and the best
of --repeats is reported, which keeps other load on the machine from favouring either side.

    python tests/benchmarks/bench_sampling.py                      # CPU, 128x128, 10 steps, batch 1
    python tests/benchmarks/bench_sampling.py --device cuda --size 512 --steps 50 --dtype float16
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository root
sys.path.insert(0, ROOT)

from minti.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from minti.io.configs import to_diffusers_config  # noqa: E402
from minti.sampling import text_to_image  # noqa: E402
from minti.schedulers import DDPM  # noqa: E402
from minti.io.tokenizer_files import clip_tokenizer, write_tokenizer_folder  # noqa: E402
from minti.unet import UNet, UNetConfig  # noqa: E402
from minti.vae import VAE, VAEConfig  # noqa: E402
from minti.io.weights import StableDiffusion  # noqa: E402


def share_weights(minti_cls, config, reference, prefix=""):
    """A minti model whose parameters ARE the reference's tensors (built on meta, then assigned)."""
    with torch.device("meta"):
        model = minti_cls(config)
    state = {(k if k.startswith(prefix) else prefix + k): v for k, v in reference.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a transformers buffer
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def build(device, dtype, tmp):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig as RefCLIPConfig
    from transformers import CLIPTextModel as RefCLIP
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    write_tokenizer_folder(tokenizer, tmp)
    ref_tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    unet_config, vae_config, clip_config = UNetConfig(), VAEConfig(), CLIPTextConfig()  # SD 1.5's
    ref_unet = UNet2DConditionModel(**to_diffusers_config(unet_config))
    vae_kwargs = {k: v for k, v in to_diffusers_config(vae_config).items() if k != "_class_name"}
    ref_vae = AutoencoderKL(**vae_kwargs)
    ref_clip = RefCLIP(RefCLIPConfig(**to_diffusers_config(clip_config)))
    if (torch.device(device), dtype) != (torch.device("cpu"), torch.float32):
        for model in (ref_unet, ref_vae, ref_clip):  # before sharing: .to() gives new tensors
            model.to(device, dtype)
    ddpm = DDPM()
    pipe = StableDiffusionPipeline(
        vae=ref_vae, text_encoder=ref_clip, tokenizer=ref_tokenizer, unet=ref_unet,
        scheduler=DDIMScheduler.from_config(to_diffusers_config(ddpm)), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    sd = StableDiffusion(
        tokenizer=tokenizer, text_encoder=share_weights(CLIPTextModel, clip_config, ref_clip, "text_model."),
        unet=share_weights(UNet, unet_config, ref_unet), vae=share_weights(VAE, vae_config, ref_vae),
        scheduler=ddpm, latent_scale=vae_config.scaling_factor)
    return pipe, sd


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="device (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision (default: %(default)s)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="images (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per library (default: %(default)s)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pipe, sd = build(args.device, dtype, tmp)
    prompt, negative, cfg, seed = "a photo of an astronaut riding a horse", "blurry", 7.5, 0

    def run_minti():
        return text_to_image(sd, [prompt], negative=negative, num_steps=args.steps, guidance_scale=cfg,
                             seed=seed, n=args.batch, width=args.size, height=args.size)

    def run_diffusers():
        images = pipe([prompt], negative_prompt=[negative], num_inference_steps=args.steps,
                      guidance_scale=cfg, num_images_per_prompt=args.batch, width=args.size, height=args.size,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="pil").images
        return np.stack([np.asarray(i) for i in images])

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    print(f"SD 1.5 architecture, random weights; {args.device} {args.dtype}, {args.size}x{args.size}, "
          f"{args.steps} DDIM steps, batch {args.batch}, CFG {cfg}; torch threads {torch.get_num_threads()}")
    _, a = timed(run_minti)  # warm-up (allocator, kernels) for both
    _, b = timed(run_diffusers)
    diff = np.abs(a.astype(int) - b.astype(int)).max()
    print(f"same picture: max pixel difference {diff} (uint8)")
    times = {"minti": [], "diffusers": []}
    for _ in range(args.repeats):  # alternate, so drifting load hits both alike
        times["minti"].append(timed(run_minti)[0])
        times["diffusers"].append(timed(run_diffusers)[0])
    for name, ts in times.items():
        print(f"{name:10s} best {min(ts):7.3f} s   median {sorted(ts)[len(ts) // 2]:7.3f} s   "
              f"runs {' '.join(f'{t:.3f}' for t in ts)}")
    print(f"ratio minti / diffusers: best {min(times['minti']) / min(times['diffusers']):.3f}, "
          f"median {sorted(times['minti'])[len(ts) // 2] / sorted(times['diffusers'])[len(ts) // 2]:.3f}")


if __name__ == "__main__":
    main()
