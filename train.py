"""Learn a new word for a concept from a few images: textual inversion (Gal et al. 2022).

    python train.py                                  # the toy model's default concept, minutes on a CPU
    python train.py --model path/to/sd15 --images my_cat/ --token "<my-cat>" --init cat \\
        --batch 1 --grad-accum 4 --lr 5e-4 --scale-lr --steps 3000 --precision fp16 --checkpointing

Writes learned_embeds.safetensors (diffusers' load_textual_inversion) and <name>.pt (AUTOMATIC1111),
a CSV log, a loss curve, the run's config.json and a resumable checkpoint/ into --out. The method is
in minti/textual_inversion.py (the word, the loss, one step) and minti/data.py (images, prompts);
this file is the loop around them: settings, logging, saving, resuming, previews.
"""
import argparse
import importlib.util
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from minti.files import PRECISIONS, atomic_write, pick_device, write_csv, write_json
MULTIRES_EXPORTS = (0.1, 0.5, 0.9)  # diffusion times exported as ordinary words, for tools without time
PREVIEW_STEPS, PREVIEW_IMAGES, PREVIEW_GUIDANCE = 25, 4, 7.5  # DDIM steps, images per prompt, CFG scale
PAPER_LR, TOY_LR = 5e-3, 5e-2  # default learning rates (see TrainConfig.lr)
# The closing toy evaluation: 64 samples per prompt and 25 DDIM steps keep it to about a minute on two
# CPU cores (95% intervals of +-12 points at worst); `python -m minti.toy.evaluate` runs the full 128 x 50.
EVAL_SAMPLES, EVAL_STEPS = 64, 25
TOY_VECTORS, TOY_STEPS = 2, 300  # the toy model's defaults for --vectors and --steps (see fill_toy_defaults)


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults learn the toy model's default concept on a CPU."""

    # what to learn
    model: str = "toy"  # "toy", a diffusers folder, or one SD 1.x .safetensors/.ckpt file
    images: str | None = None  # default: weights/toy/concepts/<default toy concept>/ (toy model only)
    token: str = "<concept>"  # the new word, as it will be written in prompts
    init: str | None = None  # coarse descriptor(s) to start from; toy model: the toy concept's shape
    vectors: int = 1  # vectors per word (the paper's "2-word", "3-word" variants)
    what: str = "auto"  # prompt templates: object | style | toy; auto = toy for the toy model, else object
    resolution: int | None = None  # image side in pixels; default: the model's (512 SD 1.x, 32 toy)
    multires: int = 1  # T > 1: multiresolution TI, one set of vectors per 1000/T timesteps
    # optimisation
    steps: int = 1000
    batch: int = 16  # the toy model's 32 px images are cheap; SD 1.x on one GPU: 1-4, with --grad-accum
    grad_accum: int = 1
    # None: 5e-3, the paper's base lr (and AUTOMATIC1111's); the toy model: TOY_LR. Adam moves each number
    # by about lr per step whatever the gradient, and the toy's words are long (median norm ~8, --norm-log).
    lr: float | None = None
    scale_lr: bool = False
    lr_warmup: int = 0  # linear warm-up steps
    lr_schedule: str = "constant"  # constant | cosine (decays to 0 at --steps)
    weight_decay: float = 1e-2  # torch AdamW's default, which the paper's code used; on the vectors only
    flip: float = 0.5  # probability of mirroring an image (the paper's and diffusers' 0.5); 0: never
    timesteps: str = "uniform"  # which t to train on: uniform | A-B | T | adaptive (minti/timesteps.py)
    seed: int = 0
    # speed and memory
    precision: str = "fp32"  # fp16 / bf16: frozen weights in half precision; vectors, AdamW, loss in fp32
    checkpointing: bool = False  # gradient checkpointing in the UNet: less memory, ~47% more compute
    channels_last: bool = False  # NHWC memory layout for the UNet (faster on some GPUs and CPUs)
    cache_latents: bool = True  # encode each image (and its mirror image) once, not at every step
    device: str = "auto"  # cuda if available, else mps, else cpu
    threads: int = 0  # CPU threads for torch; 0: torch's default
    # outputs
    out: str | None = None  # default: runs/<name>
    save_every: int = 250  # concept files + resumable checkpoint every N steps (0: only at the end)
    preview_every: int = 250  # preview grid every N steps and at the end (0: none)
    preview_prompt: list = field(default_factory=list)  # default: the first template
    norm_log: bool = False  # log the vectors' norm beside a typical word's norm
    evaluate: bool = True  # toy model: judge the learned word with the oracle at the end
    resume: str | None = None  # a run folder (or its checkpoint/) to continue
    from_file: str | None = None  # warm start from an embedding file of any supported format


