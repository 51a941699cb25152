"""The scripts' top level: exit codes, one-line errors instead of tracebacks, signals, and the checks made
before anything slow loads (a boundary file: its messages speak of the user's flags).

train.py, sample.py and the library's `python -m` entry points run their main through `run_main`: a
user's mistake (UsageError, argparse's own errors) exits 2, a failure (a damaged file, a full disk, ...)
exits 1, each with one "error: ..." message that says what to do, and no traceback unless MINTI_DEBUG=1.
`Signals` turns SIGTERM and SIGHUP into what Ctrl-C is (a KeyboardInterrupt), so that `timeout`, `docker
stop`, Slurm's preemption and a closed terminal stop a run the way Ctrl-C does; the exit code is 128 plus
the signal's number (130, 143, 129), and a second signal while the first is being handled is ignored.
The checks (numbers, devices, paths, concept files, prompts) refuse a flag once, here, before the model
loads; the library keeps its own guards where its inputs arrive. Nothing here is part of the method.
"""
import contextlib
import math
import os
import re
import signal
import sys
import tempfile
import threading

from ..io.concepts import Concept, load_concepts
from ..io.prompt_syntax import PromptError, names_in_prompts, parse_prompt, prompt_name, refuse_bare_multires_words

EXIT_FAILURE, EXIT_USAGE = 1, 2
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
                     if s is not None)


class UsageError(ValueError):
    """A bad argument or flag: the message says which and what to give instead (exit code 2)."""


