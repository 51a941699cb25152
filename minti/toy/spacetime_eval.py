"""Space-time words measured on the toy world: TI, multiresolution, P+ and NeTI side by side.

Every method learns the same toy concepts from the same images, prompts, batch, lr and seeds
(textual_inversion.learn, one loop), and is judged at several step counts by the oracle on the same
prompts from the same starting noise (evaluate.py's reconstruction and editability, the concept column
only). `python -m minti.toy.spacetime_eval --out lessons/results/14_spacetime.csv` runs the whole
grid, one row per (method, concept, seed, step), appending as it goes (a rerun skips the rows already
written: resumable); `--plot PNG` draws it, `--time CSV` times the methods' training steps.
"""
import argparse
import csv
import os
import time

import numpy as np
import torch

from .. import learn
from ..io.files import write_csv
from ..io.weights import load
from ..spacetime import NeTIWord
from . import TEMPLATES
from . import world as toyworld
from .evaluate import CONCEPTS_FOLDER, ImageSampler, judge_word
from .oracle import Oracle

# name -> learn() settings. Same lr, batch and steps for all; only the word differs.
METHODS = {
    "TI 1 vector": dict(kind="ti", num_vectors=1),
    "TI 2 vectors": dict(kind="ti", num_vectors=2),
    "multires T=10": dict(kind="ti", num_buckets=10),
    "P+": dict(kind="per-layer"),
    "NeTI": dict(kind="neti", bypass=True),
    "NeTI no bypass": dict(kind="neti", bypass=False),
}
CONCEPTS = tuple(toyworld.CONCEPTS)  # the five shipped concepts: three nameable, two held out
STEPS = (25, 50, 100, 200, 400)
TRUNCATIONS = (4, 8, 16, 32, 64)  # hidden widths kept (of NETI_HIDDEN = 128) judging NeTI at the last step
LR, BATCH = 5e-2, 16  # lesson 10's best single-vector lr on the toy, batch 16 (lesson 12's setting)
DDIM_STEPS, CFG = 25, 4.0
TOKEN = "<c>"
COLUMNS = {"reconstruction": "reconstruction", "shape": "shape", "colour": "colour", "pattern": "pattern",
           "editability": "editability", "edit: asked change": "asked_change",
           "edit: concept intact": "concept_intact"}  # the judged Share -> its column in a row


def measure(out, steps=STEPS, seeds=(0, 1), concepts=CONCEPTS, methods=tuple(METHODS), n=16,
            model="toy", log=print, truncations=TRUNCATIONS):
    """The grid: for each seed, concept and method, learn to max(steps), judging at each of `steps`; NeTI
    words are judged again at the last step with their hidden vector cut to each of `truncations`
    (rows in `out` with "_truncation" before ".csv")."""
    sd, oracle = load(model), Oracle.load()
    rows = read_rows(out) if os.path.exists(out) else []
    done = {(r["method"], r["concept"], int(r["seed"])) for r in rows if int(r["step"]) == max(steps)}
    for seed in seeds:
        for name in concepts:
            for method in methods:
                if (method, name, seed) in done:
                    continue
                rows, cut_rows = learn_and_judge(sd, oracle, method, name, seed, steps, n, truncations, log)
                append_rows(truncation_csv(out), cut_rows)  # first: `out` marks the run as done
                append_rows(out, rows)


