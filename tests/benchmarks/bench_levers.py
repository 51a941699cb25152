"""Fewer steps to the same word: the levers of minti.learn measured by the toy's oracle (issue 24).

Runs textual inversion on the five shipped toy concepts x seeds with each configuration (today's default,
CrossInit's start, DTI's fixed norm, and diffusers' textual_inversion recipe run on weights/toy with the
same settings), judges the word with the oracle at fixed snapshots (n samples of reconstruction and of
each edit), and records, for every step, the loss on DVAR's fixed batch (an AutoStop that never fires),
so that where `--stop auto` would fire, for any window and threshold, is read off the same runs.

Every run is one process thread (torch.set_num_threads(1)); seconds are training seconds (the judging
and the DVAR probe are timed apart and left out; the probe's own cost is reported as a share).

The recipe (diffusers' examples/textual_inversion), written out on minti's models: the placeholder rows
appended to the token table, the WHOLE table in AdamW (weight decay 1e-2) with every other row restored
after each step, and the VAE encoding the step's images at every step. Everything else (templates, lr,
batch, flips, timesteps, noise) is train.py's, from the same generator.

    python tests/benchmarks/bench_levers.py --out lessons/results/24_levers.csv            # the grid
    python tests/benchmarks/bench_levers.py --summary lessons/results/24_levers.csv        # tables + figure
"""
import argparse
import copy
import csv
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

import minti  # noqa: E402
from minti import textual_inversion as ti  # noqa: E402
from minti.data import load_concept_data  # noqa: E402
from minti.sampling import default_size  # noqa: E402
from minti.timesteps import UniformTimesteps  # noqa: E402
from minti.toy import TEMPLATES, TRAIN_DEFAULTS, world as toyworld  # noqa: E402
from minti.toy.evaluate import CONCEPTS_FOLDER, ImageSampler, judge_word  # noqa: E402
from minti.toy.oracle import Oracle  # noqa: E402
from minti.toy.spacetime_eval import append_rows  # noqa: E402

CONFIGS = {  # on top of train.py's toy defaults: 2 vectors, lr 5e-2, batch 16, 300 steps
    "default": {},
    "crossinit": dict(start="output"),
    "dti": dict(norm="fixed"),
    "dti-init": dict(norm="init"),  # (not in the default grid)
    "recipe": None,  # diffusers' recipe, below
}
GRID = ("default", "crossinit", "dti", "recipe")
SNAPSHOTS = (25, 50, 75, 100, 150, 200, 300)
TOKEN, BATCH, DDIM_STEPS, CFG = "<c>", 16, 25, 4.0
GOAL = (0.8, 0.7)  # reconstruction, editability


class ProbeStop(ti.AutoStop):
    """DVAR's fixed-batch loss after every step, never firing, its seconds counted apart."""

    seconds = 0.0

    def update(self, sd, word, step):
        start = time.perf_counter()
        super().update(sd, word, step)
        self.seconds += time.perf_counter() - start
        return False


class RecipeWord(nn.Module):
    """The recipe's word: the whole token table, placeholder rows appended, as one trainable parameter."""

    def __init__(self, table, vectors, token_ids):
        super().__init__()
        self.table = nn.Parameter(torch.cat([table.detach().float(), vectors.float()]))
        self.register_buffer("token_ids", torch.as_tensor(token_ids), persistent=False)
        self.original = self.table.detach().clone()

    @property
    def vectors(self):  # [1, n, D], as a LearnedWord's
        return self.table[self.token_ids][None]

    def context(self, text_encoder, ids, t):
        return text_encoder(ids, inputs_embeds=F.embedding(ids, self.table))

    @torch.no_grad()
    def restore_other_rows(self):
        keep = torch.ones(len(self.table), dtype=torch.bool)
        keep[self.token_ids] = False
        self.table[keep] = self.original[keep]


