"""Learn a new word for a concept from a few images: textual inversion (Gal et al. 2022).

    python train.py                                  # the toy model's default concept, minutes on a CPU
    python train.py --model path/to/sd15 --images my_cat/ --token "<my-cat>" --init cat \\
        --batch 1 --grad-accum 4 --lr 5e-4 --scale-lr --steps 3000 --precision fp16 --checkpointing
    torchrun --nproc_per_node 4 train.py --batch 4 ...   # 4 GPUs, one image of each batch each (--batch)

    python train.py --per-layer                      # P+: a vector per UNet layer (--neti: NeTI's network)

Writes learned_embeds.safetensors (diffusers' load_textual_inversion) and <name>.pt (AUTOMATIC1111)
(P+ / NeTI: <name>-per-layer / <name>-neti.safetensors), a CSV log, a loss curve, the run's config.json
and a resumable checkpoint/ into --out. The method and its training loop are in
minti/textual_inversion.py (P+ and NeTI words in minti/spacetime.py), the images and prompts in
minti/data.py, the checks and files of a run in minti/run/runs.py; this script reads as a run: settings,
load, data, the loop, saving.
"""
import argparse
import contextlib
import os
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
from tqdm.auto import tqdm

import minti
from minti.run import cli, runs
from minti import textual_inversion as ti
from minti import toy
from minti.io.concepts import Concept, export_resolution
from minti.data import TEMPLATES, load_concept_data
from minti.distributed import rank_and_world
from minti.io.files import atomic_write, image_grid, write_json
from minti.run.devices import PRECISIONS, auto_precision, choose_cuda_backends, pick_device
from minti.run.torchrun import all_stop, join_ranks
from minti.run.runs import RunError, word_kind
from minti.sampling import default_size, text_to_image
from minti.spacetime import new_spacetime_word
from minti.io.spacetime_files import SpaceTimeConcept, from_word, is_spacetime_file, make_word
from minti.timesteps import make_timestep_sampler

PREVIEW_STEPS, PREVIEW_IMAGES, PREVIEW_GUIDANCE = 25, 4, 7.5  # DDIM steps, images per prompt, CFG scale
# The closing toy evaluation: 64 samples per prompt and 25 DDIM steps keep it to about a minute on two
# CPU cores (95% intervals of +-12 points at worst); `python -m minti.toy.evaluate` runs the full 128 x 50.
EVAL_SAMPLES, EVAL_STEPS = 64, 25


def setting(default, help, note="", **argparse_options):
    """A setting: its default, its --help text (note: what None means, after the default) and how argparse
    reads it. The toy model's own defaults (minti.toy.TRAIN_DEFAULTS) are added to the help."""
    value = {"default_factory": list} if default == [] else {"default": default}
    return field(**value, metadata={"help": help, "note": note, **argparse_options})


