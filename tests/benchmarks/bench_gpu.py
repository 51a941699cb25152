"""One GPU benchmark of minti against diffusers: training step, sampling, precision and memory, one table.

On a CUDA machine, with no download: the SD 1.5 architecture with random weights (every tensor filled
from a seed derived from its name, bench_train_step's scheme), held ONCE per precision on the GPU and
shared by minti and diffusers (minti's modules are built on the meta device and given the reference's
tensors), so both sides compute with the very same weights. In one process it measures:

  train     a textual-inversion step at 512 px, batch 1 and 4, fp32 / fp16 / bf16, with and without
            gradient checkpointing, for minti (as train.py: cached latents, the word's vectors the only
            parameter, fp16 with a GradScaler) and for diffusers' examples/textual_inversion recipe,
            written out as bench_train_step does (VAE encode every step, the whole token table in AdamW,
            rows restored; fp16/bf16 as accelerate's mixed precision: autocast around the fp32 text
            encoder, UNet and VAE cast, fp16 with a GradScaler). Warm-up steps excluded, then timed
            steps, each ended by torch.cuda.synchronize. FLOPs counted once per (side, batch,
            checkpointing) with torch.utils.flop_counter.FlopCounterMode; MFU = model FLOPs (without
            checkpointing's recompute) / step time / the device's dense bf16 peak, for every precision.
  sample    512 px, 50 DDIM steps, guidance 7.5, fp32 and fp16: minti's text_to_image against
            StableDiffusionPipeline (DDIMScheduler, SD 1.x config; same weights, seed, prompt); time,
            peak memory, and the two images compared (mean / max uint8 difference).
  multires  sampling with a 10-bucket multiresolution word (time-dependent conditioning through
            text_to_image's cond=) against the plain word; with equal buckets it must give the plain image.
  check     one fp16 train_step with torch.amp.GradScaler (finite vectors, sane scale); the word's
            gradient at 64x64 latents in fp32 / bf16 / fp16 against each other (relative error);
            host-device syncs (torch.cuda.set_sync_debug_mode("warn")) over 3 train steps and a preview.
  memory    minti's peak memory after loading (fp16 text encoder and UNet, fp32 VAE as train.py), after
            caching 8 images at 512 px, after one fp16 + checkpointing step, after a 4-image preview.

Memory columns. peak_mib: torch.cuda.max_memory_allocated, reset before each case (it includes every
weight resident then: both sides' models). work_mib: that peak minus what was allocated before the case
was set up: activations, gradients, optimizer state, the recipe's copy of the table. model_mib: the
weights a side's step reads. mem_ratio compares model_mib + work_mib, what each side alone would hold.
On the CPU (--tiny) the same columns come from the process's resident memory (VmRSS, and VmHWM reset
through /proc/self/clear_refs: ru_maxrss that can be reset), or stay empty where Linux does not allow it.

Precision. fp32 means fp32: TF32 is switched OFF for matmuls and cuDNN convolutions for the whole run
(PyTorch's default leaves it on for convolutions); fp16 / bf16 rows run tensor cores in those types.
cudnn.benchmark stays at its default (off), the same for both sides.

Device peak (dense bf16 tensor-core TFLOPS, half the "with sparsity" figure of NVIDIA's datasheets) is
looked up in PEAK_BF16 by torch.cuda.get_device_name; --peak-tflops overrides it (MFU is left empty for
an unknown device). Agreement tolerances (SAMPLE_TOLERANCE, GRAD_TOLERANCE) are first guesses, to be
revised with the first GPU run's figures.

The table is printed and written as CSV (--csv, default tests/benchmarks/results/gpu_<device>.csv); time_ms
is the median step (or the best sampling run), time_min_ms the best step. A case that fails (out of
memory, say) becomes a row marked FAILED and the run goes on; the exit code is 1 if any check failed,
and 2 when there is no CUDA device and --tiny was not given.

    python tests/benchmarks/bench_gpu.py                       # CUDA: the full table (estimated 4-6 min on
                                                               # one H100; not yet timed on a GPU)
    python tests/benchmarks/bench_gpu.py --csv /tmp/h100.csv --peak-tflops 989
    python tests/benchmarks/bench_gpu.py --tiny --device cpu   # tiny models, every check that runs on a CPU
"""
import argparse
import copy
import csv
import gc
import math
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository root
sys.path.insert(0, ROOT)

from minti.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from bench_train_step import fill_shared  # noqa: E402  (the seeded weights, one copy)
from minti.io.configs import to_diffusers_config  # noqa: E402
from minti.run.devices import PRECISIONS  # noqa: E402
from minti.sampling import text_to_image  # noqa: E402
from minti.schedulers import DDPM  # noqa: E402
from minti.textual_inversion import LearnedWord, add_words, splice, train_step  # noqa: E402
from minti.io.tokenizer_files import clip_tokenizer, read_tokenizer_folder, write_tokenizer_folder  # noqa: E402
from minti.unet import UNet, UNetConfig  # noqa: E402
from minti.vae import VAE, VAEConfig  # noqa: E402
from minti.io.weights import StableDiffusion  # noqa: E402

