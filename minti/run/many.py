"""Learn many concepts: one train.py process per concept folder, then one summary table.

    python -m minti.run.many CONCEPTS/ --out runs/many -- --model path/to/sd15 --steps 3000 --batch 4
    python -m minti.run.many weights/toy/concepts --out runs/toy-many            # every toy concept
    python -m minti.run.many CONCEPTS/ --out runs/many --jobs 4 --gpus 0,1,2,3 -- ...   # 4 at once, a GPU each
    python -m minti.run.many CONCEPTS/ --out runs/many --only $SLURM_ARRAY_TASK_ID -- ...  # a job array's task
    python -m minti.run.many CONCEPTS/ --out runs/many --summary                  # the table of finished runs

CONCEPTS/ holds one folder of images per concept; concept `name` becomes the word `<name>` (its folder
may hold an `init.txt` with the descriptor word(s), else --init after `--` applies to all) and its run
goes to OUT/name. The flags after `--` are train.py's, for every concept. A concept whose run is
already finished is skipped; one that stopped part-way is resumed with the same flags (train.py refuses
a changed setting that a resumed run keeps). Every folder name, init.txt and flag is checked before the
first run starts. Ctrl-C or SIGTERM is passed on to the running train.py processes, which save their
checkpoints; many waits for them. The table (printed, and OUT/summary.csv) has each concept's status,
steps, final loss and files, and on the toy model the oracle's reconstruction and editability from the
run's concept_eval.json.
"""
import argparse
import csv
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from . import cli
from .cli import UsageError
from .runs import run_config, token_problem
from ..data import IMAGE_EXTENSIONS
from ..io.files import write_csv

TRAIN = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "train.py"))
COLUMNS = ["concept", "status", "steps", "final_loss", "reconstruction", "editability", "files"]
SET_BY_MANY = ("--images", "--token", "--out", "--resume")  # train.py's flags that many gives each concept


def concept_folders(root):
    """{name: folder} for every sub-folder of root that holds images; a folder whose name cannot be a word's
    (`<name>`: no spaces, slashes, ...) is refused now, not after its run has trained."""
    if not os.path.isdir(root):
        raise UsageError(f"{root} is not a folder (give a folder of concept folders).")
    found = {}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        if any(f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("._") for f in os.listdir(folder)):
            found[name] = folder
    if not found:
        raise UsageError(f"{root} holds no folder of images; put each concept's images in {root}/<name>/.")
    bad = [f"{name!r} ({problem})" for name in found if (problem := token_problem(f"<{name}>"))]
    if bad:
        raise UsageError(f"the word of a concept is its folder's name, <name>, which goes into prompts and file "
                         f"names: rename {cli.listing(bad)} in {root} (e.g. 'my cat' -> 'my-cat').")
    return found


def read_init(folder):
    """The init word(s) of a concept folder's init.txt (UTF-8, with or without a byte-order mark), or None."""
    path = os.path.join(folder, "init.txt")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8-sig") as f:
            words = " ".join(f.read().split())
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it again as UTF-8.") from None
    if not words:
        raise UsageError(f"{path} is empty; write the concept's init word(s) in it (e.g. 'cat'), or remove it.")
    return words


def check_train_args(train_args):
    """The flags for train.py: none of those many sets for each concept."""
    given = [a.split("=")[0] for a in train_args if a.split("=")[0] in SET_BY_MANY]
    if given:
        raise UsageError(f"{', '.join(given)} after '--': many gives each concept its own --images, --token "
                         f"(<folder name>) and --out (OUT/<folder name>), and resumes a stopped run itself; drop "
                         f"{'them' if len(given) > 1 else 'it'}.")


def command(name, folder, out, train_args, init=None):
    """train.py's command line for one concept: a new run, or the resumption of a stopped one with the same
    flags (train.py refuses one that changed a setting the run keeps, and takes --steps and the others)."""
    extra = ["--init", init] if init is not None else []  # after train_args: init.txt wins over --init
    if os.path.isfile(os.path.join(out, "checkpoint", "state.pt")):
        return [sys.executable, TRAIN, "--resume", out, *train_args, *extra]
    return [sys.executable, TRAIN, "--images", folder, "--token", f"<{name}>", "--out", out, *train_args, *extra]


class Children(cli.Signals):
    """The train.py processes running now. A stop (Ctrl-C, SIGTERM, SIGHUP) is passed on to each, which saves
    its checkpoint and exits; no new one starts after it, and main waits for those running. (As cli.Signals,
    a `with` block installs `handle` for the stop signals and puts the old handlers back at its end.)"""

    def __init__(self):
        super().__init__()
        self.running, self.signum, self.lock = set(), None, threading.RLock()

    def handle(self, signum, frame=None):
        with self.lock:
            first, self.signum = self.signum is None, self.signum or signum
            running = list(self.running)
        for process in running:
            process.send_signal(signum)
        if first:
            cli.say(f"\n{signal.Signals(signum).name}: passed on to {len(running)} train.py process(es); waiting "
                    f"for them to save their checkpoints (rerun the same command to continue)...")

    def run(self, argv, **options):
        """Run argv to its end; its exit code, or None when a stop came before it started."""
        with self.lock:
            if self.signum is not None:
                return None
            process = subprocess.Popen(argv, start_new_session=True, **options)  # only the stop passed on
            self.running.add(process)
        try:
            return process.wait()
        finally:
            with self.lock:
                self.running.discard(process)