def learn_and_judge(sd, oracle, method, name, seed, steps, n, truncations, log):
    """One run of the grid: learn concept `name` with `method` to max(steps), judging the word at each of
    `steps` (a NeTI word also at each truncation, at the last). Returns (rows, truncation rows)."""
    truth, run = toyworld.CONCEPTS[name], {"method": method, "concept": name, "seed": seed}
    rows, cut_rows, clock = [], [], {"train": 0.0, "last": time.time()}

    def judge(word):  # every method, every step: the same prompts from the same noise
        sampler = ImageSampler(sd, word, TOKEN, steps=DDIM_STEPS, cfg=CFG)
        return judge_word(sampler, oracle, truth, TOKEN, n, seed)[0]

    def callback(step, word, loss):
        clock["train"] += time.time() - clock["last"]
        if step in steps:
            was, t0 = word.training, time.time()
            word.eval()
            shares = judge(word)
            rows.append({**run, "step": step, "loss": round(loss, 5),
                         "train_s_per_step": round(clock["train"] / step, 4),
                         "eval_s": round(time.time() - t0, 1), "n": n,
                         **{column: round(shares[k].value, 4) for k, column in COLUMNS.items()}})
            log(rows[-1])
            if step == max(steps) and isinstance(word, NeTIWord):
                for keep in (*truncations, None):  # None: the whole hidden vector, last
                    word.truncation = keep
                    shares = judge(word)
                    cut_rows.append({**run, "step": step, "truncation": keep or word.mapper.hidden, "n": n,
                                     "reconstruction": round(shares["reconstruction"].value, 4),
                                     "editability": round(shares["editability"].value, 4)})
                    log(cut_rows[-1])
            word.train(was)
        clock["last"] = time.time()

    learn(sd, os.path.join(CONCEPTS_FOLDER, name), TOKEN, truth.init_word, steps=max(steps), batch=BATCH,
          lr=LR, seed=seed, templates=TEMPLATES, callback=callback, **METHODS[method])
    return rows, cut_rows


def truncation_csv(out):
    return out[:-len(".csv")] + "_truncation.csv"


def append_rows(path, rows):
    if not rows:
        return
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def time_steps(out, methods=tuple(METHODS), steps=8, rounds=3, model="toy"):
    """Wall time per training step, methods interleaved round by round (so that a shared machine's load
    falls on all alike); the median over rounds of each run's median step. Written to `out` (CSV)."""
    sd = load(model)
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            stamps = []
            learn(sd, os.path.join(CONCEPTS_FOLDER, CONCEPTS[0]), "<c>", "star", steps=steps, batch=BATCH,
                  lr=LR, templates=TEMPLATES, **METHODS[m],
                  callback=lambda step, word, loss: stamps.append(time.perf_counter()))
            times[m].append(float(np.median(np.diff(stamps))))
    rows = [{"method": m, "s_per_step": round(float(np.median(t)), 4), "rounds": rounds, "steps": steps,
             "batch": BATCH} for m, t in times.items()]
    base = rows[0]["s_per_step"]
    for r in rows:
        r["x_TI_1"] = round(r["s_per_step"] / base, 2)
    write_csv(out, list(rows[0]), [list(r.values()) for r in rows])
    return rows