@dataclass
class TrainConfig:
    """Every setting of a run, declared once: the command line is built from these fields."""

    # what to learn
    model: str = setting("toy", "'toy', a diffusers folder, or one SD 1.x checkpoint file")
    images: str | None = setting(None, "folder of the concept's images (jpg/png/webp, any size; a .txt "
                                 "beside an image is its caption, with {} or [name] or S* where the word "
                                 "goes)", "None: the default toy concept's", metavar="DIR")
    token: str = setting("<concept>", "the new word, e.g. '<my-cat>'; must not be a word the tokenizer knows")
    init: str | None = setting(None, "word(s) to start from, e.g. 'cat' (one per vector, or one for all)",
                               "None: the toy concept's shape word", metavar="WORD")
    vectors: int = setting(1, "vectors per word (the paper's '2-word', '3-word' variants)", metavar="N")
    what: str = setting("auto", "neutral prompt templates (the paper's object/style lists, or the toy "
                        "captions'); auto: toy for the toy model, else object",
                        choices=["auto", "object", "style", "toy"])
    resolution: int | None = setting(None, "image side in pixels", "None: the model's training size",
                                     type=int)
    multires: int = setting(1, "multiresolution textual inversion: T sets of vectors, one per 1000/T "
                            "timesteps (T=10 when the flag has no value)", nargs="?", const=10, metavar="T")
    per_layer: bool = setting(False, "P+ (Voynov et al. 2023): one vector set per UNet cross-attention layer "
                              "(with --multires T: per layer and time bucket); writes a minti-spacetime file")
    neti: bool = setting(False, "NeTI (Alaluf et al. 2023): a network maps (timestep, layer) to the word's "
                         "vector; writes a minti-spacetime file")
    bypass: bool = setting(True, "NeTI's textual bypass (a residual added to the text encoder's output at "
                           "the word); --no-bypass: without")
    # optimisation
    steps: int = setting(1000, "optimisation steps")
    batch: int = setting(16, "images per micro-batch (SD 1.x on one GPU: 1-4, with --grad-accum); under "
                         "torchrun split across the N processes, B/N each (B must divide by N), so a run "
                         "takes the same steps whatever N")
    grad_accum: int = setting(1, "micro-batches per step (gradient accumulation)", metavar="K")
    lr: float = setting(5e-3, "learning rate of the vectors (AdamW); 5e-3 is the paper's base lr (and "
                        "AUTOMATIC1111's)")
    scale_lr: bool = setting(False, "multiply --lr by batch x grad-accum, as the paper does")
    lr_warmup: int = setting(0, "linear warm-up steps", metavar="STEPS")
    lr_schedule: str = setting("constant", "after warm-up: constant, or cosine decay to 0 at --steps",
                               choices=["constant", "cosine"])
    weight_decay: float = setting(1e-2, "AdamW weight decay on the vectors (torch's default, the paper's)")
    flip: float = setting(0.5, "probability of mirroring an image; 0: never", metavar="P")
    start: str = setting("input", "where the vectors start: the init words' token embeddings (input, the "
                         "paper's) or the text encoder's output for them (output: CrossInit, Pang et al. 2024)",
                         choices=["input", "output"])
    pull: float = setting(1e-5, "with --start output: weight of the pull back toward the start (CrossInit's "
                          "regulariser, its distance not squared)")
    norm: str = setting("free", "the vectors' norm: free; fixed: a typical token's, only the direction learns "
                        "(DTI); init: the init vectors' own", choices=["free", "fixed", "init"])
    stop: str = setting("none", "auto: end the run when the loss on one fixed batch has flattened (DVAR, "
                        "Voronov et al. 2023); --steps stays the ceiling", choices=["none", "auto"])
    stop_window: int = setting(310, "--stop auto: the window of fixed-batch losses whose variance is compared "
                               "(DVAR's 310 for SD 1.5)", metavar="N")
    stop_threshold: float = setting(0.15, "--stop auto: stop when var(last window) < this x var(all)")
    stop_every: int = setting(1, "--stop auto: evaluate the fixed batch every N steps (each costs about a third "
                              "of a step)", metavar="N")
    timesteps: str = setting("uniform", "timesteps to train on: uniform, an interval A-B (t = A..B-1), one "
                             "timestep T, or adaptive (minti/timesteps.py)", metavar="SPEC")
    seed: int = setting(0, "seed of every random draw of the run")
    # speed and memory
    precision: str = setting("auto", "frozen weights' precision (the vectors, AdamW and the loss stay fp32; fp16 "
                             "adds a loss scale); auto: bf16 on a GPU that has it, else fp16 on a GPU, fp32 on "
                             "the CPU; 'no' (diffusers' spelling) is fp32", choices=["auto", *PRECISIONS, "no"])
    tf32: bool = setting(False, "TF32 tensor cores for fp32 matrix products and convolutions (NVIDIA; faster, "
                         "about 3 decimal digits)")
    deterministic: bool = setting(False, "CUDA: deterministic kernels only, so a resumed run repeats an "
                                  "uninterrupted one bit for bit (on the CPU it always does); slower")
    checkpointing: bool = setting(False, "gradient checkpointing in the UNet (less memory, ~47%% more "
                                  "compute)")
    channels_last: bool = setting(False, "channels-last memory layout for the UNet")
    cache_latents: bool = setting(True, "encode each image and its mirror image once, then free the VAE "
                                  "if no preview or evaluation will decode (else: the VAE at every step)")
    device: str = setting("auto", "cpu, cuda, cuda:1, mps, or auto (cuda, else mps, else cpu)")
    threads: int = setting(0, "torch CPU threads; 0: torch's default", metavar="N")
    # outputs
    out: str | None = setting(None, "output folder", "None: runs/<name>, or the resumed run's", metavar="DIR")
    save_every: int = setting(250, "write the concept files, a snapshot and a resumable checkpoint every N "
                              "steps; 0: at the end", metavar="N")
    preview_every: int = setting(250, f"fixed-seed preview grid ({PREVIEW_IMAGES} images per prompt, "
                                 f"{PREVIEW_STEPS} DDIM steps) every N steps and at the end; 0: none",
                                 metavar="N")
    preview_prompt: list = setting([], "a preview prompt with {} for the word; repeat for several",
                                   "empty: the first template", action="append", metavar="TEXT")
    norm_log: bool = setting(False, "log the vectors' norm beside a typical word's norm")
    evaluate: bool = setting(True, "toy model: evaluate the word with the oracle at the end")
    resume: str | None = setting(None, "continue the run in DIR (its checkpoint/) exactly where it stopped",
                                 metavar="DIR")
    from_file: str | None = setting(None, "start from the vectors of an embedding file (diffusers, A1111, "
                                    "kohya, the paper's, minti's multires)", flag="--from", metavar="FILE")