# Settings that may change when a run is resumed; any other must stay as the run was started.
CHANGEABLE_ON_RESUME = {"steps", "save_every", "preview_every", "preview_prompt", "out", "device", "threads",
                        "norm_log", "evaluate", "resume"}


def build_parser(with_defaults=True):
    """The command line. Without defaults, parsing tells which flags were given explicitly."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None if with_defaults else argparse.SUPPRESS)
    add, flag, d = p.add_argument, argparse.BooleanOptionalAction, " (default: %(default)s)"
    add("--model", help="'toy', a diffusers folder, or one SD 1.x checkpoint file" + d)
    add("--images", metavar="DIR",
        help="folder of the concept's images (jpg/png/webp, any size; a .txt beside an image is its caption, "
             "with {} or [name] or S* where the word goes)" + d + "; None: the default toy concept's")
    add("--token", help="the new word, e.g. '<my-cat>'; must not be a word the tokenizer knows" + d)
    add("--init", metavar="WORD",
        help="word(s) to start from, e.g. 'cat' (one per vector, or one for all)" + d
             + "; None: the toy concept's shape word")
    add("--vectors", type=int, metavar="N", help="vectors per word" + d + f"; the toy model: {TOY_VECTORS}")
    add("--what", choices=["auto", "object", "style", "toy"],
        help="neutral prompt templates (the paper's object/style lists, or the toy captions'); auto: toy for "
             "the toy model, else object" + d)
    add("--resolution", type=int, help="image side in pixels" + d + "; None: the model's training size")
    add("--multires", type=int, nargs="?", const=10, metavar="T",
        help="multiresolution textual inversion: T sets of vectors, one per 1000/T timesteps (T=10 when the "
             "flag has no value)" + d)
    add("--steps", type=int, help="optimisation steps" + d + f"; the toy model: {TOY_STEPS}")
    add("--batch", type=int, help="images per micro-batch" + d)
    add("--grad-accum", type=int, metavar="K", help="micro-batches per step (gradient accumulation)" + d)
    add("--lr", type=float,
        help="learning rate of the vectors (AdamW)" + d + f"; None: {PAPER_LR:g}, the toy model {TOY_LR:g}")
    add("--scale-lr", action=flag, help="multiply --lr by batch x grad-accum, as the paper does" + d)
    add("--lr-warmup", type=int, metavar="STEPS", help="linear warm-up steps" + d)
    add("--lr-schedule", choices=["constant", "cosine"],
        help="after warm-up: constant, or cosine decay to 0 at --steps" + d)
    add("--weight-decay", type=float, help="AdamW weight decay on the vectors" + d)
    add("--flip", type=float, metavar="P", help="probability of mirroring an image; 0: never" + d)
    add("--timesteps", metavar="SPEC",
        help="timesteps to train on: uniform, an interval A-B (t = A..B-1), one timestep T, or adaptive" + d)
    add("--seed", type=int, help="seed of every random draw of the run" + d)
    add("--precision", choices=list(PRECISIONS),
        help="frozen weights' precision; the vectors, AdamW and the loss stay fp32; fp16 adds a loss "
             "scale (torch.amp.GradScaler)" + d)
    add("--checkpointing", action=flag, help="gradient checkpointing in the UNet (less memory, slower)" + d)
    add("--channels-last", action=flag, help="channels-last memory layout for the UNet" + d)
    add("--cache-latents", action=flag,
        help="encode each image and its mirror image once (else: the VAE at every step)" + d)
    add("--device", help="cpu, cuda, cuda:1, mps, or auto" + d)
    add("--threads", type=int, metavar="N", help="torch CPU threads; 0: torch's default" + d)
    add("--out", metavar="DIR", help="output folder" + d + "; None: runs/<name>, or the resumed run's")
    add("--save-every", type=int, metavar="N",
        help="write the concept files, a snapshot and a resumable checkpoint every N steps; 0: at the "
             "end" + d)
    add("--preview-every", type=int, metavar="N",
        help=f"fixed-seed preview grid ({PREVIEW_IMAGES} images per prompt, {PREVIEW_STEPS} DDIM steps) "
             "every N steps and at the end; 0: none" + d)
    add("--preview-prompt", action="append", metavar="TEXT",
        help="a preview prompt with {} for the word; repeat for several" + d + "; empty: the first template")
    add("--norm-log", action=flag, help="log the vectors' norm beside a typical word's norm" + d)
    add("--evaluate", action=flag, help="toy model: evaluate the word with the oracle at the end" + d)
    add("--resume", metavar="DIR",
        help="continue the run in DIR (its checkpoint/) exactly where it stopped" + d)
    add("--from", dest="from_file", metavar="FILE",
        help="start from the vectors of an embedding file (diffusers, A1111, kohya, the paper's, minti's "
             "multires)" + d)
    if with_defaults:
        p.set_defaults(**asdict(TrainConfig()))
    return p


def parse_args(argv=None):
    """(TrainConfig, the names of the settings given on the command line)."""
    args = build_parser().parse_args(argv)
    explicit = set(vars(build_parser(with_defaults=False).parse_args(argv)))
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    config.preview_prompt = list(config.preview_prompt or [])
    return config, explicit


# ----------------------------------------------------------------------------------------------
# Small helpers: names, the lr schedule, files written atomically, the loss plot

class RunError(ValueError):
    """Something about the run's settings that the user must change; the message says what."""


