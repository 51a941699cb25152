"""Bad input to train.py and sample.py, and runs stopped by signals: no silent wrong result, no traceback for
a user's mistake, no lost run.

Each case of CASES runs a script on the toy model (in this process, through the same top level as the
command line, minti/run/cli.py) and asserts its exit code (2: a bad argument, 1: a failure), a phrase of its
message, that no traceback was printed, and that no file was created or changed but those the case names.
A few run as real processes; the signal cases (SIGINT, SIGTERM, SIGHUP, a double Ctrl-C) resume bit for bit
as an uninterrupted run; a kill -9 loop checks that every file train.py and sample.py leave can be read.
"""
import contextlib
import csv
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from minti import toy
from minti.run import cli
from minti.io.concepts import load_concepts

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest)

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--threads", "1", "--batch", "2", "--no-evaluate", "--preview-every", "0", "--save-every", "0"]
WIDTH = 64  # the toy text encoder's width


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"minti_{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train, sample = load_script("train"), load_script("sample")


def invoke(script, args):
    """A script's command line in this process: (exit code, everything it printed)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if script == "train":
            code = train.main([str(a) for a in args])
        else:
            code = cli.run_main(sample.main, [str(a) for a in args])
    return code, out.getvalue() + err.getvalue()


def snapshot(folder):
    """{relative path: (size, sha1)} of every file under folder."""
    found = {}
    for path in Path(folder).rglob("*"):
        if path.is_file():
            found[str(path.relative_to(folder))] = (path.stat().st_size, hashlib.sha1(path.read_bytes()).hexdigest())
    return found


class Evil:
    """Unpickling this runs a shell command that creates a file: a malicious pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------------------------
# Materials: the files and folders the cases point at (never changed by any case)

@pytest.fixture(scope="module")
def m(tmp_path_factory):
    root = tmp_path_factory.mktemp("materials")
    p = {"marker": str(root / "PWNED")}

    def images(name, extra=None):
        folder = root / name
        folder.mkdir()
        for k in range(3):
            shutil.copy(Path(toy.concept_folder()) / f"0{k}.png", folder / f"0{k}.png")
        for rel, data in (extra or {}).items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        p[name] = str(folder)

    images("images")
    images("bad_caption", {"00.txt": "a photo of {} in the caf\xe9".encode("latin-1")})
    images("long_caption", {"00.txt": ("a photo of {} " + "on a very long table " * 40).encode()})
    images("corrupt", {"broken.png": b"\x89PNG\r\n\x1a\n truncated"})
    png = (Path(toy.concept_folder()) / "00.png").read_bytes()
    images("nested_plus", {"more/05.png": png})
    (root / "nested_only" / "sub").mkdir(parents=True)
    (root / "nested_only" / "sub" / "00.png").write_bytes(png)
    p["nested_only"] = str(root / "nested_only")
    (root / "empty").mkdir()
    p["empty"] = str(root / "empty")
    (root / "a_file.txt").write_text("not a folder\n")
    p["file"] = str(root / "a_file.txt")
    if os.geteuid() == 0:  # root writes anywhere but in /sys
        p["ro"] = "/sys/fs"
    else:
        (root / "ro").mkdir()
        os.chmod(root / "ro", 0o555)
        p["ro"] = str(root / "ro")
    (root / "not_diffusers").mkdir()
    (root / "not_diffusers" / "weights.bin").write_bytes(b"\0" * 64)
    p["not_diffusers"] = str(root / "not_diffusers")
    (root / "user_folder").mkdir()
    (root / "user_folder" / "config.json").write_text('{"my": "settings"}\n')
    (root / "user_folder" / "log.csv").write_text("my,own,log\n")
    p["user_folder"] = str(root / "user_folder")

    torch.save({"x": Evil(p["marker"])}, root / "evil.pt")
    p["evil"] = str(root / "evil.pt")
    with open(root / "evil_pickle.ckpt", "wb") as f:
        pickle.dump({"state_dict": Evil(p["marker"])}, f, protocol=4)
    p["evil_pickle"] = str(root / "evil_pickle.ckpt")
    (root / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(5000))
    p["random"] = str(root / "random.ckpt")
    (root / "random.safetensors").write_bytes(np.random.default_rng(1).bytes(5000))
    p["random_st"] = str(root / "random.safetensors")

    paper = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, WIDTH))})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": paper}, root / "paper_word.pt")
    p["paper"] = str(root / "paper_word.pt")
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, root / "sdxl.safetensors")
    p["sdxl"] = str(root / "sdxl.safetensors")
    save_file({"<wide>": torch.randn(1, 768)}, root / "wide.safetensors")
    p["wide"] = str(root / "wide.safetensors")
    save_file({"<a>": torch.randn(1, WIDTH), "<b>": torch.randn(1, WIDTH)}, root / "two.safetensors")
    p["two"] = str(root / "two.safetensors")
    for name in ("same1", "same2"):
        save_file({"<same>": torch.randn(1, WIDTH)}, root / f"{name}.safetensors")
        p[name] = str(root / f"{name}.safetensors")
    save_file({"<big>": torch.randn(60, WIDTH)}, root / "big.safetensors")
    p["big"] = str(root / "big.safetensors")

    code, said = invoke("train", FAST + ["--steps", 2, "--out", root / "finished"])
    assert code == 0, said
    p["finished"] = str(root / "finished")
    second_round_materials(root, p, png)
    state = root / "finished" / "checkpoint" / "state.pt"
    for name, write in {
        "truncated": lambda f: f.write_bytes(state.read_bytes()[:700]),
        "foreign": lambda f: torch.save({"weights": torch.zeros(3)}, f),
        "malicious": lambda f: torch.save({"step": 1, "config": Evil(p["marker"])}, f),
        "garbage": lambda f: f.write_bytes(np.random.default_rng(2).bytes(3000)),
    }.items():
        (root / name / "checkpoint").mkdir(parents=True)
        write(root / name / "checkpoint" / "state.pt")
        p[name] = str(root / name)
    yield p
    assert not os.path.exists(p["marker"]), "a malicious pickle ran"