def learn_recipe(sd, folder, init, seed, steps, callback, probe_box, lr, num_vectors):
    """The recipe's loop (see the module's docstring) through minti's train_loop and draws."""
    ti.freeze(sd)
    tokenizer, table = copy.deepcopy(sd.tokenizer), ti.token_table(sd.text_encoder)
    start, _ = ti.init_vectors(tokenizer, table, init, num_vectors)
    ids = ti.add_words(tokenizer, {TOKEN: num_vectors})[TOKEN]
    word = RecipeWord(table, start, ids)
    data, _ = load_concept_data(folder, default_size(sd)[0], TOKEN, " ".join(ti.placeholder_tokens(TOKEN, num_vectors)),
                                TEMPLATES, lambda p: tokenizer(p, length=77), sd.vae, sd.latent_scale,
                                cache_latents=False)  # the VAE encodes at every step
    optimizer = torch.optim.AdamW(word.parameters(), lr=lr, weight_decay=1e-2)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    probe = probe_box["probe"] = ProbeStop.drawn(data, seed, BATCH, 1000, "cpu")

    def on_step(step, loss, lr):
        word.restore_other_rows()
        callback(step, word, loss)
    ti.train_loop(sd, word, data, optimizer, UniformTimesteps(), generator, steps=steps, lr=lr, batch=BATCH,
                  on_step=on_step, stop=probe)
    return word, probe


def one_run(sd, oracle, config, name, seed, n, steps):
    """Learn concept `name` with `config` to max(steps); rows of the judged snapshots and the probe's losses."""
    truth, folder = toyworld.CONCEPTS[name], os.path.join(CONCEPTS_FOLDER, name)
    rows, clock = [], {"judge": 0.0, "start": time.perf_counter()}
    probe_box = {}  # the run's ProbeStop, once drawn

    def callback(step, word, loss):
        if step not in steps:
            return
        t0 = time.perf_counter()
        learned = word if not isinstance(word, RecipeWord) else ti.LearnedWord(word.vectors[0].detach(), word.token_ids)
        was = learned.training
        learned.eval()
        shares = judge_word(ImageSampler(sd, learned, TOKEN, steps=DDIM_STEPS, cfg=CFG), oracle, truth, TOKEN, n,
                            seed)[0]
        learned.train(was)
        train_s = t0 - clock["start"] - clock["judge"] - probe_box["probe"].seconds
        norms = learned.vectors.detach().norm(dim=-1).flatten()
        rows.append({"config": config, "concept": name, "seed": seed, "step": step, "loss": round(loss, 5),
                     "train_s": round(train_s, 2), "n": n,
                     "reconstruction": round(shares["reconstruction"].value, 4),
                     "editability": round(shares["editability"].value, 4),
                     "norm_mean": round(norms.mean().item(), 4), "norm_max": round(norms.max().item(), 4)})
        print(json.dumps(rows[-1]), flush=True)
        clock["judge"] += time.perf_counter() - t0

    defaults = dict(num_vectors=TRAIN_DEFAULTS["vectors"], lr=TRAIN_DEFAULTS["lr"])
    if CONFIGS[config] is None:
        word, probe_box["probe"] = learn_recipe(sd, folder, truth.init_word, seed, max(steps), callback, probe_box,
                                                **defaults)
    else:
        class Probe(ProbeStop):  # minti.learn draws it; the callback reads its seconds
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                probe_box["probe"] = self
        minti.learn(sd, folder, TOKEN, truth.init_word, steps=max(steps), batch=BATCH, seed=seed,
                    templates=TEMPLATES, callback=callback, stop=Probe, **defaults, **CONFIGS[config])
    probe = probe_box["probe"]
    total = time.perf_counter() - clock["start"] - clock["judge"]
    return rows, {"config": config, "concept": name, "seed": seed, "losses": [round(x, 6) for x in probe.losses],
                  "probe_share": round(probe.seconds / total, 4)}


def first_at_goal(rows):
    """The first snapshot of one run whose reconstruction and editability reach GOAL, or None."""
    for r in sorted(rows, key=lambda r: r["step"]):
        if r["reconstruction"] >= GOAL[0] and r["editability"] >= GOAL[1]:
            return r
    return None


