"""Learn a new word for a concept from a few images: textual inversion (Gal et al. 2022).

    python train.py                                  # the toy model's default concept, minutes on a CPU
    python train.py --model path/to/sd15 --images my_cat/ --token "<my-cat>" --init cat \\
        --batch 1 --grad-accum 4 --lr 5e-4 --scale-lr --steps 3000 --precision fp16 --checkpointing
    torchrun --nproc_per_node 4 train.py --batch 4 ...   # 4 GPUs, one image of each batch each (--batch)

Writes learned_embeds.safetensors (diffusers' load_textual_inversion) and <name>.pt (AUTOMATIC1111),
a CSV log, a loss curve, the run's config.json and a resumable checkpoint/ into --out. The method and
its training loop are in minti/textual_inversion.py, the images and prompts in minti/data.py; this
script reads as a run: settings, load, data, the loop, saving.
"""
import argparse
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm.auto import tqdm

import minti
from minti import cli
from minti import textual_inversion as ti
from minti import toy
from minti.distributed import rank_and_world
from minti.concepts import Concept, check_width, export_resolution, save_a1111, save_diffusers, save_multires
from minti.data import TEMPLATES, ImageError, find_images, load_concept_data
from minti.files import (PRECISIONS, atomic_write, choose_cuda_backends, pick_device, unreadable_torch_file,
                         write_csv, write_json)
from minti.sampling import default_size
from minti.timesteps import make_timestep_sampler

MULTIRES_EXPORTS = (0.1, 0.5, 0.9)  # diffusion times exported as ordinary words, for tools without time
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
    timesteps: str = setting("uniform", "timesteps to train on: uniform, an interval A-B (t = A..B-1), one "
                             "timestep T, or adaptive (minti/timesteps.py)", metavar="SPEC")
    seed: int = setting(0, "seed of every random draw of the run")
    # speed and memory
    precision: str = setting("fp32", "frozen weights' precision; the vectors, AdamW and the loss stay fp32; "
                             "fp16 adds a loss scale (torch.amp.GradScaler)", choices=list(PRECISIONS))
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


# Settings that may change when a run is resumed; any other must stay as the run was started.
CHANGEABLE_ON_RESUME = {"steps", "save_every", "preview_every", "preview_prompt", "out", "device", "threads",
                        "norm_log", "evaluate", "resume"}


def build_parser(with_defaults=True):
    """The command line, a flag per TrainConfig field. Without defaults, parsing tells which were given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None if with_defaults else argparse.SUPPRESS)
    for f in fields(TrainConfig):
        options = {k: v for k, v in f.metadata.items() if k not in ("help", "note", "flag")}
        if isinstance(f.default, bool):
            options["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, (int, float)):
            options.setdefault("type", type(f.default))
        toy_default = f"the toy model: {toy.TRAIN_DEFAULTS[f.name]}" if f.name in toy.TRAIN_DEFAULTS else ""
        notes = "".join(f"; {note}" for note in (f.metadata["note"], toy_default) if note)
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        p.add_argument(flag, dest=f.name, help=f"{f.metadata['help']} (default: %(default)s){notes}",
                       **options)
    if with_defaults:
        p.set_defaults(**asdict(TrainConfig()))
    return p


def parse_args(argv=None):
    """(TrainConfig, the names of the settings given on the command line)."""
    args = build_parser().parse_args(argv)
    explicit = set(vars(build_parser(with_defaults=False).parse_args(argv)))
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)}), explicit


class RunError(cli.UsageError):
    """Something about the run's settings that the user must change; the message says what (exit code 2)."""


SIGNALS = None  # main's cli.Signals: Ctrl-C, SIGTERM and SIGHUP stop a run with a resumable checkpoint


def main(argv=None):
    """The command line: the exit code (0; 1 a failure, 2 a bad setting, 128 + n stopped by signal n), and
    a one-line "error: ..." instead of a traceback (minti/cli.py; MINTI_DEBUG=1 shows it)."""
    global SIGNALS
    SIGNALS, handlers = cli.Signals(defer=between_steps), {s: signal.getsignal(s) for s in cli.STOP_SIGNALS}
    if threading.current_thread() is threading.main_thread():
        SIGNALS.install()
    try:
        return cli.run_main(run_command_line, argv)
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in handlers.items():
                signal.signal(s, handler)
        SIGNALS = None
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_command_line(argv):
    train(*parse_args(argv))
    return 0


def between_steps(frame):
    """Whether a stop signal must wait: inside the loop (a step, or the log and checkpoint of a finished one)
    it waits for the step to end, and after_step raises it there, so that the saved state is always a
    step's end (a step stopped halfway could have moved the vectors already). In a preview, or before
    and after the loop, it stops at once."""
    while frame is not None:
        if frame.f_code is preview.__code__:
            return False
        if frame.f_code is ti.train_loop.__code__:
            return True
        frame = frame.f_back
    return False


