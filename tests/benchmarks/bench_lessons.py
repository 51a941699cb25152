"""How long each lesson takes, as a learner runs it: wall and CPU seconds per lesson, one thread each.

Runs `python lessons/NN_x.py` (the default mode, or with --fast the test's MINTI_FAST=1 mode) for every
lesson and the appendix, `--jobs` at a time (each on one thread; 2 jobs on a 2-core machine leave each
lesson its own core), and writes one row per lesson to the CSV as it finishes: the date, the mode, the
wall seconds, the CPU seconds (user + system, from the child's own resource usage) and the load average
before the lesson started. lessons/README.md's runtimes come from this file.

    python tests/benchmarks/bench_lessons.py --out lessons/results/lesson_times.csv
    python tests/benchmarks/bench_lessons.py --fast --lessons 09 10
"""
import argparse
import csv
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ["date", "lesson", "mode", "wall_s", "cpu_s", "load_before", "cores", "returncode"]


def lessons(numbers):
    paths = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py")) + sorted((ROOT / "lessons").glob("appendix_*.py"))
    return [p for p in paths if not numbers or p.name.split("_")[0] in numbers]


def start(path, fast):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env.pop("MINTI_FAST", None)
    if fast:
        env["MINTI_FAST"] = "1"
    process = subprocess.Popen([sys.executable, str(path.relative_to(ROOT))], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, time.monotonic(), os.getloadavg()[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "lessons" / "results" / "lesson_times.csv")
    parser.add_argument("--fast", action="store_true", help="MINTI_FAST=1, the test's mode")
    parser.add_argument("--jobs", type=int, default=1, help="lessons run at once (each on one thread)")
    parser.add_argument("--lessons", nargs="*", default=[], help="numbers to run (default: all)")
    args = parser.parse_args()
    todo, running = lessons(args.lessons), {}
    new = not args.out.exists()
    with open(args.out, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, lineterminator="\n")
        if new:
            writer.writeheader()
        while todo or running:
            while todo and len(running) < args.jobs:
                path = todo.pop(0)
                process, began, load = start(path, args.fast)
                running[process.pid] = (path, began, load)
            pid, status, usage = os.wait4(-1, 0)  # the child's own CPU time, whatever else runs
            path, began, load = running.pop(pid)
            row = dict(date=datetime.date.today().isoformat(), lesson=path.name,
                       mode="fast" if args.fast else "default", wall_s=round(time.monotonic() - began, 1),
                       cpu_s=round(usage.ru_utime + usage.ru_stime, 1), load_before=round(load, 2),
                       cores=os.cpu_count(), returncode=os.waitstatus_to_exitcode(status))
            writer.writerow(row)
            f.flush()
            print(f"{row['lesson']:34s} {row['mode']:8s} wall {row['wall_s']:7.1f} s  cpu {row['cpu_s']:7.1f} s"
                  f"  (load before {row['load_before']}, exit {row['returncode']})", flush=True)


if __name__ == "__main__":
    main()
