"""A training run's folder and settings, for train.py: the checks made before anything loads, the run
folder's one writer (its lock), the checkpoint, the word's files, the log and its plot.

train.py reads as the run itself (settings, load, data, the loop, saving); what it writes and how it
refuses a setting that would fail later live here. Every refusal is a RunError: one line saying what is
wrong and what to do (exit code 2, minti/run/cli.py). A run folder has one writer, and holds only what
its run wrote: train.py never writes over files it did not write, and two processes never write one run.
"""
import contextlib
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import unicodedata
import warnings
from dataclasses import asdict, fields

import torch

from . import cli
from .. import textual_inversion as ti
from ..io.concepts import (ConceptError, bare_name, check_width, derived_token, export_resolution, save_a1111,
                           save_diffusers, save_multires)
from ..data import ImageError, check_images, find_images
from ..io.files import atomic_write, unreadable_torch_file, write_csv
from ..io.spacetime_files import (SpaceTimeConcept, export_layer_average, is_spacetime_file, load_spacetime, make_word,
                                  save_spacetime)
from ..schedulers import NUM_TRAIN_TIMESTEPS
from ..timesteps import make_timestep_sampler
from ..unet import cross_attention_layers

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per run folder is then the user's to keep
    fcntl = None

PROMPT_TOKENS = 77  # SD 1.x's text encoder reads 77 tokens: the start token, 75, the end token
MULTIRES_EXPORTS = (0.1, 0.5, 0.9)  # diffusion times exported as ordinary words, for tools without time
STATE_KEYS = ("step", "vectors", "optimizer", "generator", "torch_rng", "sampler", "config", "log")
LOCK_FILE = ".lock"  # in a run folder while a process writes it: "pid N on HOST"
MANY_LOG = "train.log"  # what minti.run.many writes into a run folder before train.py starts
TOKEN_LENGTH = 64  # characters of a word's name: far beyond any trigger word, well within a file name's 255
NORM_LIMIT = 100  # x a typical word's norm: a word this far beyond the vocabulary is diverging (trained words
#                   stay within ~10x: the toy's reach 2x, SD 1.x's a few times its 0.39)


class RunError(cli.UsageError):
    """Something about the run's settings that the user must change; the message says what (exit code 2)."""


def word_kind(cfg):
    """"ti" (textual inversion, multiresolution with --multires), "per-layer" (P+) or "neti"."""
    return "per-layer" if cfg.per_layer else "neti" if cfg.neti else "ti"


# ----------------------------------------------------------------------------------------------
# Checks before anything is loaded

def check_settings(cfg, new_run=True):
    """Refuse, before anything is loaded, the settings that would fail later or silently mean something else
    (a new run: also the flags that would do nothing for its word, and a name that no file could take)."""
    for key in ("steps", "batch", "grad_accum", "vectors", "multires"):
        cli.check_at_least(f"--{key.replace('_', '-')}", getattr(cfg, key))
    for key in ("save_every", "preview_every", "lr_warmup", "threads"):
        cli.check_at_least(f"--{key.replace('_', '-')}", getattr(cfg, key), 0,
                           "torch's default" if key == "threads" else "none")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        why = " (nothing would train)" if cfg.lr == 0 else ""
        raise RunError(f"--lr must be a positive number, got {cfg.lr:g}{why}; e.g. --lr 5e-3.")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise RunError(f"--weight-decay must be 0 or a positive number, got {cfg.weight_decay:g}.")
    if not 0.0 <= cfg.flip <= 1.0:
        raise RunError(f"--flip is a probability in [0, 1], got {cfg.flip}.")
    cli.check_seed(cfg.seed)
    cli.check_side("--resolution", cfg.resolution, "a side in pixels")
    if cfg.vectors > PROMPT_TOKENS - 2:
        given = f"--from {cfg.from_file} holds {cfg.vectors} vectors" if cfg.from_file else f"--vectors {cfg.vectors}"
        raise RunError(f"{given}: a prompt holds {PROMPT_TOKENS - 2} tokens between its start and end tokens, so "
                       f"vectors past that would never train; use a few (1-8).")
    cli.check_device(cfg.device)
    if cfg.multires > NUM_TRAIN_TIMESTEPS:
        raise RunError(f"--multires {cfg.multires}: more time buckets than SD 1.x's {NUM_TRAIN_TIMESTEPS} timesteps "
                       f"would leave buckets that never train; use a few (e.g. 10).")
    cli.check_at_least("--stop-every", cfg.stop_every)
    if not (cfg.stop_window >= 2 and 0.0 < cfg.stop_threshold < 1.0 and math.isfinite(cfg.pull) and cfg.pull >= 0):
        raise RunError(f"--stop-window must be 2 or more (got {cfg.stop_window}), --stop-threshold lie in (0, 1) "
                       f"(got {cfg.stop_threshold:g}) and --pull be 0 or more (got {cfg.pull:g}).")
    check_timesteps(cfg)
    if new_run:
        check_token(cfg.token)
        check_combinations(cfg)