def plot(path, png):
    """Reconstruction and editability against steps, one line per method (mean over runs), and NeTI's
    against the truncation level (the rows of `path` with "_truncation")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, cut = summarise(path)[1], truncation_table(truncation_csv(path))
    levels = []
    methods = list(dict.fromkeys(m for m, _ in table))
    steps = sorted({s for _, s in table})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), width_ratios=(1, 1, 0.8))
    for i, what in enumerate(("reconstruction", "editability")):
        for m in methods:
            axes[i].plot(steps, [100 * table[m, s][i] for s in steps], "o-",
                         label=f"{m} ({table[m, steps[-1]][2]} runs)")
        axes[i].set_xscale("log")
        axes[i].set_xticks(steps, [str(s) for s in steps])
        axes[i].minorticks_off()
        axes[i].set_xlabel("optimisation steps (batch 16, lr 0.05)")
        axes[i].set_ylabel(f"% {what} (oracle)")
        axes[i].set_ylim(-3, 103)
        axes[i].set_title(what, fontsize=9)
    axes[0].axhline(80, color="k", ls=":", lw=0.8)
    axes[1].legend(fontsize=7)
    for m in dict.fromkeys(m for m, _ in cut):
        levels = sorted(k for mm, k in cut if mm == m)
        for i, (what, style) in enumerate((("reconstruction", "o-"), ("editability", "s--"))):
            axes[2].plot(levels, [100 * cut[m, k][i] for k in levels], style, label=f"{m}: {what}")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel(f"NeTI: hidden dimensions kept (of {levels[-1]}) at {steps[-1]} steps" if cut else "")
    axes[2].set_ylim(-3, 103)
    axes[2].set_title("nested dropout: truncation at sampling", fontsize=9)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"Space-time words on the toy model ({os.path.basename(path)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def means(rows, key):
    """{key(row): (mean reconstruction, mean editability, runs)} over the rows grouped by key, in order."""
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return {k: (np.mean([float(r["reconstruction"]) for r in at]),
                np.mean([float(r["editability"]) for r in at]), len(at)) for k, at in groups.items()}


def summarise(path, target=0.8, step_times=None):
    """The committed grid as tables: per method and step count, reconstruction and editability averaged
    over the runs (concepts x seeds); then s/step and, per run, the first judged step with reconstruction
    >= target (how many runs get there, the median step and the median seconds of training to it).
    Returns (the text, {(method, step): (reconstruction, editability, runs)}, {method: (runs reaching
    the target, runs, median step or None, s/step)})
    step_times: a CSV of time_steps (interleaved, fair to every method) for s/step; else the grid's own
    (measured while the grid ran, under whatever else the machine was doing)."""
    rows = read_rows(path)
    timed = {}
    if step_times and os.path.exists(step_times):
        timed = {r["method"]: float(r["s_per_step"]) for r in read_rows(step_times)}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    steps = sorted({int(r["step"]) for r in rows})
    found = means(rows, lambda r: (r["method"], int(r["step"])))
    table = {(m, s): found.get((m, s), (float("nan"), float("nan"), 0)) for m in methods for s in steps}
    lines = []
    for i, what in enumerate(("reconstruction", "editability")):
        lines.append(f"{what + ', %':22s} runs" + "".join(f"{'@' + str(s):>7s}" for s in steps))
        for m in methods:
            cells = "".join(f"{100 * table[m, s][i]:7.1f}" for s in steps)
            lines.append(f"{m:22s} {table[m, steps[-1]][2]:4d}" + cells)
    lines.append(f"{'speed':22s} {'s/step':>8s} {'x TI 1':>7s}   reach {100 * target:.0f}% rec.: runs, "
                 f"median steps, median s")
    base, reach = None, {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        speed = timed.get(m) or float(np.mean([float(r["train_s_per_step"]) for r in mine
                                               if int(r["step"]) == steps[-1]]))
        base = base or speed
        runs = {(r["concept"], r["seed"]) for r in mine}
        first = {run: min((int(r["step"]) for r in mine if (r["concept"], r["seed"]) == run
                           and float(r["reconstruction"]) >= target), default=None) for run in runs}
        reached = [s for s in first.values() if s is not None]
        median = f"{'-':>6s} {'-':>8s}"
        if reached:
            median = f"{np.median(reached):6.0f} {np.median(reached) * speed:8.1f}"
        lines.append(f"{m:22s} {speed:8.3f} {speed / base:7.2f}   {len(reached):2d}/{len(runs):<2d} {median}")
        reach[m] = (len(reached), len(runs), float(np.median(reached)) if reached else None, speed)
    return "\n".join(lines), table, reach


def truncation_table(path):
    """{(method, hidden dimensions kept): (reconstruction, editability, runs)}, means over the runs."""
    if not os.path.exists(path):
        return {}
    return means(read_rows(path), lambda r: (r["method"], int(r["truncation"])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lessons/results/14_spacetime.csv")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)),
                        help="step counts to judge at (the last: training length)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--concepts", default=",".join(CONCEPTS))
    parser.add_argument("--methods", default=",".join(METHODS), help="of: " + ", ".join(METHODS))
    parser.add_argument("--n", type=int, default=16, help="samples per condition")
    parser.add_argument("--plot", metavar="PNG", help="only draw the figure of --out's rows into PNG")
    parser.add_argument("--time", metavar="CSV", help="only time the training steps (interleaved) into CSV")
    parser.add_argument("--step-times", metavar="CSV", default="lessons/results/14_step_time.csv",
                        help="with --plot: s/step from this CSV of --time (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.plot:
        print(summarise(args.out, step_times=args.step_times)[0])
        return plot(args.out, args.plot)
    if args.time:
        for row in time_steps(args.time):
            print(row)
        return None
    measure(args.out, tuple(map(int, args.steps.split(","))), tuple(map(int, args.seeds.split(","))),
            concepts=tuple(args.concepts.split(",")), methods=tuple(args.methods.split(",")), n=args.n,
            log=lambda r: print(r, flush=True))


if __name__ == "__main__":
    main()
