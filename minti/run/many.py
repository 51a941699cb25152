"""Learn many concepts: one train.py process per concept folder, then one summary table.

    python -m minti.run.many CONCEPTS/ --out runs/many -- --model path/to/sd15 --steps 3000 --batch 4
    python -m minti.run.many weights/toy/concepts --out runs/toy-many            # every toy concept
    python -m minti.run.many CONCEPTS/ --out runs/many --jobs 4 --gpus 0,1,2,3 -- ...   # 4 at once, a GPU each
    python -m minti.run.many CONCEPTS/ --out runs/many --only $SLURM_ARRAY_TASK_ID -- ...  # a job array's task
    python -m minti.run.many CONCEPTS/ --out runs/many --summary                  # the table of finished runs

CONCEPTS/ holds one folder of images per concept; concept `name` becomes the word `<name>` (its folder
may hold an `init.txt` with the descriptor word(s), else --init after `--` applies to all) and its run
goes to OUT/name. The flags after `--` are train.py's, for every concept. A concept whose run is
already finished is skipped; one that stopped part-way is resumed. The table (printed, and OUT/summary.csv)
has each concept's status, steps, final loss and files, and on the toy model the oracle's
reconstruction and editability from the run's concept_eval.json.
"""
import argparse
import csv
import json
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

TRAIN = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "train.py"))
COLUMNS = ["concept", "status", "steps", "final_loss", "reconstruction", "editability", "files"]


def concept_folders(root):
    """{name: folder} for every sub-folder of root that holds images."""
    from ..data import IMAGE_EXTENSIONS

    if not os.path.isdir(root):
        raise SystemExit(f"error: {root} is not a folder (give a folder of concept folders).")
    found = {}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if os.path.isdir(folder) and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(folder)):
            found[name] = folder
    if not found:
        raise SystemExit(f"error: {root} holds no folder of images; put each concept's images in "
                         f"{root}/<name>/.")
    return found


def command(name, folder, out, train_args):
    """train.py's command line for one concept: a new run, or the resumption of a stopped one."""
    if os.path.isfile(os.path.join(out, "checkpoint", "state.pt")):
        steps = [a for i, a in enumerate(train_args) if i and train_args[i - 1] == "--steps"]
        return [sys.executable, TRAIN, "--resume", out, *(["--steps", steps[-1]] if steps else [])]
    init = os.path.join(folder, "init.txt")
    extra = ["--init", open(init).read().strip()] if os.path.isfile(init) else []
    return [sys.executable, TRAIN, "--images", folder, "--token", f"<{name}>", "--out", out, *train_args,
            *extra]


def status(out):
    try:
        with open(os.path.join(out, "config.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def learn_one(name, folder, args, gpu=None):
    """Run train.py for one concept, its output in OUT/name/train.log; returns its exit code."""
    out = os.path.join(args.out, name)
    if status(out).get("status") == "finished":
        print(f"{name}: already finished ({out})", flush=True)
        return 0
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
    print(f"{name}: learning{f' on GPU {gpu}' if gpu is not None else ''} -> {out}", flush=True)
    with open(os.path.join(out, "train.log"), "a") as log:
        code = subprocess.run(command(name, folder, out, args.train_args), stdout=log,
                              stderr=subprocess.STDOUT, env=env).returncode
    print(f"{name}: {'done' if code == 0 else f'FAILED (exit {code}), see {out}/train.log'}", flush=True)
    return code


def summary_row(name, out):
    """One concept's line of the table, from the files its run wrote."""
    config, row = status(out), dict.fromkeys(COLUMNS, "")
    row.update(concept=name, status=config.get("status", "not run"), steps=config.get("step", ""))
    try:
        with open(os.path.join(out, "log.csv")) as f:
            rows = list(csv.DictReader(f))
        row["final_loss"] = f"{float(rows[-1]['loss']):.4f}" if rows else ""
    except FileNotFoundError:
        pass
    try:  # the toy model's oracle (train.py's closing evaluation): the learned word's column
        with open(os.path.join(out, "concept_eval.json")) as f:
            shares = json.load(f)["shares"]["concept"]
        row["reconstruction"] = f"{shares['reconstruction']['share']:.2f}"
        row["editability"] = f"{shares['editability']['share']:.2f}"
    except (FileNotFoundError, KeyError):
        pass
    files = [os.path.relpath(os.path.abspath(f), os.path.abspath(out)) for f in config.get("files", [])]
    row["files"] = " ".join(f for f in files if f.endswith((".safetensors", ".pt")) and os.sep not in f)
    return row


def write_summary(names, out_root):
    rows = [summary_row(name, os.path.join(out_root, name)) for name in names]
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
    print("\n".join(lines) + f"\n(written to {os.path.join(out_root, 'summary.csv')})")
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
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
    concepts = concept_folders(args.concepts)
    names = list(concepts)
    if args.summary:
        write_summary(names, args.out)
        return 0
    if args.only is not None:
        if not 0 <= args.only < len(names):
            raise SystemExit(f"error: --only {args.only}: there are {len(names)} concepts "
                             f"(0..{len(names) - 1}).")
        return learn_one(names[args.only], concepts[names[args.only]], args)
    gpus = args.gpus.split(",") if args.gpus else [None]
    free = queue.Queue()  # a slot per job, the GPUs in turn: a concept takes one, and gives it back
    for i in range(max(1, args.jobs)):
        free.put(gpus[i % len(gpus)])

    def one(name):
        gpu = free.get()
        try:
            return learn_one(name, concepts[name], args, gpu)
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads only wait: each concept is its own process
        codes = list(pool.map(one, names))
    write_summary(names, args.out)
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