def second_round_materials(root, p, png):
    """Issue 27's materials: folders that are not this run's, locks, odd images and captions, P+ / NeTI files."""
    p["root"] = str(root)
    for name, remove in (("other_run", ()), ("no_checkpoint", ("checkpoint",)), ("locked_run", ())):
        shutil.copytree(p["finished"], root / name)
        for rel in remove:
            shutil.rmtree(root / name / rel)
        p[name] = str(root / name)
    (root / "embeddings").mkdir()  # an AUTOMATIC1111 embeddings folder
    torch.save({"string_to_param": {"*": torch.randn(1, WIDTH)}, "name": "mine"}, root / "embeddings" / "concept.pt")
    p["embeddings"] = str(root / "embeddings")
    (root / "locked_empty").mkdir()
    p["locked_empty"] = str(root / "locked_empty")
    for folder in ("locked_run", "locked_empty"):  # a live writer's lock (flock: even this process's other open)
        lock = open(root / folder / ".lock", "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242 on another-host\n")
        lock.flush()
        p[f"{folder}_lock"] = lock  # held while the module's cases run
    dark = Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 200))  # 16-bit, max 199
    for name, extra in {"odd_files": {"._00.png": b"\x00\x05\x16\x07 AppleDouble", "00.txt": "\ufeff{} here".encode()},
                        "bomb": {"huge.png": huge_png_header(20000, 20000)},
                        "caption_1mb": {"00.txt": ("a photo of {} " + "very " * 200_000).encode()}}.items():
        (root / name).mkdir()
        for k in range(3):
            (root / name / f"0{k}.png").write_bytes(png)
        for rel, data in extra.items():
            (root / name / rel).write_bytes(data)
        p[name] = str(root / name)
    dark.save(root / "odd_files" / "03_dark16.png")
    os.mkfifo(root / "odd_files" / "04_pipe.png")  # would hang a reader
    save_file({"<huge>": torch.randn(10_000, WIDTH)}, root / "huge_word.safetensors")
    save_file({"star": torch.randn(1, WIDTH)}, root / "star.safetensors")  # a word called like a vocabulary word
    p["star"] = str(root / "star.safetensors")
    p["huge_word"] = str(root / "huge_word.safetensors")
    for kind in ("neti", "per-layer"):
        out = root / f"{kind}_run"
        code, said = invoke("train", FAST + [f"--{kind}", "--steps", 1, "--token", "<st>", "--out", out])
        assert code == 0, said
        p[kind] = str(out / f"st-{kind}.safetensors")