# diffusers' examples/textual_inversion and kohya's spellings of the same flags, accepted as aliases
ALIASES = {"model": ["--pretrained_model_name_or_path"], "images": ["--train_data_dir"],
           "token": ["--placeholder_token"], "init": ["--initializer_token"], "vectors": ["--num_vectors"],
           "steps": ["--max_train_steps"], "batch": ["--train_batch_size"], "lr": ["--learning_rate"],
           "grad_accum": ["--gradient_accumulation_steps"], "precision": ["--mixed_precision"],
           "checkpointing": ["--gradient-checkpointing", "--gradient_checkpointing"]}
# Settings that may change when a run is resumed; any other must stay as the run was started.
CHANGEABLE_ON_RESUME = {"steps", "save_every", "preview_every", "preview_prompt", "out", "device", "threads",
                        "norm_log", "evaluate", "resume"}


def build_parser():
    """The command line, a flag per TrainConfig field; a flag not given parses as None (fill_defaults)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        options = {k: v for k, v in f.metadata.items() if k not in ("help", "note", "flag")}
        default = [] if f.default is MISSING else f.default
        if isinstance(default, bool):
            options["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, (int, float)):
            options.setdefault("type", type(default))
        toy_default = f"the toy model: {toy.TRAIN_DEFAULTS[f.name]}" if f.name in toy.TRAIN_DEFAULTS else ""
        notes = "".join(f"; {note}" for note in (f.metadata["note"], toy_default) if note)
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        p.add_argument(flag, *ALIASES.get(f.name, ()), dest=f.name, help=f"{f.metadata['help']} (default: "
                       f"{default}){notes}", **options)
    return p


def parse_args(argv=None):
    """The settings given on the command line: a TrainConfig whose others are None (train fills them)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def main(argv=None):
    """The command line: the exit code (0; 1 a failure, 2 a bad setting, 128 + n stopped by signal n), and
    a one-line "error: ..." instead of a traceback (minti/run/cli.py; MINTI_DEBUG=1 shows it)."""
    try:
        return cli.run_main(lambda argv: train(parse_args(argv)), argv)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The run: settings, load, data, the loop, saving

def train(cfg):
    """Run textual inversion as configured (a TrainConfig; None: not given); returns {"out", "files", "step"}."""
    cfg, state = settle(cfg)  # a resumed run's own settings, or the defaults of those not given; checked
    if state is not None and state["step"] >= cfg.steps:  # said before loading anything, changing nothing
        print(f"The run is already at step {state['step']} of --steps {cfg.steps}: nothing to do (pass a "
              f"larger --steps to train further).")
        return {"out": cfg.out, "files": [], "step": state["step"]}
    rank = join_ranks(cfg.batch, cfg.device)  # torchrun: this process's rank; one process: 0
    # Ctrl-C, SIGTERM and SIGHUP stop at once, but in the loop at a step's end; the run folder is this run's alone
    with cli.Signals() as stops, runs.locked(cfg.out, writes=rank == 0):
        run = setup(cfg, state)  # the frozen model, the word, the data, AdamW, the generator
        run.writes, run.stops = rank == 0, stops  # torchrun: every rank holds the same vectors; rank 0 writes
        if run.writes:
            describe(run)
            runs.remove_unfinished_writes(run.out)
        try:  # from "running" in config.json on, a stop saves a resumable checkpoint
            if run.writes:
                write_json(os.path.join(run.out, "config.json"), {**run.info, "status": "running"})
            run.bar = tqdm(total=cfg.steps, initial=run.step, desc=f"training ({run.kind})", dynamic_ncols=True,
                           smoothing=0.1, disable=not run.writes)
            run.t0 = time.time() - (run.rows[-1][-1] if run.rows else 0.0)  # a resumed log's seconds go on
            with stops.waiting():  # THE loop (minti/textual_inversion.py); after_step logs, saves, previews
                ti.train_loop(run.sd, run.word, run.data, run.optimizer, run.timestep_sampler, run.generator,
                              steps=cfg.steps, lr=run.lr, start=run.step, batch=cfg.batch, grad_accum=cfg.grad_accum,
                              warmup=cfg.lr_warmup, schedule=cfg.lr_schedule, scaler=run.scaler,
                              on_step=lambda step, loss, lr: after_step(run, step, loss, lr), stop=run.stop)
            run.bar.close()
            if getattr(run.stop, "step", None) is not None:
                stopped(run)
            if run.writes:
                save(run, snapshot=bool(cfg.save_every) and run.step % cfg.save_every == 0)
                if cfg.preview_every:
                    preview(run)
                finish(run, "finished")
        except KeyboardInterrupt as stop:
            close_bar(run)
            sys.exit(interrupted(run, stop))
        except ti.NonFiniteLoss as error:  # a NaN loss, or vectors far beyond the vocabulary's (runs.NormWatch)
            run.bar.close()
            sys.exit(diverged(run, error))
        except OSError as error:  # a full disk: the path, and how to resume from the last checkpoint
            raise runs.write_failed(run.out, error) from error
        if not run.writes:
            return {"out": run.out, "files": [], "step": run.step}
        report(run)
        if will_evaluate(cfg):
            evaluate_toy_concept(run)
    return {"out": run.out, "files": sorted(run.written), "step": run.step}