def check_timesteps(cfg):
    """--timesteps: a spec the samplers know, one a space-time word can use, and one that reaches every time
    bucket of --multires (an interval inside one bucket would leave the others as they started)."""
    try:
        sampler = make_timestep_sampler(cfg.timesteps)  # a bad spec fails now, not after the model is loaded
    except ValueError as e:
        raise RunError(f"--timesteps: {e}") from None
    if (cfg.per_layer or cfg.neti) and getattr(sampler, "wants_grad_norms", False):
        raise RunError(f"--timesteps {cfg.timesteps} reads the gradient of one context, but a space-time word "
                       f"gives each UNet layer its own; use uniform or a fixed interval.")
    T, (first, last) = cfg.multires, (getattr(sampler, "start", 0), getattr(sampler, "stop", NUM_TRAIN_TIMESTEPS) - 1)
    seen = ti.time_bucket(last, T) - ti.time_bucket(first, T) + 1
    if seen < T:
        raise RunError(f"--multires {T} with --timesteps {cfg.timesteps}: the timesteps {first}..{last} fall in "
                       f"{seen} of the {T} time buckets, so {T - seen} would never train. Use --timesteps uniform "
                       f"(or an interval that reaches every bucket), or fewer buckets (none: no --multires).")


def check_token(token, flag="--token"):
    """A word's name goes into prompts and file names: refuse now one that would fail at the first save."""
    problem = token_problem(token)
    if problem:
        raise RunError(f"{flag} {cli.shorten(repr(token))} {problem}; a word's name goes into prompts and file "
                       f"names. Give a short name without those, e.g. '<my-cat>'.")


def token_problem(token):
    """What is wrong with a word's name, or None: spaces, control characters, path separators, the characters
    of the prompts' syntax (io/prompt_syntax.py: <name|t|>, <name:K>), an empty or too long name."""
    for c in token:
        if c.isspace() or unicodedata.category(c).startswith("C"):
            return f"holds {'a space' if c == ' ' else f'the invisible character U+{ord(c):04X}'}"
        if c in "/\\":
            return f"holds a path separator {c!r}"
    name = bare_name(token)
    if len(token) > TOKEN_LENGTH:
        return f"is {len(token)} characters long (at most {TOKEN_LENGTH})"
    if not name.strip("<>"):
        return "is empty"
    for c in name:
        if c in "<>|()[],;:\"":
            return f"holds {c!r}, which prompts use for their syntax (<name>, <name|t|>, <name:K>)"
    return None