def file_name(token):
    """A file-system-safe name for the word: '<my-cat>' -> 'my-cat' (AUTOMATIC1111 calls it by it)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", token.strip("<>")).strip("-.") or "concept"


def lr_factor(step, warmup, total, schedule):
    """Multiplier of the learning rate at a step (0-based): linear warm-up, then constant or cosine."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def plot_loss(path, columns, rows, title):
    """The loss per step and its running mean; below it, the vectors' norm (and a typical word's)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if not rows:
        return
    col = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
    window = max(1, min(50, len(rows) // 10))
    loss = torch.tensor(col["loss"], dtype=torch.float64)
    running = torch.nn.functional.avg_pool1d(loss[None, None], window, stride=1)[0, 0]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(2, 1))
    ax.plot(col["step"], col["loss"], lw=0.5, alpha=0.4, label="loss")
    ax.plot(col["step"][window - 1:], running.tolist(), lw=1.5, label=f"running mean ({window} steps)")
    ax.set_ylabel("loss (eq. 2)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax2.plot(col["step"], col["vector_norm"], label="learned vectors")
    if "typical_norm" in col:
        ax2.plot(col["step"], col["typical_norm"], ls="--", label="a typical word (median of the table)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("norm")
    ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Setting up: the model, the toy defaults, the starting vectors

def load_frozen_model(cfg, device):
    """The SD model with every weight frozen: eval mode, no gradients, half precision if asked."""
    import minti

    sd = minti.load(cfg.model, device=device)
    for module in (sd.text_encoder, sd.unet, sd.vae):
        module.eval().requires_grad_(False)  # no weight gradient is ever computed or stored
    # The VAE stays fp32: it encodes the images once (and decodes previews); SD's VAE overflows in fp16.
    sd.text_encoder.to(PRECISIONS[cfg.precision])
    sd.unet.to(PRECISIONS[cfg.precision])
    sd.unet.gradient_checkpointing = cfg.checkpointing
    if cfg.channels_last:
        sd.unet.to(memory_format=torch.channels_last)
    return sd


def is_toy(model):
    """Is `model` the toy model: "toy", or the path of its folder?"""
    from minti.weights import TOY_FOLDER

    return model == "toy" or os.path.realpath(model) == os.path.realpath(TOY_FOLDER)


def toy_concept_name(images):
    """The toy concept an images folder holds (weights/toy/concepts/<name>/), or None."""
    from minti.toy.world import CONCEPTS
    from minti.weights import TOY_FOLDER

    parent, name = os.path.split(os.path.abspath(images).rstrip(os.sep))
    return name if parent == os.path.join(str(TOY_FOLDER), "concepts") and name in CONCEPTS else None


def fill_toy_defaults(cfg, explicit):
    """The toy model's default concept: its images folder, and its init word (its shape's name)."""
    from minti.toy.world import CONCEPTS, DEFAULT_CONCEPT
    from minti.weights import TOY_FOLDER

    if not is_toy(cfg.model):
        if cfg.images is None:
            raise RunError("--images DIR is required with a model other than the toy model: a folder with "
                           "3-5 images of the concept.")
        return
    if cfg.images is None:
        cfg.images = os.path.join(str(TOY_FOLDER), "concepts", DEFAULT_CONCEPT)
        if not os.path.isdir(cfg.images):
            raise RunError(f"The default toy concept's images ({cfg.images}) are not there; write them with "
                           f"`python -c \"from minti.toy.world import write_concept_images as w; "
                           f"w('{DEFAULT_CONCEPT}', '{cfg.images}')\"`, or pass --images DIR.")
    name = toy_concept_name(cfg.images)
    if cfg.init is None and name is not None and "from_file" not in explicit:
        cfg.init = CONCEPTS[name].init_word
    if cfg.resume is None:  # a resumed run keeps its own settings
        # Measured on the default concept (lessons/results/10_tradeoff.csv, 200 steps, lr 5e-2): one
        # vector reconstructs 73% (its stripes come and go), two vectors 89% with editability 80%.
        if "vectors" not in explicit:
            cfg.vectors = TOY_VECTORS
        if "steps" not in explicit:
            cfg.steps = TOY_STEPS


def initial_vectors(cfg, explicit, sd):
    """The word's starting vectors [T, n, D] and a sentence saying where they come from."""
    from minti.concepts import load_concepts
    from minti.textual_inversion import init_vectors

    table = sd.text_encoder.text_model.embeddings.token_embedding.weight
    T = cfg.multires
    if not cfg.from_file:
        if not cfg.init:
            raise RunError("--init WORD is needed: a coarse descriptor of the concept to start from, e.g. "
                           "'cat', 'sculpture', 'painting' (or --from FILE to start from a learned word).")
        vectors, message = init_vectors(sd.tokenizer, table, cfg.init, cfg.vectors)
        return vectors[None].repeat(T, 1, 1), message + (f"; the same for all {T} resolutions" * (T > 1))
    concepts = load_concepts(cfg.from_file, expected_width=table.shape[1])
    if len(concepts) != 1:
        raise RunError(f"--from {cfg.from_file} holds {len(concepts)} words ({[c.token for c in concepts]}); "
                       f"a warm start needs a file with one.")
    c = concepts[0]
    if "vectors" in explicit and cfg.vectors != c.num_vectors:
        raise RunError(f"--from {cfg.from_file} has {c.num_vectors} vector(s), but --vectors is "
                       f"{cfg.vectors}.")
    cfg.vectors = c.num_vectors
    if "token" not in explicit:
        cfg.token = c.token
    if not c.is_multires:
        message = f"init: {c.num_vectors} vector(s) from {cfg.from_file}"
        return c.vectors[None].repeat(T, 1, 1), message + (f", for all {T} resolutions" * (T > 1))
    if "multires" in explicit and T != c.resolutions:
        raise RunError(f"--from {cfg.from_file} is a multiresolution word of {c.resolutions} sets, but "
                       f"--multires is {T}.")
    cfg.multires = T = c.resolutions
    return c.vectors.clone(), f"init: {c.num_vectors} vector(s) x {T} resolutions from {cfg.from_file}"


