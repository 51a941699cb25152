"""One GPU benchmark of minti against diffusers: train.py's own training step, sampling, precision and memory.

On a CUDA machine, with no download: the SD 1.5 architecture with random weights (every tensor filled
from a seed derived from its name, bench_train_step's scheme), built once in fp32 on the CPU and copied to
the GPU in each precision, so that both sides compute with the very same weights.

  train     a textual-inversion step, minti against diffusers' examples/textual_inversion recipe, each side
            with its own models on the GPU (the other side's freed first: its memory is its own).
            minti runs train.py's own step: the images read, cropped and cached by data.load_concept_data
            (fp32 VAE, then freed as train.py frees it), the word a textual_inversion.LearnedWord, ti.adamw
            (train.py's optimizer: fused AdamW on CUDA), train.py's GradScaler in fp16, the uniform timestep
            sampler and a CPU generator, one textual_inversion.train_loop step at a time (what train.py
            calls), --checkpointing and --channels-last as train.py sets them. The recipe is written out as
            bench_train_step does it (VAE encode every step, the whole token table in AdamW, rows restored;
            fp16/bf16 as accelerate's mixed precision: autocast around the fp32 text encoder, UNet and VAE
            cast, fp16 with a GradScaler). Warm-up steps excluded, then timed steps, each ended by
            torch.cuda.synchronize; time_ms is the median step, time_min_ms the best.
  sample    512 px, 50 DDIM steps, guidance 7.5, fp16 and fp32: minti's text_to_image against
            StableDiffusionPipeline (same weights, seed, prompt); time, peak memory, the images compared.
  multires  a 10-bucket multiresolution word against the plain word; with equal buckets, the plain image.
  check     one fp16 train_loop step with train.py's GradScaler; the word's gradient in fp32 / bf16 / fp16
            against each other; host-device syncs over 3 train steps and a preview (CUDA's sync debug mode).
  memory    minti's peak memory after loading, caching 8 images, one fp16 + checkpointing step, a preview.

The order is the order of what matters most: the main table (minti and the recipe at 512 px, bf16 and
fp16, batch 1 and 4, without and with checkpointing), then channels-last (bf16, batch 1 and 4), batch 16
(bf16, without and with checkpointing), fp32 (IEEE, TF32 off) and TF32, then the other sections. Each row is
appended to the CSV as soon as it is measured. --budget-s: a training row, or a section after them, starts
only if the longest such task so far would still end within the budget; those that would not are written as
SKIPPED (one 8-minute call on one H100: --budget-s 420 leaves a minute for the start and the imports; a
task longer than all before it can still overrun, and the CSV keeps every row measured before).

FLOPs, counted with torch.utils.flop_counter.FlopCounterMode. useful_tflop: what a TI step must compute,
counted on each side's own modules, per step: the text encoder's forward, the UNet's forward and their
backward to the word (frozen weights: no weight gradient), without the VAE (the recipe's per-step encode is
overhead: minti caches it), checkpointing's recomputation or the optimizer. The two sides' counts per image
must agree (the test checks it). run_tflop: what the side's real step executed (the recipe's VAE encode,
checkpointing's recompute included). tflops = useful_tflop / time, MFU = tflops / the device's dense peak
for the row's precision: bf16/fp16 tensor cores for bf16 and fp16 rows, TF32 tensor cores for tf32 rows,
plain FP32 for fp32 rows (train.py's fp32 is IEEE: TF32 off unless --tf32; minti.run.devices).

Memory columns (CUDA): peak_mib, torch.cuda.max_memory_allocated over the timed steps, reset after the
warm-up (this side's weights, data, optimizer state and the steps' work); reserved_mib, the allocator's
reserved peak over the same steps (what nvidia-smi would show, less CUDA's context); work_mib, peak_mib
minus what was allocated before the steps; model_mib, the weights a side keeps on the device. mem_ratio =
minti's peak_mib / the recipe's. On the CPU (--tiny) the allocated columns come from the process's resident
memory (VmRSS, and VmHWM reset through /proc/self/clear_refs), reserved stays empty.

Device peaks (dense, half NVIDIA's "with sparsity" tensor-core figures) are looked up in PEAKS by
torch.cuda.get_device_name; --peak-tflops gives one figure for every precision instead (a CPU's, say).
Agreement tolerances (SAMPLE_TOLERANCE, GRAD_TOLERANCE) are first guesses, to be revised with the first GPU
run's figures. A case that fails (out of memory, say) becomes a row marked FAILED and the run goes on; the
exit code is 1 if any check failed, 2 when there is no CUDA device and --tiny was not given.

    python tests/benchmarks/bench_gpu.py --budget-s 420           # CUDA: the main table and what fits
    python tests/benchmarks/bench_gpu.py --csv /tmp/h100.csv       # everything (not yet timed on a GPU)
    python tests/benchmarks/bench_gpu.py --tiny --device cpu      # tiny models: the same code on a CPU
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
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository root
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_train_step, also when imported

from bench_train_step import fill_shared  # noqa: E402  (the seeded weights, one copy)
from minti import textual_inversion as ti  # noqa: E402  (train.py's step, loop and optimizer)
from minti.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from minti.data import load_concept_data  # noqa: E402  (train.py's data path)
from minti.io.configs import to_diffusers_config  # noqa: E402
from minti.io.tokenizer_files import clip_tokenizer, read_tokenizer_folder, write_tokenizer_folder  # noqa: E402
from minti.io.weights import StableDiffusion  # noqa: E402
from minti.run.devices import PRECISIONS, choose_cuda_backends  # noqa: E402  (train.py's back-end settings)
from minti.sampling import text_to_image  # noqa: E402
from minti.schedulers import DDPM  # noqa: E402
from minti.textual_inversion import LearnedWord, add_words, splice  # noqa: E402
from minti.timesteps import make_timestep_sampler  # noqa: E402
from minti.unet import UNet, UNetConfig  # noqa: E402
from minti.vae import VAE, VAEConfig  # noqa: E402

# Dense TFLOPS per precision (substring of the CUDA device name; first match wins), from NVIDIA's datasheets:
# tensor-core figures are the "with sparsity" ones / 2; fp32 is the plain (non-tensor-core) FP32 figure.
PEAKS = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}, "NVIDIA H100 datasheet, H100 PCIe"),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}, "NVIDIA H100 datasheet, H100 NVL"),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}, "NVIDIA H100 datasheet, H100 SXM"),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}, "NVIDIA H200 datasheet, H200 NVL"),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}, "NVIDIA H200 datasheet, H200 SXM"),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}, "NVIDIA A100 datasheet"),
]
DTYPES = {**PRECISIONS, "tf32": torch.float32}  # tf32: fp32 weights, TF32 tensor cores on (train.py --tf32)
INIT, PLACEHOLDER = 320, 49408  # the word starts at "a"; its id is one past CLIP's 49,408 tokens
TRAIN_IDS = [49406, 320, 1125, 539, 320, PLACEHOLDER]  # <start> a photo of a <word>, then <end> padding
WORD, TEMPLATE = "<concept>", "a photo of a {}"  # minti's prompt is the recipe's: 77 tokens either way
LR, WEIGHT_DECAY = 5e-3, 1e-2  # train.py's defaults, the recipe's weight decay
PROMPT, NEGATIVE, GUIDANCE, SEED = "a photo of an astronaut riding a horse", "blurry", 7.5, 0
BUCKETS = 10  # the multiresolution word's time buckets (Daras & Dimakis use 10)
SAMPLE_TOLERANCE = {"fp32": 1.0, "fp16": 4.0, "bf16": 8.0}  # mean |minti - diffusers| in uint8 levels
GRAD_TOLERANCE = 0.25  # relative error of the word's gradient between two precisions
COLUMNS = ["section", "case", "side", "precision", "batch", "px", "checkpointing", "channels_last", "time_ms",
           "time_min_ms", "peak_mib", "reserved_mib", "work_mib", "model_mib", "useful_tflop", "run_tflop",
           "tflops", "peak_tflops", "mfu", "time_ratio", "mem_ratio", "optimizer", "value", "ok", "note"]


@dataclass
class Setup:
    device: torch.device
    tiny: bool
    px: int  # image side for training, sampling and the gradient check (latents are px / 8)
    batches: tuple  # the main table's two batch sizes
    big_batch: int
    warmup: int
    steps: int
    sample_steps: int
    repeats: int  # timed sampling runs per side, alternating
    preview_steps: int
    peaks: dict | None = None  # precision -> dense TFLOPS
    peak_source: str = ""
    cache_images: int = 8
    preview_images: int = 4


FULL = dict(px=512, batches=(1, 4), big_batch=16, warmup=2, steps=5, sample_steps=50, repeats=2, preview_steps=25)
TINY = dict(px=64, batches=(1, 2), big_batch=4, warmup=1, steps=1, sample_steps=10, repeats=1, preview_steps=3)


def model_configs(tiny):
    """(text, UNet, VAE) configs: SD 1.5's, or a tiny model of the same classes (VAE factor 8 as SD's).
    The token table has one row more than CLIP's vocabulary: the recipe's resized table."""
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


@dataclass
class Case:
    side: str  # "minti" or "recipe"
    precision: str  # fp32 (IEEE), tf32, fp16, bf16
    batch: int
    ckpt: bool = False
    channels_last: bool = False

    @property
    def name(self):
        return f"{self.side} {self.precision} b{self.batch}{' ckpt' * self.ckpt}{' channels_last' * self.channels_last}"


def train_plan(setup):
    """Every training case, in the order they run (the recipe before minti, so minti's row has its ratios)."""
    small, large = setup.batches
    plan = []

    def add(precision, batches, ckpts, channels_last=False):
        for side in ("recipe", "minti"):
            plan.extend(Case(side, precision, b, ckpt, channels_last) for b in batches for ckpt in ckpts)
    for precision in ("bf16", "fp16"):  # the main table
        add(precision, (small, large), (False, True))
    add("bf16", (small, large), (False,), channels_last=True)
    add("bf16", (setup.big_batch,), (False, True))
    add("fp32", (small, large), (False,))
    add("tf32", (small, large), (False,))
    return plan


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

    def reserved(self):
        """The allocator's reserved peak since reset() (CUDA; None on the CPU)."""
        return torch.cuda.max_memory_reserved() / 2 ** 20 if self.cuda else None


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


def device_peaks(device, override):
    """({precision: dense TFLOPS}, where the figures come from) for MFU, or (None, why not)."""
    if override:
        return dict.fromkeys(DTYPES, override), "--peak-tflops, for every precision"
    if device.type != "cuda":
        return None, "no peak for a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, peaks, source in PEAKS:
        if key in name:
            return peaks, source + " (dense)"
    return None, f"{name!r} is not in PEAKS (give --peak-tflops)"


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
                           tokenizer=tokenizer, tokenizer_name=which, word_ids=word_ids, folder=folder,
                           images=write_images(setup, os.path.join(folder, "images")))