# ----------------------------------------------------------------------------------------------
# The run: settings, load, data, the loop, saving

def train(cfg, explicit=frozenset()):
    """Run textual inversion as configured (a TrainConfig); returns {"out", "files", "step"}."""
    cfg, state = settle(cfg, explicit)  # a resumed run's own settings, checked, the toy model's defaults
    if cfg.per_layer or cfg.neti:
        return train_spacetime(cfg, explicit)
    if state is not None and state["step"] >= cfg.steps:  # said before loading anything, changing nothing
        print(f"The run is already at step {state['step']} of --steps {cfg.steps}: nothing to do (pass a "
              f"larger --steps to train further).")
        return {"out": cfg.out, "files": [], "step": state["step"]}
    rank = join_ranks(cfg)  # torchrun: this process's rank; one process: 0
    run = setup(cfg, explicit, state)  # the frozen model, the word, the data, AdamW, the generator
    run.writes = rank == 0  # torchrun: every rank holds the same vectors; rank 0 alone prints and writes
    if run.writes:
        describe(run)
        remove_unfinished_writes(run.out)
    try:  # from "running" in config.json on, a stop (Ctrl-C, SIGTERM, SIGHUP) saves a resumable checkpoint
        if run.writes:
            write_json(os.path.join(run.out, "config.json"), {**run.info, "status": "running"})
        run.bar = tqdm(total=cfg.steps, initial=run.step, desc="training", dynamic_ncols=True, smoothing=0.1,
                       disable=not run.writes)
        run.t0 = time.time() - (run.rows[-1][-1] if run.rows else 0.0)  # a resumed log's seconds go on
        # THE loop (minti/textual_inversion.py); after_step logs, snapshots and previews
        ti.train_loop(run.sd, run.word, run.data, run.optimizer, run.sampler, run.generator, steps=cfg.steps,
                      lr=run.lr, start=run.step, batch=cfg.batch, grad_accum=cfg.grad_accum,
                      warmup=cfg.lr_warmup, schedule=cfg.lr_schedule, scaler=run.scaler,
                      on_step=lambda step, loss, lr: after_step(run, step, loss, lr))
        run.bar.close()
        if run.writes:
            save(run, snapshot=bool(cfg.save_every) and run.step % cfg.save_every == 0)
            if cfg.preview_every:
                preview(run)
            finish(run, "finished")
    except KeyboardInterrupt as stop:
        close_bar(run)
        sys.exit(interrupted(run, stop))
    except ti.NonFiniteLoss as error:
        run.bar.close()
        sys.exit(diverged(run, error))
    if SIGNALS is not None and SIGNALS.pending:  # a stop while the last step was saved: the run is complete
        cli.say(f"\nStopped ({signal.Signals(SIGNALS.caught).name}) after the last step; the run is finished.")
        sys.exit(128 + SIGNALS.caught)
    if not run.writes:
        return {"out": run.out, "files": [], "step": run.step}
    report(run)
    if will_evaluate(cfg):
        evaluate_toy_concept(run)
    return {"out": run.out, "files": sorted(run.written), "step": run.step}


CTRL_C = threading.Event()  # torchrun: a stop signal reached this rank; the ranks stop together after the step