def fire_step(losses, window, threshold, every=1):
    """Where AutoStop(window, threshold, every) would end a run with this per-step history of the fixed
    batch's loss (None: never)."""
    stop = ti.AutoStop([], window, threshold, every)
    for step, loss in enumerate(losses, 1):
        if step % every == 0:
            stop.losses.append(loss)
            if stop.ratio() < threshold:
                return step
    return None


def load(path):
    with open(path) as f:
        rows = [{k: (v if k in ("config", "concept") else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
    runs = {}
    for r in rows:
        runs.setdefault((r["config"], r["concept"], int(r["seed"])), []).append(r)
    with open(path.replace(".csv", "_dvar.jsonl")) as f:
        probes = {(p["config"], p["concept"], p["seed"]): p for p in map(json.loads, f)}
    return runs, probes


def summarise(path, windows=(25, 50, 75, 100), thresholds=(0.1, 0.15, 0.2)):
    """Per configuration: runs reaching the goal, median steps and seconds to it, the quality and norms at
    the last step; then, for the default's fixed-batch losses, where each AutoStop setting fires and the
    quality at the last snapshot before it. Writes <path>_summary.csv and the figure <path>.png."""
    import statistics

    runs, probes = load(path)
    table = []
    for config in dict.fromkeys(k[0] for k in runs):
        mine = {k: v for k, v in runs.items() if k[0] == config}
        hits = [first_at_goal(v) for v in mine.values()]
        reached = [h for h in hits if h is not None]
        last = [max(v, key=lambda r: r["step"]) for v in mine.values()]
        per_step = statistics.median(r["train_s"] / r["step"] for r in last)
        table.append({"config": config, "runs": len(mine), "reach_goal": len(reached),
                      "median_steps_to_goal": statistics.median(h["step"] for h in reached) if reached else "",
                      "median_seconds_to_goal": round(statistics.median(h["train_s"] for h in reached), 1)
                      if reached else "",
                      "s_per_step": round(per_step, 4),
                      "final_reconstruction": round(statistics.mean(r["reconstruction"] for r in last), 3),
                      "final_editability": round(statistics.mean(r["editability"] for r in last), 3),
                      "final_norm_mean": round(statistics.mean(r["norm_mean"] for r in last), 2),
                      "dvar_probe_share": round(statistics.mean(probes[k]["probe_share"] for k in mine), 3)})
    stops = []
    for config in dict.fromkeys(k[0] for k in runs):
        for window in windows:
            for threshold in thresholds:
                fired, quality = [], []
                for key, rows in runs.items():
                    if key[0] != config:
                        continue
                    step = fire_step(probes[key]["losses"], window, threshold) or int(max(r["step"] for r in rows))
                    before = [r for r in rows if r["step"] <= step] or [min(rows, key=lambda r: r["step"])]
                    fired.append(step)
                    quality.append(max(before, key=lambda r: r["step"]))
                stops.append({"config": config, "window": window, "threshold": threshold,
                              "median_stop_step": statistics.median(fired), "max_stop_step": max(fired),
                              "reconstruction_at_stop": round(statistics.mean(q["reconstruction"] for q in quality), 3),
                              "editability_at_stop": round(statistics.mean(q["editability"] for q in quality), 3),
                              "at_goal_at_stop": sum(q["reconstruction"] >= GOAL[0] and q["editability"] >= GOAL[1]
                                                     for q in quality)})
    for rows in (table, stops):
        print(",".join(rows[0]))
        for r in rows:
            print(",".join(str(v) for v in r.values()))
        print()
    for name, rows in (("summary", table), ("stops", stops)):
        with open(path.replace(".csv", f"_{name}.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    plot(runs, path.replace(".csv", ".png"))
    return table, stops


def plot(runs, png):
    """Pooled reconstruction and editability against step, one line per configuration (the steps every run
    of it was judged at)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for config in dict.fromkeys(k[0] for k in runs):
        steps = sorted(set.intersection(*[{r["step"] for r in v} for k, v in runs.items() if k[0] == config]))
        for ax, column in zip(axes, ("reconstruction", "editability")):
            means = [sum(r[column] for k, v in runs.items() if k[0] == config for r in v if r["step"] == s)
                     / sum(1 for k, v in runs.items() if k[0] == config for r in v if r["step"] == s) for s in steps]
            ax.plot(steps, [100 * m for m in means], marker="o", label=config)
    for ax, column, goal in zip(axes, ("reconstruction", "editability"), GOAL):
        ax.axhline(100 * goal, color="gray", ls=":")
        ax.set(xlabel="step", ylabel=f"{column} (%)", ylim=(0, 100))
    axes[1].legend(fontsize=8)
    seeds = sorted({k[2] for k in runs})
    fig.suptitle(f"{len({k[1] for k in runs})} toy concepts x seed(s) {seeds}, pooled (n = {int(next(iter(runs.values()))[0]['n'])} samples per "
                 f"condition and run): the levers against today's default")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def done_runs(out):
    if not os.path.exists(out):
        return set()
    with open(out) as f:
        return {(r["config"], r["concept"], int(r["seed"])) for r in csv.DictReader(f)}


def grid(args):
    torch.set_num_threads(1)
    sd, oracle = minti.load("toy"), Oracle.load()
    done, probes = done_runs(args.out), args.out.replace(".csv", "_dvar.jsonl")
    for seed in args.seeds:
        for name in args.concepts:
            for config in args.configs:
                if (config, name, seed) in done:
                    continue
                rows, probe = one_run(sd, oracle, config, name, seed, args.n, tuple(args.snapshots))
                with open(probes, "a") as f:  # first: a run is done once its rows are in `out`
                    f.write(json.dumps(probe) + "\n")
                append_rows(args.out, rows)


def timing(out, concepts, steps, rounds=2):
    """Seconds per step of train.py's loop (the default) and of the recipe on the same runs, interleaved
    (default, recipe, default, ...), one thread, no judging; and whether the two learn the same vectors."""
    torch.set_num_threads(1)
    sd, rows = minti.load("toy"), []
    defaults = dict(num_vectors=TRAIN_DEFAULTS["vectors"], lr=TRAIN_DEFAULTS["lr"])
    for name in concepts:
        truth, folder = toyworld.CONCEPTS[name], os.path.join(CONCEPTS_FOLDER, name)
        seconds, words = {"default": [], "recipe": []}, {}
        for _ in range(rounds):
            start = time.perf_counter()
            words["default"], _ = minti.learn(sd, folder, TOKEN, truth.init_word, steps=steps, batch=BATCH, seed=0,
                                              templates=TEMPLATES, **defaults)
            seconds["default"].append(time.perf_counter() - start)
            start = time.perf_counter()
            words["recipe"], probe = learn_recipe(sd, folder, truth.init_word, 0, steps, lambda *a: None, {},
                                                  **defaults)
            seconds["recipe"].append(time.perf_counter() - start - probe.seconds)
        difference = (words["default"].vectors - words["recipe"].vectors).abs().max().item()
        rows.append({"concept": name, "steps": steps, "default_s_per_step": round(min(seconds["default"]) / steps, 4),
                     "recipe_s_per_step": round(min(seconds["recipe"]) / steps, 4),
                     "max_vector_difference": f"{difference:.2e}"})
        print(json.dumps(rows[-1]), flush=True)
    append_rows(out, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "lessons", "results", "24_levers.csv"))
    p.add_argument("--configs", nargs="+", default=list(GRID), choices=list(CONFIGS))
    p.add_argument("--concepts", nargs="+", default=list(toyworld.CONCEPTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--snapshots", nargs="+", type=int, default=list(SNAPSHOTS))
    p.add_argument("--n", type=int, default=16, help="samples per condition at each snapshot")
    p.add_argument("--summary", metavar="CSV", help="print the tables and draw the figure of a finished grid")
    p.add_argument("--timing", type=int, metavar="STEPS", help="time STEPS steps of the default and the recipe, "
                   "interleaved, without judging (writes <out>_timing.csv)")
    args = p.parse_args(argv)
    if args.summary:
        return summarise(args.summary)
    if args.timing:
        return timing(args.out.replace(".csv", "_timing.csv"), args.concepts, args.timing)
    grid(args)


if __name__ == "__main__":
    main()