def templates_for(cfg):
    from minti.data import TEMPLATES

    return TEMPLATES[cfg.what if cfg.what != "auto" else ("toy" if is_toy(cfg.model) else "object")]


# ----------------------------------------------------------------------------------------------
# Concept files, checkpoints

def save_concept_files(folder, concept, name):
    """diffusers + AUTOMATIC1111 files of the word (multires: minti's file + a few resolutions of it)."""
    from minti.concepts import export_resolution, save_a1111, save_diffusers, save_multires

    if not concept.is_multires:
        paths = [os.path.join(folder, "learned_embeds.safetensors"), os.path.join(folder, f"{name}.pt")]
        save_diffusers(paths[0], concept)
        save_a1111(paths[1], concept)
        return paths
    paths = [os.path.join(folder, f"{name}-multires.safetensors")]
    save_multires(paths[0], concept)
    for t in MULTIRES_EXPORTS:
        single = export_resolution(concept, t)  # named "<token-r0.5>"
        paths += [os.path.join(folder, f"learned_embeds-r{t:g}.safetensors"),
                  os.path.join(folder, f"{name}-r{t:g}.pt")]
        save_diffusers(paths[-2], single)
        save_a1111(paths[-1], single)
    return paths


def find_checkpoint(path):
    """The state file of a run folder, of its checkpoint/ folder, or the file itself."""
    for candidate in (os.path.join(path, "checkpoint", "state.pt"), os.path.join(path, "state.pt"), path):
        if os.path.isfile(candidate):
            return candidate
    expected = os.path.join(path, "checkpoint", "state.pt")
    raise RunError(f"--resume {path}: no checkpoint there (no {expected}); give the folder of a run that "
                   f"train.py wrote.")


