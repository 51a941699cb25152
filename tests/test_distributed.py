"""train.py under torchrun: 2 processes (gloo, CPU) take the steps 1 process takes, and resume as 1 process.

Every rank draws the whole step's batch from the same seeded generator (so the draws are the 1-process
run's draws, in the same order) and keeps its contiguous slice of it; the word's gradient and the loss
are averaged over the ranks, the timestep sampler's readings gathered in rank order. So the 2-process
vectors equal the 1-process vectors up to float rounding (the mean of two half-batch means against one
mean), and every rank holds the same vectors, AdamW state and generator: rank 0 alone writes.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train_cli import base_args, images, model_dir, run, train, vectors  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# batch 8 split 4 + 4, accumulation 2 and the adaptive sampler: the gradient, the loss and the readings
# all cross the ranks. --save-every 2: the 1-process run leaves a snapshot at step 2 to compare with.
SETTINGS = {"--batch": 8, "--grad-accum": 2, "--timesteps": "adaptive", "--seed": 3, "--save-every": 2}
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # fp32: the same sums in another order
# Only a guard against a hung torchrun (the test fails with its output); never a speed requirement.
HANG_S = 1800


def torchrun(n, argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           os.path.join(ROOT, "train.py"), "--threads", "1", *map(str, argv)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_S)


@pytest.fixture(scope="module")
def runs(model_dir, images, tmp_path_factory):  # noqa: F811
    """A 1-process run of 4 steps, and a 2-process run of its first 2 steps, in their own folders."""
    root = tmp_path_factory.mktemp("distributed")
    one = root / "one"
    assert run(*base_args(model_dir, images, one, **SETTINGS, **{"--steps": 4})) == 0
    (root / "two").mkdir()
    two = root / "two" / "run"
    done = torchrun(2, base_args(model_dir, images, two, **SETTINGS, **{"--steps": 2}), cwd=root / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    return one, two, done


def test_two_processes_take_the_one_process_steps_and_write_one_set_of_files(runs):
    one, two, done = runs
    expected = vectors(one / "snapshots" / "step-000002" / "learned_embeds.safetensors")
    torch.testing.assert_close(vectors(two / "learned_embeds.safetensors"), expected, **TOLERANCE)
    assert not torch.equal(expected, vectors(one / "learned_embeds.safetensors"))  # steps 3-4 moved it
    # one set of files: the folder of a 1-process run, nothing beside it, one log line per step
    files = sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    assert files == ["checkpoint/state.pt", "config.json", "learned_embeds.safetensors", "log.csv",
                     "loss.png", "snapshots/step-000002/learned_embeds.safetensors",
                     "snapshots/step-000002/tiny.pt", "tiny.pt"]
    assert sorted(os.listdir(two.parent)) == ["run"]
    assert len((two / "log.csv").read_text().splitlines()) == 3
    assert done.stdout.count("Done: 2 steps") == 1  # rank 0 alone reports
    assert json.loads((two / "config.json").read_text())["processes"] == 2
    logged = [float(r.split(",")[1]) for r in (two / "log.csv").read_text().splitlines()[1:]]
    reference = [float(r.split(",")[1]) for r in (one / "log.csv").read_text().splitlines()[1:3]]
    assert logged == pytest.approx(reference, rel=1e-5)  # the loss of the whole batch, averaged over ranks


def test_a_two_process_run_resumes_as_one_process(runs):
    one, two, _ = runs
    assert run("--resume", two, "--steps", 4) == 0
    torch.testing.assert_close(vectors(two / "learned_embeds.safetensors"),
                               vectors(one / "learned_embeds.safetensors"), **TOLERANCE)
    assert len((two / "log.csv").read_text().splitlines()) == 5


def test_a_per_layer_word_takes_the_same_steps_on_two_processes(model_dir, images, tmp_path):  # noqa: F811
    """P+ (--per-layer, 2 time buckets) under torchrun: the same step as one process, as for TI. (NeTI's
    nested dropout draws its widths per rank, for that rank's rows: 2 processes train it, but do not
    reproduce the 1-process draws.)"""
    from safetensors.torch import load_file

    settings = {"--batch": 4, "--seed": 2, "--steps": 2, "--per-layer": True, "--multires": 2}
    assert run(*base_args(model_dir, images, tmp_path / "one", **settings)) == 0
    (tmp_path / "two").mkdir()
    done = torchrun(2, base_args(model_dir, images, tmp_path / "two" / "run", **settings), cwd=tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(folder / "tiny-per-layer.safetensors")["vectors"]
                for folder in (tmp_path / "one", tmp_path / "two" / "run"))
    assert one.shape[0] == 2 and not torch.equal(one[0], one[1])  # two time buckets, each its own steps
    torch.testing.assert_close(two, one, **TOLERANCE)


def test_the_batch_must_divide_by_the_number_of_processes(model_dir, images, tmp_path,  # noqa: F811
                                                         monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert run(*base_args(model_dir, images, tmp_path / "run", **{"--batch": 8})) == "error: " + (
        "--batch 8 does not divide by the 3 processes of torchrun (each takes batch / 3 images of "
        "every micro-batch); use a multiple of 3.")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the ranks' processes in /proc")
def test_ctrl_c_on_one_rank_stops_every_rank_after_the_step_resumably(model_dir, images,  # noqa: F811
                                                                       tmp_path):
    """Ctrl-C reaches rank 1 once rank 0 has saved step 1 (--save-every 1: the checkpoint is the event waited
    for, not a time): both ranks stop after the same step, rank 0 saves it, and it resumes."""
    out, env = tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    argv = base_args(model_dir, images, out, **{"--batch": 4, "--steps": 10000, "--save-every": 1})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), "--threads", "1", *map(str, argv)]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        hung = time.monotonic() + HANG_S  # a hang guard only
        while not (out / "checkpoint" / "state.pt").is_file():  # both ranks have taken step 1, rank 0 saved it
            assert launcher.poll() is None and time.monotonic() < hung, launcher.stdout.read()[-3000:]
            time.sleep(0.2)
        rank_1 = next(pid for pid in worker_pids(launcher.pid) if environ(pid).get("RANK") == "1")
        os.kill(rank_1, signal.SIGINT)  # Ctrl-C reaches rank 1 only
        printed = launcher.communicate(timeout=HANG_S)[0]
    finally:
        launcher.kill()
    assert "Interrupted (Ctrl-C) after step" in printed and "--resume" in printed, printed[-3000:]
    step = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert 0 < step < 10000 and len((out / "log.csv").read_text().splitlines()) == step + 1
    assert json.loads((out / "config.json").read_text())["status"] == "interrupted"
    assert run("--resume", out, "--steps", step + 1) == 0


def worker_pids(parent):
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children]


def environ(pid):
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)
