"""The scripts' top level: exit codes, one-line errors instead of tracebacks, signals, paths (a boundary file).

train.py, sample.py and the library's `python -m` entry points run their main through `run_main`: a
user's mistake (UsageError, argparse's own errors) exits 2, a failure (a damaged file, a full disk, ...)
exits 1, each with one "error: ..." message that says what to do, and no traceback unless MINTI_DEBUG=1.
`Signals` turns SIGTERM and SIGHUP into what Ctrl-C is (a KeyboardInterrupt), so that `timeout`, `docker
stop`, Slurm's preemption and a closed terminal stop a run the way Ctrl-C does; the exit code is 128 plus
the signal's number (130, 143, 129), and a second signal while the first is being handled is ignored.
Nothing here is part of the method.
"""
import os
import re
import signal
import sys
import tempfile

EXIT_FAILURE, EXIT_USAGE = 1, 2
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
                     if s is not None)


class UsageError(ValueError):
    """A bad argument or flag: the message says which and what to give instead (exit code 2)."""


class Stop(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP, raised where the program was: `exit_code` is 128 + the signal number."""

    def __init__(self, signum=signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.exit_code = int(signum), 128 + int(signum)


def debug() -> bool:
    """MINTI_DEBUG=1: let exceptions through with their tracebacks."""
    return os.environ.get("MINTI_DEBUG", "") not in ("", "0")


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
    """SIGINT, SIGTERM and SIGHUP raise Stop (a KeyboardInterrupt) in the main thread, once.

    While `waits` is True (train.py: inside the training loop), the first signal is only noted, and
    `check()` raises it at a safer place (train.py: at a step's end, after its log and checkpoint). A
    signal after the first is ignored: the program is already stopping, and the save under way must finish.
    """

    def __init__(self):
        self.waits, self.caught, self.pending = False, None, False

    def install(self):
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.caught is not None:
            os.write(2, f"\n({signal.Signals(signum).name} again: already stopping, saving first)\n".encode())
            return
        self.caught = signum
        if self.waits:
            self.pending = True
            return
        raise Stop(signum)

    def check(self):
        """Raise the signal that was deferred, if any."""
        if self.pending:
            self.pending = False
            raise Stop(self.caught)


# ----------------------------------------------------------------------------------------------
# Paths and devices

def check_device(name: str, flag: str = "--device") -> None:
    """Refuse a device torch does not know, or one this machine does not have, before anything is loaded."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {name!r} is not a device: give cpu, cuda, cuda:1, mps or auto.") from None
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
    from ..io.concepts import Concept, load_concepts

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
    return concepts
