"""python -m minti.run.many: a folder of concept folders, one train.py process each, one summary table."""
import json
import shutil

import pytest

from minti.run import many
from test_train_cli import images, model_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_many_concepts_learn_one_process_each_and_are_summarised(model_dir, images, tmp_path,  # noqa: F811
                                                                 capsys):
    concepts = tmp_path / "concepts"
    for name in ("alpha", "beta"):
        shutil.copytree(images, concepts / name)
    (concepts / "beta" / "init.txt").write_text("dog\n")
    (concepts / "empty").mkdir()  # no images: not a concept
    out = tmp_path / "runs"
    train_args = ["--model", model_dir, "--init", "cat", "--batch", 2, "--steps", 2, "--threads", 1,
                  "--save-every", 0, "--preview-every", 0, "--no-evaluate"]
    assert many.main([str(concepts), "--out", str(out), "--", *map(str, train_args)]) == 0
    for name in ("alpha", "beta"):
        config = json.loads((out / name / "config.json").read_text())
        assert config["status"] == "finished" and config["config"]["token"] == f"<{name}>"
    assert json.loads((out / "beta" / "config.json").read_text())["config"]["init"] == "dog"  # its init.txt

    # the toy model's oracle result, as train.py's closing evaluation writes it
    (out / "alpha" / "concept_eval.json").write_text(json.dumps({"shares": {"concept": {
        "reconstruction": {"share": 0.75}, "editability": {"share": 0.5}}}}))
    capsys.readouterr()
    assert many.main([str(concepts), "--out", str(out), "--summary"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == many.COLUMNS
    alpha, beta = (line.split() for line in table[1:3])
    assert alpha[:3] == ["alpha", "finished", "2"] and alpha[4:6] == ["0.75", "0.50"]
    assert alpha[6:] == ["alpha.pt", "learned_embeds.safetensors"]
    assert beta[:3] == ["beta", "finished", "2"] and float(beta[3]) > 0
    assert (out / "summary.csv").read_text().startswith(",".join(many.COLUMNS))

    # a finished concept is not learned again; a job array's task learns one
    assert many.main([str(concepts), "--out", str(out), "--only", "1", "--", *map(str, train_args)]) == 0
    assert "beta: already finished" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Issue 27: every folder name, init.txt and flag checked before the first run; a resume forwards every flag;
# a stop reaches the train.py processes, and many waits for them

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from minti import toy  # noqa: E402
from minti.run import cli  # noqa: E402

# Only a guard against a hung process; never a speed requirement (the train.py processes take as long as the
# machine's load makes them take).
HANG_S = 1800
TOY = ["--threads", "1", "--batch", "2", "--no-evaluate", "--preview-every", "0", "--save-every", "1", "--init",
       "star"]


def toy_concepts(root, *names):
    for name in names:
        shutil.copytree(toy.concept_folder(), root / name)
    return root


def many_main(*argv):
    return cli.run_main(many.main, [str(a) for a in argv])


@pytest.mark.parametrize("make, argv, phrase", [
    (lambda c: (c / "my cat").mkdir(), [], "rename 'my cat' (holds a space)"),
    (lambda c: (c / "a" / "init.txt").write_bytes("caf\xe9".encode("latin-1")), [], "init.txt is not UTF-8"),
    (lambda c: (c / "a" / "init.txt").write_text(" \n"), [], "init.txt is empty"),
    (None, ["--gpus", "0,"], "an empty GPU id would give a job no GPU"),
    (None, ["--jobs", "0"], "--jobs must be at least 1"),
    (None, ["--only", "5"], "--only 5: there are 1 concepts"),
    (None, ["--out", "{file}"], "is a file, not a folder"),
    (None, ["--", "--images", "x"], "--images after '--'"),
    (None, ["--", "--out=x", "--token", "<t>"], "--out, --token after '--'"),
])
def test_many_refuses_before_any_run_starts(tmp_path, capsys, make, argv, phrase):
    concepts = toy_concepts(tmp_path / "concepts", "a")
    if make is not None:
        make(concepts)
        if (concepts / "my cat").is_dir():
            shutil.copy(concepts / "a" / "00.png", concepts / "my cat" / "00.png")
    (tmp_path / "a_file").write_text("x")
    argv = [str(a).replace("{file}", str(tmp_path / "a_file")) for a in argv]
    if "--out" not in argv and not any(a.startswith("--out") for a in argv):
        argv = ["--out", str(tmp_path / "runs"), *argv]
    code = many_main(concepts, *argv[:argv.index("--")] if "--" in argv else argv,
                     *(argv[argv.index("--"):] if "--" in argv else []))
    err = capsys.readouterr().err
    assert code == 2 and phrase in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_resumed_concept_gets_every_flag(tmp_path, capsys):
    """A concept that stopped part-way is resumed with all the flags after '--' (--steps=6 included), and a
    changed setting that the run keeps (--lr) is refused by train.py, not dropped."""
    concepts, out = toy_concepts(tmp_path / "concepts", "a"), tmp_path / "runs"
    assert many_main(concepts, "--out", out, "--", *TOY, "--steps", 2) == 0
    config = out / "a" / "config.json"

    def stopped():  # as a stop leaves it
        config.write_text(config.read_text().replace('"status": "finished"', '"status": "interrupted"'))
    stopped()
    assert many_main(concepts, "--out", out, "--", *TOY, "--steps=4") == 0
    assert json.loads(config.read_text())["step"] == 4
    stopped()
    assert many_main(concepts, "--out", out, "--", *TOY, "--steps", 6, "--lr", 0.5) == 1
    assert "--lr 0.5 differs from the run being resumed" in (out / "a" / "train.log").read_text()
    assert "a: FAILED (exit 2)" in capsys.readouterr().out


def test_a_stop_reaches_the_train_processes_and_many_waits(tmp_path):
    """SIGTERM to `python -m minti.run.many`: its train.py processes save their checkpoints and exit, many waits
    for them and exits 143; the same command again resumes them to the end."""
    concepts, out = toy_concepts(tmp_path / "concepts", "a", "b"), tmp_path / "runs"
    argv = [sys.executable, "-m", "minti.run.many", str(concepts), "--out", str(out), "--jobs", "2", "--",
            *TOY, "--steps", "400"]
    root = Path(many.__file__).resolve().parents[2]
    process = subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    end = time.monotonic() + HANG_S  # a hang guard only
    while not all((out / n / "checkpoint" / "state.pt").exists() for n in "ab"):
        assert process.poll() is None and time.monotonic() < end, process.communicate()[0]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    said = process.communicate(timeout=HANG_S)[0]
    assert process.returncode == 143 and "passed on to 2 train.py process(es)" in said, said
    for name in "ab":
        assert json.loads((out / name / "config.json").read_text())["status"] == "interrupted"
        assert not (out / name / ".lock").exists()  # its writer has ended
    done = subprocess.run(argv[:-1] + ["3"], cwd=root, capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0 or "nothing to do" in done.stdout, done.stdout + done.stderr