class Stop(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP, raised where the program was: `exit_code` is 128 + the signal number."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + int(signum)


def debug() -> bool:
    """MINTI_DEBUG=1: let exceptions through with their tracebacks."""
    return os.environ.get("MINTI_DEBUG", "") not in ("", "0")


def shorten(text: str, limit: int = 80) -> str:
    """A user's input as a message quotes it: whole up to `limit` characters, else its start and its length
    (a 1 MB caption must not fill the terminal)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text):,} characters)"


def listing(names, most: int = 5) -> str:
    """'a, b, c' for a few names, 'a, b, c, d, e and 995 more' for many."""
    names = [shorten(n, 60) for n in names]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def say(message: str) -> None:
    """Print to stderr; a closed terminal (SIGHUP) or pipe must not turn a clean exit into a traceback."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def run_main(main, argv=None) -> int:
    """Run main(argv) and return its exit code; every exception becomes a message and a code (see above)."""
    try:
        code = main(argv)
        return 0 if code is None or not isinstance(code, int) else code
    except SystemExit as e:  # argparse (exit 2) and sys.exit("error: ...") (exit 1) have said it already
        if isinstance(e.code, str):
            say(e.code)
            return EXIT_FAILURE
        return e.code or 0
    except KeyboardInterrupt as e:
        if debug():
            raise
        say(f"\nStopped ({e.args[0] if e.args else 'SIGINT'}).")
        return getattr(e, "exit_code", 128 + signal.SIGINT)
    except Exception as e:  # noqa: BLE001 (the one place that turns every error into a message)
        if debug():
            raise
        say(error_message(e))
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILURE


def error_message(e: BaseException) -> str:
    """'error: ...' for an exception: its own message for the errors a user can meet (ValueError and its
    kin: bad files, settings, prompts; OSError: paths, permissions, a full disk), else its type as well
    and where to look."""
    if isinstance(e, OSError) and e.filename is not None:
        what = e.strerror or type(e).__name__
        return f"error: {e.filename}: {what}. Check the path and its permissions (and the free disk space)."
    if isinstance(e, (ValueError, OSError)):
        return f"error: {e}"
    if "out of memory" in str(e).lower():  # torch.OutOfMemoryError, and MPS's RuntimeError
        first = str(e).strip().splitlines()[0]
        return (f"error: out of memory ({first}). train.py: try --batch 1 --grad-accum 4 --precision fp16 (bf16 "
                f"on CPUs) --checkpointing; sample.py: fewer --n, a smaller --width/--height, --precision fp16.")
    return (f"error: {type(e).__name__}: {e}\n(an unexpected error: run again with MINTI_DEBUG=1 to see where "
            "it happened, and report it)")


# ----------------------------------------------------------------------------------------------
# Signals

class Signals:
    """SIGINT, SIGTERM and SIGHUP raise Stop (a KeyboardInterrupt) where the program is, once: a signal after
    the first is ignored, for the program is already stopping and the save under way must finish.

    Inside `waiting()` (train.py's loop) the signal is only noted, and `raise_pending()` raises it at a step's
    end, where the state is whole: a step stopped halfway could have moved the vectors, or AdamW, already.
    `install()` (or a `with` block, which puts the old handlers back) works in the main thread only.
    """

    def __init__(self):
        self.caught, self.pending, self.wait, self.previous = None, None, False, {}

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    __enter__ = install

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.caught is not None:
            os.write(2, f"\n({signal.Signals(signum).name} again: already stopping, saving first)\n".encode())
            return
        self.caught = signum
        if not self.wait:
            raise Stop(signum)
        self.pending = signum

    @contextlib.contextmanager
    def waiting(self):
        """A signal within waits for raise_pending(); one still waiting at the end is raised there."""
        self.wait = True
        try:
            yield
        finally:
            self.wait = False
        self.raise_pending()

    def raise_pending(self, anywhere=bool):
        """Raise the signal that waited, if any. anywhere(flag): torchrun's all_stop, so that every rank
        stops after the same step (one that caught nothing stops as after Ctrl-C)."""
        if anywhere(self.pending is not None):
            signum, self.pending = self.pending or signal.SIGINT, None
            self.caught = self.caught or signum
            raise Stop(signum)


# ----------------------------------------------------------------------------------------------
# Checks made before anything slow (both scripts): numbers, paths, devices

def check_at_least(flag: str, value, least: int = 1, meaning: str = "") -> None:
    if value < least:
        why = f" (0: {meaning})" if meaning else ""
        raise UsageError(f"{flag} must be {'at least 1' if least == 1 else '0 or more'}{why}, got {value}.")


def check_seed(seed: int) -> None:
    if not -2 ** 63 <= seed < 2 ** 64:
        raise UsageError(f"--seed must lie in [-2^63, 2^64) (torch's seeds), got {seed}.")


def check_side(flag: str, value, what: str = "in pixels") -> None:
    """An image side (--resolution, --width, --height): None (the model's own) or a positive multiple of 8."""
    if value is not None and (value < 8 or value % 8):
        raise UsageError(f"{flag} is {what}, a positive multiple of 8 (the VAE's factor), got {value}; e.g. "
                         f"{max(8, round(value / 8) * 8)}, or leave it out for the model's own size.")


def check_model(path: str) -> None:
    if path != "toy" and not os.path.exists(path):
        raise UsageError(f"--model {path}: no such file or folder. Give 'toy', a diffusers folder, or one SD 1.x "
                         f".safetensors/.ckpt file.")


def check_device(name: str, flag: str = "--device") -> None:
    """Refuse a device torch does not know, or one this machine does not have, before anything is loaded."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name!r} is not a device: give cpu, cuda, cuda:1, mps or auto.") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {name}: minti runs on cpu, cuda (NVIDIA) or mps (Apple); give one of those, "
                         f"or auto.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: torch sees no CUDA GPU here; use --device cpu (or auto).")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: there are only {torch.cuda.device_count()} CUDA devices.")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"{flag} {name}: torch sees no Apple GPU (mps) here; use --device cpu (or auto).")


def check_writable_folder(path, flag: str) -> None:
    """Refuse, before any slow work, an output folder that cannot be written: a file, a folder under a
    file, or a folder (or its nearest existing parent) where no file can be created."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        raise UsageError(f"{flag} {path} is a file, not a folder: give a folder (it is created if needed).")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {path}: {existing} is a file, so no folder can be made under it; give "
                         f"another folder.")
    try:  # os.access says yes to root on a read-only folder; creating a file is the real test
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e}); give a folder you may "
                         f"write to.") from None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")  # what sample.py does not write


def check_sample_args(args) -> None:
    """sample.py's flags that would fail later or silently mean something else, refused before the model loads
    (the library's own guards, e.g. sampling.latent_size's, stay where the values arrive)."""
    if not math.isfinite(args.guidance):
        raise UsageError(f"--guidance (--cfg) must be a finite number, got {args.guidance}; e.g. 7.5 (1: none).")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        raise UsageError(f"--eta must be a number >= 0 (0: deterministic DDIM, 1: DDPM-like), got {args.eta}.")
    check_at_least("--steps", args.steps)
    check_at_least("--n", args.n)
    if args.steps > 999:
        raise UsageError(f"--steps {args.steps}: SD 1.x has 1000 timesteps, so at most 999 steps; 25-50 are usual.")
    check_device(args.device)
    check_side("--width", args.width)
    check_side("--height", args.height)
    check_seed(args.seed)
    suffix = os.path.splitext(args.out)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        raise UsageError(f"--out {args.out}: sample.py writes PNG files; give a .png path (one grid) or a "
                         f"folder (a PNG per image).")
    if suffix == ".png" and os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a folder; give a .png path that is not one, or the folder "
                         f"without .png to write a PNG per image.")
    if suffix == ".png":
        check_writable_folder(os.path.dirname(os.path.abspath(args.out)), f"--out {args.out}: its folder")
    else:
        check_writable_folder(args.out, "--out")
    check_model(args.model)


