"""Peak memory of a whole textual-inversion run: train.py at 512 px on the SD 1.5 architecture, on the CPU.

Builds once, in --model-dir (default /tmp/minti-sd15-random), a diffusers folder of the SD 1.5
architecture with random weights (minti's own classes and save_diffusers_folder, weights filled as
bench_train_step does, CLIP's real vocabulary from open_clip), and a folder of --images random 512 px
pictures. Then runs, in a child process, the measured command:

    train.py --model DIR --images IMAGES --resolution 512 --precision bf16 --checkpointing --batch 1
             --steps 2 --threads 1 --preview-every 0 --no-evaluate --save-every 0

and prints the child's peak resident memory (ru_maxrss of the child: loading, caching the latents and
the steps, all included) and its wall time. --train PATH measures another copy of train.py (e.g. an
older checkout) on the same folder, for a before/after comparison.

Measured on a shared 2-core CPU, 4 images (8 encodes), 2 steps: 8.82 GB (8.21 GiB) before the scale19
changes (fp32 model loaded whole then cast, the .safetensors pages all resident while loading, 8 images
per VAE call, the VAE kept); 3.40 GB (3.17 GiB) after. The load alone: 5.58 GB -> 2.28 GB.

    python tests/benchmarks/bench_memory.py
    python tests/benchmarks/bench_memory.py --train /tmp/minti-main/train.py     # the same on another copy
"""
import argparse
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository root
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build_model(folder):
    """The SD 1.5 architecture, random weights, as a diffusers folder (about 4.3 GB of fp32)."""
    import importlib.util

    from bench_train_step import fill_shared
    from minti.clip import CLIPTextConfig, CLIPTextModel
    from minti.schedulers import DDPM
    from minti.io.tokenizer_files import read_clip_bpe
    from minti.unet import UNet, UNetConfig
    from minti.vae import VAE, VAEConfig
    from minti.io.weights import StableDiffusion, save_diffusers_folder

    bpe = os.path.join(os.path.dirname(importlib.util.find_spec("open_clip").origin),
                       "bpe_simple_vocab_16e6.txt.gz")
    with torch.device("cpu"):
        text = fill_shared(CLIPTextModel(CLIPTextConfig()))
        unet = fill_shared(UNet(UNetConfig()))
        vae = fill_shared(VAE(VAEConfig()))
    save_diffusers_folder(StableDiffusion(read_clip_bpe(bpe), text, unet, vae, DDPM()), folder)


def build_images(folder, n):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # blocky: resized to 512 px
        Image.fromarray(pixels).resize((512, 512), Image.NEAREST).save(os.path.join(folder, f"{i}.png"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="/tmp/minti-sd15-random")
    p.add_argument("--images", type=int, default=4, help="concept images (each encoded with its mirror)")
    p.add_argument("--train", default=os.path.join(ROOT, "train.py"), help="the train.py to measure")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default="/tmp/minti-bench-memory-run")
    args = p.parse_args()

    if not os.path.isfile(os.path.join(args.model_dir, "model_index.json")):
        print(f"building the random SD 1.5 folder in {args.model_dir} ...", flush=True)
        build_model(args.model_dir)
    images = os.path.join(args.model_dir + "-images", str(args.images))
    if not os.path.isdir(images):
        build_images(images, args.images)
    cmd = [sys.executable, args.train, "--model", args.model_dir, "--images", images, "--token", "<bench>",
           "--init", "cat", "--resolution", "512", "--precision", "bf16", "--checkpointing", "--batch", "1",
           "--steps", str(args.steps), "--threads", "1", "--preview-every", "0", "--no-evaluate",
           "--save-every", "0", "--out", args.out + f"-{os.getpid()}"]
    t0 = time.time()
    where = os.path.dirname(os.path.abspath(args.train))
    done = subprocess.run(cmd, cwd=where, capture_output=True, text=True)
    wall = time.time() - t0
    if done.returncode != 0:
        raise SystemExit(f"train.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    print(f"{args.train}: {args.images} images, 512 px, bf16 + checkpointing, batch 1, {args.steps} steps, "
          f"1 thread: peak RSS {peak / 1e9:.2f} GB ({peak / 2 ** 30:.2f} GiB), {wall:.0f} s")


if __name__ == "__main__":
    main()