def settle(cfg):
    """The run's settings, all filled, and the checkpoint's state when resuming (else None): a resumed run's
    own, but for the given ones that may change; else those given, then fill_defaults. Checked."""
    state = folder = None
    if cfg.resume:
        path = runs.find_state(cfg.resume)
        state = runs.load_state(path, [f.name for f in fields(TrainConfig)])
        out, folder = cfg.out, os.path.dirname(os.path.dirname(os.path.abspath(path)))  # <run>/checkpoint/state.pt
        cfg = runs.merge_resumed_config(TrainConfig(**state["config"]), cfg, CHANGEABLE_ON_RESUME, state)
        cfg.out = out or folder
    else:
        fill_defaults(cfg)
        cfg.out = runs.choose_out(cfg)
    runs.check_settings(cfg, new_run=state is None)
    if state is None or state["step"] < cfg.steps:  # (nothing to check when there is nothing to do)
        runs.check_paths(cfg, resumed=folder)
    return cfg, state


def fill_defaults(cfg):
    """A new run's settings that were not given (None): NeTI's one vector and one time bucket; the --from
    file's word, vectors and buckets; on the toy model its default concept, the concept's init word and
    toy.TRAIN_DEFAULTS; then TrainConfig's defaults."""
    later = ("token", "vectors", "multires", "steps", "lr", "bypass")  # their defaults: the model's, --from's
    for f in fields(TrainConfig):
        if getattr(cfg, f.name) is None and f.name not in later:
            setattr(cfg, f.name, [] if f.default is MISSING else f.default)
    if cfg.neti:  # one token, and time comes from the network
        if (cfg.vectors or 1) != 1 or (cfg.multires or 1) != 1:
            raise RunError("--neti learns one token whose vector already depends on time and layer: drop "
                           "--vectors and --multires.")
        cfg.vectors = cfg.multires = 1
    if cfg.from_file:
        runs.settings_from_file(cfg)
    if not toy.is_toy_model(cfg.model):
        if cfg.images is None:
            raise RunError("--images DIR is required with a model other than the toy model: a folder with "
                           "3-5 images of the concept.")
    else:
        if cfg.images is None:
            cfg.images = toy.concept_folder()
            if not os.path.isdir(cfg.images):
                raise RunError(f"The default toy concept's images ({cfg.images}) are not there; write them with "
                               f"`python -c \"from minti.toy.world import write_concept_images as w; "
                               f"w('{toy.DEFAULT_CONCEPT}', '{cfg.images}')\"`, or pass --images DIR.")
        name = toy.concept_name(cfg.images)
        if cfg.init is None and name is not None and not cfg.from_file:
            cfg.init = toy.CONCEPTS[name].init_word
        for key in ("vectors", "steps", "lr"):
            if getattr(cfg, key) is None:
                setattr(cfg, key, toy.TRAIN_DEFAULTS[key])
    for key in later:
        if getattr(cfg, key) is None:
            setattr(cfg, key, getattr(TrainConfig, key))


def templates_for(cfg):
    """--what's prompt templates; auto: the toy model's own (toy.TRAIN_DEFAULTS), else the paper's objects."""
    if cfg.what == "auto":
        return toy.TRAIN_DEFAULTS["templates"] if toy.is_toy_model(cfg.model) else TEMPLATES["object"]
    return toy.TEMPLATES if cfg.what == "toy" else TEMPLATES[cfg.what]