def join_ranks(cfg):
    """Under torchrun (WORLD_SIZE > 1): join the other processes, nccl on CUDA (GPU LOCAL_RANK each), gloo
    on the CPU, and make Ctrl-C a request to stop after the current step (all_stop); returns the rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0
    if cfg.batch % world:
        raise RunError(f"--batch {cfg.batch} does not divide by the {world} processes of torchrun (each "
                       f"takes batch / {world} images of every micro-batch); use a multiple of {world}.")
    device = pick_device(cfg.device)
    if device.type == "cuda":
        if device.index is not None:
            raise RunError(f"--device {cfg.device}: under torchrun each process uses the GPU of its "
                           f"LOCAL_RANK; pass --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose.")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    for s in cli.STOP_SIGNALS:  # Ctrl-C, SIGTERM, SIGHUP: every rank stops after the same step (all_stop)
        signal.signal(s, lambda signum, frame: CTRL_C.set())
    return torch.distributed.get_rank()


def all_stop(run):
    """torchrun: whether Ctrl-C reached any rank (one small all-reduce per step: every rank agrees)."""
    flag = torch.tensor(float(CTRL_C.is_set()), device=run.word.vectors.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def settle(cfg, explicit):
    """The run's settings, and the checkpoint's state when resuming (else None)."""
    state = None
    if cfg.resume:
        path = next((p for p in (os.path.join(cfg.resume, "checkpoint", "state.pt"),
                                 os.path.join(cfg.resume, "state.pt"), cfg.resume)
                     if os.path.isfile(p)), None)
        if path is None:
            raise RunError(f"--resume {cfg.resume}: no checkpoint there (no "
                           f"{os.path.join(cfg.resume, 'checkpoint', 'state.pt')}); give the folder of a run "
                           f"that train.py wrote.")
        state = load_state(path)
        cfg = merge_resumed_config(state["config"], cfg, explicit)
        if "out" not in explicit:  # the run's own folder: .../<run>/checkpoint/state.pt
            cfg.out = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    check_settings(cfg)
    try:
        make_timestep_sampler(cfg.timesteps)  # a bad spec fails now, not after the model is loaded
    except ValueError as e:
        raise RunError(str(e)) from None
    fill_toy_defaults(cfg, explicit)
    check_settings(cfg)  # the toy model's defaults are fine, but a resumed run's come from a file
    if state is None or state["step"] < cfg.steps:  # (nothing to check when there is nothing to do)
        check_paths(cfg, explicit)
    return cfg, state


PROMPT_TOKENS = 77  # SD 1.x's text encoder reads 77 tokens: the start token, 75, the end token
STATE_KEYS = ("step", "vectors", "optimizer", "generator", "torch_rng", "sampler", "config", "log")


def check_settings(cfg):
    """Refuse, before anything is loaded, the settings that would fail later or silently mean something else."""
    for key in ("steps", "batch", "grad_accum", "vectors", "multires"):
        if getattr(cfg, key) < 1:
            raise RunError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(cfg, key)}.")
    for key in ("save_every", "preview_every", "lr_warmup", "threads"):
        if getattr(cfg, key) < 0:
            meaning = "torch's default" if key == "threads" else "none"
            raise RunError(f"--{key.replace('_', '-')} must be 0 or more (0: {meaning}), got {getattr(cfg, key)}.")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        why = " (nothing would train)" if cfg.lr == 0 else ""
        raise RunError(f"--lr must be a positive number, got {cfg.lr:g}{why}; e.g. --lr 5e-3.")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise RunError(f"--weight-decay must be 0 or a positive number, got {cfg.weight_decay:g}.")
    if not 0.0 <= cfg.flip <= 1.0:
        raise RunError(f"--flip is a probability in [0, 1], got {cfg.flip}.")
    if not -2 ** 63 <= cfg.seed < 2 ** 64:
        raise RunError(f"--seed must lie in [-2^63, 2^64) (torch's seeds), got {cfg.seed}.")
    if cfg.resolution is not None and (cfg.resolution < 8 or cfg.resolution % 8):
        raise RunError(f"--resolution is a side in pixels, a positive multiple of 8 (the VAE's factor), got "
                       f"{cfg.resolution}; e.g. 512 for SD 1.x.")
    if cfg.vectors > PROMPT_TOKENS - 2:
        raise RunError(f"--vectors {cfg.vectors}: a prompt holds {PROMPT_TOKENS - 2} tokens between its start and "
                       f"end tokens, so vectors past that would never train; use a few (1-8).")
    cli.check_device(cfg.device)
    if cfg.multires > 1000:
        raise RunError(f"--multires {cfg.multires}: more time buckets than SD 1.x's 1000 timesteps would leave "
                       f"buckets that never train; use a few (e.g. 10).")


def load_state(path):
    """A run's checkpoint/state.pt, read safely (weights_only) and checked, or a RunError saying what is wrong."""
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it does not expect
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign object (refused), a damaged file, a file that is not torch's at all
        raise RunError(f"--resume: {unreadable_torch_file(path, e)}; it is not a checkpoint train.py can "
                       f"continue. Start a new run (--from FILE warm-starts it from a concept file).") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing or not isinstance(state["config"], dict):
        lacks = ", ".join(missing) or "a config"
        raise RunError(f"--resume: {path} is not a checkpoint train.py wrote (it lacks {lacks}); give the folder "
                       f"of a run that train.py wrote.")
    unknown = set(state["config"]) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise RunError(f"--resume: {path} has settings this train.py does not know ({', '.join(sorted(unknown))}):"
                       f" it was written by another version of minti.")
    return state


RUN_FILES = ("config.json", "log.csv", "loss.png", "learned_embeds.safetensors")  # what a run writes on top