def place(masters, setup, precision, recipe=True, vae_precision=None):
    """One precision's models on the device, for the sampling and check sections: the reference's, and
    minti's sharing their tensors (both sides' weights resident: the training rows place each side alone).
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
                           ref_unet=unet, ref_vae=vae, word_ids=masters.word_ids, folder=masters.folder,
                           images=masters.images, data=None)


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


def write_images(setup, folder):
    """The concept's images as files, for train.py's data path: cache_images random RGB PNGs of px x px."""
    os.makedirs(folder, exist_ok=True)
    pixels = ((images(setup, setup.cache_images, seed=3).cpu() + 1) * 127.5).round().clamp(0, 255).byte()
    for i, image in enumerate(pixels):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:02d}.png"))
    return folder


def concept_data(sd, setup, folder):
    """train.py's data: data.load_concept_data reads, crops and resizes the images, tokenizes the prompt and
    encodes each image and its mirror image once with sd's VAE (cached latents, train.py's default)."""
    data, _ = load_concept_data(folder, setup.px, WORD, WORD, [TEMPLATE],
                                lambda prompts: sd.tokenizer(prompts, length=77), sd.vae, sd.latent_scale,
                                cache_latents=True, flip_p=0.5, device=setup.device)
    return data


def describe_optimizer(optimizer, scaler=None):
    """What the step's optimizer is, in the CSV: its class, fused or not, what it trains; the loss scale."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fused = bool(optimizer.defaults.get("fused"))
    return (f"{type(optimizer).__name__} fused={fused}, {len(params)} tensor(s) of "
            f"{sum(p.numel() for p in params)} values" + (f", {type(scaler).__name__}" if scaler else ""))


