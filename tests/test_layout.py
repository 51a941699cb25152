"""The shape of minti/: imports run one way (DESIGN.md "Layout"; the contract is .importlinter, which the
README's test command runs too), and the contract really catches an arrow that points the wrong way."""
import os
import shutil
import subprocess
from pathlib import Path


def test_the_layering_contract_holds_and_catches_a_wrong_import(tmp_path):
    root = Path(__file__).resolve().parent.parent

    def lint(folder):
        return subprocess.run(["lint-imports", "--config", str(folder / ".importlinter")], cwd=folder,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(folder)})
    assert lint(root).returncode == 0, lint(root).stdout
    shutil.copytree(root / "minti", tmp_path / "minti", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / ".importlinter", tmp_path)
    for file, line in [("unet.py", "from .textual_inversion import splice"),  # a model imports the method
                       ("textual_inversion.py", "    from .run.cli import UsageError"),  # inside a function
                       ("multires.py", "from .io.concepts import Concept"),  # the method imports a file format
                       ("io/concepts.py", "from ..toy import world")]:  # io imports the toy
        path = tmp_path / "minti" / file
        original = path.read_text()
        body = f"def _late():\n{line}\n" if line.startswith(" ") else line + "\n"
        path.write_text(original + "\n\n" + body)
        result = lint(tmp_path)
        assert result.returncode != 0 and "BROKEN" in result.stdout, (file, result.stdout)
        path.write_text(original)