def huge_png_header(width, height):
    """The start of a PNG that says it is width x height (what PIL reads before refusing it)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grey: 50 MB of pixels, never written
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------
# The cases: (id, script, arguments, exit code, a phrase of the message, what may be created or changed)

T, S = "train", "sample"
NEW = {"out"}  # a case that succeeds writes into {tmp}/out only
CASES = [
    # train.py: settings that would fail later or silently mean something else
    ("steps-0", T, ["--steps", 0], 2, "--steps must be at least 1", ()),
    ("batch-0", T, ["--batch", 0], 2, "--batch must be at least 1", ()),
    ("grad-accum-0", T, ["--grad-accum", 0], 2, "--grad-accum must be at least 1", ()),
    ("vectors-0", T, ["--vectors", 0], 2, "--vectors must be at least 1", ()),
    ("vectors-1000", T, ["--vectors", 1000], 2, "would never train", ()),
    ("multires-0", T, ["--multires", 0], 2, "--multires must be at least 1", ()),
    ("multires-2000", T, ["--multires", 2000], 2, "buckets that never train", ()),
    ("lr-0", T, ["--lr", 0], 2, "nothing would train", ()),
    ("lr-negative", T, ["--lr", -1], 2, "--lr must be a positive number", ()),
    ("lr-inf", T, ["--lr", "inf"], 2, "--lr must be a positive number, got inf", ()),
    ("lr-nan", T, ["--lr", "nan"], 2, "--lr must be a positive number, got nan", ()),
    ("weight-decay-negative", T, ["--weight-decay", -0.1], 2, "--weight-decay must be 0 or", ()),
    ("flip-1.5", T, ["--flip", 1.5], 2, "--flip is a probability", ()),
    ("seed-overflow", T, ["--seed", 2 ** 70], 2, "--seed must lie in", ()),
    ("resolution-0", T, ["--resolution", 0], 2, "--resolution is a side in pixels", ()),
    ("resolution-30", T, ["--resolution", 30], 2, "a positive multiple of 8", ()),
    ("resolution-unet", T, ["--resolution", 40, "--steps", 1], 2, "this model needs a multiple of", ()),
    ("save-every-negative", T, ["--save-every", -1], 2, "--save-every must be 0 or more", ()),
    ("preview-every-negative", T, ["--preview-every", -1], 2, "--preview-every must be 0 or more", ()),
    ("lr-warmup-negative", T, ["--lr-warmup", -1], 2, "--lr-warmup must be 0 or more", ()),
    ("threads-negative", T, ["--threads", -1], 2, "--threads must be 0 or more", ()),
    ("timesteps-bad", T, ["--timesteps", "sometimes"], 2, "is not a timestep spec", ()),
    ("device-bogus", T, ["--device", "bogus"], 2, "is not a device", ()),
    ("steps-not-a-number", T, ["--steps", "abc"], 2, "invalid int value", ()),
    ("unknown-flag", T, ["--stpes", 3], 2, "unrecognized arguments", ()),
    ("what-bogus", T, ["--what", "bogus"], 2, "invalid choice", ()),
    ("precision-fp8", T, ["--precision", "fp8"], 2, "invalid choice", ()),
    ("token-known-word", T, ["--token", "star", "--steps", 1], 2, "is already a word of the vocabulary", ()),
    ("init-unknown", T, ["--init", "qxjzv", "--steps", 1], 2, "unknown to this vocabulary", ()),
    ("init-empty", T, ["--init", "", "--steps", 1], 2, "--init", ()),
    # train.py: the output folder, checked before the model is loaded
    ("out-is-a-file", T, ["--out", "{file}"], 2, "is a file, not a folder", ()),
    ("out-under-a-file", T, ["--out", "{file}/run"], 2, "is a file, so no folder can be made under it", ()),
    ("out-read-only", T, ["--out", "{ro}/run"], 2, "cannot write in", ()),
    ("out-user-folder", T, ["--out", "{user_folder}", "--steps", 1], 2, "files that this run did not write", ()),
    ("out-holds-a-run", T, ["--out", "{finished}", "--steps", 1], 2, "already holds a run", ()),
    ("default-out-read-only", T, ["--steps", 1], 2, "cannot write in", "chdir:ro"),
    # train.py: images and captions
    ("images-missing", T, ["--images", "{tmp}/nowhere"], 2, "no such folder", ()),
    ("images-missing-no-init", T, ["--model", "{random}", "--images", "{tmp}/nowhere"], 2, "no such folder", ()),
    ("images-needed", T, ["--model", "{random}"], 2, "--images DIR is required", ()),
    ("images-empty", T, ["--images", "{empty}"], 2, "it is empty", ()),
    ("images-only-in-subfolders", T, ["--images", "{nested_only}"], 2, "holds no images", ()),
    ("images-subfolders-noted", T, ["--images", "{nested_plus}", "--init", "star", "--steps", 1, "--out",
                                    "{tmp}/out"], 0, "subfolders of --images (more/) are not read", NEW),
    ("caption-not-utf8", T, ["--images", "{bad_caption}", "--init", "star", "--steps", 1], 1, "is not UTF-8", ()),
    ("caption-too-long", T, ["--images", "{long_caption}", "--init", "star", "--steps", 1], 2,
     "its end would be cut off", ()),
    ("image-corrupt", T, ["--images", "{corrupt}", "--init", "star", "--steps", 1], 2,
     "broken.png is not a readable image", ()),
    # train.py: models
    ("model-missing", T, ["--model", "{tmp}/sd15.ckpt", "--images", "{images}"], 2, "no such file or folder", ()),
    ("model-random-bytes", T, ["--model", "{random}", "--images", "{images}"], 1, "is not a PyTorch file at all", ()),
    ("model-malicious", T, ["--model", "{evil}", "--images", "{images}"], 1, "pickled Python objects", ()),
    ("model-plain-pickle", T, ["--model", "{evil_pickle}", "--images", "{images}"], 1, "a plain Python pickle", ()),
    ("model-random-safetensors", T, ["--model", "{random_st}", "--images", "{images}"], 1,
     "truncated or corrupt", ()),
    ("model-not-diffusers", T, ["--model", "{not_diffusers}", "--images", "{images}"], 1, "model_index.json", ()),
    # train.py: --resume
    ("resume-nowhere", T, ["--resume", "{tmp}/nowhere"], 2, "no checkpoint there", ()),
    ("resume-truncated", T, ["--resume", "{truncated}", "--steps", 5], 2, "damaged torch.save file", ()),
    ("resume-foreign", T, ["--resume", "{foreign}", "--steps", 5], 2, "is not a checkpoint train.py wrote", ()),
    ("resume-malicious", T, ["--resume", "{malicious}", "--steps", 5], 2, "pickled Python objects", ()),
    ("resume-garbage", T, ["--resume", "{garbage}", "--steps", 5], 2, "is not a PyTorch file at all", ()),
    ("resume-finished", T, ["--resume", "{finished}"], 0, "nothing to do", ()),
    ("resume-changed-lr", T, ["--resume", "{finished}", "--lr", 1.0, "--steps", 5], 2, "differs from the run", ()),
    ("resume-out-is-a-file", T, ["--resume", "{finished}", "--steps", 5, "--out", "{file}"], 2, "is a file", ()),
    # train.py: --from
    ("from-missing", T, ["--from", "{tmp}/word.pt"], 2, "no such file", ()),
    ("from-random-bytes", T, ["--from", "{random}"], 1, "not an embedding file", ()),
    ("from-malicious", T, ["--from", "{evil}"], 1, "Refusing to load", ()),
    ("from-two-words", T, ["--from", "{two}", "--steps", 1], 2, "a warm start needs a file with one", ()),
    ("from-other-family", T, ["--from", "{wide}", "--steps", 1], 1, "width 768", ()),
    ("from-sdxl", T, ["--from", "{sdxl}"], 1, "is an SDXL embedding", ()),
    ("from-paper-word", T, ["--from", "{paper}", "--steps", 1, "--out", "{tmp}/out"], 0,
     "called 'paper_word' after its file", NEW),
    ("from-file-with-name", T, ["--from", "{paper}:<renamed>", "--steps", 1, "--out", "{tmp}/out"], 0,
     "word: <renamed> = 1 vector(s)", NEW),
    # sample.py: flags
    ("cfg-nan", S, ["--cfg", "nan"], 2, "must be a finite number", ()),
    ("cfg-inf", S, ["--guidance", "inf"], 2, "must be a finite number", ()),
    ("eta-negative", S, ["--eta", -1], 2, "--eta must be a number >= 0", ()),
    ("eta-nan", S, ["--eta", "nan"], 2, "--eta must be a number >= 0", ()),
    ("width-0", S, ["--width", 0], 2, "--width is in pixels", ()),
    ("height-12", S, ["--height", 12], 2, "--height is in pixels", ()),
    ("sample-steps-0", S, ["--steps", 0], 2, "--steps must be at least 1", ()),
    ("sample-steps-1000", S, ["--steps", 1000], 2, "at most 999 steps", ()),
    ("n-0", S, ["--n", 0], 2, "--n must be at least 1", ()),
    ("sample-seed-overflow", S, ["--seed", -2 ** 64], 2, "--seed must lie in", ()),
    ("scheduler-euler", S, ["--scheduler", "euler"], 2, "invalid choice", ()),
    ("drop-bogus", S, ["--drop", "bogus"], 2, "invalid choice", ()),
    ("sample-device-bogus", S, ["--device", "gpu0"], 2, "is not a device", ()),
    ("sample-model-missing", S, ["--model", "{tmp}/sd15"], 2, "no such file or folder", ()),
    ("sample-model-random", S, ["--model", "{random}"], 1, "is not a PyTorch file at all", ()),
    ("sample-model-malicious", S, ["--model", "{evil}"], 1, "pickled Python objects", ()),
    # sample.py: --out
    ("out-jpg", S, ["--out", "{tmp}/x.jpg"], 2, "sample.py writes PNG files", ()),
    ("out-png-read-only", S, ["--out", "{ro}/x.png"], 2, "cannot write in", ()),
    ("out-folder-read-only", S, ["--out", "{ro}/images"], 2, "cannot write in", ()),
    ("out-folder-is-a-file", S, ["--out", "{file}"], 2, "is a file, not a folder", ()),
    ("out-png-under-a-file", S, ["--out", "{file}/x.png"], 2, "its folder", ()),
    ("out-png-is-a-folder", S, ["--out", "{tmp}/folder.png"], 2, "is a folder", "mkdir:folder.png"),
    # sample.py: concept files
    ("embeds-missing", S, ["--embeds", "{tmp}/word.pt"], 2, "no such file", ()),
    ("embeds-random", S, ["--embeds", "{random}"], 1, "not an embedding file", ()),
    ("embeds-malicious", S, ["--embeds", "{evil}"], 1, "Refusing to load", ()),
    ("embeds-other-family", S, ["--embeds", "{wide}", "--prompt", "a <wide>"], 1, "width 768", ()),
    ("embeds-same-name", S, ["--embeds", "{same1}", "{same2}", "--prompt", "a <same>"], 2, "FILE:NAME", ()),
    ("embeds-name-then-bad-name", S, ["--embeds", "{same1}:x y"], 2, "no such file", ()),
    ("embeds-paper-word", S, ["--embeds", "{paper}", "--prompt", "a paper_word", "--steps", 2, "--out",
                              "{tmp}/out/a.png"], 0, "called 'paper_word' after its file", NEW),
    ("embeds-paper-word-named", S, ["--embeds", "{paper}:<star2>", "{same1}:<other>", "--prompt",
                                    "a <star2> and <other>", "--steps", 2, "--out", "{tmp}/out/a.png"], 0,
     "<star2> (1 vector(s))", NEW),
    # sample.py: prompts
    ("prompt-unknown-word", S, ["--prompt", "a <nope> here"], 2, "<nope> is not a loaded concept", ()),
    ("prompt-time-on-ordinary-word", S, ["--embeds", "{same1}", "--prompt", "a <same|0.5|>"], 2,
     "is an ordinary word", ()),
    ("prompt-full-time-on-ordinary-word", S, ["--embeds", "{same1}", "--prompt", "a <same[0.3]>"], 2,
     "a resolution changes nothing", ()),
    ("prompt-bad-resolution", S, ["--embeds", "{same1}", "--prompt", "a <same(1.5)>"], 2, "is not in [0, 1]", ()),
    ("negative-unknown-word", S, ["--negative", "<nope>"], 2, "<nope> is not a loaded concept", ()),
    ("prompt-too-long", S, ["--prompt", "a red star " * 700, "--steps", 2, "--out", "{tmp}/out/a.png"], 0,
     "are cut off", NEW),
    ("prompt-word-cut-off", S, ["--embeds", "{big}", "--prompt", "a photo of a red star " * 3 + "<big>"], 2,
     "does not fit its learned words", ()),
] + [
    # issue 27. A run folder has one writer and one owner: no file that is not this run's is written over
    ("resume-out-other-run", T, ["--resume", "{finished}", "--steps", 5, "--out", "{other_run}"], 2,
     "already holds a run; continue it with --resume", ()),
    ("resume-out-user-folder", T, ["--resume", "{finished}", "--steps", 5, "--out", "{user_folder}"], 2,
     "files that this run did not write (config.json, log.csv)", ()),
    ("resume-out-new-folder", T, ["--resume", "{finished}", "--steps", 3, "--out", "{tmp}/out"], 0, "Done: 3 steps",
     NEW),
    ("out-a1111-embeddings", T, ["--out", "{embeddings}", "--steps", 1], 2, "did not write (concept.pt)", ()),
    ("out-run-without-checkpoint", T, ["--out", "{no_checkpoint}", "--steps", 1], 2,
     "no checkpoint to continue from", ()),
    ("out-is-the-images", T, ["--images", "{images}", "--out", "{images}", "--steps", 1], 2,
     "is (or holds) the --images folder", ()),
    ("out-holds-the-images", T, ["--images", "{images}", "--out", "{root}", "--steps", 1], 2,
     "is (or holds) the --images folder", ()),
    ("out-locked-by-a-writer", T, ["--out", "{locked_empty}", "--steps", 1], 2,
     "is being written by another train.py (pid 4242 on another-host", ()),
    ("resume-locked-by-a-writer", T, ["--resume", "{locked_run}", "--steps", 5], 2,
     "is being written by another train.py (pid 4242 on another-host", ()),
    ("out-stale-lock-taken-over", T, ["--out", "{tmp}/out", "--steps", 1], 0, "which is not running any more",
     "stale-lock:out"),
    # everything that can fail at the end is checked at the start: the word's name, its files, the disk, the flags
    ("token-trailing-space", T, ["--token", "<cat> ", "--steps", 1], 2, "--token '<cat> ' holds a space", ()),
    ("token-inner-space", T, ["--token", "a b", "--steps", 1], 2, "holds a space", ()),
    ("token-500-characters", T, ["--token", "x" * 500, "--steps", 1], 2, "is 500 characters long (at most 64)",
     ()),
    ("token-path-separator", T, ["--token", "<a/b>", "--steps", 1], 2, "holds a path separator '/'", ()),
    ("token-control-character", T, ["--token", "<a\x07b>", "--steps", 1], 2, "invisible character U+0007", ()),
    ("token-empty-brackets", T, ["--token", "<>", "--steps", 1], 2, "is empty", ()),
    ("token-prompt-syntax", T, ["--token", "<a|b>", "--steps", 1], 2, "which prompts use for their syntax", ()),
    ("init-letters", T, ["--init", "qxjzvar", "--steps", 1], 2, "mostly single letters", ()),
    ("device-xla", T, ["--device", "xla", "--steps", 1], 2, "minti runs on cpu, cuda (NVIDIA) or mps", ()),
    ("from-10000-vectors", T, ["--from", "{huge_word}", "--steps", 1], 2, "holds 10000 vectors", ()),
    ("init-with-from", T, ["--from", "{paper}", "--init", "star", "--steps", 1], 2, "--init is not read with --from",
     ()),
    ("start-output-with-from", T, ["--from", "{paper}", "--start", "output", "--steps", 1], 2,
     "--start output starts from init words", ()),
    ("from-neti-no-bypass", T, ["--neti", "--from", "{neti}", "--no-bypass", "--steps", 1], 2,
     "which the file keeps: drop --no-bypass", ()),
    ("from-neti-vectors", T, ["--neti", "--from", "{neti}", "--vectors", 2, "--steps", 1], 2, "drop --vectors", ()),
    ("from-per-layer-multires", T, ["--per-layer", "--from", "{per-layer}", "--multires", 3, "--steps", 1], 2,
     "has 1 time bucket(s), but --multires is 3", ()),
    ("resume-changed-from", T, ["--resume", "{finished}", "--from", "{paper}", "--steps", 5], 2,
     "--from '", ()),
    ("out-disk-full-at-the-start", T, ["--steps", 1, "--out", "{tmp}/out"], 2, "MB free on its disk", "no-space"),
    # no silent drop, no silently wrong result: flags that do nothing refused, a diverging run stopped
    ("no-bypass-without-neti", T, ["--no-bypass", "--steps", 1], 2, "--no-bypass is NeTI's", ()),
    ("pull-without-start-output", T, ["--pull", 0.1, "--steps", 1], 2, "--pull weighs --start output's pull", ()),
    ("stop-window-without-stop", T, ["--stop-window", 10, "--steps", 1], 2, "is a setting of --stop auto", ()),
    ("preview-prompt-without-previews", T, ["--preview-prompt", "a {{}}", "--steps", 1], 2,
     "needs --preview-every N", ()),
    ("multires-one-bucket", T, ["--multires", 10, "--timesteps", 500, "--steps", 1], 2,
     "fall in 1 of the 10 time buckets, so 9 would never train", ()),
    ("multires-interval", T, ["--multires", 10, "--timesteps", "400-600", "--steps", 1], 2,
     "fall in 2 of the 10 time buckets", ()),
    ("lr-1e6-diverges", T, ["--lr", 1e6, "--steps", 4, "--save-every", 1, "--out", "{tmp}/out"], 1,
     "x a typical word's", NEW),
    # images and captions: 16-bit, BOM, macOS "._" files and pipes read right or skipped with a note
    ("images-odd-files", T, ["--images", "{odd_files}", "--init", "star", "--steps", 1, "--out", "{tmp}/out"], 0,
     "04_pipe.png is not a regular file", NEW),
    ("image-20000-pixels-square", T, ["--images", "{bomb}", "--init", "star", "--steps", 1], 2,
     "huge.png is too large to open safely", ()),
    # every error names the file and the flag, fits one screen, and says what to do
    ("caption-1mb", T, ["--images", "{caption_1mb}", "--init", "star", "--steps", 1], 2,
     "characters) (for", ()),
]


# sample.py's cases of issue 27: their checks are in minti/run/cli.py; each row runs once sample.py calls them
SAMPLE_SOURCE = (ROOT / "sample.py").read_text()
SAMPLE_CASES = [(*case, helper) for helper, cases in {
    "check_spacetime_prompts": [
        ("prompt-neti-time", S, ["--embeds", "{neti}", "--prompt", "a <st|0.5|>"], 2, "would change nothing", ()),
        ("prompt-neti-k-not-whole", S, ["--embeds", "{neti}", "--prompt", "a <st:1.5>"], 2, "K is a whole number", ()),
        ("prompt-neti-k-negative", S, ["--embeds", "{neti}", "--prompt", "a <st:-1>"], 2, "K is a whole number", ()),
        ("prompt-neti-capitals", S, ["--embeds", "{neti}", "--prompt", "a <ST:4>"], 2, "as its file spells it", ()),
        ("prompt-neti-space", S, ["--embeds", "{neti}", "--prompt", "a <st: 4>"], 2, "K is a whole number", ()),
        ("prompt-neti-typo", S, ["--embeds", "{neti}", "--prompt", "a <stt>"], 2, "<stt> is not a loaded concept", ()),
        ("prompt-pplus-time", S, ["--embeds", "{per-layer}", "--prompt", "a <st|0.5|>"], 2, "would change nothing",
         ()),
        ("truncation-ordinary-word", S, ["--embeds", "{same1}", "--prompt", "a <same>", "--truncation", 4], 2,
         "no NeTI word is loaded", ()),
        ("truncation-per-layer", S, ["--embeds", "{per-layer}", "--prompt", "a <st>", "--truncation", 4], 2,
         "<st> is a per-layer word", ())],
    "check_new_words": [
        ("embeds-word-is-a-word", S, ["--embeds", "{star}", "--prompt", "a star"], 2,
         "every 'star' in a prompt would become the learned word", ())],
}.items() for case in cases]


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_bad_sample_input(case, m, tmp_path, monkeypatch):
    if f"cli.{case[-1]}(" not in SAMPLE_SOURCE:
        pytest.skip(f"sample.py does not call cli.{case[-1]} yet")
    test_bad_input(case[:-1], m, tmp_path, monkeypatch)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, m, tmp_path, monkeypatch):
    name, script, args, code, phrase, may_change = case
    paths = {**m, "tmp": str(tmp_path)}
    args = [str(a).format(**paths) if isinstance(a, str) else a for a in args]
    if script == T and not any(str(a).startswith("--threads") for a in args):
        args = FAST + args
    elif script == S:
        args = ["--no-progress"] + args
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # a default --out would land here (nothing may)
    if may_change == "chdir:ro":
        monkeypatch.chdir(m["ro"])
        may_change = ()
    elif may_change == "mkdir:folder.png":
        (tmp_path / "folder.png").mkdir()
        may_change = ()
    elif may_change == "stale-lock:out":  # a lock file left by a writer killed with -9
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / ".lock").write_text("pid 999999 on a-host-long-gone\n")
        may_change = NEW
    elif may_change == "no-space":
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 12, 10 ** 12, 50_000))
        may_change = ()
    before, materials = snapshot(tmp_path), snapshot(Path(m["file"]).parent)
    got, said = invoke(script, args)
    assert got == code, said
    assert phrase in said, said
    assert "Traceback" not in said, said
    error = said[said.index("error:"):] if "error:" in said else ""
    assert len(error) < 1500 and error.count("\n") < 12, error  # one screen, whatever the input's size
    assert snapshot(Path(m["file"]).parent) == materials  # no material was ever changed
    changed = {k for k in set(before) | set(snapshot(tmp_path)) if before.get(k) != snapshot(tmp_path).get(k)}
    assert {k.split(os.sep)[0] for k in changed} <= set(may_change), changed
    assert not os.path.exists(m["marker"])


def test_learned_files_are_readable_by_other_users(m):
    """atomic_write gives every file the umask's mode (safetensors alone would write 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for path in Path(m["finished"]).rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_file_name_splitting(tmp_path):
    existing = tmp_path / "odd:name.pt"
    existing.write_bytes(b"")
    assert cli.split_file_and_name(str(existing)) == (str(existing), None)  # a path that exists stays whole
    assert cli.split_file_and_name("words/cat.pt:<cat>") == ("words/cat.pt", "<cat>")
    assert cli.split_file_and_name("C:\\words\\cat.pt") == ("C:\\words\\cat.pt", None)  # a drive letter
    assert cli.split_file_and_name("C:cat") == ("C:cat", None)
    assert cli.split_file_and_name("cat.pt:") == ("cat.pt:", None)
    assert cli.split_file_and_name("cat.pt:a b") == ("cat.pt:a b", None)