NAME = re.compile(r"[^\s/\\:]+")  # a word's name after FILE:NAME: no spaces, slashes or colons


def split_file_and_name(spec: str) -> tuple[str, str | None]:
    """'FILE' or 'FILE:NAME' -> (FILE, NAME or None). The last colon splits only when the whole string is
    not an existing path and what follows it is a valid name (so 'C:\\words\\cat.pt' stays a path)."""
    spec = os.fspath(spec)
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, _, name = spec.rpartition(":")
    if not path or not NAME.fullmatch(name) or re.fullmatch(r"[A-Za-z]", path):  # 'C:name': a drive
        return spec, None
    return path, name


def read_concepts(spec: str, flag: str, note: bool = True) -> list:
    """The words of a concept file given on the command line as FILE or FILE:NAME (NAME renames a one-word
    file). A word of the paper's format is called by its placeholder, usually '*', already a word of the
    vocabulary: as AUTOMATIC1111 does, the scripts call it by its file's name instead."""
    path, name = split_file_and_name(spec)
    if not os.path.isfile(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {spec}: no such file (a concept file, optionally FILE:NAME to name its word).")
    concepts = load_concepts(path, token=name)
    if name is None and len(concepts) == 1 and concepts[0].meta.get("format") == "textual_inversion_paper":
        c = concepts[0]
        stem = re.sub(r"[^\w.-]+", "-", os.path.splitext(os.path.basename(path))[0]).strip("-.") or "concept"
        if note:
            say(f"note: {path} is in the paper's format, whose word {c.token!r} is a placeholder; it is called "
                f"{stem!r} after its file (write {flag} {path}:NAME to call it NAME).")
        concepts = [Concept(stem, c.vectors, step=c.step, meta={**c.meta, "placeholder": c.token})]
    for c in concepts:
        c.meta["given_as"] = spec  # for the messages that name the file
    return concepts


def read_embeds(specs) -> list:
    """sample.py's --embeds FILE[:NAME] ...: their concepts (read_concepts); two words of one name are refused
    with the command line's way out."""
    concepts, seen = [], {}
    for spec in specs:
        for c in read_concepts(spec, "--embeds"):
            name = prompt_name(c.token).lower()
            if name in seen:
                raise UsageError(f"--embeds: {spec} and {seen[name]} both hold a word called {c.token!r}; name "
                                 f"one of them with FILE:NAME, e.g. --embeds {spec}:other-name.")
            seen[name] = spec
            concepts.append(c)
    return concepts


def check_prompts(prompts, concepts) -> None:
    """sample.py's prompts that cannot be read fail before the model is loaded (io/prompt_syntax.py), and so the
    time syntax on an ordinary word, which has one set of vectors: <cat|0.5|> or <cat[0.5]> would change
    nothing (<cat(0.5)>, silent below 0.5, does)."""
    named = names_in_prompts(concepts)
    for prompt in prompts:
        try:
            pieces = parse_prompt(prompt, named)
            refuse_bare_multires_words(prompt, pieces, named.values())
            for word in pieces[1::2]:
                timed = word.end - word.start > len(word.name) + 2  # not a bare <name>
                if timed and word.mode != "semi" and not named[word.name.lower()].is_multires:
                    raise PromptError(prompt, word.start, word.end, f"<{word.name}> is an ordinary word (one "
                                      f"set of vectors, not a multiresolution one): a resolution changes nothing",
                                      f"Write <{word.name}>, or <{word.name}(t)> to silence it below t.")
        except PromptError as e:
            raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# sample.py: space-time words in prompts, words that shadow the vocabulary, black images

def check_spacetime_prompts(prompts, concept=None, truncation=None) -> None:
    """sample.py's prompts with a P+ / NeTI word (`concept`, a SpaceTimeConcept; None: the words are ordinary),
    read as an ordinary word's are (io/prompt_syntax.py: an unknown, misspelt or unclosed <name> refused, with a
    caret) and nothing dropped silently: <name:K> is a NeTI word's truncation, K a whole number 1..hidden, the
    name as its file spells it; a resolution (<name|t|>, <name(t)>, <name[t]>) is refused, for the word's time
    is the sampler's own. --truncation without a NeTI word would change nothing: refused."""
    kind = getattr(concept, "kind", None)
    if truncation is not None and kind != "neti":
        what = f"{concept.token} is a {kind} word" if concept else \
            "no NeTI word is loaded (--embeds FILE-neti.safetensors)"
        raise UsageError(f"--truncation {truncation} keeps part of a NeTI word's mapper, but {what}: drop it.")
    if concept is None:
        return
    for prompt in prompts:
        try:
            _check_spacetime_prompt(prompt, concept)
        except PromptError as e:
            raise UsageError(str(e)) from None


def _check_spacetime_prompt(prompt, concept) -> None:
    name, hidden = prompt_name(concept.token), int(concept.meta.get("hidden", 0))
    example = f"<{name}:{min(16, hidden)}>" if concept.kind == "neti" else f"<{name}>"
    for m in re.finditer(rf"<\s*{re.escape(name)}\s*:([^>]*)(>?)", prompt, re.IGNORECASE):
        k = m.group(1)
        if concept.kind != "neti":
            raise PromptError(prompt, m.start(), m.end(), f"<{name}:K> sets a NeTI word's truncation, but "
                              f"{concept.token} is a {concept.kind} word", f"Write <{name}>.")
        if m.group(0) != f"<{name}:{k}>" or not k.isdigit() or not 1 <= int(k) <= hidden:
            raise PromptError(prompt, m.start(), m.end(), f"<{name}:K> keeps K of the NeTI word's {hidden} hidden "
                              f"dimensions: K is a whole number from 1 to {hidden}, the name as its file spells it",
                              f"e.g. {example}.")
    # <name:K> checked: read the rest as an ordinary word's prompt (spaces keep the carets in place)
    text = re.sub(rf"<{re.escape(name)}:(\d+)>", lambda m: f"<{name}>" + " " * (len(m.group(1)) + 1), prompt)
    for word in parse_prompt(text, [name])[1::2]:
        if word.end - word.start > len(word.name) + 2:
            raise PromptError(prompt, word.start, word.end, f"<{name}> is a {concept.kind} word: it changes with "
                              f"the sampler's own time, so a resolution here would change nothing",
                              f"Write <{name}>" + (f", or {example} to keep K of its dimensions." if
                                                   concept.kind == "neti" else "."))
        if word.name != name:
            raise PromptError(prompt, word.start, word.end, f"<{word.name}> must be written as its file spells it",
                              f"Write <{name}>.")


def check_new_words(concepts, tokenizer) -> None:
    """sample.py's ordinary learned words (after the model loads): one whose name is already a word of the
    vocabulary (an embeddings file whose word is 'star') would replace that word in every prompt; refused, with
    the command line's way to rename it."""
    from ..textual_inversion import check_new_word

    for c in concepts:
        if c.is_multires:  # never in the tokenizer: written <name|t|>, ... (io/prompt_syntax.py)
            continue
        try:
            check_new_word(tokenizer, c.token)
        except ValueError:
            spec = c.meta.get("given_as", "FILE")
            raise UsageError(f"--embeds {spec}: its word {shorten(repr(c.token))} is already a word of the "
                             f"vocabulary, so every {c.token!r} in a prompt would become the learned word. Name it: "
                             f"--embeds {split_file_and_name(spec)[0]}:<{prompt_name(c.token)}-word>.") from None


def warn_if_not_finite(images, precision, sd, concepts=()) -> None:
    """NaN/Inf pixels are written black: say so on stderr, and what is wrong. fp16 / bf16 weights can overflow
    (most often in the VAE's decoder); fp32 weights do not, so there it is the input: a learned word whose
    vectors lie far beyond the vocabulary's (a diverged run), named with its norm."""
    import torch

    from ..textual_inversion import token_table

    bad = [i for i, image in enumerate(images) if not torch.isfinite(image).all()]
    if not bad:
        return
    typical = token_table(sd.text_encoder).detach().float().norm(dim=-1).median().item()
    norms = {c.token: c.vectors.float().norm(dim=-1).mean().item() for c in concepts
             if getattr(c, "vectors", None) is not None}
    wild = [f"{t} (norm {n:.3g}, {n / typical:.3g} x a typical word's {typical:.3g})" for t, n in norms.items()
            if not n <= 10 * typical]
    head = f"warning: image(s) {bad} of {len(images)} hold NaN/Inf values (written as black pixels): "
    if wild:
        say(head + f"the learned word(s) {', '.join(wild)} lie far beyond the vocabulary: the run that made them "
                   f"diverged. Train it again with a lower --lr (or use an earlier snapshot's file).")
    elif precision in ("fp16", "bf16"):
        say(head + f"the {precision} weights overflowed, most often in the VAE's decoder. Run again with "
                   f"--precision fp32.")
    else:
        say(head + "with fp32 weights this is no overflow of precision: the model file itself, or a learned "
                   "word, produces them. Try without --embeds, then check the model file.")