def check_combinations(cfg):
    """A new run's flags that would do nothing for its word (its settings, all filled in), refused: a flag
    that changes nothing, silently, is a wrong result."""
    defaults, kind = {f.name: f.default for f in fields(cfg)}, word_kind(cfg)
    unused = [("--no-bypass", not cfg.bypass and kind != "neti", "is NeTI's (--neti)"),
              ("--pull", cfg.pull != defaults["pull"] and cfg.start != "output", "weighs --start output's pull"),
              ("--init", cfg.from_file and cfg.init, "is not read with --from (the file's vectors are the start)"),
              ("--start output", cfg.from_file and cfg.start == "output", "starts from init words, not --from"),
              ("--preview-prompt", cfg.preview_prompt and not cfg.preview_every, "needs --preview-every N")]
    unused += [(f"--{key.replace('_', '-')}", getattr(cfg, key) != defaults[key] and cfg.stop != "auto",
                "is a setting of --stop auto") for key in ("stop_window", "stop_threshold", "stop_every")]
    for flag, given, why in unused:
        if given:
            raise RunError(f"{flag} {why}, so here it would change nothing; drop it (or add what it needs).")
    if (cfg.per_layer or cfg.neti) and (cfg.start != "input" or cfg.norm != "free"):
        raise RunError("--start output and --norm apply to ordinary and multiresolution words; a P+ or NeTI word "
                       "starts at the init word's embedding (NeTI's mapper already scales its output to the init "
                       "word's norm). Drop them, or train without --per-layer / --neti.")
    if cfg.per_layer and cfg.neti:
        raise RunError("--per-layer and --neti are two kinds of word: choose one.")


def check_paths(cfg, resumed=None):
    """Refuse, before the model is loaded: a missing model, a missing or empty --images folder or an image that
    does not open, and an --out that cannot be written, is or holds the images, or holds files that this run did
    not write (resumed: the folder of the run being resumed). A new run's paths are made absolute."""
    cli.check_model(cfg.model)
    if cfg.images is not None:
        try:
            for note in check_images(cfg.images):
                print(note)
        except ImageError as e:
            raise RunError(str(e)) from None
        cfg.images = os.path.abspath(cfg.images) if resumed is None else cfg.images
    out = cfg.out or "runs"
    cli.check_writable_folder(out, "--out" if cfg.out else "the default output folder")
    for folder in {cfg.out, resumed} - {None}:
        if writer_of(folder):
            raise busy(folder, writer_of(folder))
    if cfg.images is not None and is_within(cfg.images, out):
        raise RunError(f"--out {out} is (or holds) the --images folder {cfg.images}: the run's own files (loss.png, "
                       f"previews) would become training images. Choose an --out outside it.")
    check_out(cfg.out, resumed)