def test_grid_labels_keep_their_spaces():
    """A label drawn in the grid is as wide as its letters and spaces: "a photo of a" is not "a photoofa"."""
    from PIL import ImageDraw

    from minti.toy.evaluate import label_font

    font = label_font()
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    spaced, packed = draw.textlength("a photo of a", font=font), draw.textlength("aphotoofa", font=font)
    assert spaced - packed >= 3 * 0.6 * draw.textlength("n", font=font)


def test_ctrl_c_during_start_up(m, tmp_path, monkeypatch):
    import minti

    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minti, "load", interrupted_load)
    for script, args in ((T, FAST + ["--steps", 2, "--out", tmp_path / "run"]), (S, ["--out", tmp_path / "x.png"])):
        code, said = invoke(script, args)
        assert code == 130 and "Stopped (SIGINT)" in said and "Traceback" not in said, said
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error, phrase", [(torch.OutOfMemoryError("CUDA out of memory."), "--grad-accum 4"),
                                           (TypeError("a bug"), "MINTI_DEBUG=1"),
                                           (PermissionError(13, "Permission denied", "/x"), "/x: Permission denied")])
def test_other_errors_are_one_line(m, tmp_path, monkeypatch, error, phrase):
    import minti

    def failing_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(minti, "load", failing_load)
    for script, args in ((T, FAST + ["--steps", 2, "--out", tmp_path / "run"]), (S, ["--out", tmp_path / "x.png"])):
        code, said = invoke(script, args)
        assert code == 1 and phrase in said and "Traceback" not in said, said
    monkeypatch.setenv("MINTI_DEBUG", "1")
    with pytest.raises(type(error)):
        invoke(T, FAST + ["--steps", 2, "--out", tmp_path / "run"])


