"""Shared test fixtures: the real CLIP vocabulary (from open_clip) and reference tokenizers."""
import importlib.util
import os

import pytest
import torch


def open_clip_dir():
    """Folder of the installed open_clip package, found without importing it.

    open_clip is installed without its dependencies (torchvision has no matching CPU build), so
    `import open_clip` fails; its tokenizer module and vocabulary file are used directly.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    return os.path.dirname(spec.origin)


@pytest.fixture(scope="session")
def clip_bpe_path():
    """Path of CLIP's bpe_simple_vocab_16e6.txt.gz (49,408 tokens), shipped by open-clip-torch."""
    d = open_clip_dir()
    path = d and os.path.join(d, "bpe_simple_vocab_16e6.txt.gz")
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