def check_paths(cfg, explicit):
    """Refuse, before the model is loaded: a missing or empty --images folder, an unreadable --from file, and
    an --out that is a file, under a file, read-only, or a folder of other files that a run would overwrite."""
    if not toy.is_toy_model(cfg.model) and not os.path.exists(cfg.model):
        raise RunError(f"--model {cfg.model}: no such file or folder. Give 'toy', a diffusers folder, or one SD "
                       f"1.x .safetensors/.ckpt file.")
    if cfg.images is not None:
        try:
            find_images(cfg.images)
        except ImageError as e:
            raise RunError(str(e)) from None
        nested = sorted(n for n in os.listdir(cfg.images) if os.path.isdir(os.path.join(cfg.images, n))
                        and not n.startswith("."))
        if nested:
            print(f"note: the subfolders of --images ({', '.join(n + '/' for n in nested[:5])}) are not read: only "
                  f"the images directly in {cfg.images} are.")
    if cfg.from_file and cfg.resume is None:
        cli.read_concepts(cfg.from_file, "--from", note=False)  # read now: a damaged or foreign file fails in a second
    out = cfg.out or "runs"
    cli.check_writable_folder(out, "--out" if cfg.out else "the default output folder")
    if cfg.out and cfg.resume is None and os.path.isdir(cfg.out):
        if os.path.isfile(os.path.join(cfg.out, "checkpoint", "state.pt")):
            raise RunError(f"--out {cfg.out} already holds a run; continue it with --resume {cfg.out}, or "
                           f"choose another --out.")
        taken = [n for n in RUN_FILES if os.path.exists(os.path.join(cfg.out, n))]
        if taken and not is_run_config(os.path.join(cfg.out, "config.json")):
            raise RunError(f"--out {cfg.out} holds files that are not a train.py run's ({', '.join(taken)}) and "
                           f"that a run would overwrite; choose another --out (or an empty folder).")


def is_run_config(path):
    """Is this the config.json of a train.py run (one that stopped before its first checkpoint)?"""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        return isinstance(config, dict) and "status" in config and isinstance(config.get("config"), dict)
    except (OSError, ValueError):
        return False


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


def fill_toy_defaults(cfg, explicit):
    """On the toy model: its default concept's images, the concept's init word, and toy.TRAIN_DEFAULTS for
    the settings not given (a resumed run keeps its own)."""
    if not toy.is_toy_model(cfg.model):
        if cfg.images is None:
            raise RunError("--images DIR is required with a model other than the toy model: a folder with "
                           "3-5 images of the concept.")
        return
    if cfg.images is None:
        cfg.images = toy.concept_folder()
        if not os.path.isdir(cfg.images):
            raise RunError(f"The default toy concept's images ({cfg.images}) are not there; write them with "
                           f"`python -c \"from minti.toy.world import write_concept_images as w; "
                           f"w('{toy.DEFAULT_CONCEPT}', '{cfg.images}')\"`, or pass --images DIR.")
    name = toy.concept_name(cfg.images)
    if cfg.init is None and name is not None and "from_file" not in explicit:
        cfg.init = toy.CONCEPTS[name].init_word
    for key in ("vectors", "steps", "lr"):
        if cfg.resume is None and key not in explicit:
            setattr(cfg, key, toy.TRAIN_DEFAULTS[key])


@dataclass
class Run:
    """What the loop's callbacks share: the run's parts, its log, and what was written where."""

    cfg: TrainConfig
    sd: object  # the frozen model (minti.load)
    word: ti.LearnedWord
    data: object  # data.ConceptData
    optimizer: torch.optim.Optimizer
    sampler: object  # the timestep sampler (minti/timesteps.py)
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