def test_second_ctrl_c_while_saving_is_ignored(m, tmp_path, monkeypatch, capfd):
    """Ctrl-C at step 3, and again in the middle of the save it starts: the save completes, config.json
    says "interrupted", and the run resumes bit for bit."""
    import minti.textual_inversion as ti

    real_step, real_save, calls = ti.train_step, train.save, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, through cli.Signals
        return real_step(*args, **kwargs)

    def save(run, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, while saving
        return real_save(run, **kwargs)

    monkeypatch.setattr(ti, "train_step", step)
    monkeypatch.setattr(train, "save", save)
    out = tmp_path / "run"
    code, said = invoke(T, FAST + ["--steps", 4, "--seed", 3, "--out", out])
    assert code == 130 and "Traceback" not in said, said
    assert "already stopping" in capfd.readouterr().err  # written by the signal handler, to fd 2
    assert json.loads((out / "config.json").read_text())["status"] == "interrupted"
    # the stop waits for step 3 to end (a step stopped halfway may have moved the vectors already)
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(ti, "train_step", real_step)
    monkeypatch.setattr(train, "save", real_save)
    assert invoke(T, ["--resume", out])[0] == 0
    assert invoke(T, FAST + ["--steps", 4, "--seed", 3, "--out", tmp_path / "whole"])[0] == 0
    assert torch.equal(vectors(out), vectors(tmp_path / "whole"))


def test_ctrl_c_while_a_step_is_logged_and_saved_waits_for_the_save(m, tmp_path, monkeypatch):
    """Ctrl-C while the loop saves its periodic checkpoint (after_step): the stop waits until the step's log
    and checkpoint are written, so the state's step, its vectors and the log agree; resume is bit for bit."""
    real_save, calls = train.save, []

    def save(run, **kwargs):
        calls.append(run.step)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # lands in the loop's bookkeeping: deferred (stops_wait)
        return real_save(run, **kwargs)

    monkeypatch.setattr(train, "save", save)
    out = tmp_path / "run"
    code, said = invoke(T, [*FAST[:-1], "1", "--steps", 5, "--seed", 4, "--out", out])
    assert code == 130 and "after step 2" in said, said
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    assert (out / "snapshots" / "step-000002").is_dir()  # the periodic save finished before the stop
    assert (out / "log.csv").read_text().count("\n") == 3
    monkeypatch.setattr(train, "save", real_save)
    assert invoke(T, ["--resume", out])[0] == 0
    assert invoke(T, FAST + ["--steps", 5, "--seed", 4, "--out", tmp_path / "whole"])[0] == 0
    assert torch.equal(vectors(out), vectors(tmp_path / "whole"))


def vectors(run):
    return load_file(Path(run) / "learned_embeds.safetensors")["<concept>"]


# ----------------------------------------------------------------------------------------------
# Real processes: the command line's own top level, signals, kill -9

def start(script, *args, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / f"{script}.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})


# How long a test waits for a process before calling it hung: only a guard (the test then fails with what the
# process said), never a speed requirement; a loaded machine may take minutes where an idle one takes seconds.
HANG_S = 1800


def wait_for(path, process):
    """Wait until `path` exists (the event), failing at once if the process ends first."""
    wait_until(lambda: os.path.exists(path), process, f"{path} never appeared")


def wait_until(condition, process, what="the condition never held"):
    hung = time.monotonic() + HANG_S
    while not condition():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < hung, f"{what} (hang guard, {HANG_S} s)"
        time.sleep(0.02)


def logged_steps(run):
    """Steps in a run's log.csv (written atomically): 0 before the first save."""
    path = Path(run) / "log.csv"
    return path.read_text().count("\n") - 1 if path.is_file() else 0


def test_command_line_exit_codes_and_debug_tracebacks(m, tmp_path):
    """As processes: a usage error (2), a failure (1), each without a traceback; MINTI_DEBUG=1 shows it."""
    runs = [start("train", "--lr", "inf"), start("sample", "--model", m["random"], "--out", tmp_path / "x.png"),
            start("sample", "--cfg", "nan", env={"MINTI_DEBUG": "1"})]
    a, b, c = [p.wait(HANG_S) for p in runs]
    said = [p.stdout.read() for p in runs]
    assert (a, b) == (2, 1) and not any("Traceback" in s for s in said[:2]), said
    assert "error: --lr must be a positive number, got inf" in said[0]
    assert c == 1 and "Traceback" in said[2] and "UsageError" in said[2]


STOPS = {"SIGINT": ((signal.SIGINT,), 130), "SIGTERM": ((signal.SIGTERM,), 143),
         "SIGHUP": ((signal.SIGHUP,), 129), "double-SIGINT": ((signal.SIGINT, signal.SIGINT), 130)}


def test_signals_save_a_run_that_resumes_bit_for_bit(tmp_path):
    """Ctrl-C, SIGTERM (timeout, docker stop, Slurm), SIGHUP (a closed terminal) and a double Ctrl-C, each to
    its own training process (run side by side): a resumable checkpoint, config.json "interrupted", exit
    128 + the signal, and --resume ends where an uninterrupted run of as many steps ends, bit for bit."""
    processes = {name: start("train", *FAST, "--steps", 400, "--seed", 1, "--out", tmp_path / name)
                 for name in STOPS}
    for name, process in processes.items():
        wait_for(tmp_path / name / "config.json", process)
    time.sleep(0.3)  # a moment into training; any moment is right (step 0 included): not a bound
    for name, process in processes.items():
        for s in STOPS[name][0]:
            process.send_signal(s)
            time.sleep(0.01)
    steps = {}
    for name, process in processes.items():
        said, out = process.communicate(timeout=HANG_S)[0], tmp_path / name
        assert process.returncode == STOPS[name][1], (name, said)
        assert "Traceback" not in said and "python train.py --resume" in said, (name, said)
        assert json.loads((out / "config.json").read_text())["status"] == "interrupted", name
        steps[name] = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]
        assert 0 <= steps[name] < 400
        assert invoke(T, ["--resume", out, "--steps", steps[name] + 2])[0] == 0
        assert (out / "log.csv").read_text().count("\n") == steps[name] + 3, name  # header + each step once
    for total in sorted({k + 2 for k in steps.values()}):
        assert invoke(T, FAST + ["--steps", total, "--seed", 1, "--out", tmp_path / f"whole-{total}"])[0] == 0
    for name, step in steps.items():
        assert torch.equal(vectors(tmp_path / name), vectors(tmp_path / f"whole-{step + 2}")), name


def readable(path):
    """Open a file train.py or sample.py wrote, by its kind; an exception if it is damaged."""
    suffix = path.suffix
    if path.name == "state.pt":
        return torch.load(path, weights_only=True)["step"]
    if suffix in (".safetensors", ".pt"):
        return load_concepts(path) if "multires" not in path.name else load_file(path)
    if suffix == ".png":
        with Image.open(path) as image:
            return image.load()
    if suffix == ".json":
        return json.loads(path.read_text())
    if suffix == ".csv":
        rows = list(csv.reader(path.read_text().splitlines()))
        assert len({len(r) for r in rows}) == 1, path
        return rows
    if path.name == ".lock":  # the run folder's lock, left by a killed writer: "pid N on HOST"
        return re.fullmatch(r"pid \d+ on \S+\n", path.read_text()).group(0)
    raise AssertionError(f"an unexpected file {path}")


def test_kill_9_leaves_every_file_readable(tmp_path):
    """8 kill -9 at seeded moments of train.py (saving every step, previewing every other; start-up included)
    and of sample.py (while it writes its PNGs): every file they leave opens, and the run resumes. The atomic
    writes leave at most hidden temporary files (.name.xxxx.tmp). Each moment is an event and a seeded delay
    after it (a resumed run: in its start-up, or after 1-3 more logged steps), so no assertion depends on how
    fast the machine is; where within a step the delay lands still varies with its load, by design."""
    rng, out, images = random.Random(0), tmp_path / "run", tmp_path / "images"
    kills, whole = 0, start("sample", "--no-progress", "--n", 8, "--steps", 3, "--out", images)  # to the end
    for k in range(9):
        if k == 4:
            assert whole.wait(HANG_S) == 0
            continue
        if k == 8:  # sample.py again, killed while it writes its 8 PNGs over the first run's
            process = start("sample", "--no-progress", "--n", 8, "--steps", 3, "--seed", k, "--out", images)
            wait_for(images / f"p00_00_seed{k}.png", process)
        elif k == 0:  # a new run, killed once it has saved a step
            process = start("train", *FAST, "--steps", 400, "--out", out, "--save-every", 1, "--preview-every", 2)
            wait_for(out / "log.csv", process)
            time.sleep(rng.uniform(0.0, 0.5))
        else:  # resumed, and killed while starting or loading, or once it has logged 1-3 more steps: then
            # training, saving or previewing (every step saves, every other previews)
            logged, more = logged_steps(out), rng.randint(0, 3)
            process = start("train", "--resume", out, "--steps", 400)
            wait_until(lambda: logged_steps(out) >= logged + more, process, f"step {logged + more} never logged")
            time.sleep(rng.uniform(0.0, 1.0) if more else rng.uniform(0.0, 3.0))
        process.kill()
        process.communicate()
        kills += 1
    assert kills == 8
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
    assert any(p.name == "state.pt" for p in files) and any(p.suffix == ".png" for p in files)
    for path in files:
        readable(path)
    step = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert invoke(T, ["--resume", out, "--steps", step + 1])[0] == 0
    assert not list(out.rglob("*.tmp"))  # the resumed run removed what the kills left
    assert not (out / ".lock").exists()  # and took over the stale lock, and let it go at its end


def test_kill_9_in_the_middle_of_a_save(tmp_path):
    """kill -9 once the third checkpoint is written to its temporary file but before it takes the name
    state.pt: the previous checkpoint (step 2) is intact, every file opens, and the run resumes from it."""
    out = tmp_path / "run"
    script = (f"import os, runpy, sys, time\n"
              f"sys.argv = ['train.py', *{[str(a) for a in FAST]!r}, '--steps', '400', '--save-every', '1', "
              f"'--out', {str(out)!r}]\n"
              f"real, saves = os.replace, []\n"
              f"def replace(a, b):\n"
              f"    if b.endswith('state.pt'):\n"
              f"        saves.append(b)\n"
              f"        if len(saves) == 3:\n"
              f"            open({str(tmp_path / 'saving')!r}, 'w').close()\n"
              f"            time.sleep(3600)\n"  # killed long before the hour: not a bound
              f"    return real(a, b)\n"
              f"os.replace = replace\n"
              f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(tmp_path / "saving", process)
    process.kill()
    process.communicate()
    assert [p.name for p in (out / "checkpoint").iterdir() if p.name.endswith(".tmp")]  # the unfinished one
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    for path in out.rglob("*"):
        if path.is_file() and not path.name.endswith(".tmp"):
            readable(path)
    assert invoke(T, ["--resume", out, "--steps", 4])[0] == 0
    assert not list(out.rglob("*.tmp"))
    assert invoke(T, FAST + ["--steps", 4, "--out", tmp_path / "whole"])[0] == 0
    assert torch.equal(vectors(out), vectors(tmp_path / "whole"))


# ----------------------------------------------------------------------------------------------
# Issue 27, beyond the table: several writers, a full disk, a diverging norm, images that moved

def test_two_writers_of_one_run_folder(tmp_path):
    """A second train.py on the folder another is writing (a new run, or --resume of the same run) is refused
    with the writer's pid and host, and changes nothing; after a SIGTERM the first is resumable, and resumes."""
    out = tmp_path / "run"
    first = start("train", *FAST, "--steps", 400, "--save-every", 1, "--out", out)
    wait_for(out / "checkpoint" / "state.pt", first)
    for args in (FAST + ["--steps", 400, "--out", out], ["--resume", out, "--steps", 400]):
        code, said = invoke(T, args)
        assert code == 2 and f"is being written by another train.py (pid {first.pid} on" in said, said
    first.send_signal(signal.SIGTERM)
    assert first.wait(HANG_S) == 143
    step = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert not (out / ".lock").exists()
    assert invoke(T, ["--resume", out, "--steps", step + 1])[0] == 0


def test_a_full_disk_names_the_path_and_the_resume_command(tmp_path, monkeypatch):
    real, calls = train.runs.save_state, []

    def full(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", os.path.join(os.path.dirname(path), ".state.pt.1a2b.tmp"))
        return real(path, state)

    monkeypatch.setattr(train.runs, "save_state", full)
    out = tmp_path / "run"
    code, said = invoke(T, FAST + ["--steps", 4, "--save-every", 1, "--out", out])
    assert code == 1 and "Traceback" not in said, said
    assert "No space left on device" in said and ".state.pt.1a2b.tmp" in said
    assert f"python train.py --resume {out}" in said
    monkeypatch.setattr(train.runs, "save_state", real)
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 1
    assert invoke(T, ["--resume", out])[0] == 0 and not (out / ".lock").exists()


@pytest.mark.parametrize("save_every, stopped_at", [(1, 3), (0, 3)])
def test_a_norm_far_beyond_the_vocabulary_stops_the_run_and_names_the_last_good_snapshot(
        tmp_path, monkeypatch, save_every, stopped_at):
    """The vectors' norm past NORM_LIMIT x a typical word's at step 3: with a save every step, caught before
    step 3 is saved (the last good snapshot is step 2's); without, a step late (runs.NormWatch)."""
    real, steps = train.word_norm, []

    def norm(word):
        steps.append(1)
        return real(word) * (1e6 if len(steps) >= stopped_at else 1)

    monkeypatch.setattr(train, "word_norm", norm)
    out = tmp_path / "run"
    code, said = invoke(T, FAST + ["--steps", 6, "--save-every", save_every, "--out", out])
    assert code == 1 and f"training diverged at step {stopped_at}: the vectors' norm is" in said, said
    assert "x a typical word's" in said and "lower --lr" in said
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "stopped: diverging norm"
    if save_every:
        assert f"{out / 'snapshots' / 'step-000002'} (the last snapshot)" in said
        assert not (out / "snapshots" / "step-000003").exists()
        assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    else:
        assert "none (no snapshot was saved before it)" in said and "last checkpoint: none" in said


def test_resume_finds_its_images_wherever_they_are(tmp_path, monkeypatch):
    """A new run records its --images as an absolute path; a resumed run may name the same images by another
    relative path (another working directory) or where they moved; other images are refused, and a folder
    that is gone asks for --images."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copytree(toy.concept_folder(), a / "images")
    monkeypatch.chdir(a)
    out = tmp_path / "run"
    assert invoke(T, FAST + ["--images", "images", "--init", "star", "--steps", 1, "--out", out])[0] == 0
    monkeypatch.chdir(b)
    assert invoke(T, ["--resume", out, "--steps", 2, "--images", "../a/images"])[0] == 0
    (a / "images").rename(b / "moved")
    code, said = invoke(T, ["--resume", out, "--steps", 3])
    assert code == 2 and "are not there any more; pass --images" in said, said
    shutil.copytree(toy.concept_folder("plain_cyan_triangle"), b / "other")
    code, said = invoke(T, ["--resume", out, "--steps", 3, "--images", "other"])
    assert code == 2 and "holds other images than the run being resumed" in said, said
    assert invoke(T, ["--resume", out, "--steps", 3, "--images", "moved"])[0] == 0
    assert json.loads((out / "config.json").read_text())["config"]["images"] == str(b / "moved")


# ----------------------------------------------------------------------------------------------
# sample.py's cases, in the helpers it calls (minti/run/cli.py): a space-time word's prompts, --truncation,
# a learned word that is already a word, the black-image advice

def spacetime(kind="neti"):
    from minti.io.spacetime_files import SpaceTimeConcept

    token = "<nt>" if kind == "neti" else "<pp>"
    return SpaceTimeConcept(kind, token, ["l0"], vectors=torch.zeros(1, 1, 1, WIDTH) if kind != "neti" else None,
                            meta={"hidden": 32} if kind == "neti" else {})


@pytest.mark.parametrize("prompt, kind, phrase", [
    ("a <nt:1.5>", "neti", "K is a whole number from 1 to 32"),
    ("a <nt:-1>", "neti", "K is a whole number from 1 to 32"),
    ("a <nt:0>", "neti", "K is a whole number from 1 to 32"),
    ("a <nt:33>", "neti", "K is a whole number from 1 to 32"),
    ("a <NT:4>", "neti", "the name as its file spells it"),
    ("a <nt: 4>", "neti", "K is a whole number"),
    ("a <nt:4", "neti", "K is a whole number"),
    ("a <nt|0.5|>", "neti", "a resolution here would change nothing"),
    ("a <nt(0.5)> and <nt:4>", "neti", "a resolution here would change nothing"),
    ("a <pp|0.5|>", "per-layer", "a resolution here would change nothing"),
    ("a <pp[0.2]>", "per-layer", "a resolution here would change nothing"),
    ("a <pp:4>", "per-layer", "sets a NeTI word's truncation, but <pp> is a per-layer word"),
    ("a <ntt> on a beach", "neti", "<ntt> is not a loaded concept"),
    ("a <nt on a beach", "neti", "<nt is not closed"),
    ("a <PP> here", "per-layer", "must be written as its file spells it"),
])
def test_spacetime_words_in_prompts_are_never_dropped_silently(prompt, kind, phrase):
    with pytest.raises(cli.UsageError) as e:
        cli.check_spacetime_prompts([prompt], spacetime(kind))
    assert phrase in str(e.value) and "^" in str(e.value), str(e.value)  # a caret under the place


def test_spacetime_prompts_that_read_and_truncation_without_a_neti_word():
    cli.check_spacetime_prompts(["a <nt:16> on a beach", "a <nt> and x < y", "", "no word"], spacetime("neti"), 8)
    cli.check_spacetime_prompts(["a <pp> on a beach"], spacetime("per-layer"))
    cli.check_spacetime_prompts(["a <cat> on a beach"], None)  # ordinary words: cli.check_prompts reads them
    for concept, phrase in ((None, "no NeTI word is loaded"), (spacetime("per-layer"), "<pp> is a per-layer word")):
        with pytest.raises(cli.UsageError, match=phrase):
            cli.check_spacetime_prompts(["a photo"], concept, truncation=8)


def test_a_learned_word_that_is_already_a_word_is_refused(m):
    import minti

    star, tokenizer = m["star"], minti.load("toy").tokenizer
    with pytest.raises(cli.UsageError) as e:
        cli.check_new_words(cli.read_concepts(star, "--embeds"), tokenizer)
    assert "every 'star' in a prompt would become the learned word" in str(e.value)
    assert f"--embeds {star}:<star-word>" in str(e.value)
    cli.check_new_words(cli.read_concepts(m["same1"], "--embeds"), tokenizer)  # <same>: a new word


def test_black_image_advice_says_what_is_wrong(m, capsys):
    import minti
    from minti.io.concepts import Concept

    sd = minti.load("toy")
    images = torch.stack([torch.zeros(3, 8, 8), torch.full((3, 8, 8), float("nan"))])
    for precision, concepts, phrase in (
            ("fp16", [], "the fp16 weights overflowed"),
            ("fp32", [Concept("<wild>", torch.full((1, WIDTH), 1e4))], "<wild> (norm 8e+04"),
            ("fp32", [Concept("<tame>", torch.full((1, WIDTH), 0.5))], "no overflow of precision")):
        cli.warn_if_not_finite(images, precision, sd, concepts)
        said = capsys.readouterr().err
        assert "image(s) [1] of 2 hold NaN/Inf" in said and phrase in said, said
        assert precision != "fp32" or "--precision fp32" not in said  # not the advice it already follows
    cli.warn_if_not_finite(images[:1], "fp32", sd, [])
    assert capsys.readouterr().err == ""