def minti_step(models, setup, batch):
    """train.py's training step on minti's model: its word (LearnedWord at "a"'s row), its optimizer
    (ti.adamw: fused AdamW on CUDA), its loss scale (a GradScaler when the weights are fp16, as train.py
    makes it), its timestep sampler and CPU generator, its data (models.data, else read as train.py reads
    it), and each call one step of ti.train_loop, the loop train.py runs. Returns step() -> the loss."""
    sd, dev = models.sd, setup.device
    data = models.data if getattr(models, "data", None) is not None else concept_data(sd, setup, models.images)
    word = LearnedWord(ti.token_table(sd.text_encoder)[INIT:INIT + 1].float(), models.word_ids).to(dev)
    optimizer = ti.adamw(word, LR, WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(dev.type) if models.dtype == torch.float16 else None  # train.py's
    sampler = make_timestep_sampler("uniform", sd.scheduler.num_train_timesteps)
    generator, losses = torch.Generator().manual_seed(1), []

    def step():
        done = len(losses)
        losses.extend(ti.train_loop(sd, word, data, optimizer, sampler, generator, steps=done + 1, lr=LR,
                                    start=done, batch=batch, scaler=scaler))
        return losses[-1]
    step.word, step.scaler, step.optimizer = word, scaler, optimizer
    return step


@contextmanager
def recipe_mode(models, ckpt):
    """The recipe's freezing and checkpointing switches, undone afterwards."""
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


def recipe_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def recipe_loss(models, scheduler, latents, noise, timesteps, ids):
    """The recipe's loss from clean latents: noise them, the text encoder (under accelerate's autocast, its
    output back to fp32, then the weights' dtype), the UNet, the mean squared error in fp32."""
    dtype, dev = models.dtype, latents.device
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        encoder_hidden_states = models.recipe_te(ids)[0].float().to(dtype=dtype)
    model_pred = models.ref_unet(noisy_latents, timesteps, encoder_hidden_states).sample
    return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")


def recipe_step(models, setup, batch):
    """diffusers' examples/textual_inversion/textual_inversion.py, one step of its loop, written out."""
    te, vae, dev, weight_dtype = models.recipe_te, models.ref_vae, setup.device, models.dtype
    scheduler = recipe_scheduler()
    embeddings = te.get_input_embeddings()
    optimizer = torch.optim.AdamW(embeddings.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY,
                                  eps=1e-8)
    scaler = torch.amp.GradScaler(dev.type) if weight_dtype == torch.float16 else None  # accelerate's
    orig_embeds_params = embeddings.weight.data.clone()
    pixels, ids = images(setup, batch), train_ids(batch, dev)

    def step():
        latents = vae.encode(pixels.to(dtype=weight_dtype)).latent_dist.sample().detach()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device).long()
        loss = recipe_loss(models, scheduler, latents, noise, timesteps, ids)
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
    step.optimizer, step.scaler = optimizer, scaler
    return step


