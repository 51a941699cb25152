"""Every lesson and every solution runs from start to end, as a learner runs it, and its check passes.

Each `lessons/NN_*.py` found (new lessons are picked up by the glob; a lesson inserted between two
numbers is named `08_topic.py`) runs in its own process from the repository root,
`python lessons/NN_topic.py`, with MINTI_FAST=1: a lesson may shorten its work in that mode but never
skips its check, which prints "check passed: ..." only after its assertions hold. No line it prints
is wider than 100 characters (a learner reads them in a terminal or a notebook cell). Each
`lessons/solutions/NN_*.py` (the exercises' solutions) runs the same way and must exit cleanly,
print "solved" and keep within the same width.
The lessons write their pictures under lessons/out/ (not tracked by git).
"""
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The path in order, then the appendix (a lesson off the path that the path points to).
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py")) + sorted((ROOT / "lessons").glob("appendix_*.py"))
SOLUTIONS = sorted((ROOT / "lessons" / "solutions").glob("[0-9][0-9]_*.py")) + \
    sorted((ROOT / "lessons" / "solutions").glob("appendix_*.py"))
# Only a guard against a hung lesson, never a speed requirement (how fast a lesson runs is a benchmark's
# question, not a test's): an hour, 12 times the 5 minutes each lesson was once held to.
HUNG_S = 3600
MAX_WIDTH = 100  # characters per printed line
MAX_CELL = 45  # code lines per `# %%` cell ("about 40")


def number(path):
    return path.name.split("_")[0]  # "08", "13" (solutions 13_1_..., 13_2_...), "appendix"


def run_one(path):
    # MINTI_REQUIRE_OPTIONAL: a check that needs open_clip or diffusers (test requirements, not the
    # learner's) fails here instead of saying it was skipped.
    env = dict(os.environ, MINTI_FAST="1", MPLBACKEND="Agg", MINTI_REQUIRE_OPTIONAL="1")
    # One thread per lesson: the lessons' tensors are small, and on shared CI cores several threads
    # per process mostly wait for each other (the appendix lesson measured 2.6x slower with 2 threads).
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        result = subprocess.run([sys.executable, str(path.relative_to(ROOT))], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=HUNG_S)
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"{path.name} was still running after {HUNG_S} s: hung?\n{output[-4000:]}")
    return result, result.stdout + result.stderr


# Each lesson runs on one thread, so on CI's two cores two of them run at once: the tests selected in
# this session are started together, two at a time (at most the machine's cores), and each test waits
# for its own. Nothing else changes: every process still runs alone from the repository root.
_POOL, _RUNS = None, {}


def run(path, selected=()):
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
        for other in selected:
            _RUNS[other] = _POOL.submit(run_one, other)
    if path not in _RUNS:
        _RUNS[path] = _POOL.submit(run_one, path)
    return _RUNS[path].result()


@pytest.fixture
def selected(request):
    """The lessons and solutions that this pytest session will run, in its order."""
    paths = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if item.module is request.module and spec is not None:
            paths += [v for k, v in spec.params.items() if k in ("lesson", "solution") and
                      item.originalname in ("test_lesson_runs_and_its_check_passes", "test_solution_runs")]
    return paths


def test_lessons_are_numbered_once_and_listed_in_the_readme():
    assert LESSONS, "no lessons/NN_*.py found"
    numbers = [number(p) for p in LESSONS]
    assert len(set(numbers)) == len(numbers), f"two lessons share a number: {numbers}"
    readme = (ROOT / "lessons" / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in LESSONS if not re.search(re.escape(p.name), readme)]
    assert not missing, f"lessons/README.md does not list {missing}"


def test_every_solution_belongs_to_a_lesson():
    lessons = {number(p) for p in LESSONS}
    orphans = [p.name for p in SOLUTIONS if number(p) not in lessons]
    assert not orphans, f"solutions without a lesson of their number: {orphans}"


def code_cells(path):
    """(first line number, code lines) of each code cell of a `# %%` file."""
    cells, start, lines, markdown = [], 1, [], False
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("# %%"):
            if not markdown:
                cells.append((start, lines))
            start, lines, markdown = i, [], "[markdown]" in line
        else:
            lines.append(line)
    if not markdown:
        cells.append((start, lines))
    return cells


# Terms a learner must not meet before the lesson that explains them (lessons/README.md lists more);
# mentions inside a lesson's exercises do not count.
INTRODUCED = {"oracle": "08", "wilson": "08", "editability": "08", "prompt only": "08",
              "image only": "08", "evaluate_concept": "09", "forward hook": "11", "object mask": "11",
              "multiresolution": "12", "error-norm": "13",
              "dreambooth": "16", "lora": "16", "automatic1111": "16", "sign test": "08",
              "bias correction": "09", "crossinit": "10", "dti": "10",
              "p+": "14", "neti": "14", "nested dropout": "14", "textual bypass": "14", "style mixing": "14"}


def test_terms_are_introduced_before_they_are_used():
    order = [number(p) for p in LESSONS]
    early = []
    for term, lesson in INTRODUCED.items():
        for path in LESSONS:
            if order.index(number(path)) < order.index(lesson):
                body = path.read_text(encoding="utf-8").lower().split("## exercises")[0]
                if term in body:
                    early.append(f"{path.name} uses {term!r} (introduced in {lesson})")
    assert not early, early


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_cells_are_short(lesson):
    long = [(start, len(lines)) for start, lines in code_cells(lesson) if len(lines) > MAX_CELL]
    assert not long, f"{lesson.name}: cells (first line, length) longer than {MAX_CELL} lines: {long}"


@pytest.mark.parametrize("lesson", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_runs_and_its_check_passes(lesson, selected):
    result, output = run(lesson, selected)
    assert result.returncode == 0, f"{lesson.name} exited with {result.returncode}:\n{output[-4000:]}"
    assert "check passed" in result.stdout, (f"{lesson.name} ran but printed no 'check passed':\n"
                                             f"{output[-4000:]}")
    wide = [line for line in result.stdout.splitlines() if len(line) > MAX_WIDTH]
    assert not wide, f"{lesson.name} printed {len(wide)} lines wider than {MAX_WIDTH}: {wide[:3]}"


@pytest.mark.parametrize("solution", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solution_runs(solution, selected):
    result, output = run(solution, selected)
    assert result.returncode == 0, f"{solution.name} exited with {result.returncode}:\n{output[-4000:]}"
    assert "solved" in result.stdout or "check passed" in result.stdout, \
        f"{solution.name} printed neither 'solved' nor 'check passed':\n{output[-4000:]}"
    wide = [line for line in result.stdout.splitlines() if len(line) > MAX_WIDTH]
    assert not wide, f"{solution.name} printed {len(wide)} lines wider than {MAX_WIDTH}: {wide[:3]}"