@dataclass
class Run:
    """What the loop's callbacks share: the run's parts, its log, and what was written where."""

    cfg: TrainConfig
    sd: object  # the frozen model (minti.load)
    word: torch.nn.Module  # ti.LearnedWord; P+ / NeTI: spacetime.PerLayerWord / NeTIWord
    data: object  # data.ConceptData
    optimizer: torch.optim.Optimizer
    timestep_sampler: object  # minti/timesteps.py's
    generator: torch.Generator  # every random draw of the run, on the CPU
    scaler: object  # torch.amp.GradScaler with fp16 weights, else None
    lr: float  # the effective lr (--scale-lr applied)
    templates: list
    out: str
    info: dict  # what config.json says about the run
    step: int = 0
    rows: list = field(default_factory=list)  # log.csv
    written: dict = field(default_factory=dict)  # path -> kind, for the closing report
    bar: object = None
    t0: float = 0.0
    writes: bool = True  # torchrun: rank 0 alone writes files
    stops: object = None  # cli.Signals: Ctrl-C, SIGTERM, SIGHUP
    stop: object = None  # --stop auto: ti.AutoStop
    watch: object = None  # runs.NormWatch: vectors far beyond the vocabulary's stop the run

    @property
    def kind(self):
        return word_kind(self.cfg)


def setup(cfg, state):
    """Everything the loop needs, restored from `state` when resuming."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    chose = cfg.precision == "auto"  # resolved once, said by describe(), kept in config.json as chosen
    cfg.precision = auto_precision(device) if chose else "fp32" if cfg.precision == "no" else cfg.precision
    choose_cuda_backends(cfg.tf32, cfg.deterministic)  # fp32 is IEEE fp32 unless --tf32 (minti/run/devices.py)
    # Read, cast and moved a tensor at a time. The VAE stays fp32: it encodes the images once (and decodes
    # previews); SD's VAE overflows in fp16.
    precision = PRECISIONS[cfg.precision]
    sd = minti.load(cfg.model, device=device, dtype={"text_encoder": precision, "unet": precision})
    ti.freeze(sd)  # no weight gradient is ever computed or stored
    sd.unet.gradient_checkpointing = cfg.checkpointing
    if cfg.channels_last:
        sd.unet.to(memory_format=torch.channels_last)
    word, init_message = start_word(cfg, sd, state)
    word = word.to(device)

    resolution, templates = cfg.resolution or default_size(sd)[0], templates_for(cfg)
    length = sd.text_encoder.config.max_position_embeddings
    data, data_summary = load_concept_data(
        cfg.images, resolution, cfg.token, placeholder_text(word, cfg.token), templates,
        lambda prompts: sd.tokenizer(prompts, length=length), sd.vae, sd.latent_scale,
        cache_latents=cfg.cache_latents, flip_p=cfg.flip, device=device)
    runs.check_fits(cfg, sd, resolution, data, word, cfg.out)
    if cfg.cache_latents and not cfg.preview_every and not will_evaluate(cfg):
        sd.vae = data.latents.vae = None  # nothing will encode or decode again: free its memory

    lr = cfg.lr * (cfg.batch * cfg.grad_accum if cfg.scale_lr else 1)
    timestep_sampler = make_timestep_sampler(cfg.timesteps, sd.scheduler.num_train_timesteps)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None  # fp16 needs a loss scale
    info = {"config": asdict(cfg), "effective_lr": lr, "model": sd.source, "resolution": resolution,
            "init": init_message, "data": data_summary, "timesteps": timestep_sampler.describe(),
            "placeholder_tokens": ti.placeholder_tokens(cfg.token, len(word.token_ids)),
            "typical_word_norm": ti.token_table(sd.text_encoder).detach().float().norm(dim=1).median().item(),
            "torch": torch.__version__, "device": str(device), "processes": rank_and_world()[1],
            "precision_auto": chose}
    run = Run(cfg=cfg, sd=sd, word=word, data=data, optimizer=ti.adamw(word, lr, cfg.weight_decay),
              timestep_sampler=timestep_sampler, generator=torch.Generator().manual_seed(cfg.seed), scaler=scaler,
              lr=lr, templates=templates, out=cfg.out, info=info,
              watch=runs.NormWatch(info["typical_word_norm"]))
    if cfg.stop == "auto":  # DVAR: a fixed batch from its own generator (the run's draws stay as they are)
        run.stop = ti.AutoStop.drawn(data, cfg.seed, cfg.batch, sd.scheduler.num_train_timesteps, device,
                                     window=cfg.stop_window, threshold=cfg.stop_threshold, every=cfg.stop_every)
    if state is not None:  # AdamW, the generator, torch's RNG, the timestep sampler, the loss scale, the log
        runs.restore(run, state)
    return run


def start_word(cfg, sd, state):
    """The word to train, its placeholders registered in sd.tokenizer, and a sentence saying where it
    starts: the checkpoint's (resuming), a file's (--from), or the --init word's vectors."""
    kind, timesteps = word_kind(cfg), sd.scheduler.num_train_timesteps
    resumed = f"resumed from {cfg.resume} at step {state['step']}" if state is not None else None
    if state is not None and kind != "ti":  # P+ / NeTI: the word as its file holds it
        word = make_word(SpaceTimeConcept(**state["spacetime"]), sd.tokenizer).train()
        if kind == "neti":
            word.generator.set_state(state["word_generator"])  # the nested-dropout draws go on
        return word, resumed
    if state is None and kind != "ti" and cfg.from_file and is_spacetime_file(cfg.from_file):
        return runs.spacetime_from_file(cfg, sd)
    start, message = runs.initial_vectors(cfg, sd)  # (resuming: where the pull and the init norm point)
    vectors, message = (state["vectors"], resumed) if state is not None else (start, message)
    try:
        if kind == "ti":
            norm = {"free": None, "fixed": ti.typical_norm(ti.token_table(sd.text_encoder)),
                    "init": start.norm(dim=-1, keepdim=True)}[cfg.norm]
            return ti.new_word(sd.tokenizer, cfg.token, vectors, timesteps, start=start, norm=norm,
                               pull=cfg.pull if cfg.start == "output" else 0.0), message
        return new_spacetime_word(kind, sd, sd.tokenizer, cfg.token, vectors[0], cfg.multires, cfg.bypass,
                                  cfg.seed), message
    except ValueError as e:  # a --token that is already a word
        raise RunError(f"--token: {e}") from None