def useful_work(models, setup, batch):
    """What a TI step must compute, on this side's own modules: the text encoder's and the UNet's forward and
    their backward to the word (frozen weights: no weight gradient) for `batch` images, without the VAE,
    checkpointing or the optimizer. Returns a function that does it once (for count_flops)."""
    dev = setup.device
    g = torch.Generator().manual_seed(4)
    shape = (batch, 4, setup.px // 8, setup.px // 8)
    latents, noise = torch.randn(shape, generator=g).to(dev), torch.randn(shape, generator=g).to(dev)
    t, ids = torch.randint(0, 1000, (batch,), generator=g).to(dev), train_ids(batch, dev)
    if models.side == "minti":
        sd = models.sd
        word = LearnedWord(ti.token_table(sd.text_encoder)[INIT:INIT + 1].float(), [PLACEHOLDER]).to(dev)

        def work():
            with minti_checkpointing(sd.unet, False):
                loss, _ = ti.diffusion_loss(sd.text_encoder, sd.unet, sd.scheduler, word, ids, latents, t, noise)
                loss.backward()
        return work
    scheduler = recipe_scheduler()

    def work():
        with recipe_mode(models, ckpt=False):
            recipe_loss(models, scheduler, latents.to(models.dtype), noise.to(models.dtype), t, ids).backward()
            models.recipe_te.get_input_embeddings().weight.grad = None
    return work


def place_side(masters, setup, case):
    """One side's models on the device, alone (the other side's are freed before): the recipe's fp32 text
    encoder, UNet and VAE in the row's dtype; minti's text encoder and UNet in the row's dtype, its images
    read and cached with the fp32 VAE, which is then freed (train.py without previews); channels-last UNet
    as train.py's --channels-last makes it."""
    dtype, dev = DTYPES[case.precision], setup.device
    moved = lambda m, dt: copy.deepcopy(m).to(dev, dt)  # noqa: E731  (the masters stay fp32 on the CPU)
    out = SimpleNamespace(side=case.side, precision=case.precision, dtype=dtype)
    if case.side == "recipe":
        out.recipe_te, out.ref_unet, out.ref_vae = moved(masters.te, torch.float32), moved(masters.unet, dtype), \
            moved(masters.vae, dtype)
        if case.channels_last:
            out.ref_unet.to(memory_format=torch.channels_last)
        return out
    text_cfg, unet_cfg, vae_cfg = masters.configs
    out.sd = StableDiffusion(tokenizer=masters.tokenizer, scheduler=DDPM(), latent_scale=vae_cfg.scaling_factor,
                             text_encoder=share(CLIPTextModel, text_cfg, moved(masters.te, dtype), "text_model."),
                             unet=share(UNet, unet_cfg, moved(masters.unet, dtype)),
                             vae=share(VAE, vae_cfg, moved(masters.vae, torch.float32)))
    if case.channels_last:
        out.sd.unet.to(memory_format=torch.channels_last)
    out.data, out.word_ids, out.images = concept_data(out.sd, setup, masters.images), masters.word_ids, masters.images
    out.sd.vae = out.data.latents.vae = None  # nothing encodes or decodes again: train.py frees it
    return out


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


def case_row(case, setup, **fields):
    return row("train", case.name, side=case.side, precision=case.precision, batch=case.batch, px=setup.px,
               checkpointing=int(case.ckpt), channels_last=int(case.channels_last), **fields)


def train_row(models, setup, case, memory, flops):
    """Set one side's step up, run warm-up and timed steps; count the useful FLOPs once per (side, batch) and
    what the step ran once per (side, batch, checkpointing)."""
    dev = setup.device
    if (case.side, case.batch) not in flops:
        flops[case.side, case.batch] = count_flops(useful_work(models, setup, case.batch))
    free()
    mode = recipe_mode(models, case.ckpt) if case.side == "recipe" else minti_checkpointing(models.sd.unet, case.ckpt)
    with mode:
        step = (recipe_step if case.side == "recipe" else minti_step)(models, setup, case.batch)
        for _ in range(setup.warmup):
            step()
        sync(dev)
        base = memory.now()
        memory.reset()  # the peak of the steps: not the one-off setup (minti's cache, the recipe's copies)
        times, losses = [], []
        for _ in range(setup.steps):
            start = time.perf_counter()
            losses.append(step())
            sync(dev)
            times.append(time.perf_counter() - start)
        peak, reserved = memory.peak(), memory.reserved()
        if (case.side, case.batch, case.ckpt) not in flops:
            flops[case.side, case.batch, case.ckpt] = count_flops(step)
    model = mib(models.sd.text_encoder, models.sd.unet) if case.side == "minti" else \
        mib(models.recipe_te, models.ref_unet, models.ref_vae)
    median, useful = sorted(times)[len(times) // 2], flops[case.side, case.batch]
    achieved = useful / median / 1e12
    peak_tflops = (setup.peaks or {}).get(case.precision)
    return case_row(case, setup, time_ms=1e3 * median, time_min_ms=1e3 * min(times), peak_mib=peak,
                    reserved_mib=reserved, work_mib=None if peak is None else max(0.0, peak - base), model_mib=model,
                    useful_tflop=useful / 1e12, run_tflop=flops[case.side, case.batch, case.ckpt] / 1e12,
                    tflops=achieved, peak_tflops=peak_tflops, mfu=achieved / peak_tflops if peak_tflops else None,
                    optimizer=describe_optimizer(step.optimizer, step.scaler),
                    ok=all(math.isfinite(x) for x in losses))


@contextmanager
def minti_checkpointing(unet, on):
    """train.py's --checkpointing (sd.unet.gradient_checkpointing), undone afterwards."""
    unet.gradient_checkpointing = on
    try:
        yield
    finally:
        unet.gradient_checkpointing = False


def add_ratios(r, done):
    """minti / recipe for a training case: time, and peak allocated memory (each side measured alone)."""
    other = done.get(("recipe",) + key_of(r))
    if r["side"] != "minti" or other is None or "" in (r["time_ms"], other["time_ms"]):
        return r  # (a failed or skipped case has no numbers)
    r["time_ratio"] = r["time_ms"] / other["time_ms"]
    if r["peak_mib"] not in ("", None) and other["peak_mib"] not in ("", None):
        r["mem_ratio"] = r["peak_mib"] / other["peak_mib"]
    return r


def key_of(r):
    return r["precision"], r["batch"], r["checkpointing"], r["channels_last"]


def train_rows(masters, setup, memory, clock, emit):
    """The training table, case by case in train_plan's order: each side's models placed once per group of
    cases (side, precision, channels-last), freed before the next group; each row emitted when measured."""
    flops, done, held = {}, {}, {"key": None, "models": None}
    for case in train_plan(setup):
        if not clock.allows():
            emit(case_row(case, setup, note="SKIPPED: --budget-s"))
            continue
        group = (case.side, case.precision, case.channels_last)

        def measure(case=case, group=group):
            if held["key"] != group:
                held["key"] = held["models"] = None
                free()
                choose_cuda_backends(tf32=case.precision == "tf32")  # train.py's: IEEE fp32 unless --tf32
                held["models"], held["key"] = place_side(masters, setup, case), group
            return train_row(held["models"], setup, case, memory, flops)
        with clock.task():
            out = attempt(case_row(case, setup), measure)
        for r in out:
            done[(r["side"],) + key_of(r)] = add_ratios(r, done)
            emit(r)
    held.clear()
    free()
    choose_cuda_backends(tf32=False)
    return flops


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
    """One fp16 step of train.py's (train_loop, its GradScaler): the vectors stay finite, the scale sane."""
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
                        peak_mib=memory.peak(), reserved_mib=memory.reserved(), value=memory.now(), ok=True,
                        note="value: MiB in use now"))

    models = place(masters, setup, "fp16", recipe=False, vae_precision="fp32")
    stage("loading")
    models.data = concept_data(models.sd, setup, masters.images)  # as train.py: each image and its mirror
    stage(f"caching {setup.cache_images} images")
    with minti_checkpointing(models.sd.unet, True):
        step = minti_step(models, setup, batch=1)
        step()
    stage("one fp16 + checkpointing step")
    with torch.inference_mode():
        preview(models, setup, setup.preview_images, step.word)
    stage(f"a {setup.preview_images}-image preview")
    del models, step
    free()
    return rows


