"""Lesson 14's experiment: NeTI's nested dropout, with the edit measure split into its two parts.

The committed grid (lessons/results/14_spacetime_truncation.csv, from minti.toy.spacetime_eval) judged
NeTI's words at 400 steps with their hidden vector cut to 4 ... 64 of 128 dimensions, but kept only
reconstruction and editability. Editability counts an edit sample only when the asked change is made
AND the concept is intact, so it cannot show the trade-off NeTI's paper describes (a truncated word
that is less faithful but follows the rest of the prompt more). This script learns NeTI words again
with the grid's settings (its concepts, seeds, images, prompts, batch 16, lr 0.05, 400 steps) and
judges each cut with the asked-change and concept-intact columns too, 16 samples per condition from
the same noise. They are new words, not the grid's: minti changed between the grid (commit 0d08d6c)
and this run, and a run's numbers differ from the grid's row for it (the cause was not traced).

Resumable: a run's rows are written (atomically, the whole file) when the run ends; runs already in
the file are skipped. Run from the repository root:
    python lessons/experiments/14_truncation_edits.py            # 5 concepts x seeds 0, 1
    python lessons/experiments/14_truncation_edits.py --seeds 0  # half of it (what is committed)
A run took about 4 minutes of one CPU thread (learning 125 s, judging the 6 cuts 100-113 s: learn_cpu_s
and judge_cpu_s in the CSV) and 47-49 minutes of wall time on the shared 2-core machine it ran on
(load 10-17, four runs side by side, each with --concepts and its own --out, merged afterwards). The
committed file has seed 0 for four concepts; outlined_pink_heart's run was stopped unfinished.
"""
import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import minti  # noqa: E402
from minti import learn  # noqa: E402
from minti.io.files import write_csv  # noqa: E402
from minti.toy import TEMPLATES, world as toyworld  # noqa: E402
from minti.toy.evaluate import CONCEPTS_FOLDER, ImageSampler, judge_word  # noqa: E402
from minti.toy.oracle import Oracle  # noqa: E402
from minti.toy.spacetime_eval import BATCH, CFG, CONCEPTS, DDIM_STEPS, LR, METHODS, TOKEN, TRUNCATIONS  # noqa: E402

OUT = ROOT / "lessons" / "results" / "14_truncation_edits.csv"
STEPS, N = 400, 16
COLUMNS = ["method", "concept", "seed", "step", "truncation", "n", "reconstruction", "editability",
           "asked_change", "concept_intact", "learn_cpu_s", "judge_cpu_s"]
SHARES = {"reconstruction": "reconstruction", "editability": "editability",
          "asked_change": "edit: asked change", "concept_intact": "edit: concept intact"}


def one_run(sd, oracle, name, seed):
    """NeTI (with bypass) on concept `name` from `seed`, judged at each truncation and whole (128)."""
    truth = toyworld.CONCEPTS[name]
    cpu = time.process_time()
    word, _ = learn(sd, os.path.join(CONCEPTS_FOLDER, name), TOKEN, truth.init_word, steps=STEPS, batch=BATCH,
                    lr=LR, seed=seed, templates=TEMPLATES, **METHODS["NeTI"])
    word.eval()
    learn_s, rows = time.process_time() - cpu, []
    for keep in (*TRUNCATIONS, None):
        cpu = time.process_time()
        word.truncation = keep
        shares = judge_word(ImageSampler(sd, word, TOKEN, steps=DDIM_STEPS, cfg=CFG), oracle, truth, TOKEN, N,
                            seed)[0]
        rows.append(["NeTI", name, seed, STEPS, keep or word.mapper.hidden, N,
                     *(round(shares[k].value, 4) for k in SHARES.values()),
                     round(learn_s, 1), round(time.process_time() - cpu, 1)])
        print(dict(zip(COLUMNS, rows[-1])), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--concepts", default=",".join(CONCEPTS))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sd, oracle = minti.load("toy"), Oracle.load()
    rows = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = [[r[c] for c in COLUMNS] for r in csv.DictReader(f)]
    for seed in map(int, args.seeds.split(",")):
        for name in args.concepts.split(","):
            if any(r[1] == name and int(r[2]) == seed for r in rows):
                continue
            rows += one_run(sd, oracle, name, seed)
            write_csv(args.out, COLUMNS, rows)


if __name__ == "__main__":
    main()