def setup(cfg, explicit, state):
    """Everything the loop needs, restored from `state` when resuming."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    choose_cuda_backends()  # no TF32: fp32 is fp32 (minti/files.py)
    # Read, cast and moved a tensor at a time. The VAE stays fp32: it encodes the images once (and decodes
    # previews); SD's VAE overflows in fp16.
    precision = PRECISIONS[cfg.precision]
    sd = minti.load(cfg.model, device=device, dtype={"text_encoder": precision, "unet": precision})
    ti.freeze(sd)  # no weight gradient is ever computed or stored
    sd.unet.gradient_checkpointing = cfg.checkpointing
    if cfg.channels_last:
        sd.unet.to(memory_format=torch.channels_last)

    if state is None:
        vectors, init_message = initial_vectors(cfg, explicit, sd)
    else:
        vectors, init_message = state["vectors"], f"resumed from {cfg.resume} at step {state['step']}"
    try:
        word = ti.new_word(sd.tokenizer, cfg.token, vectors, sd.scheduler.num_train_timesteps).to(device)
    except ValueError as e:  # a --token that is already a word
        raise RunError(str(e)) from None

    resolution, templates = cfg.resolution or default_size(sd)[0], templates_for(cfg)
    length = sd.text_encoder.config.max_position_embeddings
    data, data_summary = load_concept_data(
        cfg.images, resolution, cfg.token, placeholder_text(word, cfg.token), templates,
        lambda prompts: sd.tokenizer(prompts, length=length), sd.vae, sd.latent_scale,
        cache_latents=cfg.cache_latents, flip_p=cfg.flip, device=device)
    check_fits(cfg, sd, resolution, data)
    if cfg.cache_latents and not cfg.preview_every and not will_evaluate(cfg):
        sd.vae = data.latents.vae = None  # nothing will encode or decode again: free its memory

    lr = cfg.lr * (cfg.batch * cfg.grad_accum if cfg.scale_lr else 1)
    sampler = make_timestep_sampler(cfg.timesteps, sd.scheduler.num_train_timesteps)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None  # fp16 needs a loss scale
    info = {"config": asdict(cfg), "effective_lr": lr, "model": sd.source, "resolution": resolution,
            "init": init_message, "data": data_summary, "timesteps": sampler.describe(),
            "placeholder_tokens": ti.placeholder_tokens(cfg.token, word.vectors.shape[1]),
            "typical_word_norm": ti.token_table(sd.text_encoder).detach().float().norm(dim=1).median().item(),
            "torch": torch.__version__, "device": str(device), "processes": rank_and_world()[1]}
    run = Run(cfg=cfg, sd=sd, word=word, data=data, optimizer=ti.adamw(word, lr, cfg.weight_decay),
              sampler=sampler, generator=torch.Generator().manual_seed(cfg.seed), scaler=scaler, lr=lr,
              templates=templates, out=choose_out(cfg), info=info)
    if state is not None:  # AdamW, the generator, torch's RNG, the sampler, the loss scale, the log
        run.optimizer.load_state_dict(state["optimizer"])
        run.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        run.sampler.load_state_dict(state["sampler"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        run.rows, run.step = [list(r) for r in state["log"]], state["step"]
    return run


def check_fits(cfg, sd, resolution, data):
    """What only the loaded model can tell: its timesteps, its UNet's size steps, its prompt length."""
    if cfg.multires > sd.scheduler.num_train_timesteps:
        raise RunError(f"--multires {cfg.multires} is more time buckets than the model's "
                       f"{sd.scheduler.num_train_timesteps} timesteps: some would never train.")
    factor = sd.vae.config.downsample_factor * 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if resolution % factor:
        raise RunError(f"--resolution {resolution}: this model needs a multiple of {factor} (VAE and UNet "
                       f"downsampling); e.g. {max(factor, round(resolution / factor) * factor)}.")
    length = sd.text_encoder.config.max_position_embeddings
    for path, prompts in zip(data.paths, data.prompts):
        for prompt in dict.fromkeys(prompts):
            n = len(sd.tokenizer.encode(prompt))
            if n > length:
                raise RunError(f"The training prompt {prompt!r} (for {path}) is {n} tokens with the word's "
                               f"{cfg.vectors} vector(s), but the text encoder reads {length}: its end would be "
                               f"cut off. Shorten the caption, or use fewer --vectors.")


def initial_vectors(cfg, explicit, sd):
    """The word's starting vectors [T, n, D] and a sentence saying where they come from."""
    table, T = ti.token_table(sd.text_encoder), cfg.multires
    if not cfg.from_file:
        if not cfg.init:
            raise RunError("--init WORD is needed: a coarse descriptor of the concept to start from, e.g. "
                           "'cat', 'sculpture', 'painting' (or --from FILE to start from a learned word).")
        try:
            vectors, message = ti.init_vectors(sd.tokenizer, table, cfg.init, cfg.vectors)
        except ValueError as e:  # an --init word the vocabulary does not know
            raise RunError(str(e)) from None
        return vectors[None].repeat(T, 1, 1), message + (f"; the same for all {T} resolutions" * (T > 1))
    concepts = cli.read_concepts(cfg.from_file, "--from")  # FILE or FILE:NAME
    if len(concepts) != 1:
        raise RunError(f"--from {cfg.from_file} holds {len(concepts)} words ({[c.token for c in concepts]}); "
                       f"a warm start needs a file with one.")
    c = concepts[0]
    check_width(c, table.shape[1])
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
    """--what's prompt templates; auto: the toy model's own (toy.TRAIN_DEFAULTS), else the paper's objects."""
    if cfg.what == "auto":
        return toy.TRAIN_DEFAULTS["templates"] if toy.is_toy_model(cfg.model) else TEMPLATES["object"]
    return toy.TEMPLATES if cfg.what == "toy" else TEMPLATES[cfg.what]


def placeholder_text(word, token):
    """What stands for the word in a prompt: its n placeholder tokens."""
    return " ".join(ti.placeholder_tokens(token, word.vectors.shape[1]))


def choose_out(cfg):
    """--out; by default runs/<name>, or runs/<name>-2, ... when that is taken."""
    if cfg.out:
        if cfg.resume is None and os.path.isfile(os.path.join(cfg.out, "checkpoint", "state.pt")):
            raise RunError(f"--out {cfg.out} already holds a run; continue it with --resume {cfg.out}, or "
                           f"choose another --out.")
        return cfg.out
    out, k = os.path.join("runs", file_name(cfg.token)), 1
    while os.path.exists(out) and os.listdir(out):
        k += 1
        out = os.path.join("runs", f"{file_name(cfg.token)}-{k}")
    return out


