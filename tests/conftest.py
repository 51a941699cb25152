"""Shared test fixtures: the real CLIP vocabulary (from open_clip) and reference tokenizers; the check,
before any test runs, that the reference implementations are installed; the CPU pinned.

The suite runs on the CPU on every machine, so that `python -m pytest` means on a GPU machine what it
means on CI (the scripts' `--device auto` would otherwise take the GPU, and their bit-for-bit checks
compare CUDA runs). GPUs are hidden from the test process and from every process it starts, unless the
run selects the GPU tests: `python -m pytest -m cuda` runs the tests marked `cuda` (tests/test_cuda.py)
with the GPUs visible; elsewhere those tests skip and say why.
"""
import gzip
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the parity tests compare minti against. A missing one fails the whole run at start: the tests
# that need it must not be skipped silently (a green run would then prove nothing).
REFERENCES = {"diffusers": "diffusers", "transformers": "transformers", "open_clip": "open-clip-torch"}


def pinned_versions():
    """{distribution: version} pinned by requirements-test.txt (open-clip-torch by README's command)."""
    with open(os.path.join(ROOT, "requirements-test.txt"), encoding="utf-8") as f:
        text = f.read()
    return dict(re.findall(r"^#?\s*([A-Za-z0-9_.-]+)==([^\s#]+)", text, flags=re.M))


def missing_references():
    """The reference packages that cannot be used, each with the reason."""
    missing = []
    for module in ("diffusers", "transformers"):
        try:
            importlib.import_module(module)
        except ImportError as e:  # not installed, or installed but broken
            missing.append(f"{module} ({type(e).__name__}: {e})")
    d = open_clip_dir()  # open_clip is never imported (see open_clip_dir): its two files must exist
    if d is None or not all(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.py", BPE_FILE)):
        missing.append(f"open_clip (its tokenizer.py and {BPE_FILE} not found)")
    return missing


def selects_cuda(markexpr):
    """Whether `-m markexpr` selects the tests marked cuda (`-m cuda`, `-m "cuda and not slow"`)."""
    from _pytest.mark.expression import Expression  # pytest's own parser of -m expressions
    return bool(markexpr) and Expression.compile(markexpr).evaluate(lambda name, **kwargs: name == "cuda")


def pin_the_cpu(config):
    """Hide the GPUs (CUDA_VISIBLE_DEVICES="", inherited by every subprocess) unless the run selects
    the cuda tests. It must happen before anything asks CUDA for its devices: CUDA reads the variable
    once, when it starts; pytest_configure runs before any test module is imported."""
    if selects_cuda(config.getoption("markexpr")):
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if torch.cuda.is_available():  # CUDA started before this hook: the variable came too late
        raise pytest.UsageError("CUDA was initialised before tests/conftest.py could hide the GPUs: "
                                "run with CUDA_VISIBLE_DEVICES= set, or select the GPU tests with -m cuda")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    pin_the_cpu(config)
    missing = missing_references()
    if missing:
        pins = pinned_versions()
        wanted = ", ".join(f"{d}=={pins.get(d, '?')}" for d in REFERENCES.values())
        raise pytest.UsageError(
            f"the parity tests need the reference implementations {wanted}; missing: {'; '.join(missing)}. "
            f"Install them with README's test command: pip install -r requirements-test.txt && "
            f"pip install --no-deps open-clip-torch=={pins.get('open-clip-torch', '?')}")


def pytest_report_header(config):
    pins = pinned_versions()
    found = []
    for dist in REFERENCES.values():
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        found.append(f"{dist} {version}" + ("" if version == pins.get(dist) else f" (pinned: {pins.get(dist)})"))
    device = ("GPUs visible (the run selects the cuda tests)" if selects_cuda(config.getoption("markexpr"))
              else "CPU (GPUs hidden; `-m cuda` runs the GPU tests)")
    return ["references: " + ", ".join(found), "device: " + device]


def pytest_runtest_setup(item):
    """A cuda-marked test needs a CUDA device that the run has not hidden."""
    if item.get_closest_marker("cuda") is None:
        return
    if not selects_cuda(item.config.getoption("markexpr")):
        pytest.skip("needs CUDA: this run pins the CPU (GPUs hidden); run it with `python -m pytest -m cuda`")
    if not torch.cuda.is_available():
        pytest.skip(f"needs CUDA: no CUDA device visible here (torch {torch.__version__})")


def open_clip_dir():
    """Folder of the installed open_clip package, found without importing it.

    open_clip is installed without its dependencies (torchvision has no matching CPU build), so
    `import open_clip` fails; its tokenizer module and vocabulary file are used directly.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    return os.path.dirname(spec.origin)


BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="session")
def clip_bpe_path():
    """Path of CLIP's bpe_simple_vocab_16e6.txt.gz (49,408 tokens), shipped by open-clip-torch."""
    d = open_clip_dir()
    path = d and os.path.join(d, BPE_FILE)
    if not path or not os.path.exists(path):
        pytest.fail("open-clip-torch is not installed: run the test command in README.md")
    return path


@pytest.fixture(scope="session")
def open_clip_tokenizer_module():
    """open_clip's tokenizer.py, loaded by file path (see open_clip_dir)."""
    d = open_clip_dir()
    if d is None:
        pytest.fail("open-clip-torch is not installed: run the test command in README.md")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", os.path.join(d, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clip_vocabulary(bpe_path):
    """(vocab {token: id}, merges [(a, b)]) from CLIP's merges file, built as openai/CLIP's
    simple_tokenizer.py builds its table, without minti: the 256 byte symbols, the same with '</w>',
    one token per merge (the first 49,152 - 256 - 2 lines after the version line), then the two
    special tokens. It is the reference's vocabulary, so it must not come from the code under test."""
    # GPT-2's byte-to-unicode table: printable Latin-1 bytes stand for themselves, the others move to
    # U+0100 and up, in byte order; the dict's order is the order of ids 0-255.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = printable + [256 + n for n in range(256 - len(printable))]
    symbols = [chr(c) for c in chars]
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@pytest.fixture(scope="session")
def clip_vocab_folder(clip_bpe_path, tmp_path_factory):
    """A tokenizer folder as SD 1.x ships it (vocab.json, merges.txt, tokenizer_config.json), written
    from CLIP's merges file by clip_vocabulary, not by minti: what the reference tokenizers read."""
    vocab, merges = clip_vocabulary(clip_bpe_path)
    folder = tmp_path_factory.mktemp("clip_vocab_independent")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    # SD 1.5's tokenizer/tokenizer_config.json, its settings as published
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the modules that run tiny models (`pytestmark = usefixtures("one_thread")`).

    Their work is far too small to split, and on a busy 2-core machine two threads that wait on each
    other made them 20-100x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