def placeholder_text(word, token):
    """What stands for the word in a prompt: its n placeholder tokens."""
    return " ".join(ti.placeholder_tokens(token, len(word.token_ids)))


def word_norm(word):
    """The mean norm of the word's vectors (NeTI: the norm its mapper's output is scaled to)."""
    if hasattr(word, "vectors"):
        return word.vectors.detach().norm(dim=-1).mean()
    return torch.tensor(word.mapper.norm)


def describe(run):
    cfg, word, info = run.cfg, run.word, run.info
    print(f"model: {info['model']}\ndata: {info['data']}\n{info['init']}")
    shape = {"ti": "{1} vector(s) x {2}", "per-layer": "{2} vector(s) x {3} for each of {1} UNet layers (P+)",
             "neti": "NeTI: a network of (timestep, layer) -> its vector"}[run.kind]
    sizes = tuple(word.vectors.shape) if hasattr(word, "vectors") else ()
    print(f"word: {cfg.token} = " + shape.format(*sizes)
          + (f" x {word.num_buckets} resolutions" if getattr(word, "num_buckets", 1) > 1 else "")
          + f"; timesteps: {info['timesteps']}; precision {cfg.precision}"
          + " (--precision auto)" * info["precision_auto"] + f" on {info['device']}")
    scaled = f" = {cfg.lr:g} x batch {cfg.batch} x accumulation {cfg.grad_accum}" if cfg.scale_lr else \
        f" (--scale-lr would multiply it by batch x accumulation = {cfg.batch * cfg.grad_accum})"
    print(f"lr: {run.lr:g} effective{scaled}")
    if cfg.precision == "fp16" and info["device"] == "cpu":
        print("note: fp16 is slow on CPUs; bf16 is the better choice there.")
    if cfg.norm_log:
        print(f"norms: a typical word {info['typical_word_norm']:.3f} (median over the table); the word now "
              f"{word_norm(word).item():.3f}")
    print(f"out: {run.out}")


# ----------------------------------------------------------------------------------------------
# What hangs off the loop: the log of each step, snapshots and checkpoints, previews, Ctrl-C, the NaN stop