def describe(run):
    cfg, word, info = run.cfg, run.word, run.info
    print(f"model: {info['model']}\ndata: {info['data']}\n{info['init']}")
    print(f"word: {cfg.token} = {word.vectors.shape[1]} vector(s) x {word.vectors.shape[2]}"
          + (f" x {word.resolutions} resolutions" if word.resolutions > 1 else "")
          + f"; timesteps: {info['timesteps']}; precision {cfg.precision} on {info['device']}")
    if cfg.scale_lr:
        print(f"lr: {run.lr:g} effective = {cfg.lr:g} x batch {cfg.batch} x accumulation {cfg.grad_accum}")
    else:
        print(f"lr: {run.lr:g} effective (--scale-lr would multiply it by batch x accumulation = "
              f"{cfg.batch * cfg.grad_accum})")
    if cfg.precision == "fp16" and word.vectors.device.type == "cpu":
        print("note: fp16 is slow on CPUs; bf16 is the better choice there.")
    if cfg.norm_log:
        print(f"norms: a typical word {info['typical_word_norm']:.3f} (median over the table); the word now "
              f"{word.vectors.detach().norm(dim=-1).mean().item():.3f}")
    print(f"out: {run.out}")


# ----------------------------------------------------------------------------------------------
# What hangs off the loop: the log of each step, snapshots and checkpoints, previews, Ctrl-C, the NaN stop

def after_step(run, step, loss, lr):
    """The loop's on_step: log the step and show it; every --save-every / --preview-every steps, save
    and preview (the last step's are written after the loop)."""
    cfg, typical = run.cfg, run.info["typical_word_norm"]
    run.step = step
    norm = run.word.vectors.detach().norm(dim=-1).mean()  # on the device: read when the log is written
    run.rows.append([step, loss, lr, norm] + [typical] * cfg.norm_log + [round(time.time() - run.t0, 3)])
    run.bar.update(1)
    shown = {"norm": f"{norm.item():.3f}/{typical:.3f}"} if cfg.norm_log else {}  # one more read per step
    run.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2g}", **shown)
    if run.writes and step < cfg.steps and cfg.save_every and step % cfg.save_every == 0:
        save(run, snapshot=True)
    if SIGNALS is not None:
        SIGNALS.check()  # a stop that came while this step was logged and saved (between_steps)
    if run.writes and step < cfg.steps and cfg.preview_every and step % cfg.preview_every == 0:
        preview(run)
    if torch.distributed.is_initialized() and all_stop(run):
        raise KeyboardInterrupt  # after the step, on every rank: the state is saved at a step's end


def save(run, snapshot=False):
    """Concept files, log, plot and the resumable checkpoint at run.step. The generator is as at the start
    of the next step (the loop rewinds an unfinished one), so a resumed run draws what this one would."""
    read_log(run)
    concept = concept_at(run, run.step)
    run.written.update({p: "concept" for p in save_concept_files(run.out, concept, file_name(run.cfg.token))})
    if snapshot:
        folder = os.path.join(run.out, "snapshots", f"step-{run.step:06d}")
        save_concept_files(folder, concept, file_name(run.cfg.token))
        run.written[folder + os.sep] = "snapshots"
    state = {"format": "minti-textual-inversion-state", "step": run.step,
             "vectors": run.word.vectors.detach().cpu(), "optimizer": run.optimizer.state_dict(),
             "generator": run.generator.get_state(), "torch_rng": torch.get_rng_state(),
             "sampler": run.sampler.state_dict(),
             "scaler": run.scaler.state_dict() if run.scaler is not None else None,
             "config": asdict(run.cfg), "log": run.rows}
    path = os.path.join(run.out, "checkpoint", "state.pt")
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    run.written[path] = "checkpoint"
    write_log(run)


def preview(run):
    """A fixed-seed grid made with the word as trained so far: a row per prompt (and resolution)."""
    import numpy as np
    from PIL import Image

    from minti.sampling import image_grid, text_to_image

    text = placeholder_text(run.word, run.cfg.token)
    prompts = [p.replace("{}", text) for p in run.cfg.preview_prompt or run.templates[:1]]
    times = MULTIRES_EXPORTS if run.word.resolutions > 1 else (0.0,)  # multires: a row per resolution
    rows = [text_to_image(run.sd, prompts, num_steps=PREVIEW_STEPS, seed=run.cfg.seed, n=PREVIEW_IMAGES,
                          guidance_scale=PREVIEW_GUIDANCE, embed_fn=run.word.embed_fn(run.sd.text_encoder, t))
            for t in times]
    grid = image_grid(np.concatenate(rows), rows=len(prompts) * len(times))
    path = os.path.join(run.out, "previews", f"step-{run.step:06d}.png")
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    run.written[path] = "preview"


