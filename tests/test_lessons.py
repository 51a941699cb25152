"""Every lesson runs from start to end, as a learner runs it, and its closing check passes.

Each `lessons/NN_*.py` found (new lessons are picked up by the glob) runs in its own process from the
repository root, `python lessons/NN_topic.py`, with MINTI_FAST=1: a lesson may shorten its work in
that mode but never skips its check, which prints "check passed: ..." only after its assertions
hold. The lessons write their pictures under lessons/out/ (not tracked by git).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# NN_topic.py, and NNx_topic.py for a lesson slotted in after NN (11d_space_time_words.py)
LESSONS = sorted([*(ROOT / "lessons").glob("[0-9][0-9]_*.py"), *(ROOT / "lessons").glob("[0-9][0-9][a-z]_*.py")])
TIMEOUT_S = 300  # the bound: each lesson within 5 minutes on a CPU


def test_lessons_are_numbered_once_and_listed_in_the_readme():
    assert LESSONS, "no lessons/NN_*.py found"
    numbers = [p.name.split("_")[0] for p in LESSONS]
    assert len(set(numbers)) == len(numbers), f"two lessons share a number: {numbers}"
    readme = (ROOT / "lessons" / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in LESSONS if not re.search(re.escape(p.name), readme)]
    assert not missing, f"lessons/README.md does not list {missing}"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_and_its_check_passes(lesson):
    env = dict(os.environ, MINTI_FAST="1", MPLBACKEND="Agg")
    # One thread per lesson: the lessons' tensors are small, and on shared CI cores several threads
    # per process mostly wait for each other (lesson 08 measured 2.6x slower with 2 threads).
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run([sys.executable, str(lesson.relative_to(ROOT))], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{lesson.name} exited with {result.returncode}:\n{output[-4000:]}"
    assert "check passed" in result.stdout, (f"{lesson.name} ran but printed no 'check passed':\n"
                                             f"{output[-4000:]}")