def after_step(run, step, loss, lr):
    """The loop's on_step: log the step and show it; every --save-every / --preview-every steps, save
    and preview (the last step's are written after the loop)."""
    cfg, typical = run.cfg, run.info["typical_word_norm"]
    run.step = step
    norm = word_norm(run.word)  # on the device: read when the log is written, and by run.watch a step late
    run.watch(step, norm)
    fixed = [run.stop.losses[-1] if step % cfg.stop_every == 0 else ""] if run.stop is not None else []
    run.rows.append([step, loss, lr, norm] + [typical] * cfg.norm_log + fixed + [round(time.time() - run.t0, 3)])
    run.bar.update(1)
    shown = {"norm": f"{norm.item():.3f}/{typical:.3f}"} if cfg.norm_log else {}  # one more read per step
    run.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2g}", **shown)
    if run.writes and step < cfg.steps and cfg.save_every and step % cfg.save_every == 0:
        save(run, snapshot=True)
    if run.writes and step < cfg.steps and cfg.preview_every and step % cfg.preview_every == 0:
        preview(run)
    # A stop signal that came during the step, its log, checkpoint or preview: now, on every rank (torchrun)
    run.stops.raise_pending(lambda stop: all_stop(stop, run.word.token_ids.device))


def save(run, snapshot=False):
    """Concept files, log, plot and the resumable checkpoint at run.step. The generator is as at the start
    of the next step (the loop rewinds an unfinished one), so a resumed run draws what this one would."""
    runs.read_log(run.rows)
    run.watch.check(run.step, run.rows[-1][3] if run.rows else 0.0)  # no snapshot of vectors gone too far
    concept, name = concept_at(run, run.step), runs.file_name(run.cfg.token)
    run.written.update({p: "concept" for p in runs.save_concept_files(run.out, concept, name)})
    if snapshot:
        folder = os.path.join(run.out, "snapshots", f"step-{run.step:06d}")
        runs.save_concept_files(folder, concept, name)
        run.written[folder + os.sep] = "snapshots"
    path = os.path.join(run.out, "checkpoint", "state.pt")
    runs.save_state(path, runs.checkpoint(run, concept))  # the word, AdamW, the generators, the log, ...
    run.written[path] = "checkpoint"
    write_log(run)


def preview(run):
    """A fixed-seed grid made with the word as trained so far, a row per prompt: the word as it samples (each
    step its time bucket, each UNet layer its own context), or for a multiresolution word one row per
    resolution, the word held at that diffusion time (the files' exports)."""
    import numpy as np
    from PIL import Image

    sd, te, word = run.sd, run.sd.text_encoder, run.word
    text, T = placeholder_text(word, run.cfg.token), sd.scheduler.num_train_timesteps
    prompts = [p.replace("{}", text) for p in run.cfg.preview_prompt or run.templates[:1]]
    ids = sd.tokenizer(prompts, length=te.config.max_position_embeddings).to(word.token_ids.device)
    held = [round(t * T) for t in runs.MULTIRES_EXPORTS] if run.kind == "ti" and word.num_buckets > 1 else []
    options = dict(num_steps=PREVIEW_STEPS, seed=run.cfg.seed, n=PREVIEW_IMAGES, guidance_scale=PREVIEW_GUIDANCE)
    word.eval()  # NeTI: without nested dropout
    try:
        with torch.no_grad():
            conds = [word.context(te, ids, torch.full_like(ids[:, 0], t)).repeat_interleave(PREVIEW_IMAGES, 0)
                     for t in held] or [ti.sampling_conditioning(word, te, ids, n=PREVIEW_IMAGES)]
            rows = [text_to_image(sd, prompts, cond=cond, **options) for cond in conds]
    finally:
        word.train()
    grid = image_grid(np.concatenate(rows), rows=len(prompts) * len(rows))
    path = os.path.join(run.out, "previews", f"step-{run.step:06d}.png")
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    run.written[path] = "preview"


def close_bar(run):
    """Close the progress bar; after SIGHUP its terminal may be gone, which must not cost the checkpoint."""
    with contextlib.suppress(OSError, ValueError):
        if run.bar is not None:
            run.bar.close()


def interrupted(run, stop=None):
    """Ctrl-C, SIGTERM or SIGHUP: save a resumable state (an unfinished step is redone on resume, with the
    same draws); a second signal meanwhile is ignored (cli.Signals). Exit code 128 + the signal number."""
    code = getattr(stop, "exit_code", 130)
    if run.writes:
        save(run)
        finish(run, "interrupted")
        cli.say(f"\nInterrupted ({'Ctrl-C' if code == 130 else stop.args[0]}) after step {run.step}: the state is "
                f"saved in {run.out}/checkpoint/. Continue with\n    python train.py --resume {run.out}")
    return code