def remove_unfinished_writes(out):
    """The temporary files of atomic_write that a kill -9 left in the run's folder (.name.1a2b3c4d.tmp):
    the files they were to replace are intact, and this run is the folder's only writer."""
    for folder, _, names in os.walk(out):
        for name in names:
            if re.fullmatch(r"\..+\.[0-9a-f]{8}\.tmp", name):
                os.remove(os.path.join(folder, name))


def close_bar(run):
    """Close the progress bar; after SIGHUP its terminal may be gone, which must not cost the checkpoint."""
    try:
        if run.bar is not None:
            run.bar.close()
    except (OSError, ValueError):
        pass


def interrupted(run, stop=None):
    """Ctrl-C, SIGTERM or SIGHUP: save a resumable state (an unfinished step is redone on resume, with the
    same draws); a second signal meanwhile is ignored (cli.Signals). Exit code 128 + the signal number."""
    if not run.writes:
        return getattr(stop, "exit_code", 130)
    save(run)
    finish(run, "interrupted")
    name = stop.args[0] if getattr(stop, "args", None) else "Ctrl-C"
    cli.say(f"\nInterrupted ({name}) after step {run.step}: the state is saved in {run.out}/checkpoint/. "
            f"Continue with\n    python train.py --resume {run.out}")
    return getattr(stop, "exit_code", 130)


def diverged(run, error):
    """Save the last vectors that gave a finite loss (the loop put them back), and say what to do."""
    if not run.writes:
        return f"error: training diverged at step {error.step} (rank 0 says more)"
    lr = run.optimizer.param_groups[0]["lr"]
    good = "none (the very first step failed: does the model itself produce NaN?)"
    if error.good_step is not None:
        folder = os.path.join(run.out, "last-good")
        paths = save_concept_files(folder, concept_at(run, error.good_step), file_name(run.cfg.token))
        which = f"after step {error.good_step}" if error.good_step else "at the start"
        good = f"the vectors {which} (the last to give a finite loss): {', '.join(paths)}"
    write_log(run)
    finish(run, "stopped: non-finite loss")
    path, checkpoint = os.path.join(run.out, "checkpoint", "state.pt"), "none"
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)["step"]
        checkpoint = f"{path} (step {saved}; --resume {run.out})"
    return (f"error: training diverged at step {error.step}: {error}, with lr {lr:g}. The run is stopped.\n"
            f"  last good snapshot: {good}\n  last checkpoint: {checkpoint}\n"
            f"  What to do: lower --lr (e.g. {lr / 10:g}), or use --precision fp32/bf16 if it was fp16.")


# ----------------------------------------------------------------------------------------------
# Saving: the concept files, the log and its plot, config.json, the report, the toy evaluation

def file_name(token):
    """A file-system-safe name for the word: '<my-cat>' -> 'my-cat' (AUTOMATIC1111 calls it by it)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", token.strip("<>")).strip("-.") or "concept"


def concept_at(run, step):
    """The word as a Concept (minti/concepts.py) for its files; AUTOMATIC1111 shows the model's name."""
    v, model_name = run.word.vectors.detach().cpu(), os.path.basename(os.path.normpath(run.cfg.model))
    return Concept(run.cfg.token, v[0] if v.shape[0] == 1 else v, step=step,
                   meta={"sd_checkpoint": None, "sd_checkpoint_name": model_name})


def save_concept_files(folder, concept, name):
    """diffusers + AUTOMATIC1111 files of the word (multires: minti's file + a few resolutions of it)."""
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


def read_log(run):
    """The log's values still on the device (the vectors' norms), read in one go: numbers from here on."""
    waiting = [(r, i) for r in run.rows for i, v in enumerate(r) if isinstance(v, torch.Tensor)]
    if waiting:
        for (r, i), value in zip(waiting, torch.stack([r[i] for r, i in waiting]).tolist()):
            r[i] = value