# ------------------------------------------------------------------------------ the run

def attempt(fallback, fn):
    """fn()'s rows (a row, a list of rows, or None) as a list; a failure (out of memory, a non-finite loss, an
    API that moved) becomes the failed row `fallback` instead, so that one GPU run still gives the rest."""
    try:
        out = fn()
        out = [] if out is None else out
    except Exception as error:  # noqa: BLE001  (reported in the row and on stderr, never hidden)
        traceback.print_exc()
        out = dict(fallback, ok=False, note=f"FAILED: {type(error).__name__}: {str(error)[:300]}")
    free()  # after the except block: the traceback no longer holds the failed call's tensors
    return out if isinstance(out, list) else [out]


class Clock:
    """--budget-s: a task starts only if the longest task so far would still end within the budget."""

    def __init__(self, budget_s=None):
        self.start, self.budget, self.longest = time.perf_counter(), budget_s, 0.0

    def elapsed(self):
        return time.perf_counter() - self.start

    def allows(self):
        return self.budget is None or self.elapsed() + self.longest <= self.budget

    @contextmanager
    def task(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.longest = max(self.longest, time.perf_counter() - began)


def run(setup, memory, clock, emit, log):
    """Every section, in the order of what matters most; each row goes to emit() when it is measured.
    Returns the rows and the FLOP counts."""
    rows, grads = [], {}

    def out(r):
        rows.append(r)
        emit(r)
        if r["section"] == "train":
            log(f"{r['case']}: " + (f"{r['time_ms']:.1f} ms" if r["time_ms"] != "" else r["note"] or "FAILED"))

    with tempfile.TemporaryDirectory() as folder:
        masters = build_masters(setup, folder)
        log(f"models built (tokenizer: {masters.tokenizer_name})")
        flops = train_rows(masters, setup, memory, clock, out)
        sections = {"fp16": [sampling_rows, multires_rows, scaler_row, sync_rows], "bf16": [], "fp32": [sampling_rows]}
        for precision, todo in sections.items():
            models = None  # placed when its first section starts: a precision the budget skips is never placed
            for section in [*todo, word_gradient]:
                name = f"{section.__name__} {precision}"
                if section is sync_rows and setup.device.type != "cuda":
                    continue  # CUDA's sync debug mode has no CPU counterpart
                if not clock.allows():
                    out(row("check", name, precision=precision, note="SKIPPED: --budget-s"))
                    continue
                with clock.task():  # each section its own task: the budget learns how long they take
                    if models is None:
                        models = place(masters, setup, precision)
                    if section is word_gradient:
                        work = lambda: grads.update({precision: word_gradient(models, setup)})  # noqa: E731
                    else:
                        work = lambda: section(models, setup, memory)  # noqa: E731
                    for r in attempt(row("check", name, precision=precision), work):
                        out(r)
                log(f"{name} done")
            models = None  # freed before the next precision is placed
            free()
        for r in gradient_rows(grads, setup):
            out(r)
        if clock.allows():
            for r in attempt(row("memory", "memory stages"), lambda: memory_rows(masters, setup, memory)):
                out(r)
        else:
            out(row("memory", "memory stages", note="SKIPPED: --budget-s"))
    return rows, flops


def fmt(value, spec):
    return "" if value in ("", None) else format(value, spec)


def print_table(rows, setup):
    print("\n  section  case                                 ms   min ms  peak MiB  rsvd MiB  work MiB "
          "useful TF  run TF  TFLOPS    MFU t ratio m ratio     value ok")
    for r in rows:
        print(f"  {r['section']:8s} {r['case'][:33]:33s} {fmt(r['time_ms'], '8.1f'):>8s} "
              f"{fmt(r['time_min_ms'], '8.1f'):>8s} {fmt(r['peak_mib'], '9.0f'):>9s} "
              f"{fmt(r['reserved_mib'], '9.0f'):>9s} {fmt(r['work_mib'], '9.0f'):>9s} "
              f"{fmt(r['useful_tflop'], '9.3g'):>9s} {fmt(r['run_tflop'], '7.3g'):>7s} {fmt(r['tflops'], '7.3g'):>7s} "
              f"{fmt(r['mfu'], '6.1%'):>6s} {fmt(r['time_ratio'], '7.2f'):>7s} {fmt(r['mem_ratio'], '7.2f'):>7s} "
              f"{fmt(r['value'], '9.4g'):>9s} {r['ok']!s:>2.1s}")
    print("\n  notes:")
    for r in rows:
        if r["note"] or r["optimizer"]:
            print(f"    {r['case']}: " + "; ".join(x for x in (r["optimizer"], r["note"]) if x))
    print(f"\n  ratios are minti / recipe (train: time, peak allocated) and minti / diffusers (sample); MFU = "
          f"useful TFLOP / time / the precision's dense peak ({setup.peak_source}): "
          f"{setup.peaks or 'none'}; fp32 rows are IEEE fp32 (TF32 off), tf32 rows TF32 on.")


class CsvRows:
    """The table as CSV, a row appended (and flushed) as soon as it is measured: a run cut short keeps
    what it measured. The header is written when the file is opened (an older file is replaced)."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, COLUMNS).writeheader()

    def __call__(self, r):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow({k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v)
                                                 for k, v in r.items()})
            f.flush()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="tiny models, 64 px, batch 1-2 (big batch 4), 1+1 steps: the same code on a CPU")
    p.add_argument("--device", default=None, help="cuda (default) or, with --tiny, cpu")
    p.add_argument("--csv", default=None,
                   help="where to write the table (default: tests/benchmarks/results/gpu_<device>.csv)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="one dense peak for every precision (default: looked up by device name, per precision)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds of benchmarking: a row starts only if the longest row so far would still end "
                        "within them; the rest are written as SKIPPED (420 fits one 8-minute call on an H100)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() or not args.tiny else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here. The full benchmark needs one; to check the script on a CPU, "
              "run: python tests/benchmarks/bench_gpu.py --tiny --device cpu")
        sys.exit(0 if args.tiny else 2)
    if device.type != "cuda" and not args.tiny:
        print("bench_gpu: the full SD 1.5 benchmark runs on CUDA only; on a CPU use --tiny.")
        sys.exit(2)
    choose_cuda_backends(tf32=False)  # train.py's: fp32 is IEEE fp32 (TF32 off) unless a row says tf32
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny work: a second thread only waits (see tests/conftest.py)
    setup = Setup(device=device, tiny=args.tiny, **(TINY if args.tiny else FULL))
    setup.peaks, setup.peak_source = device_peaks(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = args.csv or os.path.join(ROOT, "tests", "benchmarks", "results",
                                    f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', name)}{'_tiny' * args.tiny}.csv")
    clock = Clock(args.budget_s)
    log = lambda text: print(f"[{clock.elapsed():6.1f} s] {text}", flush=True)  # noqa: E731
    print(f"bench_gpu: {'tiny models' if args.tiny else 'SD 1.5 architecture'}, random weights; {name}; "
          f"{setup.px} px; torch {torch.__version__}; peaks {setup.peaks or '?'} TFLOPS ({setup.peak_source}); "
          f"budget {args.budget_s or 'none'} s; rows appended to {path}", flush=True)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # .to(fp16) on a random-weight model warns for every copy
    rows, _ = run(setup, Memory(device), clock, CsvRows(path), log)
    print_table(rows, setup)
    failed = [r["case"] for r in rows if r["ok"] is False]
    skipped = sum(r["note"].startswith("SKIPPED") for r in rows)
    print(f"\nwrote {path} ({len(rows)} rows, {skipped} skipped by the budget) in {clock.elapsed():.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "every check passed"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