def diverged(run, error):
    """Save the last vectors that gave a finite loss (the loop put them back; vectors gone too far: the last
    snapshot is the last good one), and say what to do (runs.diverged_message)."""
    if not run.writes:
        return f"error: training diverged at step {error.step} (rank 0 says more)"
    good = ()
    if error.good_step is not None:
        good = runs.save_concept_files(os.path.join(run.out, "last-good"), concept_at(run, error.good_step),
                                       runs.file_name(run.cfg.token))
    write_log(run)
    finish(run, f"stopped: {'diverging norm' if isinstance(error, runs.Diverged) else 'non-finite loss'}")
    return runs.diverged_message(run.out, error, run.optimizer.param_groups[0]["lr"], good)


# ----------------------------------------------------------------------------------------------
# Saving: the word's files, the log, config.json, the report, the toy evaluation

def concept_at(run, step):
    """The word as its files hold it: a Concept (minti/io/concepts.py; AUTOMATIC1111 shows the model's name),
    or for P+ / NeTI a SpaceTimeConcept (minti/io/spacetime_files.py)."""
    model_name = os.path.basename(os.path.normpath(run.cfg.model))
    if run.kind != "ti":
        return from_word(run.word, run.cfg.token, step=step, meta={"model": model_name})
    v = run.word.vectors.detach().cpu()
    return Concept(run.cfg.token, v[0] if v.shape[0] == 1 else v, step=step,
                   meta={"sd_checkpoint": None, "sd_checkpoint_name": model_name})


def write_log(run):
    columns = (["step", "loss", "lr", "vector_norm"] + ["typical_norm"] * run.cfg.norm_log
               + ["fixed_batch_loss"] * (run.stop is not None) + ["seconds"])
    paths = runs.write_log(run.out, columns, run.rows, f"{run.cfg.token} on {run.cfg.model}")
    run.written.update({p: "log" for p in paths})


def stopped(run):
    """--stop auto ended the run: say where and why (config.json keeps it too)."""
    stop = run.stop
    run.info["stopped"] = {"step": stop.step, "ratio": stop.ratio(), "window": stop.window,
                           "threshold": stop.threshold}
    print(f"Stopped automatically at step {stop.step} of --steps {run.cfg.steps}: the loss on the fixed batch "
          f"has flattened (the variance of its last {stop.window} values is {stop.ratio():.3f} x that of all "
          f"of them, below --stop-threshold {stop.threshold:g}).")


def finish(run, status):
    path = os.path.join(run.out, "config.json")
    run.written[path] = "config"
    write_json(path, {**run.info, "status": status, "step": run.step, "files": sorted(run.written)})


def report(run):
    print(f"\nDone: {run.step} steps. Written to {run.out}/:")
    for path, kind in sorted(run.written.items(), key=lambda kv: (kv[1], kv[0])):
        print(f"  {kind:10s} {os.path.relpath(path, run.out)}")
    usable, token = runs.usable_file(concept_at(run, run.step), runs.file_name(run.cfg.token))
    print(f"Use it: python sample.py --model {run.cfg.model} --embeds {os.path.join(run.out, usable)} "
          f"--prompt \"{run.templates[0].format(token)}\"")


def will_evaluate(cfg):
    """Whether the run ends with the oracle's evaluation: --evaluate, the toy model, a toy concept."""
    return cfg.evaluate and toy.is_toy_model(cfg.model) and toy.concept_name(cfg.images) is not None


def evaluate_toy_concept(run):
    """On the toy model, judge the learned word with the oracle (minti/toy/evaluate.py): reconstruction
    and editability against the toy concept's true attributes."""
    from minti.toy.evaluate import ImageSampler, evaluate_concept

    concept, sampler = concept_at(run, run.step), None
    if run.kind != "ti":  # P+ / NeTI: drawn by the word itself; the report gets its name and size
        run.word.eval()
        sampler = ImageSampler(run.sd, run.word, run.cfg.token, run.sd.tokenizer, steps=EVAL_STEPS)
        concept = Concept(run.cfg.token, torch.zeros(len(run.word.token_ids), ti.token_table(run.sd.text_encoder)
                                                     .shape[1]))
    elif concept.is_multires:  # the evaluation knows ordinary words: judge the middle resolution
        concept = export_resolution(concept, runs.MULTIRES_EXPORTS[1], token=run.cfg.token)
    print("\nEvaluating the word with the oracle (--no-evaluate skips this)...")
    result = evaluate_concept(run.sd, concept, truth=toy.concept_name(run.cfg.images), images=run.cfg.images,
                              n=EVAL_SAMPLES, steps=EVAL_STEPS, sampler=sampler)
    print(result.table())
    print("wrote " + ", ".join(result.save(run.out, "concept_eval")))


if __name__ == "__main__":
    sys.exit(main())