def merge_resumed_config(saved, given, explicit):
    """The resumed run's settings: as saved, but for the few that may change (CHANGEABLE_ON_RESUME)."""
    cfg = TrainConfig(**saved)
    for key in sorted(explicit):
        if key in CHANGEABLE_ON_RESUME:
            setattr(cfg, key, getattr(given, key))
        elif getattr(given, key) != getattr(cfg, key):
            raise RunError(f"--{key.replace('_', '-')} {getattr(given, key)!r} differs from the run being "
                           f"resumed ({getattr(cfg, key)!r}); a resumed run keeps its settings (only "
                           f"{', '.join(sorted(CHANGEABLE_ON_RESUME - {'resume'}))} may change). Start a new "
                           f"run with --from to change the others.")
    return cfg


def choose_out(cfg, name):
    """--out; by default runs/<name>, or runs/<name>-2, ... when that is taken."""
    if cfg.out:
        if cfg.resume is None and os.path.isfile(os.path.join(cfg.out, "checkpoint", "state.pt")):
            raise RunError(f"--out {cfg.out} already holds a run; continue it with --resume {cfg.out}, or "
                           f"choose another --out.")
        return cfg.out
    out, k = os.path.join("runs", name), 1
    while os.path.exists(out) and os.listdir(out):
        k += 1
        out = os.path.join("runs", f"{name}-{k}")
    return out


# ----------------------------------------------------------------------------------------------
# The run

