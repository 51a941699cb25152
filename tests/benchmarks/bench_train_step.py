"""Time one textual-inversion training step: minti against diffusers' examples/textual_inversion recipe.

Both sides run the SD 1.5 architecture with the same random weights (every tensor is filled from a
seed derived from its name, so two processes build identical models), the same batch, resolution and
precision, on the CPU. Each side runs in its own process, so that its peak memory (ru_maxrss) is its
own. The recipe's step is written out as the example does it: VAE encode of the images at every step,
the text encoder's whole token table trainable in AdamW (weight decay 1e-2) and every row but the
placeholder's restored after the step; with bf16, accelerate's autocast around the text encoder and
the VAE and UNet cast to bf16. minti's step: cached latents, the [1, 768] vectors as the only
parameter, the frozen table untouched, half-precision weights without autocast.

    python tests/benchmarks/bench_train_step.py          # fp32 and bf16, 256 px, batch 1, 1 thread
    python tests/benchmarks/bench_train_step.py --precisions fp32 --steps 5 --resolution 512 --threads 0
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import zlib

import torch
import torch.nn.functional as F

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository root
sys.path.insert(0, ROOT)

PLACEHOLDER = 49408  # the new word's id: one past CLIP's 49,408-token vocabulary
PROMPT = [49406, 320, 1125, 539, 320, PLACEHOLDER]  # <start> a photo of a <new word>, then <end> padding
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rss_mb():
    """This process's resident memory now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def fill_shared(module, prefix=""):
    """Fill every floating tensor from a generator seeded by its (minti / diffusers) name, in place:
    both sides get the same weights whatever library built them. Scaled like a trained network
    (weights ~ 1/sqrt(fan_in), norms ~ 1), so no activation overflows or turns denormal."""
    for name, tensor in module.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        key = name if name.startswith(prefix) else prefix + name  # transformers 5 drops "text_model."
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        if "embedding" in name:
            tensor.normal_(0.0, 0.02, generator=generator)
        elif tensor.dim() >= 2:
            tensor.normal_(0.0, 1.0 / math.sqrt(tensor[0].numel()), generator=generator)
        elif "norm" in name and name.endswith("weight"):
            tensor.normal_(1.0, 0.05, generator=generator)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
    return module


def batch(args):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1
    ids = torch.tensor([PROMPT + [49407] * (77 - len(PROMPT))] * args.batch)
    return pixels, ids


def minti_side(args):
    """minti's step: what train.py runs, minus the data loading."""
    from minti.clip import CLIPTextConfig, CLIPTextModel
    from minti.data import Latents
    from minti.schedulers import DDPM
    from minti.textual_inversion import LearnedWord, train_step
    from minti.timesteps import UniformTimesteps
    from minti.unet import UNet, UNetConfig
    from minti.vae import VAE, VAEConfig

    dtype = DTYPES[args.precision]
    text_encoder = fill_shared(CLIPTextModel(CLIPTextConfig())).eval().requires_grad_(False).to(dtype)
    unet = fill_shared(UNet(UNetConfig())).eval().requires_grad_(False).to(dtype)
    vae = fill_shared(VAE(VAEConfig())).eval().requires_grad_(False)  # fp32: it encodes once
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    pixels, ids = batch(args)
    latents = Latents(vae, pixels, VAEConfig().scaling_factor)  # the cache: each image and its mirror, once
    table = text_encoder.text_model.embeddings.token_embedding.weight
    word = LearnedWord(table[320:321].float(), [PLACEHOLDER])  # init from "a"
    optimizer = torch.optim.AdamW([word.vectors], lr=5e-3, weight_decay=1e-2)
    ddpm, sampler, generator = DDPM(), UniformTimesteps(), torch.Generator().manual_seed(1)

    def step():
        image, mirrored = torch.zeros(args.batch, dtype=torch.long), torch.zeros(args.batch, dtype=torch.bool)
        z0 = latents.sample(image, mirrored, generator)
        t = sampler.sample(args.batch, generator)
        noise = torch.randn(z0.shape, generator=generator)
        return train_step(text_encoder, unet, ddpm, word, optimizer, [(ids, z0, t, noise)], sampler)
    return step


