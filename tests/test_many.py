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