class Run:
    """One training run: the frozen model, the learned word, the data, AdamW, the timestep sampler,
    the random generator that every draw comes from, the log, and what gets saved where."""

    def __init__(self, cfg, explicit=frozenset()):
        from minti.concepts import Concept
        from minti.data import load_concept_data
        from minti.sampling import default_size
        from minti.textual_inversion import LearnedWord, add_words, check_new_word
        from minti.timesteps import make_timestep_sampler

        state = None
        if cfg.resume:
            state_path = find_checkpoint(cfg.resume)
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            cfg = merge_resumed_config(state["config"], cfg, explicit)
            if "out" not in explicit:  # the run's own folder: .../<run>/checkpoint/state.pt
                cfg.out = os.path.dirname(os.path.dirname(os.path.abspath(state_path)))
        for key in ("steps", "batch", "grad_accum", "vectors", "multires"):
            if getattr(cfg, key) < 1:
                raise RunError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(cfg, key)}.")
        if not 0.0 <= cfg.flip <= 1.0:
            raise RunError(f"--flip is a probability in [0, 1], got {cfg.flip}.")
        make_timestep_sampler(cfg.timesteps)  # a bad spec fails now, not after the model is loaded
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        fill_toy_defaults(cfg, explicit)
        self.cfg, self.device = cfg, pick_device(cfg.device)

        self.sd = sd = load_frozen_model(cfg, self.device)
        self.sampler = make_timestep_sampler(cfg.timesteps, sd.scheduler.num_train_timesteps)
        if state is None:
            vectors, self.init_message = initial_vectors(cfg, explicit, sd)
        else:
            vectors = state["vectors"]
            self.init_message = f"resumed from {cfg.resume} at step {state['step']}"
        check_new_word(sd.tokenizer, cfg.token)
        concept = Concept(cfg.token, vectors[0] if cfg.multires == 1 else vectors)
        ids = add_words(sd.tokenizer, {cfg.token: concept.num_vectors})[cfg.token]
        self.word = LearnedWord(vectors, ids, sd.scheduler.num_train_timesteps).to(self.device)
        self.placeholder_text = " ".join(concept.placeholder_tokens)  # n vectors: n tokens in a prompt
        self.name = file_name(cfg.token)

        self.resolution = cfg.resolution or default_size(sd)[0]
        self.templates = templates_for(cfg)
        length = sd.text_encoder.config.max_position_embeddings
        self.data, self.data_summary = load_concept_data(
            cfg.images, self.resolution, cfg.token, self.placeholder_text, self.templates,
            lambda prompts: sd.tokenizer(prompts, length=length), sd.vae, sd.latent_scale,
            cache_latents=cfg.cache_latents, flip_p=cfg.flip, device=self.device)

        if cfg.lr is None:
            cfg.lr = TOY_LR if is_toy(cfg.model) else PAPER_LR
        self.lr = cfg.lr * (cfg.batch * cfg.grad_accum if cfg.scale_lr else 1)
        self.optimizer = torch.optim.AdamW([self.word.vectors], lr=self.lr, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=cfg.weight_decay)
        self.scaler = None
        if cfg.precision == "fp16":  # fp16 gradients underflow without a loss scale, on any device
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # every random draw of the run, on the CPU
        table = sd.text_encoder.text_model.embeddings.token_embedding.weight
        self.typical_norm = table.detach().float().norm(dim=1).median().item()
        self.columns = ["step", "loss", "lr", "vector_norm"] + ["typical_norm"] * cfg.norm_log + ["seconds"]
        self.rows, self.step = [], 0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            self.sampler.load_state_dict(state["sampler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.rows, self.step = [list(r) for r in state["log"]], state["step"]
        self.out = choose_out(cfg, self.name)
        self.written = {}
        self.info = {"config": asdict(cfg), "effective_lr": self.lr, "model": sd.source,
                     "resolution": self.resolution, "init": self.init_message, "data": self.data_summary,
                     "timesteps": self.sampler.describe(), "placeholder_tokens": concept.placeholder_tokens,
                     "typical_word_norm": self.typical_norm, "torch": torch.__version__,
                     "device": str(self.device)}

    def describe(self):
        cfg, word = self.cfg, self.word
        print(f"model: {self.sd.source}")
        print(f"data: {self.data_summary}")
        print(self.init_message)
        print(f"word: {cfg.token} = {word.vectors.shape[1]} vector(s) x {word.vectors.shape[2]}"
              + (f" x {word.resolutions} resolutions" if word.resolutions > 1 else "")
              + f"; timesteps: {self.sampler.describe()}; precision {cfg.precision} on {self.device}")
        if cfg.scale_lr:
            print(f"lr: {self.lr:g} effective = {cfg.lr:g} x batch {cfg.batch} x accumulation "
                  f"{cfg.grad_accum}")
        else:
            print(f"lr: {self.lr:g} effective (--scale-lr would multiply it by batch x accumulation = "
                  f"{cfg.batch * cfg.grad_accum})")
        if cfg.precision == "fp16" and self.device.type == "cpu":
            print("note: fp16 is slow on CPUs; bf16 is the better choice there.")
        if cfg.norm_log:
            print(f"norms: a typical word {self.typical_norm:.3f} (median over the table); the word now "
                  f"{word.vectors.detach().norm(dim=-1).mean().item():.3f}")
        print(f"out: {self.out}")

    # -- saving ------------------------------------------------------------------------------

    def concept(self, step):
        from minti.concepts import Concept

        v = self.word.vectors.detach().cpu()
        model_name = os.path.basename(os.path.normpath(self.cfg.model))
        return Concept(self.cfg.token, v[0] if v.shape[0] == 1 else v, step=step,
                       meta={"sd_checkpoint": None, "sd_checkpoint_name": model_name})

    def write_log(self):
        csv, png = os.path.join(self.out, "log.csv"), os.path.join(self.out, "loss.png")
        write_csv(csv, self.columns, self.rows)
        plot_loss(png, self.columns, self.rows, f"{self.cfg.token} on {self.cfg.model}")
        self.written.update({csv: "log", png: "log"})

    def save(self, generator_state, snapshot=False):
        """Concept files, log, plot and the resumable checkpoint at self.step. generator_state: the
        generator as it was at the start of the next step, so that a resumed run draws what we would."""
        concept = self.concept(self.step)
        self.written.update({p: "concept" for p in save_concept_files(self.out, concept, self.name)})
        if snapshot:
            folder = os.path.join(self.out, "snapshots", f"step-{self.step:06d}")
            save_concept_files(folder, concept, self.name)
            self.written[folder + os.sep] = "snapshots"
        state = {"format": "minti-textual-inversion-state", "step": self.step,
                 "vectors": self.word.vectors.detach().cpu(), "optimizer": self.optimizer.state_dict(),
                 "generator": generator_state, "torch_rng": torch.get_rng_state(),
                 "sampler": self.sampler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "config": asdict(self.cfg), "log": self.rows}
        path = os.path.join(self.out, "checkpoint", "state.pt")
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        self.written[path] = "checkpoint"
        self.write_log()

    def preview(self):
        """A fixed-seed grid made with the word as trained so far: a row per prompt (and resolution)."""
        import numpy as np
        from PIL import Image

        from minti.textual_inversion import bucket_index, splice
        from minti.sampling import image_grid, text_to_image

        table = self.sd.text_encoder.text_model.embeddings.token_embedding.weight
        prompts = self.cfg.preview_prompt or self.templates[:1]
        prompts = [p.replace("{}", self.placeholder_text) for p in prompts]
        times = MULTIRES_EXPORTS if self.word.resolutions > 1 else (0.0,)
        rows = []
        for t in times:  # multires: the word at a few resolutions, one above the other
            vectors = self.word.vectors.detach()[bucket_index(t, self.word.resolutions)]

            def embed_fn(ids, vectors=vectors):
                return splice(ids, table, self.word.token_ids, vectors)
            rows.append(text_to_image(self.sd, prompts, num_steps=PREVIEW_STEPS, seed=self.cfg.seed,
                                      guidance_scale=PREVIEW_GUIDANCE, n=PREVIEW_IMAGES, embed_fn=embed_fn))
        grid = image_grid(np.concatenate(rows), rows=len(prompts) * len(times))
        path = os.path.join(self.out, "previews", f"step-{self.step:06d}.png")
        atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
        self.written[path] = "preview"

    def finish(self, status):
        path = os.path.join(self.out, "config.json")
        self.written[path] = "config"
        write_json(path, {**self.info, "status": status, "step": self.step, "files": sorted(self.written)})

    # -- training ----------------------------------------------------------------------------

    def draw_batches(self):
        """The step's micro-batches (ids, z_0, t, noise), every draw from the run's generator."""
        batches = []
        for _ in range(self.cfg.grad_accum):
            ids, z0 = self.data.batch(self.cfg.batch, self.generator)
            t = self.sampler.sample(self.cfg.batch, self.generator)
            noise = torch.randn(z0.shape, generator=self.generator)
            batches.append(tuple(x.to(self.device) for x in (ids, z0, t, noise)))
        return batches

    def train(self):
        """Run the remaining steps; returns {"out", "files", "step"}. Ctrl-C saves a resumable state
        and exits with 130; a NaN/Inf loss stops the run with a message (see diverged)."""
        from tqdm.auto import tqdm

        from minti.textual_inversion import NonFiniteLoss, train_step

        cfg, sd, word = self.cfg, self.sd, self.word
        os.makedirs(self.out, exist_ok=True)
        write_json(os.path.join(self.out, "config.json"), {**self.info, "status": "running"})
        if self.step >= cfg.steps:
            print(f"The run is already at step {self.step} of --steps {cfg.steps}: nothing to do (pass a "
                  f"larger --steps to train further).")
            return {"out": self.out, "files": [], "step": self.step}
        last_good = None  # (step, the vectors then): the last vectors that gave a finite loss
        generator_state = self.generator.get_state()  # the draws of the next step start here
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", dynamic_ncols=True, smoothing=0.1)
        t0 = time.time() - (self.rows[-1][-1] if self.rows else 0.0)
        try:
            while self.step < cfg.steps:
                lr = self.lr * lr_factor(self.step, cfg.lr_warmup, cfg.steps, cfg.lr_schedule)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                before = (self.step, word.vectors.detach().clone())
                loss = train_step(sd.text_encoder, sd.unet, sd.scheduler, word, self.optimizer,
                                  self.draw_batches(), self.sampler, self.scaler)
                last_good, self.step, generator_state = before, self.step + 1, self.generator.get_state()
                norm = word.vectors.detach().norm(dim=-1).mean().item()
                self.rows.append([self.step, loss, lr, norm] + [self.typical_norm] * cfg.norm_log
                                 + [round(time.time() - t0, 3)])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2g}",
                                norm=f"{norm:.3f}" + (f"/{self.typical_norm:.3f}" if cfg.norm_log else ""))
                if self.step < cfg.steps and cfg.save_every and self.step % cfg.save_every == 0:
                    self.save(generator_state, snapshot=True)
                if self.step < cfg.steps and cfg.preview_every and self.step % cfg.preview_every == 0:
                    self.preview()
        except KeyboardInterrupt:
            bar.close()
            self.save(generator_state)  # an unfinished step is redone on resume, with the same draws
            self.finish("interrupted")
            print(f"\nInterrupted after step {self.step}: the state is saved in {self.out}/checkpoint/. "
                  f"Continue with\n    python train.py --resume {self.out}")
            sys.exit(130)
        except NonFiniteLoss as e:
            bar.close()
            sys.exit(self.diverged(e, last_good))
        bar.close()
        self.save(generator_state, snapshot=bool(cfg.save_every) and self.step % cfg.save_every == 0)
        if cfg.preview_every:
            self.preview()
        self.finish("finished")
        self.report()
        if cfg.evaluate:
            evaluate_toy_concept(self)
        return {"out": self.out, "files": sorted(self.written), "step": self.step}

    def diverged(self, error, last_good):
        """Save the last vectors that gave a finite loss, and say what happened and what to do."""
        lr = self.optimizer.param_groups[0]["lr"]
        good = "none (the very first step failed: does the model itself produce NaN?)"
        if last_good is not None:
            self.word.vectors.data.copy_(last_good[1])
            folder = os.path.join(self.out, "last-good")
            paths = save_concept_files(folder, self.concept(last_good[0]), self.name)
            which = f"after step {last_good[0]}" if last_good[0] else "at the start"
            good = f"the vectors {which} (the last to give a finite loss): {', '.join(paths)}"
        self.write_log()
        self.finish("stopped: non-finite loss")
        path = os.path.join(self.out, "checkpoint", "state.pt")
        checkpoint = "none"
        if os.path.isfile(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)["step"]
            checkpoint = f"{path} (step {saved}; --resume {self.out})"
        return (f"error: training diverged at step {self.step + 1}: {error}, with lr {lr:g}. The run is "
                f"stopped.\n"
                f"  last good snapshot: {good}\n  last checkpoint: {checkpoint}\n"
                f"  What to do: lower --lr (e.g. {lr / 10:g}), or use --precision fp32/bf16 if it was fp16.")

    def report(self):
        print(f"\nDone: {self.step} steps. Written to {self.out}/:")
        for path, kind in sorted(self.written.items(), key=lambda kv: (kv[1], kv[0])):
            print(f"  {kind:10s} {os.path.relpath(path, self.out)}")
        usable = ("learned_embeds.safetensors" if self.word.resolutions == 1
                  else f"learned_embeds-r{MULTIRES_EXPORTS[1]:g}.safetensors")
        print(f"Use it: python sample.py --model {self.cfg.model} --embeds {os.path.join(self.out, usable)} "
              f"--prompt \"{self.templates[0].format(self.cfg.token)}\"")