def recipe_side(args):
    """diffusers' examples/textual_inversion/textual_inversion.py, one step of its loop, written out."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from minti.clip import CLIPTextConfig as MintiCLIPConfig
    from minti.io.configs import to_diffusers_config
    from minti.unet import UNetConfig
    from minti.vae import VAEConfig

    weight_dtype = DTYPES[args.precision]
    text_config = to_diffusers_config(MintiCLIPConfig())
    text_config["vocab_size"] += 1  # tokenizer.add_tokens + text_encoder.resize_token_embeddings
    text_encoder = fill_shared(CLIPTextModel(CLIPTextConfig(**text_config)), prefix="text_model.")
    unet = fill_shared(UNet2DConditionModel(**to_diffusers_config(UNetConfig())))
    vae_config = {k: v for k, v in to_diffusers_config(VAEConfig()).items() if k != "_class_name"}
    vae = fill_shared(AutoencoderKL(**vae_config))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    embeddings = text_encoder.get_input_embeddings()
    with torch.no_grad():
        embeddings.weight[PLACEHOLDER] = embeddings.weight[320]  # initializer_token "a"
    # Freeze vae and unet, and all of the text encoder but the token embeddings (as the example).
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 has no .text_model
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW(embeddings.parameters(), lr=5e-3, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8)
    unet.to(dtype=weight_dtype)
    vae.to(dtype=weight_dtype)
    orig_embeds_params = embeddings.weight.data.clone()
    text_encoder.train()
    pixels, ids = batch(args)
    autocast = torch.autocast("cpu", dtype=weight_dtype, enabled=weight_dtype != torch.float32)  # accelerate

    def step():
        latents = vae.encode(pixels.to(dtype=weight_dtype)).latent_dist.sample().detach()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            encoder_hidden_states = text_encoder(ids)[0].to(dtype=weight_dtype)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        index_no_updates = torch.ones((PLACEHOLDER + 1,), dtype=torch.bool)
        index_no_updates[PLACEHOLDER] = False
        with torch.no_grad():
            embeddings.weight[index_no_updates] = orig_embeds_params[index_no_updates]
        return loss.item()
    return step


def run_side(args):
    """In a child process: build one side, time its steps, print one JSON line."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    step = (minti_side if args.side == "minti" else recipe_side)(args)
    built, before = time.perf_counter() - t0, rss_mb()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        if not math.isfinite(loss):
            raise SystemExit(f"{args.side}: the loss is {loss}")
    print(json.dumps({"side": args.side, "precision": args.precision, "times": times, "build_s": built,
                      "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
                      "threads": torch.get_num_threads()}))


def child(args, side, precision):
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--precision", precision,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--resolution", str(args.resolution), "--threads", str(args.threads)]
    out = subprocess.run(cmd + ["--channels-last"] * args.channels_last, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{side} {precision} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (default: %(default)s)")
    add("--steps", type=int, default=3, help="timed steps per process (default: %(default)s)")
    add("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    add("--rounds", type=int, default=2,
        help="processes per side, alternating recipe / minti, so that load from other programs on the "
             "machine falls on both (default: %(default)s)")
    add("--batch", type=int, default=1, help="images per step (default: %(default)s)")
    add("--resolution", type=int, default=256, help="image side; latents are 1/8 (default: %(default)s)")
    # One thread by default: on a shared 2-core machine, OpenMP threads that wait for a busy core spin,
    # and a 2-thread step took 25-30 s instead of 5-7 s (measured). On an idle machine, 0 uses them all.
    add("--threads", type=int, default=1, help="torch threads; 0: torch's default (default: %(default)s)")
    add("--channels-last", action="store_true", help="minti's UNet in channels-last layout")
    add("--side", choices=["minti", "recipe"], help=argparse.SUPPRESS)  # set in a child process
    add("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return run_side(args)

    print(f"SD 1.5 architecture, random weights, {args.resolution} px ({args.resolution // 8}x"
          f"{args.resolution // 8} latents), batch {args.batch}, CPU; each side in its own process, "
          f"{args.rounds} x ({args.warmup} warm-up + {args.steps} timed steps), alternating")
    results = {}
    for precision in args.precisions.split(","):
        for _ in range(args.rounds):
            for side in ("recipe", "minti"):
                r = child(args, side, precision)
                steps = ", ".join(f"{t:.2f}" for t in r["times"])
                print(f"  {precision} {side:6s}: steps {steps} s; peak RSS {r['peak_rss_mb']:.0f} MiB (after "
                      f"setup {r['rss_before_mb']:.0f}); built in {r['build_s']:.0f} s; "
                      f"{r['threads']} threads", flush=True)
                kept = results.setdefault((side, precision), {"times": [], "peak": 0.0})
                kept["times"] += r["times"]
                kept["peak"] = max(kept["peak"], r["peak_rss_mb"])

    def median(key):
        times = sorted(results[key]["times"])
        return times[len(times) // 2]

    print("\nside / precision: median step (best), peak RSS")
    for (side, precision), r in results.items():
        print(f"  {side:6s} {precision}: {median((side, precision)):.2f} s ({min(r['times']):.2f} s), "
              f"{r['peak']:.0f} MiB")
    print("ratios minti / recipe: time (median; best), peak memory")
    for precision in args.precisions.split(","):
        m, d = ("minti", precision), ("recipe", precision)
        best = min(results[m]["times"]) / min(results[d]["times"])
        memory = results[m]["peak"] / results[d]["peak"]
        print(f"  {precision}: {median(m) / median(d):.2f}x ({best:.2f}x), {memory:.2f}x"
              + ("   target: <= 0.6x" * (precision == "fp32")))
    if ("minti", "bf16") in results and ("recipe", "fp32") in results:
        print(f"  minti bf16 vs minti fp32: {median(('minti', 'bf16')) / median(('minti', 'fp32')):.2f}x; "
              f"vs recipe fp32: {median(('minti', 'bf16')) / median(('recipe', 'fp32')):.2f}x")


if __name__ == "__main__":
    main()