# (substring of the CUDA device name, dense bf16 TFLOPS, where the figure comes from); first match wins.
PEAK_BF16 = [
    ("H100 PCIe", 756.0, "NVIDIA H100 datasheet, H100 PCIe: BF16 1,513 TFLOPS with sparsity / 2"),
    ("H100 NVL", 835.0, "NVIDIA H100 datasheet, H100 NVL: BF16 1,671 TFLOPS with sparsity / 2"),
    ("H100", 989.0, "NVIDIA H100 datasheet, H100 SXM: BF16 1,979 TFLOPS with sparsity / 2"),
    ("H200 NVL", 835.0, "NVIDIA H200 datasheet, H200 NVL: BF16 1,671 TFLOPS with sparsity / 2"),
    ("H200", 989.0, "NVIDIA H200 datasheet, H200 SXM: BF16 1,979 TFLOPS with sparsity / 2 (H100 SXM's)"),
    ("A100", 312.0, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense (624 with sparsity)"),
]
INIT, PLACEHOLDER = 320, 49408  # the word starts at "a"; its id is one past CLIP's 49,408 tokens
TRAIN_IDS = [49406, 320, 1125, 539, 320, PLACEHOLDER]  # <start> a photo of a <word>, then <end> padding
WORD = "<concept>"
PROMPT, NEGATIVE, GUIDANCE, SEED = "a photo of an astronaut riding a horse", "blurry", 7.5, 0
BUCKETS = 10  # the multiresolution word's time buckets (Daras & Dimakis use 10)
SAMPLE_TOLERANCE = {"fp32": 1.0, "fp16": 4.0, "bf16": 8.0}  # mean |minti - diffusers| in uint8 levels
GRAD_TOLERANCE = 0.25  # relative error of the word's gradient between two precisions
COLUMNS = ["section", "case", "side", "precision", "batch", "px", "checkpointing", "time_ms", "time_min_ms",
           "peak_mib", "work_mib", "model_mib", "tflop", "tflops", "mfu", "time_ratio", "mem_ratio",
           "value", "ok", "note"]


@dataclass
class Setup:
    device: torch.device
    tiny: bool
    px: int  # image side for training, sampling and the gradient check (latents are px / 8)
    batches: tuple
    warmup: int
    steps: int
    sample_steps: int
    repeats: int  # timed sampling runs per side, alternating
    preview_steps: int
    peak: float | None = None  # dense bf16 TFLOPS
    peak_source: str = ""
    cache_images: int = 8
    preview_images: int = 4


FULL = dict(px=512, batches=(1, 4), warmup=2, steps=5, sample_steps=50, repeats=2, preview_steps=25)
TINY = dict(px=64, batches=(1, 2), warmup=1, steps=1, sample_steps=10, repeats=1, preview_steps=3)


def model_configs(tiny):
    """(text, UNet, VAE) configs: SD 1.5's, or a tiny model of the same classes (VAE factor 8 as SD's).
    The token table has one row more than CLIP's vocabulary: the recipe's resized table, shared."""
    if not tiny:
        return CLIPTextConfig(vocab_size=PLACEHOLDER + 1), UNetConfig(), VAEConfig()
    text = CLIPTextConfig(vocab_size=PLACEHOLDER + 1, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4)
    unet = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                      cross_attention_dim=32, norm_num_groups=8, sample_size=8,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
    return text, unet, vae


def case_name(case):
    return f"{case.side} {case.precision} b{case.batch}{' ckpt' * case.ckpt}"


def train_cases(setup):
    """THE table of training cases: both sides of every precision, batch and checkpointing."""
    return [SimpleNamespace(side=side, precision=precision, batch=batch, ckpt=ckpt)
            for precision in PRECISIONS for batch in setup.batches for ckpt in (False, True)
            for side in ("recipe", "minti")]


# ------------------------------------------------------------------------------ device and memory

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    """MiB now and at the peak since reset(): CUDA's allocator, else this process's resident memory."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.can_reset = self.cuda

    def _status(self, key):  # Linux /proc/self/status, kB
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))

    def now(self):
        return torch.cuda.memory_allocated() / 2 ** 20 if self.cuda else self._status("VmRSS:")

    def reset(self):
        if self.cuda:
            return torch.cuda.reset_peak_memory_stats()
        try:  # "5" resets the peak resident size (VmHWM, what ru_maxrss reads) to the current one
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.can_reset = True
        except OSError:
            self.can_reset = False

    def peak(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2 ** 20
        return self._status("VmHWM:") if self.can_reset else None


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mib(*modules):
    """MiB of the distinct tensors of some modules (shared tensors counted once)."""
    seen = {}
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 2 ** 20


def device_peak(device, override):
    """(dense bf16 TFLOPS, where the figure comes from) for MFU, or (None, why not)."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, tflops, source in PEAK_BF16:
        if key in name:
            return tflops, source
    return None, f"{name!r} is not in PEAK_BF16 (give --peak-tflops)"


# ------------------------------------------------------------------------------ models, shared

def share(minti_cls, config, reference, prefix=""):
    """A frozen minti model whose tensors ARE the reference's (built on meta, then assigned)."""
    with torch.device("meta"):
        model = minti_cls(config)
    state = {(k if k.startswith(prefix) else prefix + k): v for k, v in reference.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # a transformers buffer
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_tokenizer():
    """CLIP's vocabulary if open-clip-torch ships it here, else the toy model's (prompts only need ids)."""
    try:
        return clip_tokenizer(), "CLIP"
    except (FileNotFoundError, ImportError, OSError):
        return read_tokenizer_folder(os.path.join(ROOT, "weights", "toy", "tokenizer")), "toy (no open-clip)"


def build_masters(setup, folder):
    """The reference models in fp32 on the CPU, filled from seeds: every precision is copied from them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as RefCLIPConfig
    from transformers import CLIPTextModel as RefCLIP

    text_cfg, unet_cfg, vae_cfg = model_configs(setup.tiny)
    te = fill_shared(RefCLIP(RefCLIPConfig(**to_diffusers_config(text_cfg))), prefix="text_model.")
    unet = fill_shared(UNet2DConditionModel(**to_diffusers_config(unet_cfg)))
    vae = fill_shared(AutoencoderKL(**{k: v for k, v in to_diffusers_config(vae_cfg).items()
                                        if k != "_class_name"}))
    with torch.no_grad():  # the recipe's initializer_token: the placeholder's row starts as "a"'s
        te.get_input_embeddings().weight[PLACEHOLDER] = te.get_input_embeddings().weight[INIT]
    for module in (te, unet, vae):
        module.eval().requires_grad_(False)
    tokenizer, which = load_tokenizer()
    write_tokenizer_folder(tokenizer, folder)  # for the pipeline's CLIPTokenizer, before the word is added
    word_ids = add_words(tokenizer, {WORD: 1})[WORD]
    return SimpleNamespace(te=te, unet=unet, vae=vae, configs=(text_cfg, unet_cfg, vae_cfg),
                           tokenizer=tokenizer, tokenizer_name=which, word_ids=word_ids, folder=folder)


def place(masters, setup, precision, recipe=True, vae_precision=None):
    """One precision's models on the device: the reference's, and minti's sharing their tensors.
    recipe: also the fp32 text encoder whose table the recipe trains (minti's fp32 one shares it)."""
    dtype, dev = PRECISIONS[precision], setup.device
    moved = lambda m, dt: copy.deepcopy(m).to(dev, dt)  # noqa: E731  (the masters stay fp32 on the CPU)
    unet, vae = moved(masters.unet, dtype), moved(masters.vae, PRECISIONS[vae_precision or precision])
    recipe_te = moved(masters.te, torch.float32) if recipe or dtype == torch.float32 else None
    te = recipe_te if dtype == torch.float32 else moved(masters.te, dtype)
    text_cfg, unet_cfg, vae_cfg = masters.configs
    sd = StableDiffusion(tokenizer=masters.tokenizer, text_encoder=share(CLIPTextModel, text_cfg, te, "text_model."),
                         unet=share(UNet, unet_cfg, unet), vae=share(VAE, vae_cfg, vae), scheduler=DDPM(),
                         latent_scale=vae_cfg.scaling_factor)
    return SimpleNamespace(precision=precision, dtype=dtype, sd=sd, ref_te=te, recipe_te=recipe_te,
                           ref_unet=unet, ref_vae=vae, word_ids=masters.word_ids, folder=masters.folder)


def make_pipe(models):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=models.ref_vae, text_encoder=models.ref_te, unet=models.ref_unet,
        tokenizer=CLIPTokenizer.from_pretrained(models.folder, model_max_length=77),
        scheduler=DDIMScheduler.from_config(to_diffusers_config(DDPM())), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------ the two training steps

def images(setup, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, setup.px, setup.px, generator=g) * 2 - 1).to(setup.device)


def train_ids(batch, device):
    return torch.tensor([TRAIN_IDS + [49407] * (77 - len(TRAIN_IDS))] * batch, device=device)


@torch.no_grad()
def cache_latents(vae, pixels):
    """minti's cache: each image encoded once (one at a time, so the encoder's peak stays one image's);
    the latent Gaussian's mean and std, fp32."""
    means, stds = [], []
    for image in pixels:
        mean, logvar = vae.encode(image[None].to(next(vae.parameters()).dtype))
        means.append(mean.float())
        stds.append((0.5 * logvar.float()).exp())
    return torch.cat(means), torch.cat(stds)


def minti_step(models, setup, batch):
    """minti's step as train.py runs it: cached latents, the word's [1, D] vectors the only parameter
    (AdamW), frozen half-precision weights without autocast, a GradScaler in fp16; the draws from a CPU
    generator, moved to the device (train.py's draw_batches, data.Latents.sample), so a resumed run
    repeats them on any device. The recipe draws on the device instead."""
    sd, dev = models.sd, setup.device
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight
    mean, std = cache_latents(sd.vae, images(setup, batch))
    word = LearnedWord(table[INIT:INIT + 1].float(), [PLACEHOLDER]).to(dev)
    optimizer = torch.optim.AdamW([word.vectors], lr=5e-3, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(dev.type) if models.dtype == torch.float16 else None
    ids, ddpm, generator = train_ids(batch, "cpu"), sd.scheduler, torch.Generator().manual_seed(1)

    def step():
        z0 = (mean + std * torch.randn(mean.shape, generator=generator).to(dev)) * sd.latent_scale
        t = torch.randint(0, ddpm.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        micro_batch = (ids.to(dev), z0, t.to(dev), noise.to(dev))
        return train_step(sd.text_encoder, sd.unet, ddpm, word, optimizer, [micro_batch], None, scaler)
    step.word, step.scaler = word, scaler
    return step


@contextmanager
def recipe_mode(models, ckpt):
    """The recipe's freezing and checkpointing switches on the shared modules, undone afterwards."""
    te, unet = models.recipe_te, models.ref_unet
    text_model = getattr(te, "text_model", te)  # transformers 5 has no .text_model
    te.get_input_embeddings().requires_grad_(True)  # the whole table trains; nothing else does
    te.train()
    if ckpt:  # as the example: unet.train(), then both models' checkpointing
        unet.train()
        te.gradient_checkpointing_enable()
        unet.enable_gradient_checkpointing()
    assert not any(p.requires_grad for p in text_model.encoder.parameters())
    try:
        yield
    finally:
        te.get_input_embeddings().requires_grad_(False)
        if ckpt:
            te.gradient_checkpointing_disable()
            unet.disable_gradient_checkpointing()
        te.eval()
        unet.eval()


def recipe_step(models, setup, batch):
    """diffusers' examples/textual_inversion/textual_inversion.py, one step of its loop, written out."""
    from diffusers import DDPMScheduler

    te, unet, vae, dev = models.recipe_te, models.ref_unet, models.ref_vae, setup.device
    weight_dtype = models.dtype
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    embeddings = te.get_input_embeddings()
    optimizer = torch.optim.AdamW(embeddings.parameters(), lr=5e-3, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8)
    scaler = torch.amp.GradScaler(dev.type) if weight_dtype == torch.float16 else None  # accelerate's
    autocast = torch.autocast(dev.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    orig_embeds_params = embeddings.weight.data.clone()
    pixels, ids = images(setup, batch), train_ids(batch, dev)

    def step():
        latents = vae.encode(pixels.to(dtype=weight_dtype)).latent_dist.sample().detach()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device).long()
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        with autocast:  # accelerate wraps the prepared text encoder's forward, outputs back to fp32
            encoder_hidden_states = te(ids)[0].float().to(dtype=weight_dtype)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        (scaler.scale(loss) if scaler else loss).backward()  # accelerator.backward
        if scaler:  # accelerate's optimizer.step() in fp16
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
        index_no_updates = torch.ones((PLACEHOLDER + 1,), dtype=torch.bool)
        index_no_updates[PLACEHOLDER] = False
        with torch.no_grad():
            embeddings.weight[index_no_updates] = orig_embeds_params[index_no_updates]
        return loss.detach().item()
    return step


# ------------------------------------------------------------------------------ measuring

def row(section, case, **fields):
    """One line of the table; columns a row does not measure stay empty."""
    out = dict.fromkeys(COLUMNS, "")
    out.update(section=section, case=case, **fields)
    return out


def timed(fn, device, memory):
    """(seconds, result, peak MiB, work MiB) of one call, synchronized at both ends."""
    sync(device)
    base = memory.now()
    memory.reset()
    start = time.perf_counter()
    result = fn()
    sync(device)
    seconds, peak = time.perf_counter() - start, memory.peak()
    return seconds, result, peak, None if peak is None else max(0.0, peak - base)


def count_flops(fn):
    """FLOPs of one call (forward and backward), by PyTorch's dispatch-level counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def train_row(models, setup, case, memory, flops):
    """Set one side up, run warm-up and timed steps, and count its FLOPs once per (side, batch, ckpt)."""
    dev, base = setup.device, memory.now()
    sd = models.sd
    mode = recipe_mode(models, case.ckpt) if case.side == "recipe" else minti_checkpointing(sd.unet, case.ckpt)
    with mode:
        step = (recipe_step if case.side == "recipe" else minti_step)(models, setup, case.batch)
        for _ in range(setup.warmup):
            step()
        sync(dev)
        memory.reset()  # the peak of the steps: not the one-off setup (minti's cache, the recipe's copies)
        times, losses = [], []
        for _ in range(setup.steps):
            start = time.perf_counter()
            losses.append(step())
            sync(dev)
            times.append(time.perf_counter() - start)
        peak = memory.peak()
        key = (case.side, case.batch, case.ckpt)
        if key not in flops:
            flops[key] = count_flops(step)
    model = mib(sd.text_encoder, sd.unet) if case.side == "minti" else \
        mib(models.recipe_te, models.ref_unet, models.ref_vae)
    median = sorted(times)[len(times) // 2]
    model_flops = flops.get((case.side, case.batch, False), flops[key])  # without the recompute
    achieved = model_flops / median / 1e12
    return row("train", case_name(case), side=case.side,
               precision=case.precision, batch=case.batch, px=setup.px, checkpointing=int(case.ckpt),
               time_ms=1e3 * median, time_min_ms=1e3 * min(times), peak_mib=peak,
               work_mib=None if peak is None else max(0.0, peak - base), model_mib=model,
               tflop=flops[key] / 1e12, tflops=achieved, mfu=achieved / setup.peak if setup.peak else None,
               ok=all(math.isfinite(x) for x in losses),
               note="TF32 off" if case.precision == "fp32" else "")


@contextmanager
def minti_checkpointing(unet, on):
    unet.gradient_checkpointing = on
    try:
        yield
    finally:
        unet.gradient_checkpointing = False


def add_ratios(rows):
    """minti / recipe for each training case: time, and memory a side alone would hold (weights + work)."""
    recipe = {(r["precision"], r["batch"], r["checkpointing"]): r for r in rows
              if r["section"] == "train" and r["side"] == "recipe"}
    for r in rows:
        other = recipe.get((r["precision"], r["batch"], r["checkpointing"]))
        if r["section"] != "train" or r["side"] != "minti" or other is None or "" in (r["time_ms"], other["time_ms"]):
            continue  # (a failed case has no numbers)
        r["time_ratio"] = r["time_ms"] / other["time_ms"]
        if r["work_mib"] is not None and other["work_mib"] is not None:
            r["mem_ratio"] = (r["model_mib"] + r["work_mib"]) / (other["model_mib"] + other["work_mib"])


# ------------------------------------------------------------------------------ sampling

def word_embed_fn(models, vectors):
    """Token vectors with the word's [n, D] vectors spliced in at its placeholders (sampling's embed_fn)."""
    table = models.sd.text_encoder.text_model.embeddings.token_embedding.weight
    return lambda ids: splice(ids, table, models.word_ids, vectors)


def alternate(runs, setup, memory):
    """Warm up each run once, then time them in turn (load that drifts falls on all alike): for each name
    {"times", "peak", "work", "image"}, the image of the warm-up run."""
    out = {}
    for name, fn in runs.items():
        with torch.inference_mode():
            out[name] = {"times": [], "peak": None, "work": None, "image": fn()}
    for _ in range(setup.repeats):
        for name, fn in runs.items():
            with torch.inference_mode():
                seconds, _, peak, work = timed(fn, setup.device, memory)
            r = out[name]
            r["times"].append(seconds)
            r["peak"] = peak if r["peak"] is None or peak is None else max(r["peak"], peak)
            r["work"] = work if r["work"] is None or work is None else max(r["work"], work)
    return out


def sampling_rows(models, setup, memory):
    """minti's text_to_image against StableDiffusionPipeline: same weights, seed, prompt and scheduler."""
    pipe, px, steps = make_pipe(models), setup.px, setup.sample_steps

    def run_minti():
        return text_to_image(models.sd, [PROMPT], negative=NEGATIVE, num_steps=steps, guidance_scale=GUIDANCE,
                             seed=SEED, width=px, height=px)

    def run_diffusers():
        out = pipe([PROMPT], negative_prompt=[NEGATIVE], num_inference_steps=steps, guidance_scale=GUIDANCE,
                   width=px, height=px, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pil")
        return np.stack([np.asarray(image) for image in out.images])

    got = alternate({"diffusers": run_diffusers, "minti": run_minti}, setup, memory)
    diff = np.abs(got["minti"]["image"].astype(int) - got["diffusers"]["image"].astype(int))
    tolerance = SAMPLE_TOLERANCE[models.precision]
    rows = []
    for name in ("diffusers", "minti"):
        r = got[name]
        rows.append(row("sample", f"{name} {models.precision} {steps} DDIM steps", side=name,
                        precision=models.precision, batch=1, px=px, time_ms=1e3 * min(r["times"]),
                        peak_mib=r["peak"], work_mib=r["work"], model_mib=mib(models.ref_te, models.ref_unet,
                                                                             models.ref_vae)))
    rows[1].update(time_ratio=rows[1]["time_ms"] / rows[0]["time_ms"], value=float(diff.mean()),
                   ok=bool(diff.mean() <= tolerance),
                   note=f"value: mean |minti - diffusers| uint8 (max {diff.max()}; tolerance {tolerance})")
    return rows


def multires_conditioning(models, vectors, calls):
    """context_fn(t) for "a photo of a <concept>" with a multiresolution word, vectors [T, n, D]: the set
    of t's bucket floor(t T / 1000), each bucket's conditioning encoded once and kept."""
    sd, cache = models.sd, {}
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight
    ids = sd.tokenizer([f"a photo of a {WORD}"], length=77).to(sd.unet.device)

    def context_fn(t):
        k = int(t) * len(vectors) // sd.scheduler.num_train_timesteps  # t: the sampler's CPU timestep
        if k not in cache:
            calls.append(k)
            cache[k] = sd.text_encoder(ids, inputs_embeds=splice(ids, table, models.word_ids, vectors[k]))
        return cache[k]
    return context_fn


def multires_rows(models, setup, memory):
    """A 10-bucket word (its conditioning changes with the timestep) against the plain word; the same
    word with equal buckets must give the plain word's image."""
    dev = setup.device
    table = models.sd.text_encoder.text_model.embeddings.token_embedding.weight
    plain = table[INIT:INIT + 1].float()  # [1, D]
    g = torch.Generator().manual_seed(1)
    buckets = plain + 0.02 * torch.randn(BUCKETS, 1, plain.shape[-1], generator=g).to(dev)  # [T, 1, D]
    calls, equal_calls = [], []
    common = dict(negative=NEGATIVE, num_steps=setup.sample_steps, guidance_scale=GUIDANCE, seed=SEED,
                  width=setup.px, height=setup.px)
    prompt = [f"a photo of a {WORD}"]
    runs = {
        "plain": lambda: text_to_image(models.sd, prompt, embed_fn=word_embed_fn(models, plain), **common),
        "multires": lambda: text_to_image(models.sd, prompt, cond=multires_conditioning(models, buckets, calls),
                                          **common),
    }
    got = alternate(runs, setup, memory)
    with torch.inference_mode():
        same = text_to_image(models.sd, prompt, **common,
                             cond=multires_conditioning(models, plain[None].expand(BUCKETS, -1, -1), equal_calls))
    diff = np.abs(same.astype(int) - got["plain"]["image"].astype(int))
    rows = [row("multires", f"{name} word {models.precision}", side="minti", precision=models.precision,
                batch=1, px=setup.px, time_ms=1e3 * min(r["times"]), peak_mib=r["peak"], work_mib=r["work"])
            for name, r in got.items()]
    per_image = len(calls) / (1 + setup.repeats)  # warm-up and timed runs each build their conditioning
    rows[1].update(time_ratio=rows[1]["time_ms"] / rows[0]["time_ms"], value=per_image,
                   ok=per_image <= BUCKETS, note="value: text-encoder calls per image; time_ratio vs plain")
    rows.append(row("multires", "equal buckets = plain word", side="minti", precision=models.precision,
                    px=setup.px, value=int(diff.max()), ok=bool(diff.max() <= 1),
                    note="value: max |multires - plain| uint8"))
    return rows


# ------------------------------------------------------------------------------ checks

def scaler_row(models, setup, memory=None):
    """One fp16 train_step with a fresh GradScaler: the vectors stay finite, the scale stays sane."""
    step = minti_step(models, setup, batch=1)
    before = step.word.vectors.detach().clone()
    loss = step()
    vectors, scale = step.word.vectors.detach(), step.scaler.get_scale()
    moved = not torch.equal(vectors, before)
    ok = bool(torch.isfinite(vectors).all()) and math.isfinite(loss) and 1.0 <= scale <= 2.0 ** 16
    return row("check", "fp16 GradScaler step", side="minti", precision="fp16", batch=1, px=setup.px,
               value=scale, ok=ok, note=f"value: loss scale after the step; vectors "
                                        f"{'updated' if moved else 'unchanged (step skipped)'}, loss {loss:.4g}")


def word_gradient(models, setup):
    """d loss / d vectors [1, D] at one fixed (latent, t, noise), batch 1, in the models' precision. In fp16
    the loss is scaled as GradScaler would (start 2^16, halve until the gradient is finite)."""
    sd, dev = models.sd, setup.device
    g = torch.Generator().manual_seed(2)
    shape = (1, 4, setup.px // 8, setup.px // 8)
    z0, noise = torch.randn(shape, generator=g).to(dev), torch.randn(shape, generator=g).to(dev)
    t = torch.tensor([500], device=dev)
    table = sd.text_encoder.text_model.embeddings.token_embedding.weight
    word = LearnedWord(table[INIT:INIT + 1].float(), [PLACEHOLDER]).to(dev)
    ids = train_ids(1, dev)
    scale = 2.0 ** 16 if models.dtype == torch.float16 else 1.0
    while True:
        context = sd.text_encoder(ids, inputs_embeds=word(ids, table, t))
        eps = sd.unet(sd.scheduler.add_noise(z0, noise, t), t, context)
        grad, = torch.autograd.grad(F.mse_loss(eps.float(), noise) * scale, word.vectors)
        if torch.isfinite(grad).all() or scale <= 1.0:
            return (grad / scale).double().cpu()
        scale /= 2


def gradient_rows(grads, setup):
    rows = []
    for a, b in (("bf16", "fp32"), ("fp16", "fp32"), ("fp16", "bf16")):
        if a not in grads or b not in grads:
            continue  # its failure is in the table already
        error = float((grads[a] - grads[b]).norm() / grads[b].norm())
        rows.append(row("check", f"word gradient {a} vs {b}", side="minti", precision=a, batch=1, px=setup.px,
                        value=error, ok=math.isfinite(error) and error <= GRAD_TOLERANCE,
                        note=f"value: |g_{a} - g_{b}| / |g_{b}| (tolerance {GRAD_TOLERANCE})"))
    return rows


def preview(models, setup, n, word=None):
    """What train.py's preview does: n images of "a photo of a <concept>" with the word as it stands."""
    table = models.sd.text_encoder.text_model.embeddings.token_embedding.weight
    vectors = table[INIT:INIT + 1].float() if word is None else word.vectors[0].detach()
    return text_to_image(models.sd, [f"a photo of a {WORD}"], num_steps=setup.preview_steps, n=n,
                         width=setup.px, height=setup.px, embed_fn=word_embed_fn(models, vectors))


def sync_sources(caught):
    """How many host-device syncs CUDA's sync debug mode reported, and from where (the top 4 lines)."""
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    name = lambda f: os.path.relpath(f, ROOT) if f.startswith(ROOT) else os.path.basename(f)  # noqa: E731
    places = Counter(f"{name(w.filename)}:{w.lineno}" for w in syncs)
    return len(syncs), "; ".join(f"{place} x{n}" for place, n in places.most_common(4))


def sync_rows(models, setup, memory=None):
    """Syncs over three fp16 train steps and a preview (after a warm-up step: first-call setup aside)."""
    step = minti_step(models, setup, batch=1)
    step()
    sync(setup.device)
    rows = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for name, fn in (("3 train steps", lambda: [step() for _ in range(3)]),
                         (f"preview, {setup.preview_steps} steps", lambda: preview(models, setup, 1, step.word))):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
            count, where = sync_sources(caught)
            rows.append(row("check", f"host-device syncs: {name}", side="minti", precision="fp16", batch=1,
                            px=setup.px, value=count, ok=True, note=f"value: syncs; {where}"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return rows


def memory_rows(masters, setup, memory):
    """minti's memory through a run: load (fp16, VAE fp32 as train.py), cache images, one fp16 +
    checkpointing step, a preview. peak_mib: the peak so far; value: allocated (resident) now."""
    free()
    memory.reset()
    rows = []

    def stage(name):
        sync(setup.device)
        rows.append(row("memory", f"after {name}", side="minti", precision="fp16", px=setup.px,
                        peak_mib=memory.peak(), value=memory.now(), ok=True, note="value: MiB in use now"))

    models = place(masters, setup, "fp16", recipe=False, vae_precision="fp32")
    stage("loading")
    cache = cache_latents(models.sd.vae, images(setup, setup.cache_images, seed=3))
    stage(f"caching {setup.cache_images} images")
    with minti_checkpointing(models.sd.unet, True):
        step = minti_step(models, setup, batch=1)
        step()
    stage("one fp16 + checkpointing step")
    with torch.inference_mode():
        preview(models, setup, setup.preview_images, step.word)
    stage(f"a {setup.preview_images}-image preview")
    del models, cache, step
    free()
    return rows


# ------------------------------------------------------------------------------ the run

def attempt(rows, fallback, fn):
    """rows += fn() (a row, a list of rows, or None); a failure (out of memory, a non-finite loss, an API that
    moved) becomes the failed row `fallback` instead, so that one GPU run still gives the rest of the table."""
    try:
        out = fn()
        out = [] if out is None else out
    except Exception as error:  # noqa: BLE001  (reported in the row and on stderr, never hidden)
        traceback.print_exc()
        out = dict(fallback, ok=False, note=f"FAILED: {type(error).__name__}: {str(error)[:300]}")
    rows += out if isinstance(out, list) else [out]
    free()  # after the except block: the traceback no longer holds the failed call's tensors


def run(setup, memory, log):
    """Every section; returns the rows. Each precision's models are placed once and freed after use."""
    rows, flops, grads = [], {}, {}
    with tempfile.TemporaryDirectory() as folder:
        masters = build_masters(setup, folder)
        log(f"models built (tokenizer: {masters.tokenizer_name})")
        attempt(rows, row("memory", "memory stages"), lambda: memory_rows(masters, setup, memory))  # GPU empty
        for precision in PRECISIONS:
            models = place(masters, setup, precision)
            for case in [c for c in train_cases(setup) if c.precision == precision]:
                failed = row("train", case_name(case), side=case.side, precision=precision, batch=case.batch,
                             px=setup.px, checkpointing=int(case.ckpt))
                attempt(rows, failed, lambda: train_row(models, setup, case, memory, flops))
                log(f"train {rows[-1]['case']}: {fmt(rows[-1]['time_ms'], '.1f') or 'FAILED'} ms")
            attempt(rows, row("check", f"word gradient {precision}", precision=precision),
                    lambda: grads.update({precision: word_gradient(models, setup)}))
            sections = {"fp32": [sampling_rows], "fp16": [sampling_rows, multires_rows, scaler_row, sync_rows]}
            for section in sections.get(precision, []):
                if section is sync_rows and setup.device.type != "cuda":
                    continue  # CUDA's sync debug mode has no CPU counterpart
                attempt(rows, row("check", f"{section.__name__} {precision}"), lambda: section(models, setup, memory))
                log(f"{section.__name__} {precision} done")
            del models
            free()
    rows += gradient_rows(grads, setup)
    add_ratios(rows)
    order = ["train", "sample", "multires", "check", "memory"]
    return sorted(rows, key=lambda r: order.index(r["section"]))  # stable: run order within a section


def fmt(value, spec):
    return "" if value in ("", None) else format(value, spec)


def print_table(rows, setup):
    print("\n  section  case                                   ms     min ms  peak MiB  work MiB model MiB  "
          "TFLOP  TFLOPS    MFU  t ratio m ratio     value ok")
    for r in rows:
        print(f"  {r['section']:8s} {r['case'][:36]:36s} {fmt(r['time_ms'], '8.1f'):>8s} "
              f"{fmt(r['time_min_ms'], '8.1f'):>8s} {fmt(r['peak_mib'], '9.0f'):>9s} "
              f"{fmt(r['work_mib'], '9.0f'):>9s} {fmt(r['model_mib'], '9.0f'):>9s} {fmt(r['tflop'], '6.3g'):>6s} "
              f"{fmt(r['tflops'], '7.3g'):>7s} {fmt(r['mfu'], '6.1%'):>6s} {fmt(r['time_ratio'], '7.2f'):>7s} "
              f"{fmt(r['mem_ratio'], '7.2f'):>7s} {fmt(r['value'], '9.4g'):>9s} {r['ok']!s:>2.1s}")
    print("\n  notes:")
    for r in rows:
        if r["note"] and r["note"] != "TF32 off":
            print(f"    {r['case']}: {r['note']}")
    print(f"\n  ratios are minti / recipe (train) and minti / diffusers (sample); MFU against "
          f"{setup.peak or '?'} TFLOPS dense bf16 ({setup.peak_source}); fp32 rows ran with TF32 off.")


def write_csv(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v)
                             for k, v in r.items()})


def exact_fp32():
    """fp32 means fp32: no TF32 in matmuls or cuDNN convolutions (PyTorch's default allows it in
    convolutions). Returns the setting in words, for the table."""
    if hasattr(torch.backends.cudnn, "conv"):  # PyTorch >= 2.9: the fp32_precision settings
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        return (f"TF32 off (matmul {torch.backends.cuda.matmul.fp32_precision}, cuDNN conv "
                f"{torch.backends.cudnn.conv.fp32_precision})")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "TF32 off (allow_tf32 False for matmul and cuDNN)"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="tiny models, 64 px, batch 1-2, 1+1 steps: runs on a CPU in about a minute")
    p.add_argument("--device", default=None, help="cuda (default) or, with --tiny, cpu")
    p.add_argument("--csv", default=None,
                   help="where to write the table (default: tests/benchmarks/results/gpu_<device>.csv)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak for MFU (default: looked up by device name)")
    return p.parse_args()


def main():
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() or not args.tiny else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here. The full benchmark needs one; to check the script on a CPU, "
              "run: python tests/benchmarks/bench_gpu.py --tiny --device cpu")
        sys.exit(0 if args.tiny else 2)
    if device.type != "cuda" and not args.tiny:
        print("bench_gpu: the full SD 1.5 benchmark runs on CUDA only; on a CPU use --tiny.")
        sys.exit(2)
    tf32 = exact_fp32()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny work: a second thread only waits (see tests/conftest.py)
    setup = Setup(device=device, tiny=args.tiny, **(TINY if args.tiny else FULL))
    setup.peak, setup.peak_source = device_peak(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = args.csv or os.path.join(ROOT, "tests", "benchmarks", "results",
                                    f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', name)}{'_tiny' * args.tiny}.csv")
    start = time.perf_counter()
    log = lambda text: print(f"[{time.perf_counter() - start:6.1f} s] {text}", flush=True)  # noqa: E731
    print(f"bench_gpu: {'tiny models' if args.tiny else 'SD 1.5 architecture'}, random weights; {name}; "
          f"{setup.px} px; torch {torch.__version__}; {tf32}; MFU against {setup.peak or '?'} TFLOPS bf16 "
          f"({setup.peak_source})", flush=True)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # .to(fp16) on a random-weight model warns for every copy
    rows = run(setup, Memory(device), log)
    print_table(rows, setup)
    write_csv(path, rows)
    failed = [r["case"] for r in rows if r["ok"] is False]
    print(f"\nwrote {path} ({len(rows)} rows) in {time.perf_counter() - start:.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "every check passed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