def evaluate_toy_concept(run):
    """On the toy model, judge the learned word with the oracle (minti/toy/evaluate.py, when it exists):
    reconstruction and editability against the toy concept's true attributes."""
    name = toy_concept_name(run.cfg.images)
    if not is_toy(run.cfg.model) or name is None or importlib.util.find_spec("minti.toy.evaluate") is None:
        return
    from minti.concepts import export_resolution
    from minti.toy.evaluate import evaluate_concept

    concept = run.concept(run.step)
    if concept.is_multires:  # the evaluation knows ordinary words: judge the middle resolution
        concept = export_resolution(concept, MULTIRES_EXPORTS[1], token=run.cfg.token)
    print("\nEvaluating the word with the oracle (--no-evaluate skips this)...")
    report = evaluate_concept(run.sd, concept, truth=name, images=run.cfg.images, n=EVAL_SAMPLES, steps=EVAL_STEPS)
    print(report.table())
    print("wrote " + ", ".join(report.save(run.out, "concept_eval")))


def train(cfg, explicit=frozenset()):
    """Run textual inversion as configured (a TrainConfig); returns {"out", "files", "step"}."""
    run = Run(cfg, explicit)
    run.describe()
    return run.train()


def main(argv=None):
    cfg, explicit = parse_args(argv)
    try:
        train(cfg, explicit)
    except (ValueError, FileNotFoundError) as e:  # bad settings, images, model or concept file: say what
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