def write_log(run):
    read_log(run)
    csv, png = os.path.join(run.out, "log.csv"), os.path.join(run.out, "loss.png")
    columns = ["step", "loss", "lr", "vector_norm"] + ["typical_norm"] * run.cfg.norm_log + ["seconds"]
    write_csv(csv, columns, run.rows)
    plot_loss(png, columns, run.rows, f"{run.cfg.token} on {run.cfg.model}")
    run.written.update({csv: "log", png: "log"})


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
    ax.set(ylabel="loss (eq. 2)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax2.plot(col["step"], col["vector_norm"], label="learned vectors")
    if "typical_norm" in col:
        ax2.plot(col["step"], col["typical_norm"], ls="--", label="a typical word (median of the table)")
    ax2.set(xlabel="step", ylabel="norm")
    ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def finish(run, status):
    path = os.path.join(run.out, "config.json")
    run.written[path] = "config"
    write_json(path, {**run.info, "status": status, "step": run.step, "files": sorted(run.written)})


def report(run):
    print(f"\nDone: {run.step} steps. Written to {run.out}/:")
    for path, kind in sorted(run.written.items(), key=lambda kv: (kv[1], kv[0])):
        print(f"  {kind:10s} {os.path.relpath(path, run.out)}")
    usable = ("learned_embeds.safetensors" if run.word.resolutions == 1
              else f"learned_embeds-r{MULTIRES_EXPORTS[1]:g}.safetensors")
    print(f"Use it: python sample.py --model {run.cfg.model} --embeds {os.path.join(run.out, usable)} "
          f"--prompt \"{run.templates[0].format(run.cfg.token)}\"")


def will_evaluate(cfg):
    """Whether the run ends with the oracle's evaluation: --evaluate, the toy model, a toy concept."""
    return cfg.evaluate and toy.is_toy_model(cfg.model) and toy.concept_name(cfg.images) is not None


def evaluate_toy_concept(run):
    """On the toy model, judge the learned word with the oracle (minti/toy/evaluate.py): reconstruction
    and editability against the toy concept's true attributes."""
    name = toy.concept_name(run.cfg.images)
    if not toy.is_toy_model(run.cfg.model) or name is None:
        return
    from minti.toy.evaluate import evaluate_concept

    concept = concept_at(run, run.step)
    if concept.is_multires:  # the evaluation knows ordinary words: judge the middle resolution
        concept = export_resolution(concept, MULTIRES_EXPORTS[1], token=run.cfg.token)
    print("\nEvaluating the word with the oracle (--no-evaluate skips this)...")
    result = evaluate_concept(run.sd, concept, truth=name, images=run.cfg.images, n=EVAL_SAMPLES,
                              steps=EVAL_STEPS)
    print(result.table())
    print("wrote " + ", ".join(result.save(run.out, "concept_eval")))


def train_spacetime(cfg, explicit=frozenset()):
    """--per-layer / --neti: the same loop through ti.learn (one call), then the word's minti-spacetime
    file (and, for P+, its layer average as an ordinary diffusers word). No resume, previews or fp16 yet."""
    from minti.spacetime_files import export_layer_average, from_word, save_spacetime

    if cfg.per_layer and cfg.neti:
        raise RunError("--per-layer and --neti are two kinds of word: choose one.")
    unsupported = [f for f, on in (("--resume", cfg.resume), ("--from", cfg.from_file),
                                   ("--precision fp16/bf16", cfg.precision != "fp32")) if on]
    if unsupported:
        raise RunError(f"{', '.join(unsupported)} not supported with --per-layer/--neti yet.")
    if cfg.neti:  # one token, and time comes from the network: the toy defaults' --vectors do not apply
        if ("vectors" in explicit and cfg.vectors != 1) or ("multires" in explicit and cfg.multires != 1):
            raise RunError("--neti learns one token whose vector already depends on time and layer: drop "
                           "--vectors and --multires.")
        cfg.vectors = cfg.multires = 1
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sd = minti.load(cfg.model, device=pick_device(cfg.device))
    sd.unet.gradient_checkpointing = cfg.checkpointing
    lr = cfg.lr * (cfg.batch * cfg.grad_accum if cfg.scale_lr else 1)
    kind = "per-layer" if cfg.per_layer else "neti"
    out = choose_out(cfg)
    os.makedirs(out, exist_ok=True)
    bar = tqdm(total=cfg.steps, desc=f"training ({kind})", dynamic_ncols=True)

    def on_step(step, word, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    word, losses = ti.learn(sd, cfg.images, cfg.token, cfg.init, vectors=cfg.vectors, multires=cfg.multires,
                            steps=cfg.steps, batch=cfg.batch, grad_accum=cfg.grad_accum, lr=lr,
                            lr_warmup=cfg.lr_warmup, lr_schedule=cfg.lr_schedule, weight_decay=cfg.weight_decay,
                            flip=cfg.flip, timesteps=cfg.timesteps, templates=templates_for(cfg),
                            resolution=cfg.resolution, seed=cfg.seed, callback=on_step, kind=kind,
                            bypass=cfg.bypass)
    bar.close()
    concept = from_word(word, cfg.token, step=cfg.steps, meta={"model": os.path.basename(str(cfg.model))})
    files = [os.path.join(out, f"{file_name(cfg.token)}-{kind}.safetensors")]
    save_spacetime(files[0], concept)
    if kind == "per-layer":
        files.append(os.path.join(out, "learned_embeds-layer-avg.safetensors"))
        save_diffusers(files[-1], export_layer_average(concept))
    write_csv(os.path.join(out, "log.csv"), ["step", "loss"], list(enumerate(losses, 1)))
    print(f"{kind} word {cfg.token}: {cfg.steps} steps, last loss {losses[-1]:.4f}; wrote " + ", ".join(files))
    return {"out": out, "files": files, "step": cfg.steps}


if __name__ == "__main__":
    sys.exit(main())
