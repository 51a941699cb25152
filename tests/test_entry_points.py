"""Every `python -m minti...` entry point, run for real on the toy model in a subprocess with the smallest
settings that exercise it: it exits 0, and the files it should write exist and hold sane content.

The list of entry points is checked against the modules that have a `__main__` block, so a new one fails
here until it has its run. One thread per process: the whole file takes about a minute on 2 CPU cores.
"""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minti
from minti.io.concepts import Concept, save_diffusers
from minti.toy import world

ROOT = Path(__file__).resolve().parents[1]
CONCEPT = "striped_orange_star"
IMAGES = ROOT / "weights" / "toy" / "concepts" / CONCEPT
# Only a guard against a hung process (it fails with the output so far); never a speed requirement: an entry
# point may take as long as the machine and its load make it take.
HANG_S = 3600
ENTRY_POINTS = {"minti.toy.world", "minti.toy.model", "minti.toy.oracle", "minti.toy.evaluate",
                "minti.toy.spacetime_eval", "minti.run.measure_g", "minti.run.many"}


def run(module, *args):
    """python -m module args, from the repository root; its stdout. A failure shows the end of its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, (f"python -m {module} {' '.join(map(str, args))} exited {done.returncode}:\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def is_png(path):
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def concept_file(tmp_path_factory):
    """A word learned for one step on the toy model, saved as train.py saves it (diffusers format)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        word, _ = minti.learn(minti.load("toy"), str(IMAGES), "<c>", "star", steps=1, batch=1)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("concept") / "c.safetensors"
    save_diffusers(path, Concept("<c>", word.vectors[0].detach()))
    return path


def test_every_entry_point_has_a_run():
    found = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "minti").rglob("*.py")
             if 'if __name__ == "__main__"' in p.read_text()}
    assert found == ENTRY_POINTS


def test_world_writes_captioned_renders(tmp_path):
    run("minti.toy.world", tmp_path, 3, 1)
    pngs, txts = sorted(tmp_path.glob("*.png")), sorted(tmp_path.glob("*.txt"))
    assert len(pngs) == len(txts) == 3 and all(is_png(p) for p in pngs)
    for txt in txts:
        words = txt.read_text().split()
        assert words and set(words) <= world.VOCABULARY, words


@pytest.mark.parametrize("which", ["init", "learned", "captions"])
def test_measure_g_on_each_set(which, concept_file, tmp_path):
    images = IMAGES
    if which == "captions":
        images = tmp_path / "renders"
        world.write_captioned_renders(images, 2)
    extra = {"init": ["--token", "star"], "learned": ["--concept", concept_file], "captions": []}[which]
    out = run("minti.run.measure_g", "--set", which, "--images", images, "--out", tmp_path / "g",
              "--step", 500, "--repeats", 1, "--projections", 1, "--device", "cpu", *extra)
    rows = read_csv(tmp_path / "g" / "g.csv")
    assert {r["reading"] for r in rows} == {"mse", "error-norm", "jacobian"}
    assert sorted({int(r["t"]) for r in rows}) == [0, 500]
    assert all(math.isfinite(float(r["g_mean"])) and float(r["g_mean"]) >= 0 for r in rows)
    assert {int(r["n"]) for r in rows} == {len(list(Path(images).glob("*.png")))}  # one draw per image
    assert is_png(tmp_path / "g" / "g.png") and out.count("--timesteps") == 6  # an interval and a t each


def test_toy_evaluate_a_concept_file(concept_file, tmp_path):
    out = run("minti.toy.evaluate", "--concept", concept_file, "--truth", CONCEPT, "--n", 1, "--steps", 1,
              "--out", tmp_path, "--threads", 1)
    assert "reconstruction" in out and "S* (<c>)" in out
    report = json.loads((tmp_path / "concept_eval.json").read_text())
    assert report["settings"]["n"] == 1 and report["settings"]["token"] == "<c>"
    assert set(report["shares"]) == {"concept", "prompt_only", "image_only"}
    assert report["shares"]["image_only"]["reconstruction"]["hits"] == 5  # the oracle reads its own renders
    assert all(0 <= s["share"] <= 1 for column in report["shares"].values() for s in column.values())
    assert is_png(tmp_path / "concept_eval.png")


def test_toy_oracle_trains_and_loads(tmp_path):
    run("minti.toy.oracle", "--out", tmp_path, "--steps", 1, "--batch-size", 2, "--eval-n", 8, "--threads", 1)
    from minti.toy.oracle import Oracle

    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved["accuracy_on_8_fresh_renders"]["clean"]) == {*world.ATTRIBUTES, "all"}
    assert Oracle.load(str(tmp_path)).predict(world.render_batch(2, 0)[0])["shape"].shape == (2,)


def test_toy_model_trains_and_loads(tmp_path):
    run("minti.toy.model", "--out", tmp_path / "model", "--work", tmp_path / "work", "--vae-steps", 1,
        "--unet-steps", 1, "--dataset-size", 64, "--threads", 1)
    sd = minti.load(str(tmp_path / "model"))
    assert sd.unet.config.sample_size == world.IMAGE_SIZE // 4 and len(sd.tokenizer) <= 600
    assert sd.tokenizer("a photo of a star", length=77).shape == (1, 77)


def test_spacetime_grid_row_and_plot(tmp_path):
    grid = tmp_path / "grid.csv"
    run("minti.toy.spacetime_eval", "--out", grid, "--methods", "TI 1 vector", "--steps", 1, "--seeds", 0,
        "--concepts", CONCEPT, "--n", 1)
    (row,) = read_csv(grid)
    assert (row["method"], row["concept"], row["step"], row["n"]) == ("TI 1 vector", CONCEPT, "1", "1")
    assert 0 <= float(row["reconstruction"]) <= 1 and float(row["loss"]) > 0
    out = run("minti.toy.spacetime_eval", "--out", grid, "--plot", tmp_path / "grid.png")
    assert "TI 1 vector" in out and is_png(tmp_path / "grid.png")


def test_many_learns_a_folder_of_concepts(tmp_path):
    shutil.copytree(IMAGES, tmp_path / "concepts" / "star")
    (tmp_path / "concepts" / "star" / "init.txt").write_text("star")
    run("minti.run.many", tmp_path / "concepts", "--out", tmp_path / "many", "--", "--steps", 1, "--batch", 1,
        "--no-evaluate", "--preview-every", 0)
    (row,) = read_csv(tmp_path / "many" / "summary.csv")
    assert (row["concept"], row["status"], row["steps"]) == ("star", "finished", "1")
    assert math.isfinite(float(row["final_loss"])) and "learned_embeds.safetensors" in row["files"].split()
    assert "already finished" in run("minti.run.many", tmp_path / "concepts", "--out", tmp_path / "many")