def is_within(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out(out, resumed=None):
    """A run writes into a new or empty folder, the folder of the run it resumes, or that of a run killed before
    its first checkpoint: never over files it did not write (a finished run, a user's embeddings folder)."""
    if not out or not os.path.isdir(out) or resumed is not None and os.path.samefile(out, resumed):
        return
    names = sorted(n for n in os.listdir(out) if not n.startswith(".") and n != MANY_LOG)
    config = run_config(out)
    status = str(config.get("status", "unknown")) if config else None
    if not names or (names == ["config.json"] and status == "running" and resumed is None):
        return
    if os.path.isfile(os.path.join(out, "checkpoint", "state.pt")):
        raise RunError(f"--out {out} already holds a run; continue it with --resume {out}, or choose another "
                       f"--out.")
    what = (f"the files of a train.py run ({status}) that has no checkpoint to continue from" if status else
            f"files that this run did not write ({cli.listing(names)})")
    raise RunError(f"--out {out} holds {what}. A run writes only into a new or empty folder (or the run it "
                   f"resumes), so that nothing there is replaced: choose another --out.")


def run_config(folder):
    """The config.json of a train.py run in `folder` (its settings, "status", "step", "files"), or {}."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) and isinstance(config.get("config"), dict) else {}


def check_fits(cfg, sd, resolution, data, word, out):
    """What only the loaded model can tell: its UNet's size steps, its prompt length; and the free space one
    save of this word takes (its files, a snapshot, the checkpoint with AdamW's two moments, a preview)."""
    factor = sd.vae.config.downsample_factor * 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if resolution % factor:
        raise RunError(f"--resolution {resolution}: this model needs a multiple of {factor} (VAE and UNet "
                       f"downsampling); e.g. {max(factor, round(resolution / factor) * factor)}.")
    length = sd.text_encoder.config.max_position_embeddings
    for path, prompts in zip(data.paths, data.prompts):
        for prompt in dict.fromkeys(prompts):
            n = len(sd.tokenizer.encode(prompt))
            if n > length:
                raise RunError(f"The training prompt {cli.shorten(repr(prompt))} (for {path}) is {n} tokens with "
                               f"the word's {cfg.vectors} vector(s), but the text encoder reads {length}: its end "
                               f"would be cut off. Shorten the caption, or use fewer --vectors.")
    need = 16 * 4 * sum(p.numel() for p in word.parameters()) + 3 * resolution ** 2 * 16 + 2 ** 20
    existing = os.path.abspath(out)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < need:
        raise RunError(f"--out {out}: {free / 2 ** 20:.1f} MB free on its disk, but one save of this run takes "
                       f"about {need / 2 ** 20:.1f} MB (the word's files, a snapshot, the checkpoint, a preview). "
                       f"Free some space, or choose an --out on another disk.")


# ----------------------------------------------------------------------------------------------
# Warm starts: --from a word file

def settings_from_file(cfg):
    """--from FILE (or FILE:NAME), read before the model is loaded: its one word decides --token, --vectors and
    --multires where they were not given (None), and must agree with those given. A space-time file (P+ /
    NeTI) continues a word of its own kind; an ordinary word starts every time bucket of --multires."""
    if is_spacetime_file(cfg.from_file):
        if word_kind(cfg) == "ti":
            raise RunError(f"--from {cfg.from_file} is a space-time word (P+ / NeTI): continue it with --per-layer "
                           f"or --neti, or start from an ordinary word (e.g. its learned_embeds-layer-avg file).")
        try:
            c = load_spacetime(cfg.from_file)
        except ConceptError as e:
            raise RunError(f"--from: {e}") from None
        if c.kind != word_kind(cfg):
            raise RunError(f"--from {cfg.from_file} is a {c.kind} word, but this run learns a "
                           f"{word_kind(cfg)} word; give a file of the same kind (or an ordinary word's file).")
        sizes = (c.vectors.shape[2], c.vectors.shape[0]) if c.kind == "per-layer" else (1, 1)  # [T, layers, n, D]
        bypass = c.kind == "neti" and str(c.meta.get("bypass")) == "True"
        if c.kind == "neti" and cfg.bypass not in (None, bypass):
            raise RunError(f"--from {cfg.from_file} is a NeTI word {'with' if bypass else 'without'} its textual "
                           f"bypass, which the file keeps: drop --{'no-' * (not cfg.bypass)}bypass.")
        cfg.bypass = bypass if c.kind == "neti" else cfg.bypass
    else:
        concepts = cli.read_concepts(cfg.from_file, "--from")
        if len(concepts) != 1:
            raise RunError(f"--from {cfg.from_file} holds {len(concepts)} words "
                           f"({cli.listing([c.token for c in concepts])}); a warm start needs a file with one "
                           f"(--from FILE:NAME names a one-word file's word).")
        c = concepts[0]
        sizes = (c.num_vectors, c.num_buckets or cfg.multires)
    for key, size, what in (("vectors", sizes[0], "vector(s)"), ("multires", sizes[1], "time bucket(s)")):
        if getattr(cfg, key) not in (None, size):
            raise RunError(f"--from {cfg.from_file} has {size} {what}, but --{key} is {getattr(cfg, key)}: the "
                           f"file decides it; drop --{key}.")
        setattr(cfg, key, size)
    cfg.token = cfg.token or c.token
    check_token(cfg.token, f"--from {cfg.from_file}: its word" if cfg.token == c.token else "--token")


def vectors_from_file(cfg, width):
    """--from an ordinary word's file: its vectors [T, n, D] (settings_from_file has matched the sizes) and a
    sentence saying so."""
    (c,) = cli.read_concepts(cfg.from_file, "--from", note=False)
    check_width(c, width)
    if c.is_multires:
        return c.vectors.clone(), f"init: {c.num_vectors} vector(s) x {cfg.multires} resolutions from {cfg.from_file}"
    T, message = cfg.multires, f"init: {c.num_vectors} vector(s) from {cfg.from_file}"
    return c.vectors[None].repeat(T, 1, 1), message + (f", for all {T} resolutions" * (T > 1))


def initial_vectors(cfg, sd):
    """The word's starting vectors [T, n, D] and a sentence saying where they come from: a word file's (--from),
    or the --init words' (textual_inversion.init_vectors; --start output: CrossInit, the text encoder's output)."""
    table, T = ti.token_table(sd.text_encoder), cfg.multires
    if cfg.from_file:
        return vectors_from_file(cfg, table.shape[1])
    if not str(cfg.init or "").replace(",", " ").split():
        raise RunError("--init WORD is needed: a coarse descriptor of the concept that the vectors start from "
                       "(e.g. --init cat; one word per vector, or one for all), or --from FILE to start from a word "
                       "file.")
    try:
        vectors, message = ti.init_vectors(sd.tokenizer, table, cfg.init, cfg.vectors,
                                           sd.text_encoder if cfg.start == "output" else None)
    except ValueError as e:  # no init word (and no --from), or one the vocabulary does not know
        raise RunError(f"--init: {e}") from None
    return vectors[None].repeat(T, 1, 1), message + (f"; the same for all {T} resolutions" * (T > 1))


def spacetime_from_file(cfg, sd):
    """--from a minti-spacetime file: the P+ / NeTI word it holds, called cfg.token, its placeholders registered
    in sd.tokenizer, and a sentence saying so."""
    try:
        concept = load_spacetime(cfg.from_file, cross_attention_layers(sd.unet), sd.text_encoder.config.hidden_size)
    except ConceptError as e:
        raise RunError(f"--from: {e}") from None
    concept.token = cfg.token
    try:
        word = make_word(concept, sd.tokenizer).train()
    except ValueError as e:  # its token is already a word
        raise RunError(f"--token: {e}") from None
    return word, f"init: the {concept.kind} word of {cfg.from_file}"


# ----------------------------------------------------------------------------------------------
# Resuming: the checkpoint and the settings it keeps

def find_state(folder):
    """The checkpoint of the run in `folder` (or the state.pt given itself)."""
    path = next((p for p in (os.path.join(folder, "checkpoint", "state.pt"), os.path.join(folder, "state.pt"),
                             folder) if os.path.isfile(p)), None)
    if path is None:
        raise RunError(f"--resume {folder}: no checkpoint there (no "
                       f"{os.path.join(folder, 'checkpoint', 'state.pt')}); give the folder of a run "
                       f"that train.py wrote.")
    return path


def load_state(path, known_settings):
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
    unknown = set(state["config"]) - set(known_settings)
    if unknown:
        raise RunError(f"--resume: {path} has settings this train.py does not know ({', '.join(sorted(unknown))}):"
                       f" it was written by another version of minti.")
    return state


def merge_resumed_config(saved, given, changeable, state):
    """The resumed run's settings: `saved`, but for those of `given` (the command line's, None where not given)
    that may change (`changeable`); another given setting must equal the saved one. --images may name the same
    images elsewhere (a moved folder, a relative path from another working directory)."""
    resume_images(saved, given, state)
    for f in fields(given):
        key, value = f.name, getattr(given, f.name)
        if value is None or key in changeable:
            setattr(saved, key, getattr(saved, key) if value is None else value)
        elif value != getattr(saved, key):
            flag = f.metadata.get("flag", "--" + key.replace("_", "-"))
            raise RunError(f"{flag} {cli.shorten(repr(value))} differs from the run being resumed "
                           f"({cli.shorten(repr(getattr(saved, key)))}); a resumed run keeps its settings (only "
                           f"{', '.join(sorted(changeable - {'resume'}))} may change). Start a new run with "
                           f"--from (e.g. its learned_embeds.safetensors) to change the others.")
    return saved


def resume_images(saved, given, state):
    """A resumed run trains on its own images: the saved --images folder, or a given one holding the same files
    (names and sizes, images_digest); a folder that is gone asks for --images."""
    if given.images is None:
        if saved.images is not None and not os.path.isdir(saved.images):
            raise RunError(f"--resume: the run's images ({saved.images}) are not there any more; pass --images "
                           f"with the folder where they are now.")
        return
    if saved.images is not None and is_within(given.images, saved.images) and is_within(saved.images, given.images):
        given.images = None  # the same folder, however written
        return
    digest = state.get("images") or (images_digest(saved.images) if os.path.isdir(saved.images or "") else None)
    if digest is not None and os.path.isdir(given.images) and images_digest(given.images) != digest:
        raise RunError(f"--images {given.images} holds other images than the run being resumed ({saved.images}): a "
                       f"resumed run trains on its own. Start a new run (--from its learned_embeds.safetensors) "
                       f"for new images.")
    saved.images, given.images = os.path.abspath(given.images), None


def images_digest(folder):
    """What names a concept's images wherever their folder is: their file names and sizes."""
    try:
        listed = [f"{os.path.basename(p)}:{os.path.getsize(p)}" for p in find_images(folder)]
    except ImageError:
        return None
    return hashlib.sha1("\n".join(listed).encode()).hexdigest()[:16]


def checkpoint(run, concept):
    """The resumable state at run.step (train.py's Run): the word, AdamW, every generator, the timestep sampler,
    the loss scale, --stop auto's history, the settings, the log, and what names the images (images_digest)."""
    word, spacetime = run.word, run.kind != "ti"
    return {"format": "minti-textual-inversion-state", "step": run.step,
            "vectors": None if spacetime else word.vectors.detach().cpu(),
            "spacetime": vars(concept) if spacetime else None,  # P+ / NeTI: the word as its file holds it
            "word_generator": word.generator.get_state() if run.kind == "neti" else None,
            "optimizer": run.optimizer.state_dict(), "generator": run.generator.get_state(),
            "torch_rng": torch.get_rng_state(), "sampler": run.timestep_sampler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "stop": run.stop.state_dict() if run.stop is not None else None,
            "config": asdict(run.cfg), "log": run.rows, "images": images_digest(run.cfg.images)}


def save_state(path, state):
    """Write the checkpoint atomically; torch's "file write failed" becomes an OSError naming the file."""
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except RuntimeError as e:
        raise OSError(f"{path}: {str(e).strip().splitlines()[-1]}") from e


def restore(run, state):
    """A resumed run's AdamW, generator, torch's RNG, timestep sampler, loss scale, log and --stop auto history."""
    run.optimizer.load_state_dict(state["optimizer"])
    run.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    run.timestep_sampler.load_state_dict(state["sampler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.rows, run.step = [list(r) for r in state["log"]], state["step"]
    if run.stop is not None:
        run.stop.load_state_dict(state["stop"])


def write_failed(out, error):
    """A save that failed (a full disk, a folder removed): the path, and how to go on. Atomic writes leave the
    last checkpoint intact."""
    where = f"{error.filename}: {error.strerror}" if getattr(error, "filename", None) else str(error)
    checkpoint = os.path.join(out, "checkpoint", "state.pt")
    then = (f"its last checkpoint {checkpoint} is intact: free some space (or mend the folder), then continue with"
            f"\n    python train.py --resume {out}" if os.path.isfile(checkpoint) else
            "free some space (or mend the folder), then run the same command again")
    return RunFailure(f"writing the run in {out} failed ({cli.shorten(where, 200)}); {then}")


class RunFailure(OSError):
    """A run that cannot go on; its message is whole (cli.error_message prints it as it is)."""


# ----------------------------------------------------------------------------------------------
# Divergence: a NaN loss (textual_inversion.NonFiniteLoss), or vectors far beyond the vocabulary's

class Diverged(ti.NonFiniteLoss, ValueError):
    """The word's vectors ran far past the vocabulary's norm (what --lr 1e6 does): stopped as a NaN loss is."""


class NormWatch:
    """Stops a diverging run: the vectors' mean norm beyond NORM_LIMIT x a typical word's, or not finite. Read a
    step late, from a copy the device makes without the host waiting (complete once the next step has read its
    loss), so the loop keeps its one wait per step; check() reads a norm now (at a save)."""

    def __init__(self, typical):
        self.typical, self.pending = typical, None

    def __call__(self, step, norm):
        if self.pending is not None:
            self.check(*self.pending)
        if norm.device.type in ("cpu", "cuda"):  # (elsewhere, e.g. mps, a copy would wait: read at saves only)
            self.pending = (step, norm.to("cpu", non_blocking=True))

    def check(self, step, norm):
        norm = float(norm)
        if not norm <= NORM_LIMIT * self.typical:
            error = Diverged(f"the vectors' norm is {norm:.3g}, {norm / self.typical:.3g} x a typical word's "
                             f"({self.typical:.3g})")
            error.step, error.good_step = step, None
            raise error


def diverged_message(out, error, lr, good=()):
    """What train.py says when a run diverged: the last good vectors (good: the files of the vectors the loop put
    back after a NaN; for a norm gone too far, the last snapshot), the last checkpoint, and what to do."""
    snapshots = sorted(glob.glob(os.path.join(out, "snapshots", "step-*")))
    if good:
        which = f"after step {error.good_step}" if error.good_step else "at the start"
        good = f"the vectors {which} (the last to give a finite loss): {', '.join(good)}"
    elif isinstance(error, Diverged):
        good = f"{snapshots[-1]} (the last snapshot)" if snapshots else "none (no snapshot was saved before it)"
    else:
        good = "none (the very first step failed: does the model itself produce NaN?)"
    path, checkpoint = os.path.join(out, "checkpoint", "state.pt"), "none"
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)["step"]
        checkpoint = f"{path} (step {saved}; --resume {out})"
    return (f"error: training diverged at step {error.step}: {error}, with lr {lr:g}. The run is stopped.\n"
            f"  last good snapshot: {good}\n  last checkpoint: {checkpoint}\n"
            f"  What to do: lower --lr (e.g. {lr / 10:g}) in a new run (--from a good snapshot's file keeps its "
            f"progress), or use --precision fp32/bf16 if it was fp16.")


# ----------------------------------------------------------------------------------------------
# What a run writes: its folder, the word's files, the log and its plot

def choose_out(cfg):
    """--out; by default runs/<name>, or runs/<name>-2, ... when that is taken."""
    if cfg.out:
        return cfg.out
    out, k = os.path.join("runs", file_name(cfg.token)), 1
    while os.path.exists(out) and os.listdir(out):
        k += 1
        out = os.path.join("runs", f"{file_name(cfg.token)}-{k}")
    return out


@contextlib.contextmanager
def locked(out, writes=True):
    """The run folder as this process's alone while it writes it (writes=False: a torchrun rank that writes
    nothing). OUT/.lock holds "pid N on HOST" and is locked exclusively (fcntl.flock); the system lets the lock
    go when its process ends, kill -9 included, so a lock file left behind is stale and simply taken over."""
    if not writes or fcntl is None:
        yield
        return
    created, path = not os.path.isdir(out), os.path.join(out, LOCK_FILE)
    os.makedirs(out, exist_ok=True)
    lock = take_lock(path, out)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        lock.close()
        if created:  # a run that failed before writing anything leaves no empty folder
            with contextlib.suppress(OSError):
                os.rmdir(out)


def writer_of(folder):
    """The "pid N on HOST" of the process that writes the run folder now (it holds the lock), or None."""
    path = os.path.join(folder, LOCK_FILE)
    if fcntl is None or not os.path.isfile(path):
        return None
    with open(path) as lock:  # (flock needs no write access)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return lock.read().strip() or "another process"
    return None  # (closing the file let the lock go)


def busy(out, holder):
    return RunError(f"{out} is being written by another train.py ({cli.shorten(holder)}; its lock is "
                    f"{os.path.join(out, LOCK_FILE)}): two writers would overwrite each other's files. Wait for it "
                    f"to end (or stop it), or choose another --out.")


def take_lock(path, out):
    """The open, locked lock file; a RunError naming the process that holds it."""
    for _ in range(3):
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise busy(out, holder) from None
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):
                break  # (else the writer before removed the file as this one opened it: lock the new one)
        lock.close()
    else:
        raise RunError(f"{path}: the run folder's lock kept changing hands; run again.")
    lock.seek(0)
    stale = lock.read().strip()
    if stale:
        cli.say(f"note: {path} was left by {cli.shorten(stale)}, which is not running any more (killed?): taken over.")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def remove_unfinished_writes(out):
    """The temporary files of atomic_write that a kill -9 left in the run's folder (.name.1a2b3c4d.tmp):
    the files they were to replace are intact, and this run is the folder's only writer."""
    for folder, _, names in os.walk(out):
        for name in names:
            if re.fullmatch(r"\..+\.[0-9a-f]{8}\.tmp", name):
                os.remove(os.path.join(folder, name))


def file_name(token):
    """A file-system-safe name for the word: '<my-cat>' -> 'my-cat' (AUTOMATIC1111 calls it by it)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", token.strip("<>")).strip("-.") or "concept"


def save_concept_files(folder, concept, name):
    """The word's files: diffusers + AUTOMATIC1111 (multires: minti's file + a few resolutions of it as
    ordinary words; P+ / NeTI: minti's space-time file, and for P+ its layer average as a diffusers word)."""
    if isinstance(concept, SpaceTimeConcept):
        paths = [os.path.join(folder, f"{name}-{concept.kind}.safetensors")]
        save_spacetime(paths[0], concept)
        if concept.kind == "per-layer":
            paths.append(os.path.join(folder, "learned_embeds-layer-avg.safetensors"))
            save_diffusers(paths[-1], export_layer_average(concept))
        return paths
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


def usable_file(concept, name):
    """The file of the word to give sample.py --embeds, and the word's name in it."""
    if isinstance(concept, SpaceTimeConcept):
        return f"{name}-{concept.kind}.safetensors", concept.token
    if not concept.is_multires:
        return "learned_embeds.safetensors", concept.token
    t = MULTIRES_EXPORTS[1]
    return f"learned_embeds-r{t:g}.safetensors", derived_token(concept.token, f"r{t:g}")


def read_log(rows):
    """The log's values still on the device (the vectors' norms), read in one go: numbers from here on."""
    waiting = [(r, i) for r in rows for i, v in enumerate(r) if isinstance(v, torch.Tensor)]
    if waiting:
        for (r, i), value in zip(waiting, torch.stack([r[i] for r, i in waiting]).tolist()):
            r[i] = value


def write_log(out, columns, rows, title):
    """log.csv and loss.png in `out`; returns their paths."""
    read_log(rows)
    csv, png = os.path.join(out, "log.csv"), os.path.join(out, "loss.png")
    write_csv(csv, columns, rows)
    plot_loss(png, columns, rows, title)
    return csv, png


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
    if "fixed_batch_loss" in col:  # --stop auto's signal: smooth, since its batch never changes
        fixed = [(s, v) for s, v in zip(col["step"], col["fixed_batch_loss"]) if v != ""]
        ax.plot(*zip(*fixed), lw=1.5, label="the fixed batch's loss (--stop auto)")
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