def learn_one(name, folder, args, gpu=None, children=None):
    """Run train.py for one concept, its output in OUT/name/train.log; returns its exit code (None: stopped
    before it started)."""
    out = os.path.join(args.out, name)
    if run_config(out).get("status") == "finished":
        print(f"{name}: already finished ({out})", flush=True)
        return 0
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
    print(f"{name}: learning{f' on GPU {gpu}' if gpu is not None else ''} -> {out}", flush=True)
    argv = command(name, folder, out, args.train_args, args.inits.get(name))
    with open(os.path.join(out, "train.log"), "a") as log:
        code = (children or Children()).run(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code is not None:
        print(f"{name}: {'done' if code == 0 else f'FAILED (exit {code}), see {out}/train.log'}", flush=True)
    return code


def summary_row(name, out, code=None):
    """One concept's line of the table, from the files its run wrote (code: its train.py's exit code)."""
    config, row = run_config(out), dict.fromkeys(COLUMNS, "")
    row.update(concept=name, status=config.get("status", "not run"), steps=config.get("step", ""))
    if code and row["status"] in ("running", "not run"):  # it ended without saying why: its train.log does
        row["status"] = "failed"
    try:
        with open(os.path.join(out, "log.csv")) as f:
            rows = list(csv.DictReader(f))
        row["final_loss"] = f"{float(rows[-1]['loss']):.4f}" if rows else ""
    except (OSError, ValueError, KeyError):
        pass
    try:  # the toy model's oracle (train.py's closing evaluation): the learned word's column
        with open(os.path.join(out, "concept_eval.json")) as f:
            shares = json.load(f)["shares"]["concept"]
        row["reconstruction"] = f"{shares['reconstruction']['share']:.2f}"
        row["editability"] = f"{shares['editability']['share']:.2f}"
    except (OSError, ValueError, KeyError):
        pass
    files = [os.path.relpath(os.path.abspath(f), os.path.abspath(out)) for f in config.get("files", [])]
    row["files"] = " ".join(f for f in files if f.endswith((".safetensors", ".pt")) and os.sep not in f)
    return row


def write_summary(names, out_root, codes=None):
    rows = [summary_row(name, os.path.join(out_root, name), (codes or {}).get(name)) for name in names]
    path = os.path.join(out_root, "summary.csv")
    write_csv(path, COLUMNS, [[r[c] for c in COLUMNS] for r in rows])  # no value holds a comma (folder names)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
    print("\n".join(lines) + f"\n(written to {path})")
    return rows


def parse_args(argv):
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m minti.run.many", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("concepts", help="a folder with one folder of images per concept")
    p.add_argument("--out", default=os.path.join("runs", "many"),
                   help="runs go to OUT/<name> (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=1, help="concepts learned at once (default: %(default)s)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids, given to the jobs in turn "
                                                "(CUDA_VISIBLE_DEVICES); default: as inherited")
    p.add_argument("--only", type=int, default=None, metavar="I",
                   help="learn only the I-th concept (0-based, sorted by name): one task of a job array, "
                        "no table (--summary makes it when all are done)")
    p.add_argument("--summary", action="store_true", help="only print the table of the runs in OUT")
    args = p.parse_args(argv)
    args.train_args = train_args
    return args


def check_args(args, names):
    """Everything a run could fail on later, refused before the first one starts."""
    cli.check_at_least("--jobs", args.jobs)
    gpus = [g.strip() for g in args.gpus.split(",")] if args.gpus is not None else [None]
    if any(g == "" for g in gpus):
        raise UsageError(f"--gpus {args.gpus!r}: an empty GPU id would give a job no GPU (it would train on the "
                         f"CPU); give ids like 0,1,2.")
    if args.only is not None and not 0 <= args.only < len(names):
        raise UsageError(f"--only {args.only}: there are {len(names)} concepts (0..{len(names) - 1}).")
    check_train_args(args.train_args)
    cli.check_writable_folder(args.out, "--out")
    return gpus


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    concepts = concept_folders(args.concepts)
    names = list(concepts)
    if args.summary:
        write_summary(names, args.out)
        return 0
    gpus = check_args(args, names)
    args.inits = {name: read_init(folder) for name, folder in concepts.items()}
    if args.only is not None:
        names = [names[args.only]]
    free = queue.Queue()  # a slot per job, the GPUs in turn: a concept takes one, and gives it back
    for i in range(args.jobs):
        free.put(gpus[i % len(gpus)])

    def one(name):
        gpu = free.get()
        try:
            return learn_one(name, concepts[name], args, gpu, children)
        finally:
            free.put(gpu)

    # threads only wait: each concept is its own process; a stop is passed on to them (Children)
    with Children() as children, ThreadPoolExecutor(args.jobs) as pool:
        codes = dict(zip(names, pool.map(one, names)))
    if args.only is None:
        write_summary(names, args.out, codes)
    if children.signum is not None:
        return 128 + int(children.signum)
    return 0 if not any(codes.values()) else 1


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
